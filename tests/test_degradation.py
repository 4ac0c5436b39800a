import os

import degradation
from helpers import make_cifar_archive


def test_degradation_outputs_and_reuse(tmp_path, capsys):
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=150, n_test=40)
    args = ["--data-file", archive, "--subset", "100", "--val-size", "40", "--epochs", "2", "--batch-size", "50",
            "--nets", "plain20,resnet20", "--num-workers", "0", "--output-dir", str(tmp_path / "out")]
    degradation.main(args)
    out = tmp_path / "out"
    for name in ("degradation.png", "results.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| plain20 | 269,722 | 2 |")
    assert len((out / "results.csv").read_text().splitlines()) == 3
    stamp = os.path.getmtime(out / "resnet20" / "last.pdckpt")
    capsys.readouterr()
    degradation.main(args)  # a second run reuses both finished networks
    log = capsys.readouterr().out
    assert "plain20: finished before" in log and "resnet20: finished before" in log
    assert os.path.getmtime(out / "resnet20" / "last.pdckpt") == stamp
    assert (out / "results.md").read_text().splitlines() == table
