"""A run names its data (``dataset``), and ``data.load`` is the one door: CIFAR-100 and an
image folder trained by train_cifar10.py, old checkpoints, and no import cycle."""
import ast
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import checkpoint
import config
import data
import errors
import eval as eval_script
import predict
import train_cifar10
from helpers import ROOT, make_cifar100_archive, make_cifar_archive, make_image_folder

TINY = ["--model", "resnet20", "--epochs", "1", "--batch-size", "50", "--num-workers", "0", "--log-every", "100"]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c100")
    archive = make_cifar100_archive(tmp / "cifar-100-python.tar.gz")
    out = tmp / "run"
    result = train_cifar10.main(TINY + ["--dataset", "cifar100", "--data-file", archive, "--val-size", "100",
                                        "--output-dir", str(out)])
    return dict(archive=archive, out=out, result=result, tmp=tmp)


def test_cifar100_loads_fine_labels_and_its_class_names(cifar100):
    cfg = config.make_config(dict(dataset="cifar100", data_file=cifar100["archive"], val_size=100))
    loaded = data.load(cfg)
    assert loaded.classes == [f"class_{i:02d}" for i in range(100)]
    assert {k: len(v) for k, v in loaded.splits.items()} == dict(train=300, val=100, test=200)
    assert sorted({int(loaded.splits["test"][i][1]) for i in range(200)}) == list(range(100))  # fine, not coarse
    assert loaded.preprocess["mean"] == list(data.CIFAR100_MEAN)  # normalize "dataset": its own statistics


def test_cifar100_trains_evaluates_and_predicts(cifar100, tmp_path, capsys):
    state = checkpoint.load(str(cifar100["out"] / "last.pdckpt"))
    assert state["config"]["dataset"] == "cifar100" and len(state["class_names"]) == 100
    assert state["model"]["fc.weight"].shape == [64, 100]
    r = eval_script.main(["--ckpt", str(cifar100["out"]), "--num-workers", "0", "--json"])
    assert r["split"] == "test" and r["n"] == 200 and len(r["per_class"]) == 100
    assert np.asarray(r["confusion"]).shape == (100, 100) and r["top5"] >= r["top1"]
    assert r["top1"] == pytest.approx(cifar100["result"]["final_test_acc"])
    assert os.path.getsize(r["confusion_png"]) > 0
    capsys.readouterr()
    eval_script.main(["--ckpt", str(cifar100["out"]), "--num-workers", "0"])
    printed = capsys.readouterr().out
    assert "the 10 lowest: class_" in printed and "most confused (true -> predicted: images): class_" in printed
    assert max(len(line) for line in printed.splitlines()) < 400  # no 100-column table
    from PIL import Image
    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "x.png")
    top = predict.main(["--ckpt", str(cifar100["out"]), str(tmp_path / "x.png"), "--topk", "3"])[0][1]
    assert len(top) == 3 and all(name.startswith("class_") for name, _ in top)


def test_a_damaged_cifar100_row_is_one_line(tmp_path):
    archive = make_cifar100_archive(tmp_path / "c.tar.gz", n_train=100, n_test=100)
    with tarfile.open(archive) as tar:
        test = pickle.load(tar.extractfile("cifar-100-python/test"), encoding="bytes")
    test[b"fine_labels"][3] = 100  # one label past the 100 classes
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            raw = pickle.dumps(test, protocol=2) if m.name.endswith("/test") else src.extractfile(m).read()
            m.size = len(raw)
            dst.addfile(m, io.BytesIO(raw))
    with pytest.raises(errors.UserError, match=r"test image 3 has 3072 values and label 100 \(expected 3072 values "
                                               r"and a label in 0\.\.99\)"):
        data.load(config.make_config(dict(dataset="cifar100", data_file=str(bad), val_size=10)))


def test_an_image_folder_trains_from_scratch_without_finetune(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    result = train_cifar10.main(TINY + ["--dataset", "folder", "--data-dir", folder, "--image-size", "32",
                                        "--batch-size", "6", "--output-dir", str(out)])
    assert "final_test_acc" not in result and result["best_val_acc"] is not None  # a folder: train and val only
    state = checkpoint.load(str(out / "last.pdckpt"))
    assert state["class_names"] == ["cats", "dogs", "owls"] and state["preprocess"]["crop"] == 32
    assert eval_script.main(["--ckpt", str(out), "--num-workers", "0"])["split"] == "val"


def test_the_device_loader_refuses_an_image_folder(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(TINY + ["--dataset", "folder", "--data-dir", folder, "--loader", "device",
                                   "--output-dir", str(tmp_path / "o")])
    assert str(e.value.code).startswith("error: --loader device is for CIFAR-10 and CIFAR-100, not --dataset folder")


def test_a_checkpoint_from_before_the_dataset_key_still_loads(tmp_path):
    """Written by the current code, then its config stripped of the key (and, for an image
    folder's run, of what TrainConfig had not): as checkpoints of 2026-11 are."""
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=100, n_test=50)
    out = tmp_path / "run"
    train_cifar10.main(TINY + ["--data-file", archive, "--val-size", "20", "--output-dir", str(out)])
    state = checkpoint.load(str(out / "last.pdckpt"))
    old = dict(state, config={k: v for k, v in state["config"].items()
                              if k not in ("dataset", "data_dir", "image_size", "val_fraction")})
    cfg = config.from_checkpoint(old)
    assert cfg.dataset == "cifar10" and type(cfg) is config.TrainConfig
    folder_run = dict(state, config=dict(old["config"], data_dir="imgs", pretrained="none", strategy="full"))
    cfg = config.from_checkpoint(folder_run)
    assert cfg.dataset == "folder" and type(cfg) is config.FinetuneConfig
    resumed, _ = config.resume_config(str(out), dict(epochs=2), config.TrainConfig, old)
    assert resumed.dataset == "cifar10" and resumed.epochs == 2


def test_no_two_modules_import_each_other():
    """Walk the imports of the top-level modules (at any depth of the file): no cycle."""
    mine = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"models", "cpu_kernels"}
    graph = {}
    for name in mine:
        path = os.path.join(ROOT, name + ".py") if os.path.isfile(os.path.join(ROOT, name + ".py")) \
            else os.path.join(ROOT, name, "__init__.py")
        tree = ast.parse(open(path).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & mine - {name}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in (cycle_from(n) for n in sorted(graph)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_a_one_stem_net_takes_its_stem_without_being_told(tmp_path):
    import finetune
    folder = make_image_folder(tmp_path / "imgs")
    common = ["--model", "resnet20", "--pretrained", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "6",
              "--num-workers", "0", "--data-dir", folder]
    finetune.main(common + ["--output-dir", str(tmp_path / "auto")])
    state = checkpoint.load(str(tmp_path / "auto" / "last.pdckpt"))
    assert state["config"]["stem"] == "auto" and state["model"]["conv1.weight"].shape == [16, 3, 3, 3]
    with pytest.raises(SystemExit) as e:  # asked for, the other stem stays an error
        finetune.main(common + ["--stem", "imagenet", "--output-dir", str(tmp_path / "imagenet")])
    assert "resnet20 is the paper's CIFAR network: it has only the CIFAR stem; pass --stem cifar" in str(e.value.code)
    assert checkpoint.stem_of(config.make_config(dict(model="resnet18"))) == "cifar"  # CIFAR: the 3x3 stem
    assert checkpoint.stem_of(config.make_config(dict(model="resnet34"), cls=config.FinetuneConfig)) == "imagenet"


def test_a_checkpoint_records_its_data_paths_absolute(tmp_path, monkeypatch):
    """eval.py --ckpt RUN from another folder found no '../data/...' the user never typed."""
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=100, n_test=50)
    monkeypatch.chdir(tmp_path)
    train_cifar10.main(TINY + ["--data-file", "c.tar.gz", "--val-size", "20", "--output-dir", "run"])
    assert checkpoint.load("run")["config"]["data_file"] == archive
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_script.main(["--ckpt", "../run", "--num-workers", "0", "--json"])["n"] == 50
    os.rename(archive, tmp_path / "moved.tar.gz")
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", "../run", "--num-workers", "0"])
    assert str(e.value.code) == (f"error: the data the run was trained on, {archive} (recorded in the checkpoint), "
                                 "is not there; pass --data-file PATH")
