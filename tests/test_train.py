"""train_cifar10.py and eval.py end to end, on tiny archives the tests build."""
import csv
import json
import os
import re

import numpy as np
import paddle
import pytest
import yaml

import checkpoint
import config
import device as devices
import engine
import errors
import progress
import eval as eval_script
import train_cifar10
from helpers import (checkpoint_of, checkpoint_weights, interrupt_in_epoch, kernel_independent, make_cifar_archive,
                     once_with_the_operators)

FAST = ["--model", "resnet20", "--epochs", "2", "--batch-size", "40", "--val-size", "40",
        "--num-workers", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz", n_train=200, n_test=60)


@pytest.fixture(scope="module")
def straight_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train_cifar10.main(FAST + ["--data-file", archive, "--output-dir", str(out)])
    return out


def test_two_epoch_run_writes_every_output(straight_run, capsys):
    out = straight_run
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pdckpt", "best.pdckpt", "results.yaml"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert int(rows[-1]["iteration"]) == 8  # 160 training images / 40
    cfg = yaml.safe_load(open(out / "config.yaml"))
    assert cfg["model"] == "resnet20" and cfg["epochs"] == 2
    state = checkpoint.load(str(out / "last.pdckpt"))
    assert state["epoch"] == 2 and state["config"]["model"] == "resnet20"
    assert {"model", "optimizer", "scheduler", "rng", "best", "history"} <= set(state)
    best = checkpoint.load(str(out / "best.pdckpt"))
    assert best["best"]["val_acc"] == max(float(r["val_acc"]) for r in rows)
    results = yaml.safe_load(open(out / "results.yaml"))
    assert set(results) >= {"final_test_acc", "best_test_acc", "best_epoch"}


def test_best_is_the_last_file_of_its_epoch_not_a_second_save(straight_run):
    best, last = straight_run / "best.pdckpt", straight_run / "last.pdckpt"
    state = checkpoint.load(str(best))
    assert state["epoch"] == 2  # on this data the last epoch improved: best is the same file (a hard link)
    assert os.stat(best).st_ino == os.stat(last).st_ino
    assert not list(straight_run.glob("*.tmp"))
    results = yaml.safe_load(open(straight_run / "results.yaml"))
    assert results["paddle_version"] == paddle.__version__ and results["seed"] == 0
    assert "cores" in results["device"] and results["command"]


def test_progress_lines_have_no_carriage_returns(archive, tmp_path, capfd):
    train_cifar10.main(FAST + ["--epochs", "1", "--data-file", archive, "--output-dir", str(tmp_path)])
    out = capfd.readouterr().out
    assert "\r" not in out
    assert "img/s eta" in out and "step 4/4" in out
    assert "epoch 1/1 done in" in out and "val acc" in out and "run eta" in out
    assert "best model (epoch 1, chosen on val acc" in out


@pytest.mark.parametrize("stop_step", [0, pytest.param(2, marks=once_with_the_operators)])  # at the epoch boundary,
# and inside epoch 2 (the Paddle 3 suite: the same resume as at the boundary, on Paddle 2.6)
def test_ctrl_c_and_resume_give_identical_weights(archive, straight_run, tmp_path, monkeypatch, capsys, stop_step):
    original = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(original, 1, stop_step))
    with pytest.raises(SystemExit) as exit_info:
        train_cifar10.main(FAST + ["--data-file", archive, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 130
    state = checkpoint.load(str(tmp_path / "last.pdckpt"))
    assert state["epoch"] == 1
    assert (state["progress"] or {"step": 0})["step"] == stop_step
    monkeypatch.setattr(engine, "train_one_epoch", original)
    capsys.readouterr()
    train_cifar10.main(["--resume", str(tmp_path)])
    assert re.search(r"training done in \S+ \(this session; its \d+ epochs took \S+ in all\)", capsys.readouterr().out)
    resumed = checkpoint_weights(str(tmp_path / "last.pdckpt"))
    straight = checkpoint_weights(str(straight_run / "last.pdckpt"))
    assert resumed.keys() == straight.keys()
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    assert open(tmp_path / "metrics.csv").read().splitlines()[1:] != []
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    straight_rows = list(csv.DictReader(open(straight_run / "metrics.csv")))
    assert [(r["train_loss"], r["val_acc"]) for r in rows] == [(r["train_loss"], r["val_acc"]) for r in straight_rows]


@kernel_independent
def test_workers_do_not_change_the_run(archive, straight_run, tmp_path):
    args = [a if a != "0" else "2" for a in FAST]  # --num-workers 2
    train_cifar10.main(args + ["--data-file", archive, "--output-dir", str(tmp_path), "--epochs", "2"])
    a = checkpoint_weights(str(tmp_path / "last.pdckpt"))
    b = checkpoint_weights(str(straight_run / "last.pdckpt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_eval_reproduces_logged_val_accuracy(straight_run, capsys):
    rows = list(csv.DictReader(open(straight_run / "metrics.csv")))
    result = eval_script.main(["--ckpt", str(straight_run / "last.pdckpt"), "--split", "val", "--json",
                               "--num-workers", "0"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 40 and result["top1"] == line["top1"]
    assert line["top1"] == pytest.approx(float(rows[-1]["val_acc"]), abs=1e-12)
    assert line["loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
    assert len(line["confusion"]) == 10 and sum(map(sum, line["confusion"])) == 40
    assert os.path.exists(line["confusion_png"])
    test = eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0"])  # directory: its best
    results = yaml.safe_load(open(straight_run / "results.yaml"))
    assert test["n"] == 60 and test["top1"] == pytest.approx(results["best_test_acc"])


def test_eval_runs_on_our_cpu_kernels_where_they_build(straight_run, monkeypatch):
    """As training evaluates (fp32 on cpu_kernels/): Paddle's CPU kernels ran a fast-recipe
    network at 12 img/s where ours ran 147."""
    import cpu_kernels
    calls, use_in = [], cpu_kernels.use_in
    monkeypatch.setattr(cpu_kernels, "use_in", lambda model, **kw: calls.append(kw) or use_in(model, **kw))
    eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0", "--json"])
    built = cpu_kernels.load()[0] is not None
    assert calls == ([dict(dtype="float32", bf16_eval=False)] if built else [])


def run_error(fn, argv, capsys):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code not in (0, None)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_config_key_and_type(archive, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nbatchsize: 64\n")
    msg = run_error(train_cifar10.main, ["--config", str(bad), "--data-file", archive], capsys)
    assert "batchsize" in msg and "valid keys: " in msg and "batch_size" in msg
    bad.write_text("epochs: many\n")
    msg = run_error(train_cifar10.main, ["--config", str(bad)], capsys)
    assert "'epochs' must be int" in msg
    msg = run_error(train_cifar10.main, ["--lr", "fast"], capsys)
    assert "'lr' must be float" in msg


def test_bad_data_paths(archive, tmp_path, capsys):
    msg = run_error(train_cifar10.main, ["--data-file", str(tmp_path / "missing.tar.gz")], capsys)
    assert "no such file" in msg
    msg = run_error(train_cifar10.main, ["--data-file", str(tmp_path)], capsys)
    assert "is a directory" in msg
    notar = tmp_path / "x.tar.gz"
    notar.write_bytes(b"not an archive")
    assert "not a tar archive" in run_error(train_cifar10.main, ["--data-file", str(notar)], capsys)


def test_a_checkpoint_of_another_numpy_major_says_so(straight_run, monkeypatch, capsys):
    def numpy2_pickle(*args, **kwargs):  # what numpy 1 says to a numpy 2 pickle's arrays
        raise ModuleNotFoundError("No module named 'numpy._core'", name="numpy._core")

    monkeypatch.setattr(checkpoint.paddle, "load", numpy2_pickle)
    msg = run_error(eval_script.main, ["--ckpt", str(straight_run)], capsys)
    assert "No module named 'numpy._core': it was saved under another numpy major version than this numpy " in msg
    assert "truncated" not in msg


def test_no_data_and_no_network_is_one_line(monkeypatch, tmp_path, capsys):
    import paddle.vision.datasets as datasets

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Cannot download https://dataset.bj.bcebos.com/cifar/cifar-10-python.tar.gz within retry limit 3")

    monkeypatch.setattr(datasets, "Cifar10", Offline)
    msg = run_error(train_cifar10.main, ["--output-dir", str(tmp_path)], capsys)
    assert "could not be downloaded" in msg and "--data-file" in msg


def test_bad_checkpoints(straight_run, tmp_path, capsys):
    assert "no such file" in run_error(eval_script.main, ["--ckpt", str(tmp_path / "none.pdckpt")], capsys)
    truncated = tmp_path / "cut.pdckpt"
    truncated.write_bytes((straight_run / "last.pdckpt").read_bytes()[:5000])
    assert "truncated" in run_error(eval_script.main, ["--ckpt", str(truncated)], capsys)
    assert f"saved by another Paddle than this {paddle.__version__}" in run_error(
        eval_script.main, ["--ckpt", str(truncated)], capsys)
    state = checkpoint.load(str(straight_run / "last.pdckpt"))
    state["config"]["model"] = "resnet32"  # the weights are a resnet20's
    wrong = tmp_path / "wrong.pdckpt"
    paddle.save(state, str(wrong))
    msg = run_error(eval_script.main, ["--ckpt", str(wrong)], capsys)
    assert "does not match model resnet32" in msg and "missing" in msg


def test_a_new_run_never_overwrites_an_old_one(straight_run, archive, capsys):
    before = (straight_run / "last.pdckpt").read_bytes()
    msg = run_error(train_cifar10.main, FAST + ["--data-file", archive, "--output-dir", str(straight_run)], capsys)
    assert "already holds a run" in msg and "--resume" in msg
    assert (straight_run / "last.pdckpt").read_bytes() == before


def test_resume_of_missing_run_is_one_line(tmp_path, capsys):
    assert "no checkpoint in it; give the --output-dir of a run" in run_error(
        train_cifar10.main, ["--resume", str(tmp_path)], capsys)


def test_configs_parse():
    import config
    for name in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs")):
        cfg = config.make_config(config.load_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", name)))
        assert cfg.model
    paper = config.make_config(config.load_yaml(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                             "paper_resnet_cifar.yaml")))
    assert (paper.milestones, paper.max_iters, paper.weight_decay, paper.lr) == ([32000, 48000], 64000, 1e-4, 0.1)


def test_eval_fast_path_gives_the_same_predictions(straight_run):
    slow = eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0", "--json"])
    fast = eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0", "--json", "--inference"])
    assert fast["path"] == "paddle.inference" and slow["path"] == "dygraph"
    assert fast["confusion"] == slow["confusion"]  # identical top-1 for every image
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-4)


needs_bf16_units = pytest.mark.skipif(devices.cpu_bf16_units(devices.cpu_flags()) is None,
                                      reason="this CPU has no bf16 units (avx512_bf16, amx_bf16)")


@needs_bf16_units
def test_bf16_inference_is_fp32s_logits_within_bf16_rounding(straight_run, tmp_path):
    """oneDNN's bf16 on the program format: activations in bf16 (the logits differ from fp32's,
    within bf16's rounding), the classifier's logits left in fp32 (not bf16 values)."""
    import predictors
    ckpt = checkpoint.resolve(str(straight_run))
    predictors.export(predictors.CheckpointPredictor(ckpt, "cpu"), str(tmp_path), program=True)
    assert os.path.isfile(tmp_path / "model.pdmodel")
    x = np.random.RandomState(0).randn(32, 3, 32, 32).astype("float32")
    fp32 = predictors.InferenceModelPredictor(str(tmp_path), "cpu")(x)
    bf16 = predictors.InferenceModelPredictor(str(tmp_path), "cpu", precision="bf16")(x)
    error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    assert 0 < error < 3e-2, error
    assert bf16.dtype == np.float32 and (bf16.view(np.uint32) & 0xFFFF).any()
    fast = eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0", "--json", "--inference",
                             "--precision", "bf16"])
    slow = eval_script.main(["--ckpt", str(straight_run), "--num-workers", "0", "--json"])
    assert fast["path"] == "paddle.inference" and fast["n"] == slow["n"]
    assert fast["loss"] == pytest.approx(slow["loss"], rel=3e-2)


def test_bf16_inference_of_a_gelu_network_on_paddle3_is_one_line(tmp_path):
    """Paddle 3.x's F.gelu is _C_ops.gelu alone, which the program format (what bf16
    inference runs) cannot hold: a traceback of "must be Value, but got Variable" before."""
    import predictors
    ckpt, _ = checkpoint_of(tmp_path, "fast_resnet_small", ["a", "b"], 32)
    predictor = predictors.CheckpointPredictor(ckpt, "cpu")
    if paddle.__version__.startswith("2."):  # 2.x writes only the program format, GELU included
        predictors.export(predictor, str(tmp_path / "e"), program=True)
        assert os.path.isfile(tmp_path / "e" / "model.pdmodel")
        return
    with pytest.raises(errors.UserError, match="fast_resnet_small's GELU in the program format .* drop --inference"):
        predictors.export(predictor, str(tmp_path / "e"), program=True)


def test_bf16_inference_is_refused_where_it_cannot_run(straight_run, tmp_path, capsys, monkeypatch):
    import predictors
    args = ["--ckpt", str(straight_run), "--num-workers", "0", "--precision", "bf16"]
    assert "add --inference" in run_error(eval_script.main, args[:-1] + ["fp16"], capsys)
    monkeypatch.setattr(devices, "cpu_flags", lambda: ["avx512f"])
    message = run_error(eval_script.main, args + ["--inference"], capsys)
    assert "needs a CPU with bf16 units" in message and "avx512_bf16" in message
    message = run_error(eval_script.main, args, capsys)  # in dygraph, on our kernels
    assert "needs a CPU with avx512_bf16 or amx_bf16" in message and "drop --precision" in message
    if paddle.__version__.startswith("2."):
        return  # 2.x writes only the program format
    monkeypatch.setattr(devices, "cpu_flags", lambda: ["avx512_bf16"])
    predictors.export(predictors.CheckpointPredictor(checkpoint.resolve(str(straight_run)), "cpu"), str(tmp_path))
    with pytest.raises(errors.UserError, match="runs a model.pdmodel export"):
        predictors.InferenceModelPredictor(str(tmp_path), "cpu", precision="bf16")


def test_seed_000_recipe_is_the_seeds_code(archive):
    import config
    import data
    import paddle.vision.transforms as T
    cfg = config.make_config(config.load_yaml(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                           "resnet18_adam.yaml")))
    assert (cfg.model, cfg.stem, cfg.optimizer, cfg.lr, cfg.schedule, cfg.batch_size, cfg.epochs, cfg.weight_decay) == \
        ("resnet18", "cifar", "adam", 1e-3, "constant", 150, 20, 0.0)
    train, test = data.cifar10_transforms(cfg.augment, cfg.normalize)
    steps = train.transforms
    assert [type(t).__name__ for t in steps[:6]] == ["RandomHorizontalFlip", "RandomVerticalFlip"] + ["ColorJitter"] * 4
    assert (steps[0].prob, steps[1].prob) == (0.5, 0.5)
    jitter = [(t.brightness, t.contrast, t.saturation, t.hue) for t in steps[2:6]]
    assert jitter == [(0.5, 0, 0, 0), (0, 0.5, 0, 0), (0, 0, 0.5, 0), (0, 0, 0, 0.3)]
    normalize = steps[-1]
    assert isinstance(normalize, T.Normalize) and list(normalize.mean) == [0.485, 0.456, 0.406]
    assert list(normalize.std) == [0.229, 0.224, 0.225]
    assert data.cifar10_preprocess(cfg.normalize)["mean"] == [0.485, 0.456, 0.406]


def test_visualdl_logs_read_back(archive, tmp_path):
    pytest.importorskip("visualdl", reason="VisualDL is optional (pip install visualdl)")
    from visualdl import LogReader
    out = tmp_path / "run"
    train_cifar10.main(FAST + ["--data-file", archive, "--output-dir", str(out), "--visualdl"])
    (log,) = os.listdir(out / "visualdl")
    reader = LogReader(file_path=str(out / "visualdl" / log))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    val = [(r.id, r.value) for r in reader.get_data("scalar", "epoch/val_acc")]
    assert val == [(int(r["epoch"]), pytest.approx(float(r["val_acc"]), abs=1e-6)) for r in rows]
    steps = [r.id for r in reader.get_data("scalar", "step/train_loss")]
    assert steps == [2, 4, 6, 8]  # every --log-every 2 of the 8 iterations
    assert len(reader.get_data("scalar", "step/lr")) == 4


def test_visualdl_missing_is_one_line(archive, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "visualdl", None)  # as if it were not installed
    msg = run_error(train_cifar10.main, FAST + ["--data-file", archive, "--output-dir", str(tmp_path), "--visualdl"],
                    capsys)
    assert "pip install visualdl" in msg
    monkeypatch.undo()
    train_cifar10.main(FAST + ["--epochs", "1", "--data-file", archive, "--output-dir", str(tmp_path)])  # retry works


def test_rough_duration_reads_as_a_person_would_say_it():
    assert [progress.rough_duration(s) for s in (3, 44, 61, 59 * 60, 3600, 8 * 3600 + 37 * 60)] == \
        ["10 s", "40 s", "1 min", "59 min", "1 h", "8 h 40 min"]


def test_the_run_estimate_times_steps_after_the_first_and_speaks_once(monkeypatch):
    clock, lines = iter([100.0, 105.0]), []  # steps 3..12 of the run take 5 s: 0.5 s a step
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    monkeypatch.setattr(progress, "log", lines.append)
    estimate = progress.RunEstimate(total_iterations=7212, start_iteration=0)
    for iteration in range(1, 40):
        estimate.step(iteration)
    assert lines == ["the run's 7,200 remaining training steps: about 1 h on this machine "
                     "(from steps 3-12; validation adds to it)"]


def test_a_run_says_its_estimate_after_its_first_steps(archive, tmp_path, capsys):
    train_cifar10.main(["--model", "resnet20", "--epochs", "1", "--batch-size", "8", "--val-size", "40",
                        "--num-workers", "0", "--log-every", "100", "--data-file", archive,
                        "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "the run's 8 remaining training steps: about " in out  # 160 images / 8 = 20 steps, 12 measured
    assert out.index("model resnet20:") < out.index("remaining training steps") < out.index("epoch 1/1 done")


def test_a_run_from_python_records_the_command_line_that_trains_it(straight_run):
    """In a notebook sys.argv is ipykernel_launcher's: results.yaml gets the equivalent command instead."""
    import argparse
    import shlex
    command = yaml.safe_load(open(straight_run / "results.yaml"))["command"]
    assert command.startswith("python train_cifar10.py --model resnet20 --epochs 2 --batch-size 40 ")
    parser = argparse.ArgumentParser()
    config.add_run_arguments(parser, config.TrainConfig, train_cifar10.DEPTHS)
    again, _ = config.run_config(parser.parse_args(shlex.split(command)[2:]), config.TrainConfig)
    assert again == config.make_config(yaml.safe_load(open(straight_run / "config.yaml")))


def test_the_old_conv_key_is_cpu_kernels(tmp_path):
    """--conv onednn|paddle, a recipe's `conv:` and a checkpoint's saved `conv` (before the
    key was renamed) still choose the CPU kernels, under their new name."""
    assert config.make_config({"conv": "onednn"}).cpu_kernels == "ours"
    assert config.make_config({"conv": "paddle"}).cpu_kernels == "paddle"
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model: resnet20\nconv: paddle\n")
    assert config.make_config(config.load_yaml(str(recipe))).cpu_kernels == "paddle"
    saved = dict(config.to_dict(config.TrainConfig()), conv="paddle")
    del saved["cpu_kernels"]
    assert config.from_checkpoint({"config": saved}).cpu_kernels == "paddle"
    with pytest.raises(errors.UserError, match="'cpu_kernels' must be one of ours, paddle"):
        config.make_config({"conv": "mkl"})
