"""finetune.py, predict.py, export.py and the torchvision converter on tiny data."""
import json
import os

import numpy as np
import paddle
import pytest

import checkpoint
import engine
import export as export_script
import finetune
import models
import predict
from helpers import checkpoint_weights, interrupt_in_epoch, make_image_folder
from models.convert import torchvision_to_paddle
from models.weights import pretrained_state

ARGS = ["--model", "resnet20", "--stem", "cifar", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--num-workers", "0", "--lr", "0.05"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Weights we make ourselves: a 10-class resnet20, saved as .pdparams."""
    paddle.seed(1)
    model = models.resnet20()
    path = str(tmp_path_factory.mktemp("w") / "resnet20.pdparams")
    state = model.state_dict()
    state = {k: v + 0.5 if k.endswith("_mean") else v for k, v in state.items()}  # non-trivial BN stats
    paddle.save(state, path)
    return path, {k: np.asarray(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def run_full(folder, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    finetune.main(ARGS + ["--data-dir", folder, "--pretrained", pretrained[0], "--strategy", "full",
                          "--output-dir", str(out)])
    return out


def trained(out):
    return checkpoint_weights(str(out / "last.pdckpt"))


def bf16_training_runs_here():
    import device as devices
    import cpu_kernels
    return cpu_kernels.load()[0] is not None and devices.cpu_bf16_units(devices.cpu_flags()) is not None


@pytest.mark.parametrize("precision", [
    pytest.param([], id="fp32"),
    pytest.param(["--amp", "--amp-dtype", "bfloat16"], id="bf16",  # frozen BN on Paddle's kernel, in fp32
                 marks=pytest.mark.skipif(not bf16_training_runs_here(), reason="needs a CPU with bf16 units")),
])
@pytest.mark.parametrize("strategy,frozen_prefixes", [
    ("head", ("conv1", "bn1", "layer1", "layer2", "layer3")),
    ("last", ("conv1", "bn1", "layer1", "layer2")),
])
def test_strategies_freeze_what_they_say(folder, pretrained, tmp_path, capfd, strategy, frozen_prefixes, precision):
    finetune.main(ARGS + precision + ["--data-dir", folder, "--pretrained", pretrained[0], "--strategy", strategy,
                                      "--output-dir", str(tmp_path)])
    log = capfd.readouterr().out
    after, before = trained(tmp_path), pretrained[1]
    model = models.resnet20(num_classes=3)
    n_fc = 64 * 3 + 3
    n_last = sum(p.size for k, p in model.named_parameters()
                 if k.startswith("layer3") and not k.endswith(("_mean", "_variance")))
    expected = n_fc if strategy == "head" else n_fc + n_last
    assert f"strategy {strategy}: {expected:,} of 269,267 parameters trainable" in log
    for k, v in after.items():
        if k.startswith(frozen_prefixes):  # weights and BN running statistics untouched
            np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not np.array_equal(after["fc.bias"], np.zeros(3))
    if strategy == "last":
        assert not np.array_equal(after["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])
        assert not np.array_equal(after["layer3.0.bn1._mean"], before["layer3.0.bn1._mean"])


@pytest.mark.parametrize("strategy,trained_prefixes", [("last", ("groups.2.", "fc.")), ("head", ("fc.",))])
def test_strategies_on_a_fast_network_train_its_last_group_and_head(strategy, trained_prefixes):
    """The fast networks hold their groups in a LayerList: --strategy last enters it and
    freezes all but the last group (it raised AttributeError: no 'stages')."""
    model = models.fast_resnet9(num_classes=5)
    trained = finetune.apply_strategy(model, strategy)
    names = {id(p): k for k, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in trained) == sorted(
        k for k, p in models.fast_resnet9(num_classes=5).named_parameters()
        if k.startswith(trained_prefixes) and not p.stop_gradient)  # BN scales stay frozen, as the network has them
    frozen_norms = [k for k, m in model.named_sublayers() if hasattr(m, "_use_global_stats") and m._use_global_stats]
    assert frozen_norms and all(not k.startswith(trained_prefixes) for k in frozen_norms)
    assert len(frozen_norms) == (5 if strategy == "last" else 8)  # the whitening one, 2 + 2 (+ the last group's 3)


def test_full_strategy_trains_everything_and_saves_classes(run_full, pretrained):
    state = checkpoint.load(str(run_full / "last.pdckpt"))
    assert state["class_names"] == ["cats", "dogs", "owls"]
    assert state["preprocess"]["crop"] == 32 and state["preprocess"]["resize"] == 37
    after = {k: np.asarray(v) for k, v in state["model"].items()}
    assert not np.array_equal(after["conv1.weight"], pretrained[1]["conv1.weight"])
    assert (run_full / "metrics.csv").exists() and (run_full / "curves.png").exists()


def test_ctrl_c_and_resume_finetune(folder, pretrained, run_full, tmp_path, monkeypatch):
    """run_full again, interrupted after 1 step and resumed: identical weights."""
    original = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(original, 0, 1))
    with pytest.raises(SystemExit):
        finetune.main(ARGS + ["--data-dir", folder, "--pretrained", pretrained[0], "--strategy", "full",
                              "--output-dir", str(tmp_path)])
    monkeypatch.setattr(engine, "train_one_epoch", original)
    finetune.main(["--resume", str(tmp_path)])
    a, b = trained(tmp_path), trained(run_full)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_torchvision_state_dict_converts_and_loads():
    paddle.seed(0)
    ours = models.resnet18()
    ours.eval()
    state = ours.state_dict()
    torch_layout = {}
    for k, v in state.items():  # the names and layouts torchvision's resnet18 uses
        v = np.asarray(v)
        if k == "fc.weight":
            v = v.T
        k = k.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        torch_layout[k] = v
        if k.endswith("running_var"):
            torch_layout[k.replace("running_var", "num_batches_tracked")] = np.array(100)
    assert "layer1.0.bn1.running_mean" in torch_layout and torch_layout["fc.weight"].shape == (1000, 512)
    converted = torchvision_to_paddle(torch_layout)
    fresh = models.resnet18()
    assert len(models.load_weights(fresh, converted)) == len(state)  # strict: nothing skipped
    fresh.eval()
    x = paddle.rand([1, 3, 64, 64])
    np.testing.assert_array_equal(fresh(x).numpy(), ours(x).numpy())


def test_imagenet_download_failure_is_one_line(monkeypatch, folder, tmp_path):
    import paddle.utils.download as download

    def offline(url, md5sum=None):
        raise RuntimeError("Download from https://paddle-hapi.bj.bcebos.com/models/resnet18.pdparams failed.")

    monkeypatch.setattr(download, "get_weights_path_from_url", offline)
    with pytest.raises(ValueError, match="could not download .*resnet18.pdparams.*--pretrained PATH/resnet18.pdparams"):
        pretrained_state("imagenet", "resnet18")
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data-dir", folder, "--depth", "18", "--pretrained", "imagenet",
                       "--output-dir", str(tmp_path)])
    assert "could not download" in str(e.value.code)


def test_wrong_pretrained_weights_are_an_error(folder, tmp_path):
    path = str(tmp_path / "r32.pdparams")
    paddle.save(models.resnet32().state_dict(), path)
    with pytest.raises(SystemExit) as e:
        finetune.main(ARGS + ["--data-dir", folder, "--pretrained", path, "--output-dir", str(tmp_path / "o")])
    assert "unexpected" in str(e.value.code) and "layer1.3" in str(e.value.code)


def test_bad_data_dir(tmp_path):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data-dir", str(tmp_path / "nope")])
    assert "no such directory" in str(e.value.code)


def test_predict_file_and_folder_with_corrupt_file(run_full, folder, tmp_path, capsys):
    results = predict.main(["--ckpt", str(run_full), os.path.join(folder, "dogs", "4.jpg"), "--topk", "2", "--json"])
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 1 and len(lines[0]["top"]) == 2 and lines[0]["file"].endswith("4.jpg")
    assert abs(sum(t["prob"] for t in lines[0]["top"]) - 1) < 1 and results[0][1][0][0] in ("cats", "dogs", "owls")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("0.png", "2.png", "3.png", "4.jpg"):  # RGB, palette, RGBA, CMYK
        (mixed / name).write_bytes(open(os.path.join(folder, "owls", name), "rb").read())
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    results = predict.main(["--ckpt", str(run_full / "best.pdckpt"), str(mixed)])
    captured = capsys.readouterr()
    assert [os.path.basename(r[0]) for r in results] == ["0.png", "2.png", "3.png", "4.jpg"]
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    with pytest.raises(SystemExit) as e:
        predict.main(["--ckpt", str(run_full), str(mixed / "broken.jpg")])
    assert str(e.value.code).startswith("error: cannot read image")


def test_export_and_inference_model_agree_with_checkpoint(run_full, folder, tmp_path, capsys):
    import predictors
    out = tmp_path / "exported"
    export_script.main(["--ckpt", str(run_full), "--output", str(out)])
    files = predictors.list_images(folder)
    ckpt = predictors.CheckpointPredictor(checkpoint.resolve(str(run_full)), "cpu")
    infer = predictors.InferenceModelPredictor(str(out), "cpu")
    assert infer.class_names == ckpt.class_names
    a = list(predict.predict_files(ckpt, files, topk=3, batch_size=7))
    b = list(predict.predict_files(infer, files, topk=3, batch_size=7))
    assert len(a) == len(files) == 24
    assert [x[1][0][0] for x in a] == [x[1][0][0] for x in b]  # same top-1
    np.testing.assert_allclose([x[1][0][1] for x in a], [x[1][0][1] for x in b], atol=1e-4)
    capsys.readouterr()
    predict.main(["--inference-model", str(out), files[0]])
    assert capsys.readouterr().out.startswith(files[0] + ": ")


def test_inference_leaves_the_process_its_threads(run_full, folder, tmp_path):
    """paddle.inference sets the calling thread to one OpenMP thread after every run; the
    predictor gives the count back, or training after it in a notebook runs on one core."""
    import ctypes
    import predictors
    iomp = os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")
    if not os.path.isfile(iomp):
        pytest.skip("this Paddle build ships no libiomp5")
    before = ctypes.CDLL(iomp).omp_get_max_threads()
    out = tmp_path / "exported"
    export_script.main(["--ckpt", str(run_full), "--output", str(out)])
    infer = predictors.InferenceModelPredictor(str(out), "cpu", threads=before + 1)
    try:
        assert len(list(predict.predict_files(infer, predictors.list_images(folder)[:2], topk=1, batch_size=2))) == 2
        assert ctypes.CDLL(iomp).omp_get_max_threads() == before + 1
    finally:  # the tests after this one run on the count they had
        paddle.base.core.set_num_threads(before)


def test_pth_file_converts_through_the_cli(tmp_path):
    """A real torch.save'd .pth (needs torch; skipped where it is not installed)."""
    torch = pytest.importorskip("torch")
    from models.convert import main as convert_main
    paddle.seed(0)
    ours = models.resnet18(num_classes=7)
    ours.eval()
    state = {}
    for k, v in ours.state_dict().items():
        v = np.asarray(v)
        state[k.replace("._mean", ".running_mean").replace("._variance", ".running_var")] = \
            torch.from_numpy(np.ascontiguousarray(v.T if k == "fc.weight" else v))
    state["bn1.num_batches_tracked"] = torch.tensor(5)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "r18.pth")
    convert_main([str(tmp_path / "r18.pth"), str(tmp_path / "r18.pdparams")])
    fresh = models.resnet18(num_classes=7)
    models.load_weights(fresh, paddle.load(str(tmp_path / "r18.pdparams")))
    fresh.eval()
    x = paddle.rand([1, 3, 64, 64])
    np.testing.assert_allclose(fresh(x).numpy(), ours(x).numpy(), rtol=1e-6, atol=1e-6)
    assert len(pretrained_state(str(tmp_path / "r18.pth"), "resnet18")) == len(ours.state_dict())


def test_eval_of_a_finetuning_run_uses_its_own_folder(run_full, folder, capsys):
    import eval as eval_script
    result = eval_script.main(["--ckpt", str(run_full / "last.pdckpt"), "--num-workers", "0", "--json"])
    assert result["split"] == "val" and result["n"] == 6  # 3 classes x round(0.2 x 8)
    history = checkpoint.load(str(run_full / "last.pdckpt"))["history"]
    assert result["top1"] == pytest.approx(history[-1]["val_acc"])
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", str(run_full), "--split", "test"])
    assert str(e.value.code).startswith("error: an image-folder run has no test split")


def test_corrupt_export_meta_is_one_line(run_full, tmp_path):
    out = tmp_path / "exported"
    export_script.main(["--ckpt", str(run_full), "--output", str(out)])
    recorded = json.load(open(out / "meta.json"))["checkpoint"]  # from the export, no home directory in it
    assert not os.path.isabs(recorded) and os.path.samefile(out / recorded, run_full / "best.pdckpt")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        predict.main(["--inference-model", str(out), str(out / "meta.json")])
    assert str(e.value.code).startswith("error: --inference-model") and "meta.json is unreadable" in str(e.value.code)


def test_the_device_is_chosen_before_the_model_is_built(tmp_path, monkeypatch):
    """GPU audit 2, N1: on a GPU build the default place is GPU 0, so a model built before
    select_device keeps its weights there even with --device cpu (reproduced as the order)."""
    import checkpoint
    import device as devices
    calls = []
    real_select, real_build = devices.select_device, checkpoint.build_model
    monkeypatch.setattr(devices, "select_device", lambda name: calls.append("select_device") or real_select(name))
    monkeypatch.setattr(checkpoint, "build_model", lambda *a: calls.append("build_model") or real_build(*a))
    folder = make_image_folder(tmp_path / "imgs")
    finetune.main(["--model", "resnet20", "--stem", "cifar", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                   "--num-workers", "0", "--pretrained", "none", "--device", "cpu", "--data-dir", folder,
                   "--output-dir", str(tmp_path / "run")])
    assert calls.index("select_device") < calls.index("build_model")
