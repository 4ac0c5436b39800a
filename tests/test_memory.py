"""memory.py: a training step that cannot fit in the free memory is one error before the
first step, one that may not fit a warning (the kernel's out-of-memory kill says nothing)."""
import pytest

import memory
import models
import train_cifar10
from helpers import make_cifar_archive

RESNET20_VALUES = 465_994  # the outputs of resnet20's layers for one 32x32 image
GIB = 2 ** 30


def test_free_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   16000000 kB\nSwapFree:        1000 kB\n"
                       "HugePages_Total:       0\n")
    assert memory.free_bytes(str(meminfo)) == (16_000_000 * 1024, 1000 * 1024)
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel before 3.14: no MemAvailable
    assert memory.free_bytes(str(meminfo)) is None
    assert memory.free_bytes(str(tmp_path / "none")) is None


def test_activations_are_the_outputs_of_every_layer():
    assert memory.activations_per_image(models.resnet20(), 32) == RESNET20_VALUES


def test_a_step_that_fits_says_nothing_one_that_may_not_warns_one_that_cannot_is_an_error():
    model, per_image = models.resnet20(), RESNET20_VALUES * 4
    step = 128 * per_image  # activations of a step at batch 128, fp32
    assert memory.check_step_fits(model, "resnet20", 128, 32, 4, free=(3 * step, 0)) is None
    warning = memory.check_step_fits(model, "resnet20", 128, 32, 4, free=(int(1.5 * step), 0))
    assert warning == (f"warning: a training step of resnet20 on batches of 128 32x32 images takes about "
                       f"{2 * step / GIB:.1f} GiB, and {1.5 * step / GIB:.1f} GiB are free: the system may kill the "
                       f"run; --batch-size 96 fits")
    with pytest.raises(memory.UserError) as e:
        memory.check_step_fits(model, "resnet20", 128, 32, 4, free=(step // 2, step // 4))
    assert str(e.value) == (f"a training step of resnet20 on batches of 128 32x32 images keeps {step / GIB:.1f} "
                            f"GiB of activations, and {0.75 * step / GIB:.1f} GiB are free: it cannot fit; "
                            f"try --batch-size 32")
    # bf16 activations take half: the same memory holds the step
    assert memory.check_step_fits(model, "resnet20", 128, 32, 2, free=(int(1.5 * step), 0)) is None


def test_a_run_that_cannot_fit_stops_before_its_first_step(tmp_path, monkeypatch):
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=100, n_test=20)
    monkeypatch.setattr(memory, "free_bytes", lambda: (50 * RESNET20_VALUES * 4, 0))
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(["--model", "resnet20", "--batch-size", "64", "--val-size", "20", "--num-workers", "0",
                            "--data-file", archive, "--output-dir", str(tmp_path / "o")])
    assert str(e.value.code).startswith("error: a training step of resnet20 on batches of 64 32x32 images keeps")
    assert str(e.value.code).endswith("it cannot fit; try --batch-size 25")
    assert not (tmp_path / "o" / "last.pdckpt").exists()
