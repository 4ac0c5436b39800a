"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel, on a tiny archive.
Needs nbclient and ipykernel (requirements-notebook.txt, installed by CI); skipped without."""
import os

import pytest

from helpers import ROOT, make_cifar_archive


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient and ipykernel")
    import nbformat
    monkeypatch.setenv("CIFAR10_DATA_FILE", make_cifar_archive(tmp_path / "c.tar.gz", n_train=300, n_test=60))
    monkeypatch.setenv("QUICKSTART_SUBSET", "200")
    monkeypatch.setenv("QUICKSTART_VAL_SIZE", "60")
    monkeypatch.setenv("QUICKSTART_OUTPUT", str(tmp_path / "runs"))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed with outputs cleared
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Trainable params" in text and "epoch 4/4 done" in text and "same top-1 as the checkpoint: True" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # curves, confusion matrix, predictions
    (run,) = os.listdir(tmp_path / "runs")
    assert os.path.exists(tmp_path / "runs" / run / "best.pdckpt")
