"""export.py --format onnx (paddle2onnx) and predict.py --onnx (onnxruntime), for users who
deploy with onnxruntime. Both are optional (requirements-onnx.txt); CI installs them with
Paddle 3.x. paddle2onnx 2.x reads Paddle 3.x exports only: Paddle 2.6 is refused."""
import json
import sys

import numpy as np
import paddle
import pytest

import checkpoint
import errors
import export
import predict
import predictors
from helpers import checkpoint_of, make_image_folder

P3 = not paddle.__version__.startswith("2.")
needs_onnx = pytest.mark.skipif(not P3, reason="paddle2onnx 2.x reads Paddle 3.x exports (model.json)")


@needs_onnx
@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_onnx_logits_equal_the_checkpoints(tmp_path, name):
    pytest.importorskip("paddle2onnx")
    ckpt, model = checkpoint_of(tmp_path, name, ["a", "b", "c"], 32)
    out = tmp_path / "exported"
    export.main(["--ckpt", ckpt, "--output", str(out), "--format", "onnx"])
    onnx = predictors.OnnxPredictor(str(out / "model.onnx"))
    model.eval()
    for n in (1, 7):  # the batch size is dynamic
        x = np.random.RandomState(n).rand(n, 3, 32, 32).astype("float32")
        ours = model(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(onnx(x), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    assert json.load(open(out / "meta.json"))["class_names"] == ["a", "b", "c"]


@needs_onnx
def test_an_onnx_model_and_a_meta_json_of_two_exports_are_one_line(tmp_path, capsys):
    pytest.importorskip("paddle2onnx")
    folder = make_image_folder(tmp_path / "imgs")
    ckpt, _ = checkpoint_of(tmp_path, "resnet20", ["cats", "dogs", "owls"], 32)
    out = tmp_path / "exported"
    export.main(["--ckpt", ckpt, "--output", str(out), "--format", "onnx"])
    meta = json.load(open(out / "meta.json"))
    meta["preprocess"].update(resize=40, crop=40)  # as another export's meta.json would say
    json.dump(meta, open(out / "meta.json", "w"))
    with pytest.raises(SystemExit) as e:
        predict.main(["--onnx", str(out / "model.onnx"), folder])
    assert str(e.value.code) == (f"error: --onnx {out / 'model.onnx'} takes images of shape [3, 32, 32], and its "
                                 "meta.json prepares them as [3, 40, 40]: they come from two exports; export the "
                                 "model again with export.py --format onnx")


@needs_onnx
def test_predict_onnx_names_the_same_classes_as_the_checkpoint(tmp_path):
    pytest.importorskip("paddle2onnx")
    folder = make_image_folder(tmp_path / "imgs")
    ckpt, _ = checkpoint_of(tmp_path, "resnet20", ["cats", "dogs", "owls"], 32)
    out = tmp_path / "exported"
    export.main(["--ckpt", ckpt, "--output", str(out), "--format", "onnx"])
    by_ckpt = predict.main(["--ckpt", ckpt, folder, "--topk", "1", "--device", "cpu"])
    by_onnx = predict.main(["--onnx", str(out / "model.onnx"), folder, "--topk", "1"])
    assert len(by_onnx) == 24 and [(p, t[0][0]) for p, t in by_onnx] == [(p, t[0][0]) for p, t in by_ckpt]
    for (_, a), (_, b) in zip(by_ckpt, by_onnx):
        assert abs(a[0][1] - b[0][1]) < 1e-4


def test_a_missing_onnx_package_or_file_is_one_line(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name in ("paddle2onnx", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / predictors.META).write_text("{}")
    (tmp_path / "model.onnx").write_text("")
    if P3:
        with pytest.raises(errors.UserError, match="needs paddle2onnx: pip install -r requirements-onnx.txt"):
            predictors.export_onnx(str(tmp_path))
    with pytest.raises(errors.UserError, match="needs onnxruntime: pip install -r requirements-onnx.txt"):
        predictors.OnnxPredictor(str(tmp_path / "model.onnx"))
    with pytest.raises(errors.UserError, match="no such file; make it with export.py --format onnx"):
        predictors.OnnxPredictor(str(tmp_path / "none.onnx"))


def test_export_without_paddle2onnx_stops_before_any_work(tmp_path, monkeypatch):
    ckpt, _ = checkpoint_of(tmp_path, "resnet20", ["a", "b"], 32)
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # an import of it raises ImportError
    out = tmp_path / "e"
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", ckpt, "--output", str(out), "--format", "onnx"])
    needs = "error: --format onnx needs paddle2onnx: pip install" if P3 else "error: ONNX export needs Paddle 3.x"
    assert str(e.value.code).startswith(needs) and not out.exists()  # no folder made


@pytest.mark.skipif(P3, reason="Paddle 2.6 writes model.pdmodel, which paddle2onnx 2.x does not read")
def test_paddle26_onnx_export_is_refused_in_one_line(tmp_path):
    ckpt, _ = checkpoint_of(tmp_path, "resnet20", ["a", "b"], 32)
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", ckpt, "--output", str(tmp_path / "e"), "--format", "onnx"])
    assert str(e.value.code).startswith("error: ONNX export needs Paddle 3.x")
    assert checkpoint.load(ckpt)["epoch"] == 1
