"""The Muon recipe (configs/fast94_muon.yaml): muon.py's step against a NumPy transcription
of airbench94_muon's, its parameter groups, the straight-down schedule, a refused AMP O2,
and a run of the recipe stopped and resumed to the bit."""
import os

import numpy as np
import paddle
import pytest
import yaml

import checkpoint
import config
import engine
import models
import muon
import train_cifar10
from errors import UserError
from helpers import interrupt_in_epoch, kernel_independent, make_cifar_archive

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "fast94_muon.yaml")
TINY = ["--config", RECIPE, "--epochs", "2", "--batch-size", "32", "--val-size", "40", "--log-every", "2"]


def recipe(**overrides):
    return config.make_config(dict(config.load_yaml(RECIPE), **overrides))


def test_the_residual_recipe_is_the_muon_recipe_on_fast_resnet9_for_10_epochs():
    residual = config.load_yaml(os.path.join(os.path.dirname(RECIPE), "fast94_resnet9.yaml"))
    assert residual == dict(config.load_yaml(RECIPE), model="fast_resnet9", epochs=10)


# ------------------------------------------------------------------------- the step
def orthogonalize_numpy(g, steps=3, eps=1e-7):
    """airbench94_muon.py's zeropower_via_newtonschulz5, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (np.linalg.norm(g) + eps)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(64, 216), (300, 40)])  # wide, as every filter here; tall, transposed
def test_orthogonalize_keeps_the_singular_vectors_and_brings_the_values_near_one(shape):
    rng, n = np.random.default_rng(0), min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], n)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], n)))
    g = u @ np.diag(np.logspace(0, -1, n)) @ v.T  # singular values spread over 10x
    x = muon.orthogonalize(paddle.to_tensor(g.astype(np.float32))).numpy()
    np.testing.assert_allclose(x, orthogonalize_numpy(g), atol=2e-5)
    inner = u.T @ x @ v  # diagonal: x = U diag(s') V^T, the same singular vectors
    np.testing.assert_allclose(inner - np.diag(np.diag(inner)), 0, atol=1e-4)
    assert 0.6 < np.diag(inner).min() and np.diag(inner).max() < 1.25  # about 1, not converged (airbench)


def test_a_filter_takes_airbench_muons_step_and_the_rest_momentums():
    paddle.seed(0)
    conv, fc = paddle.nn.Conv2D(4, 6, 3, bias_attr=False), paddle.nn.Linear(8, 3, bias_attr=False)
    w0, f0 = conv.weight.numpy().astype(np.float64), fc.weight.numpy().astype(np.float64)
    sched = paddle.optimizer.lr.LambdaDecay(0.5, lambda it: 1 - it / 4)
    opt = muon.Muon(learning_rate=sched, momentum=0.85, use_nesterov=True, weight_decay=0.01, parameters=[
        dict(params=[fc.weight]),
        dict(params=[conv.weight], learning_rate=0.24 / 0.5, momentum=0.6, weight_decay=0.0, orthogonalize=True)])
    rng = np.random.default_rng(1)
    w, v, f, vf = w0, np.zeros_like(w0), f0, np.zeros_like(f0)
    for it in range(3):
        gw, gf = rng.standard_normal(w0.shape), rng.standard_normal(f0.shape)
        conv.weight.grad = paddle.to_tensor(gw.astype(np.float32))  # what backward() would leave
        fc.weight.grad = paddle.to_tensor(gf.astype(np.float32))
        opt.step()
        opt.clear_grad()
        sched.step()
        lr = 0.5 * (1 - it / 4)
        v = 0.6 * v + gw  # airbench94_muon's Muon.step
        w = w * np.sqrt(6) / np.linalg.norm(w)
        w = w - 0.24 / 0.5 * lr * orthogonalize_numpy((gw + 0.6 * v).reshape(6, -1)).reshape(w.shape)
        vf = 0.85 * vf + gf + 0.01 * f  # Paddle's (and PyTorch's) Nesterov SGD with L2
        f = f - lr * (gf + 0.01 * f + 0.85 * vf)
        np.testing.assert_allclose(conv.weight.numpy(), w, atol=2e-6)
        np.testing.assert_allclose(fc.weight.numpy(), f, atol=2e-6)
    assert np.linalg.norm(conv.weight.numpy()) == pytest.approx(np.sqrt(6), rel=0.02)  # held near sqrt(out)


# -------------------------------------------------------------------- the recipe's parts
def test_the_filters_take_muon_and_the_shifts_and_the_head_sgd():
    cfg = recipe()
    model = models.fast_resnet()
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    head, shifts, filters = engine.parameter_groups(model, trainable, cfg)
    assert [p.name for p in head["params"]] == [model.fc.weight.name]
    assert len(shifts["params"]) == 7 and shifts["learning_rate"] == 64
    assert shifts["weight_decay"] == pytest.approx(2.42e-3 / 64)
    assert len(filters["params"]) == 6 and all(len(p.shape) == 4 for p in filters["params"])  # not the whitening
    assert filters["orthogonalize"] and filters["weight_decay"] == 0.0 and filters["momentum"] == 0.6
    with pytest.raises(ValueError, match="parameter_groups"):  # a plain list would give every filter SGD's step
        engine.build_optimizer(cfg, trainable, 10)
    opt, sched = engine.build_optimizer(cfg, [head, shifts, filters], 10)  # 80 iterations
    assert isinstance(opt, muon.Muon)
    lrs = []
    for _ in range(80):
        lrs.append(sched())
        sched.step()
    np.testing.assert_allclose(lrs, 1.66 * (1 - np.arange(80) / 80), rtol=1e-6)  # straight down, no warm-up


def test_muon_with_amp_o2_is_refused_in_one_line():
    with pytest.raises(UserError, match="use --amp-level O1"):
        config.check_limits(recipe(amp=True, amp_level="O2"))


# --------------------------------------------------------------------- a run, end to end
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz", n_train=200, n_test=60)


@pytest.fixture(scope="module")
def straight_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("muon")
    train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(out)])
    return out


@kernel_independent  # Muon's state and the resume: the suites with the operators run them
def test_a_stopped_muon_run_resumes_to_the_bit(archive, straight_run, tmp_path, monkeypatch):
    original = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(original, 1, 2))
    with pytest.raises(SystemExit):
        train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(tmp_path)])
    monkeypatch.setattr(engine, "train_one_epoch", original)
    train_cifar10.main(["--resume", str(tmp_path)])
    resumed, straight = checkpoint.load(str(tmp_path / "last.pdckpt")), checkpoint.load(str(straight_run / "last.pdckpt"))
    assert any(k.endswith("velocity_0") and "groups" in k for k in straight["optimizer"])  # the filters' momentum
    for k, v in straight["model"].items():
        np.testing.assert_array_equal(np.asarray(resumed["model"][k]), np.asarray(v), err_msg=k)
    assert yaml.safe_load(open(tmp_path / "results.yaml"))["final_test_acc"] == \
        yaml.safe_load(open(straight_run / "results.yaml"))["final_test_acc"]
