import csv
import os

import degradation
from helpers import make_cifar_archive, once_with_the_operators


@once_with_the_operators  # degradation.py's own seeds, tables and reuse: alike on Paddle 2.6
def test_degradation_outputs_seeds_and_reuse(tmp_path, capsys):
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=150, n_test=40)
    args = ["--data-file", archive, "--subset", "100", "--val-size", "40", "--epochs", "2", "--batch-size", "50",
            "--nets", "plain20,resnet20", "--seeds", "0,1", "--num-workers", "0", "--output-dir", str(tmp_path / "out")]
    degradation.main(args)
    out = tmp_path / "out"
    for name in ("degradation.png", "results.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["network"], r["seed"]) for r in rows] == [("plain20", "0"), ("plain20", "1"), ("resnet20", "0"),
                                                         ("resnet20", "1")]
    assert rows[0]["train_error"] != rows[1]["train_error"]  # the seeds give different runs
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("Evidence: Paddle ") and "seeds 0,1" in table[0] and "--seeds 0,1" in table[0]
    plain = [line for line in table if line.startswith("| plain20 |")][0]
    errors = sorted(float(r["train_error"]) for r in rows[:2])
    mean = sum(errors) / 2
    assert plain.startswith("| plain20 | 269,722 | 0,1 | 2 |")
    assert f"{mean:.2f} ({errors[0]:.2f}..{errors[1]:.2f})" in plain
    stamp = os.path.getmtime(out / "resnet20" / "seed1" / "last.pdckpt")
    capsys.readouterr()
    degradation.main(args)  # a second run reuses every finished network and seed
    log = capsys.readouterr().out
    assert "plain20 seed 0: finished before" in log and "resnet20 seed 1: finished before" in log
    assert os.path.getmtime(out / "resnet20" / "seed1" / "last.pdckpt") == stamp
    assert (out / "results.md").read_text().splitlines() == table
    # the same directory with another budget: refused, not the old results under the new title
    import pytest
    with pytest.raises(SystemExit) as e:
        degradation.main([a if a != "2" else "3" for a in args])
    assert str(e.value.code).startswith("error: ") and "holds a run of another recipe (epochs 2 -> 3" in str(e.value.code)
    assert (out / "results.md").read_text().splitlines() == table
