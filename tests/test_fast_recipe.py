"""The fast recipe (configs/fast94.yaml): its network (models/fast_resnet.py), the pieces
the recipe adds to training (the one-cycle schedule, the BatchNorm shifts' learning rate,
weight averaging, alternating flips, test-time augmentation), and a run of it end to
end, stopped and resumed to the bit."""
import csv
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import yaml

import checkpoint
import config
import data
import engine
import lookahead
import models
import train_cifar10
import tta
from helpers import checkpoint_weights, interrupt_in_epoch, kernel_independent, make_cifar_archive, once_with_the_operators

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "fast94.yaml")
TINY = ["--config", RECIPE, "--epochs", "2", "--batch-size", "32", "--val-size", "40", "--log-every", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz", n_train=200, n_test=60)


# ---------------------------------------------------------------------------- the network
def count(model, trainable=None):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if trainable is None or p.stop_gradient != trainable)


def test_the_network_has_airbench94s_shape_and_counts():
    model = models.fast_resnet()
    # convs 3x24x2x2, then 3x3 24x64, 64x64, 64x256, 256x256 x 3; fc 256x10; 1176 BN channels (24 + 64 x 2 +
    # 256 x 4) of scale, shift and (Paddle's parameters too) running mean and variance
    assert count(model) == 288 + 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256) + 2560 + 4 * 1176 == 1_975_168
    assert count(model, trainable=True) == count(model) - 288 - 3 * 1176 == 1_971_352  # whitening, BN scales frozen
    assert model(paddle.rand([2, 3, 32, 32])).shape == [2, 10]
    assert sum(isinstance(m, models.ResidualJoin) for m in model.sublayers()) == 3
    assert not any(isinstance(m, models.ResidualJoin) for m in models.fast_plain().sublayers())
    assert list(models.fast_plain().state_dict()) == list(model.state_dict())  # the same weights, no join
    assert "fast_resnet" in models.MODELS and "fast_resnet" in models.CIFAR_ONLY
    with pytest.raises(ValueError, match="drop zero_init_residual"):
        models.fast_resnet(zero_init_residual=True)


def test_the_small_network_has_128_channels_in_its_last_two_groups():
    model = models.fast_resnet_small()
    # 3x3 convs 24x64, 64x64, 64x128, 128x128 x 3; fc 128x10; BN channels 24 + 64 x 2 + 128 x 4 = 664
    trainable = 9 * (24 * 64 + 64 * 64 + 64 * 128 + 3 * 128 * 128) + 1280 + 664
    assert count(model, trainable=True) == trainable == 568_728
    assert model(paddle.rand([2, 3, 32, 32])).shape == [2, 10]
    assert sum(isinstance(m, models.ResidualJoin) for m in model.sublayers()) == 3
    assert "fast_resnet_small" in models.CIFAR_ONLY and "fast_resnet_small" in models.registry.FROZEN_SCALE
    from models.summary import summary
    macs = summary(model, 32, print_fn=None)["macs"]
    assert macs == 24 * 12 * 31 * 31 + 9 * (64 * 24 * 31 * 31 + 64 * 64 * 15 * 15 + 128 * 64 * 15 * 15
                                            + 128 * 128 * (7 * 7 * 2 + 3 * 3)) + 1280
    assert round(macs / summary(models.fast_resnet(), 32, print_fn=None)["macs"], 2) == 0.46


def test_its_flops_are_airbench94s():
    from models.summary import summary
    # airbench94's 236 MFLOP forward (FAST-CIFAR.md): 2 x the multiply-adds of the convs and the classifier
    macs = summary(models.fast_resnet(), 32, print_fn=None)["macs"]
    assert macs == 24 * 12 * 31 * 31 + 9 * (64 * 24 * 31 * 31 + 64 * 64 * 15 * 15 + 256 * 64 * 15 * 15
                                            + 256 * 256 * (7 * 7 * 2 + 3 * 3)) + 2560
    assert round(2 * macs / 1e6) == 236


def is_dirac(conv):
    w = conv.weight.numpy()
    n = min(w.shape[:2])
    identity = np.zeros_like(w[:n])
    identity[np.arange(n), np.arange(n), 1, 1] = 1
    return np.array_equal(w[:n], identity)


def test_fast_resnet9_adds_a_convolution_inside_the_last_shortcut():
    model = models.fast_resnet9()
    # fast_resnet's weights and one more 256x256 3x3 conv with its BN shift
    assert count(model, trainable=True) == 1_971_352 + 9 * 256 * 256 + 256 == 2_561_432
    assert [hasattr(g, "conv3") for g in model.groups] == [False, False, True]
    assert list(models.fast_resnet().state_dict()) == [k for k in model.state_dict() if ".conv3." not in k
                                                       and ".bn3." not in k]
    # the branches start from PyTorch's default, the convolutions before them from the identity
    assert [is_dirac(g.conv1) for g in model.groups] == [True] * 3
    assert [is_dirac(g.conv2) for g in model.groups] == [False] * 3
    assert is_dirac(model.groups[2].conv3) and all(is_dirac(g.conv2) for g in models.fast_resnet().groups)
    bound = 1 / np.sqrt(9 * 64)
    assert 0.99 * bound < np.abs(model.groups[0].conv2.weight.numpy()).max() <= bound
    assert model.scale == 1 / 13 and models.fast_resnet().scale == 1 / 9
    assert sum(isinstance(m, models.ResidualJoin) for m in model.sublayers()) == 3
    assert model(paddle.rand([2, 3, 32, 32])).shape == [2, 10]
    assert "fast_resnet9" in models.CIFAR_ONLY and "fast_resnet9" in models.registry.FROZEN_SCALE
    from models.summary import summary
    macs = summary(model, 32, print_fn=None)["macs"]
    assert macs == summary(models.fast_resnet(), 32, print_fn=None)["macs"] + 256 * 256 * 9 * 3 * 3 == 123_455_776
    with pytest.raises(ValueError, match="branch_convs must be 1 or 2"):
        models.FastResNet(branch_convs=(1, 1, 3))
    with pytest.raises(ValueError, match="one count per group: 3 widths"):
        models.FastResNet(branch_convs=(1, 2))  # zip would have built two groups


def test_fast_plain9_is_fast_resnet9_without_its_shortcuts():
    paddle.seed(0)
    residual = models.fast_resnet9()
    paddle.seed(0)
    plain = models.fast_plain9()
    assert not any(isinstance(m, models.ResidualJoin) for m in plain.sublayers())
    # the same weights, drawn alike: the joins have none
    for (name, a), (other, b) in zip(residual.state_dict().items(), plain.state_dict().items(), strict=True):
        assert name == other
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert plain.scale == 1 / 13
    assert "fast_plain9" in models.CIFAR_ONLY and "fast_plain9" in models.registry.FROZEN_SCALE
    from models.summary import summary
    assert summary(plain, 32, print_fn=None)["macs"] == 123_455_776  # fast_resnet9's: a join is no multiply-add
    # the last group is pooled -> conv2 -> conv3, and nothing added
    plain.eval()
    group, x = plain.groups[2], paddle.rand([2, 256, 7, 7])
    pooled = group.bn1(group.pool(group.conv1(x)))
    np.testing.assert_allclose(group(x).numpy(), group.bn3(group.conv3(group.bn2(group.conv2(pooled)))).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_fast_resnet9s_third_convolution_is_inside_the_shortcut():
    """Its last group is pooled -> conv2 -> conv3, plus the pooled input."""
    paddle.seed(0)
    model = models.fast_resnet9()
    model.eval()
    group, x = model.groups[2], paddle.rand([2, 256, 7, 7])
    pooled = group.bn1(group.pool(group.conv1(x)))
    want = group.bn3(group.conv3(group.bn2(group.conv2(pooled)))) + pooled
    np.testing.assert_allclose(group(x).numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_the_whitening_layer_whitens_the_patches_it_was_set_from():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    images[:, 1] += 0.8 * images[:, 0]  # correlated channels and neighbours
    images[:, :, :, 1:] += 0.5 * images[:, :, :, :-1]
    model = models.fast_resnet()
    model.init_whitening(images, eps=0)
    out = F.conv2d(paddle.to_tensor(images), model.conv1.weight).numpy()  # [64, 24, 31, 31]
    first = out[:, :12].transpose(1, 0, 2, 3).reshape(12, -1)
    np.testing.assert_allclose(first @ first.T / first.shape[1], np.eye(12), atol=1e-3)
    np.testing.assert_array_equal(out[:, 12:], -out[:, :12])
    assert model.conv1.weight.stop_gradient


def test_whitening_reads_airbench_s_number_of_patches_at_any_image_size():
    assert engine.whitening_images(32) == 5000  # airbench's 5,000 CIFAR images, as every run so far
    assert engine.whitening_images(224) == 96  # 96 x 223 x 223 patches, about 5,000 x 31 x 31
    assert engine.whitening_images(1024) == 4  # --image-size's largest


def test_the_convolutions_start_as_identities_on_their_first_channels():
    model = models.fast_resnet()
    x = paddle.rand([2, 64, 15, 15])
    conv = model.groups[0].conv2  # 64 -> 64: all of it
    np.testing.assert_allclose(conv(x).numpy(), x.numpy(), atol=1e-6)
    wide = model.groups[1].conv1  # 64 -> 256: the first 64 filters pass x, the rest are random
    y = wide(x).numpy()
    np.testing.assert_allclose(y[:, :64], x.numpy(), atol=1e-6)
    bound = 1 / np.sqrt(64 * 9)
    w = wide.weight.numpy()[64:]
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound  # PyTorch's default uniform


def test_a_frozen_scale_leaves_the_shift_its_gradient_on_paddles_kernel():
    """Paddle's batch_norm gives the shift no gradient when the scale needs none; the layer
    applies them after the normalisation then, with the same outputs."""
    norm = models.BatchNormAct2D(4, act="gelu")
    x = paddle.rand([3, 4, 5, 5]) * 3
    y_free = norm(x).numpy()
    norm.weight.stop_gradient = True
    x.stop_gradient = False
    y = norm(x)
    np.testing.assert_allclose(y.numpy(), y_free, rtol=1e-5, atol=1e-6)
    g = paddle.rand(y.shape)
    (y * g).sum().backward()
    z = F.batch_norm(x.detach(), paddle.zeros([4]), paddle.ones([4]), training=True)
    z.stop_gradient = False
    want = paddle.grad([F.gelu(z)], [z], [g])[0].sum(axis=[0, 2, 3])
    np.testing.assert_allclose(norm.bias.grad.numpy(), want.numpy(), rtol=1e-5)


# ------------------------------------------------------------------- what training adds
def recipe(**overrides):
    values = dict(config.load_yaml(RECIPE), **overrides)
    return config.make_config(values)


def test_the_one_cycle_schedule_is_airbenchs():
    cfg = recipe()
    _, sched = engine.build_optimizer(cfg, [paddle.create_parameter([1], "float32")], 10)  # 100 iterations
    lrs = []
    for _ in range(100):
        lrs.append(sched())
        sched.step()
    assert lrs[0] == pytest.approx(0.2 * 1.5) and max(lrs) == pytest.approx(1.5, rel=1e-3)
    assert int(np.argmax(lrs)) in (22, 23) and lrs[-1] == pytest.approx(0.07 * 1.5)
    assert np.all(np.diff(lrs[:22]) > 0) and np.all(np.diff(lrs[24:]) < 0)


def test_the_norm_shifts_take_their_own_lr_and_a_weight_decay_of_the_same_pull():
    cfg = recipe()
    model = models.fast_resnet()
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    groups = engine.parameter_groups(model, trainable, cfg)
    shifts = {id(m.bias) for m in model.sublayers() if isinstance(m, paddle.nn.BatchNorm2D)}
    assert [len(g["params"]) for g in groups] == [len(trainable) - 7, 7]
    assert {id(p) for p in groups[1]["params"]} == shifts
    assert groups[1]["learning_rate"] == 64 and groups[1]["weight_decay"] == pytest.approx(1.33e-3 / 64)
    assert engine.parameter_groups(model, trainable, recipe(norm_shift_lr=1.0)) is trainable


def test_lookahead_moves_to_the_average_every_fifth_step_and_ends_on_it():
    layer = paddle.nn.Linear(2, 1)
    averaging = lookahead.Lookahead(layer, decay=0.9, total=12)
    start, walk = layer.weight.numpy().copy(), []
    for it in range(1, 13):
        layer.weight.set_value(layer.weight.numpy() + 1.0)  # an optimizer step
        walk.append(layer.weight.numpy().copy())
        averaging.step(it)
    # by hand: at 5 the average moves toward start + 5; the weights take it; at 10 again; at 12 they take it
    a5 = start + (1 - 0.9 ** 5 * (5 / 12) ** 3) * 5.0
    a10 = a5 + (1 - 0.9 ** 5 * (10 / 12) ** 3) * (a5 + 5.0 - a5)
    np.testing.assert_allclose(layer.weight.numpy(), a10, rtol=1e-6)
    np.testing.assert_allclose(averaging.state_dict()["weight"], a10, rtol=1e-6)
    restored = lookahead.Lookahead(paddle.nn.Linear(2, 1), decay=0.9, total=12)
    restored.set_state_dict(averaging.state_dict())
    np.testing.assert_array_equal(restored.state_dict()["weight"], averaging.state_dict()["weight"])


def test_test_time_augmentation_averages_its_views():
    paddle.seed(0)
    model = models.resnet20()
    model.eval()
    x = paddle.rand([2, 3, 32, 32])
    assert tta.with_tta(model, "none") is model
    mirrored = 0.5 * model(x) + 0.5 * model(x.flip([3]))
    np.testing.assert_allclose(tta.with_tta(model, "flip")(x).numpy(), mirrored.numpy(), rtol=1e-5, atol=1e-6)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [paddle.to_tensor(padded[:, :, :32, :32]), paddle.to_tensor(padded[:, :, 2:, 2:])]
    want = 0.5 * mirrored + sum(0.25 * (0.5 * model(v) + 0.5 * model(v.flip([3]))) for v in views)
    np.testing.assert_allclose(tta.with_tta(model, "flip_translate")(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_translate_flip_moves_two_pixels_at_most_and_alternates_each_images_flip(archive):
    cfg = recipe(data_file=archive, val_size=40)
    split = data.load(cfg).splits["train"]
    loader = data.DeviceCifarLoader(split, "translate_flip", seed=3, mean_std=data.statistics("cifar10"))
    dy0, dx0, flip0 = loader.draws(0)
    _, _, flip1 = loader.draws(1)
    _, _, flip2 = loader.draws(2)
    assert set(dy0) | set(dx0) <= set(range(5)) and len(set(dy0)) == 5
    np.testing.assert_array_equal(flip1, ~flip0)
    np.testing.assert_array_equal(flip2, flip0)
    assert 0.3 < flip0.mean() < 0.7
    idx = np.arange(4)
    dy, dx = np.full(4, 2), np.array([0, 4, 2, 2])  # centred; moved left and right by 2
    x, _ = loader.batch(idx, dy, dx, np.zeros(4, np.uint8))  # on the CPU: NumPy arrays (host_batch)
    plain = np.stack([np.asarray(split.base[i][0], np.float32).transpose(2, 0, 1) for i in split.indices[:4]])
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) * 255 for v in data.statistics("cifar10"))
    got = x.numpy() * std + mean
    np.testing.assert_allclose(got[2], plain[2], atol=1e-3)
    np.testing.assert_allclose(got[0][:, :, 2:], plain[0][:, :, :30], atol=1e-3)  # moved right: reflected edge
    np.testing.assert_allclose(got[0][:, :, 0], plain[0][:, :, 2], atol=1e-3)


def test_translate_flip_without_the_device_loader_is_one_line(archive, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(tmp_path), "--loader", "dataloader"])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "add --loader device" in message and "\n" not in message


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def straight_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(out)])
    return out


def test_the_recipe_trains_and_reports_with_its_test_time_augmentation(straight_run, capsys):
    results = yaml.safe_load(open(straight_run / "results.yaml"))
    assert results["model"] == "fast_resnet" and results["tta"] == "flip_translate"
    state = checkpoint.load(str(straight_run / "last.pdckpt"))
    assert set(state["lookahead"]) == {k for k, v in state["model"].items() if np.asarray(v).dtype == np.float32}
    for k, v in state["lookahead"].items():  # the run ends on the average
        np.testing.assert_array_equal(np.asarray(v), np.asarray(state["model"][k]), err_msg=k)
    rows = list(csv.DictReader(open(straight_run / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [5, 10]


@kernel_independent  # the recipe's state and the resume: the suites with the operators run them
@pytest.mark.parametrize("stop_step", [0, pytest.param(2, marks=once_with_the_operators)])  # at the epoch boundary,
# and between two averaging steps (the Paddle 3 suite: the step is Paddle 2.6's at the boundary too)
def test_a_stopped_run_resumes_to_the_bit(archive, straight_run, tmp_path, monkeypatch, capsys, stop_step):
    original = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(original, 1, stop_step))
    with pytest.raises(SystemExit):
        train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(tmp_path)])
    monkeypatch.setattr(engine, "train_one_epoch", original)
    train_cifar10.main(["--resume", str(tmp_path)])
    resumed = checkpoint_weights(str(tmp_path / "last.pdckpt"))
    straight = checkpoint_weights(str(straight_run / "last.pdckpt"))
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    assert yaml.safe_load(open(tmp_path / "results.yaml"))["final_test_acc"] == \
        yaml.safe_load(open(straight_run / "results.yaml"))["final_test_acc"]
