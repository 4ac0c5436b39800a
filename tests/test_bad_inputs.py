"""What a careless or unlucky user can type or feed in: one row per case. Every row must
end with a non-zero exit, one ``error: ...`` line (no traceback) naming the problem, and
every file of the finished run beside it byte for byte as it was.
"""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import tarfile

import numpy as np
import paddle
import pytest
from PIL import Image

import bench
import checkpoint
import data
import degradation
import eval as eval_script
import export as export_script
import finetune
import predict
import train_cifar10
from helpers import ROOT, kernel_independent, make_cifar_archive, make_image_folder

TINY = ["--model", "resnet20", "--batch-size", "40", "--val-size", "40", "--num-workers", "0", "--log-every", "1"]
TUNE = ["--model", "resnet20", "--stem", "cifar", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--num-workers", "0", "--pretrained", "none"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished 2-epoch run, its archive, an image folder and an export: what must survive every row."""
    root = tmp_path_factory.mktemp("bad")
    archive = make_cifar_archive(root / "c.tar.gz", n_train=200, n_test=40)
    run = root / "run"
    train_cifar10.main(TINY + ["--epochs", "2", "--data-file", archive, "--output-dir", str(run)])
    folder = make_image_folder(root / "imgs")
    export_script.main(["--ckpt", str(run), "--output", str(root / "exported")])
    return dict(root=root, archive=archive, run=run, folder=folder, exported=root / "exported")


def fingerprint(folder):
    """sha256 of every file under ``folder`` (a run directory's lock file aside: it names the
    last process that wrote the run)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == ".lock":
                continue
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def damaged_archive(path, kind):
    """A CIFAR archive with rows of the wrong size, a label out of range, or no test batch."""
    with tarfile.open(make_cifar_archive(str(path) + ".ok.tar.gz", n_train=50, n_test=10)) as src, \
            tarfile.open(path, "w:gz") as dst:
        for member in src.getmembers():
            raw = src.extractfile(member).read()
            if kind == "no_test" and member.name.endswith("test_batch"):
                continue
            if member.name.endswith("data_batch_2") and kind in ("short_rows", "bad_label"):
                batch = pickle.loads(raw)
                if kind == "short_rows":
                    batch[b"data"] = batch[b"data"][:, :3000]
                else:
                    batch[b"labels"][3] = 10
                raw = pickle.dumps(batch, protocol=2)
            member.size = len(raw)
            import io
            dst.addfile(member, io.BytesIO(raw))
    return str(path)


def text_file(path, raw):
    open(path, "wb").write(raw)
    return str(path)


def folder_of_text(path):
    os.makedirs(path)
    for name in ("a.jpg", "b.png"):
        open(os.path.join(path, name), "w").write("not a picture")
    return str(path)


def export_without_weights(world, tmp_path):
    import shutil
    copy = tmp_path / "exported"
    shutil.copytree(world["exported"], copy)
    os.remove(copy / "model.pdiparams")
    return str(copy)


def folder_with(root, kind):
    """The tiny image folder plus one bad thing."""
    folder = make_image_folder(root / kind)
    cats = os.path.join(folder, "cats")
    if kind == "text_as_jpg":
        open(os.path.join(cats, "notes.jpg"), "w").write("this is not a picture")
    elif kind == "broken_symlink":
        os.symlink(os.path.join(folder, "gone.jpg"), os.path.join(cats, "link.jpg"))
    elif kind == "truncated_jpeg":
        raw = open(os.path.join(cats, "5.jpg"), "rb").read()
        open(os.path.join(cats, "cut.jpg"), "wb").write(raw[:len(raw) // 2])
    elif kind == "gigantic_png":  # 200 M pixels: Pillow refuses it as a decompression bomb
        Image.new("1", (20000, 10000)).save(os.path.join(cats, "huge.png"))
    elif kind == "empty_class":
        os.makedirs(os.path.join(folder, "zebras"))
    elif kind == "one_class":
        for name in ("dogs", "owls"):
            for f in os.listdir(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name, f))
            os.rmdir(os.path.join(folder, name))
    return folder


# (name, script, arguments(world, tmp_path), what the error line must say)
CASES = [
    ("zero epochs", train_cifar10.main, lambda w, t: TINY + ["--epochs", "0"], "'epochs' must be at least 1"),
    ("negative batch", train_cifar10.main, lambda w, t: TINY + ["--batch-size", "-4"], "'batch_size' must be at least 1"),
    ("zero log interval", train_cifar10.main, lambda w, t: TINY + ["--log-every", "0"], "'log_every' must be at least 1"),
    ("zero lr", train_cifar10.main, lambda w, t: TINY + ["--lr", "0"], "'lr' must be above 0"),
    ("negative lr", train_cifar10.main, lambda w, t: TINY + ["--lr", "-0.1"], "'lr' must be above 0"),
    ("negative max iters", train_cifar10.main, lambda w, t: TINY + ["--max-iters", "-5"], "'max_iters' must be"),
    ("negative warm-up", train_cifar10.main, lambda w, t: TINY + ["--warmup-iters", "-1"], "'warmup_iters' must be"),
    ("negative workers", train_cifar10.main, lambda w, t: TINY + ["--num-workers", "-1"], "'num_workers' must be"),
    ("negative subset", train_cifar10.main, lambda w, t: TINY + ["--subset", "-3"], "'subset' must be"),
    ("momentum above 1", train_cifar10.main, lambda w, t: TINY + ["--momentum", "1.5"], "'momentum' must be in [0, 1)"),
    ("label smoothing 1", train_cifar10.main, lambda w, t: TINY + ["--label-smoothing", "1"], "'label_smoothing'"),
    ("milestones decrease", train_cifar10.main,
     lambda w, t: TINY + ["--schedule", "step", "--milestones", "[300,100]"], "'milestones' must be"),
    ("val size too large", train_cifar10.main,
     lambda w, t: TINY + ["--val-size", "500", "--data-file", w["archive"], "--output-dir", str(t / "o")], "--val-size 500"),
    ("subset too large", train_cifar10.main,
     lambda w, t: TINY + ["--subset", "9999", "--data-file", w["archive"], "--output-dir", str(t / "o")], "--subset 9999"),
    ("output dir is a file", train_cifar10.main,
     lambda w, t: TINY + ["--data-file", w["archive"], "--output-dir", str(w["run"] / "metrics.csv")], "is a file"),
    ("config is a directory", train_cifar10.main, lambda w, t: ["--config", str(t)], "no such file"),
    ("config is missing", train_cifar10.main, lambda w, t: ["--config", str(t / "nope.yaml")], "no such file"),
    ("resume a checkpoint file", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"] / "last.pdckpt")], "give the run's directory"),
    ("resume with another batch", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"]), "--batch-size", "20"], "--resume cannot change batch_size"),
    ("resume with another model", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"]), "--model", "resnet32"], "--resume cannot change model"),
    ("resume with amp", train_cifar10.main, lambda w, t: ["--resume", str(w["run"]), "--amp"], "cannot change amp"),
    ("resume with config", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"]), "--config", "configs/resnet18_cifar10.yaml"], "drop --config"),
    ("resume shorter than done", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"]), "--epochs", "1"], "already finished 2 epochs"),
    ("new run into a finished run", train_cifar10.main,
     lambda w, t: TINY + ["--data-file", w["archive"], "--output-dir", str(w["run"])], "already holds a run"),
    ("amp on a CPU", train_cifar10.main,
     lambda w, t: TINY + ["--amp", "--data-file", w["archive"], "--output-dir", str(t / "o")], "--amp-dtype float16 needs a GPU"),
    ("archive rows of 3000 bytes", train_cifar10.main,
     lambda w, t: TINY + ["--data-file", damaged_archive(t / "a.tar.gz", "short_rows"), "--output-dir", str(t / "o")],
     "has 3000 values"),
    ("archive label 10", train_cifar10.main,
     lambda w, t: TINY + ["--data-file", damaged_archive(t / "a.tar.gz", "bad_label"), "--output-dir", str(t / "o")],
     "label 10"),
    ("archive without test batch", train_cifar10.main,
     lambda w, t: TINY + ["--data-file", damaged_archive(t / "a.tar.gz", "no_test"), "--output-dir", str(t / "o")],
     "no test images"),
    ("text file named .jpg", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "text_as_jpg"), "--output-dir", str(t / "o")], "cats/notes.jpg"),
    ("broken symlink", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "broken_symlink"), "--output-dir", str(t / "o")], "cats/link.jpg"),
    ("truncated JPEG", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "truncated_jpeg"), "--output-dir", str(t / "o")], "cats/cut.jpg"),
    ("gigantic PNG", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "gigantic_png"), "--output-dir", str(t / "o")],
     "cats/huge.png (ImageTooLarge)"),
    ("empty class folder", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "empty_class"), "--output-dir", str(t / "o")], "zebras hold no images"),
    ("one class", finetune.main,
     lambda w, t: TUNE + ["--data-dir", folder_with(t, "one_class"), "--output-dir", str(t / "o")], "needs at least 2"),
    ("val fraction 0.99", finetune.main,
     lambda w, t: TUNE + ["--data-dir", w["folder"], "--val-fraction", "0.99", "--output-dir", str(t / "o")],
     "no training image"),
    ("image size 8", finetune.main, lambda w, t: TUNE + ["--image-size", "8"], "'image_size' must be in [32, 1024]"),
    ("paper net with ImageNet stem", finetune.main,
     lambda w, t: TUNE[:2] + ["--stem", "imagenet"] + TUNE[4:] + ["--data-dir", w["folder"], "--output-dir", str(t / "o")],
     "pass --stem cifar"),  # asked for; without --stem a one-stem net takes its own (test_datasets.py)
    ("eval batch 0", eval_script.main, lambda w, t: ["--ckpt", str(w["run"]), "--batch-size", "0"], "--batch-size must"),
    ("eval missing checkpoint", eval_script.main, lambda w, t: ["--ckpt", str(t / "none")], "no such file"),
    ("predict topk 0", predict.main, lambda w, t: ["--ckpt", str(w["run"]), w["folder"], "--topk", "0"], "--topk must"),
    ("predict missing path", predict.main, lambda w, t: ["--ckpt", str(w["run"]), str(t / "x.jpg")], "no such file"),
    ("export without its weights", predict.main,
     lambda w, t: ["--inference-model", export_without_weights(w, t), w["folder"]], "no model.pdiparams"),
    ("export over an export", export_script.main,
     lambda w, t: ["--ckpt", str(w["run"]), "--output", str(w["exported"])], "already holds an export"),
    ("export to a file", export_script.main,
     lambda w, t: ["--ckpt", str(w["run"]), "--output", str(w["run"] / "config.yaml")], "is a file"),
    ("resume into another output dir", train_cifar10.main,
     lambda w, t: ["--resume", str(w["run"]), "--output-dir", str(t / "fork")], "continues the run where it is"),
    ("recipe with a key twice", train_cifar10.main,
     lambda w, t: ["--config", text_file(t / "r.yaml", b"lr: 0.1\nepochs: 3\nlr: 0.5\n")],
     "'lr' is given twice, on lines 1 and 3"),
    ("recipe not UTF-8", train_cifar10.main,
     lambda w, t: ["--config", text_file(t / "r.yaml", b"lr: 0.1\n# caf\xe9\n")], "is not UTF-8 text"),
    ("output dir inside the data dir", finetune.main,
     lambda w, t: TUNE + ["--data-dir", w["folder"], "--output-dir", os.path.join(w["folder"], "runs")],
     "is inside --data-dir"),
    ("predict a folder of unreadable files", predict.main,
     lambda w, t: ["--ckpt", str(w["run"]), folder_of_text(t / "junk")], "none of the 2 image files"),
    ("bench zero steps", bench.main, lambda w, t: ["--steps", "0"], "--steps must be at least 1"),
    ("bench batch 0", bench.main, lambda w, t: ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("bench unknown model", bench.main, lambda w, t: ["--model", "resnet19"], "--model resnet19: unknown"),
    ("bench unknown impl in compare", bench.main, lambda w, t: ["--compare", "ours,tf"], "--compare 'ours,tf'"),
    ("bench rounds without compare", bench.main, lambda w, t: ["--rounds", "3"], "--rounds 3: give a count"),
    ("bench bf16 in eval", bench.main, lambda w, t: ["--mode", "eval", "--compare", "ours,torch+bf16"],
     "--impl torch+bf16 times bf16 training"),
    ("bench missing archive", bench.main,
     lambda w, t: ["--pipeline", "--data-file", str(t / "none.tar.gz")], "no such file"),
    ("degradation unknown net", degradation.main, lambda w, t: ["--nets", "plain20,resnet21"], "resnet21"),
    ("degradation no nets", degradation.main, lambda w, t: ["--nets", ","], "--nets is empty"),
    ("degradation zero epochs", degradation.main,
     lambda w, t: ["--epochs", "0", "--data-file", w["archive"], "--val-size", "40", "--output-dir", str(t / "d")],
     "'epochs' must be at least 1"),
]


@pytest.mark.parametrize("name,script,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nothing_saved_changes(world, tmp_path, name, script, argv, expected):
    before = fingerprint(world["root"])
    with pytest.raises(SystemExit) as e:
        script(argv(world, tmp_path))
    message = str(e.value.code)
    assert e.value.code not in (0, None)
    assert message.startswith("error: ") and "\n" not in message, message
    assert expected in message, message
    assert fingerprint(world["root"]) == before


def test_hidden_files_and_folders_are_not_classes_or_images(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    os.makedirs(os.path.join(folder, ".ipynb_checkpoints"))
    open(os.path.join(folder, ".ipynb_checkpoints", "x.png"), "wb").write(open(os.path.join(folder, "cats", "0.png"), "rb").read())
    open(os.path.join(folder, "cats", "._0.jpg"), "wb").write(b"\x00\x05\x16\x07 macOS resource fork")
    base = data.ImageFolder(folder)
    assert base.classes == ["cats", "dogs", "owls"] and len(base) == 24


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    path = str(tmp_path / "deep.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    pixels = np.asarray(data.load_image(path))
    assert pixels.shape == (64, 64, 3) and pixels.min() == 0 and 200 < pixels.max() < 256 and pixels.mean() < 200


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_failing_inside_the_loader_is_an_error_not_a_hang(world, workers):
    """A file that breaks after the start-up check: the DataLoader must not die (Paddle's
    loader thread catches only StopIteration, and the run would wait forever)."""
    class Flaky:
        def __getitem__(self, i):
            if i == 5:
                raise OSError("image file is truncated")
            return Image.new("RGB", (32, 32)), 1

        def describe(self, i):
            return f"image flaky/{i}.jpg"

    dataset = data.SplitDataset(Flaky(), range(12), data.cifar10_transforms("none")[1])
    with pytest.raises(data.UserError, match=r"image flaky/5.jpg could not be read \(OSError: image file is truncated"):
        for _ in data.make_loader(dataset, 4, workers):
            pass


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = fingerprint(run)
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(["--resume", str(run), "--epochs", "3", "--lr", "1e30"])
    message = str(e.value.code)
    assert message.startswith("error: the training loss became nan at epoch 3") and "lower --lr" in message
    assert "is kept (epoch 2)" in message
    after = fingerprint(run)
    for name in ("last.pdckpt", "best.pdckpt", "metrics.csv", "results.yaml"):
        assert after[name] == before[name], name
    with pytest.raises(SystemExit) as e:  # a fresh run that diverges at once saves nothing
        train_cifar10.main(TINY + ["--epochs", "1", "--lr", "1e30", "--data-file", world["archive"],
                                   "--output-dir", str(tmp_path / "fresh")])
    assert "nothing was saved" in str(e.value.code)
    assert not os.path.exists(tmp_path / "fresh" / "last.pdckpt")


@kernel_independent
def test_a_longer_resume_plans_the_schedule_again(world, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert checkpoint.load(str(run))["scheduler"]["last_lr"] == pytest.approx(0, abs=1e-9)  # cosine ended
    train_cifar10.main(["--resume", str(run), "--epochs", "4"])
    out = capsys.readouterr().out
    assert "the LR schedule is planned again for epochs 4 (16 iterations in all)" in out
    history = checkpoint.load(str(run))["history"]
    assert len(history) == 4 and history[2]["lr"] > 0.01  # training goes on at a real learning rate
    straight = tmp_path / "straight"  # the same as a run started with --epochs 4
    train_cifar10.main(TINY + ["--epochs", "4", "--data-file", world["archive"], "--output-dir", str(straight)])
    planned = [h["lr"] for h in checkpoint.load(str(straight))["history"]]
    assert [h["lr"] for h in history[2:]] == pytest.approx(planned[2:])  # epochs 3 and 4 follow the new plan


def test_full_disk_while_saving_keeps_the_old_checkpoint_and_leaves_no_tmp(world, tmp_path, monkeypatch):
    import errno
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = fingerprint(run)

    def full(state, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(paddle, "save", full)
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(["--resume", str(run), "--epochs", "3"])
    assert str(e.value.code).startswith("error: could not write") and "No space left" in str(e.value.code)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert fingerprint(run)["last.pdckpt"] == before["last.pdckpt"]


@kernel_independent
def test_sigterm_saves_like_ctrl_c_and_resumes(world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train_cifar10.py")] + TINY + [
        "--epochs", "50", "--data-file", world["archive"], "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 2 step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 143, text
    assert "terminated: checkpoint in" in text and "C++ Traceback" not in text and "Traceback" not in text
    state = checkpoint.load(str(out))
    assert state["epoch"] == 1 and state["progress"]["step"] >= 2
