"""A run against interruptions and shared-machine accidents: two processes on one run, a
kill at every write, signals in every phase, closed pipes, read-only folders, the
operator's build cache, and images as people have them."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

import checkpoint
import data
import engine
import eval as eval_script
import files
import finetune
import cpu_kernels
from cpu_kernels import build
import train_cifar10
from helpers import ROOT, kernel_independent, make_cifar_archive, make_image_folder, once_with_the_operators

TINY = ["--model", "resnet20", "--batch-size", "40", "--val-size", "40", "--num-workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("data") / "c.tar.gz", n_train=200, n_test=40)


def script(name, *args):
    return [sys.executable, "-u", os.path.join(ROOT, name), *map(str, args)]


def hooked(setup, name, *args):
    """A command that runs ``setup`` (Python, a hook such as a slow phase) and then the script's main."""
    module = name[:-3]
    # Ctrl-C as in a terminal's foreground, also when the tests run in a background job (whose
    # children start with SIGINT ignored, and Python then leaves it ignored)
    code = (f"import signal, sys; sys.path.insert(0, {ROOT!r}); signal.signal(signal.SIGINT, signal.default_int_handler)"
            f"\nimport cpu_settings, models, {module}\n{setup}\n{module}.main(sys.argv[1:])")
    return [sys.executable, "-u", "-c", code, *map(str, args)]


def start(cmd, **kw):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(proc, marker, lines):
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} never came:\n" + "".join(lines))


def finish(proc, lines, timeout=120):
    rest, _ = proc.communicate(timeout=timeout)
    return "".join(lines) + rest


# --------------------------------------------------------------- one writer per run
@kernel_independent
def test_a_second_process_on_a_run_is_refused_naming_the_first(archive, tmp_path):
    out = tmp_path / "run"
    train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)])
    holder = start([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import files, time; "
                    f"files.lock({str(out)!r}); print('locked', flush=True); time.sleep(60)"])
    wait_for(holder, "locked", [])
    try:
        with pytest.raises(SystemExit) as e:
            train_cifar10.main(["--resume", str(out), "--epochs", "2"])
        assert str(e.value.code) == (f"error: {out} is in use by another process (pid {holder.pid}); wait for it "
                                     "to end or stop it, then run again")
    finally:
        holder.kill()  # kill -9: the kernel drops its lock with it
        holder.wait()
    train_cifar10.main(["--resume", str(out), "--epochs", "2"])
    assert checkpoint.load(str(out))["epoch"] == 2


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    path = str(tmp_path / "confusion.png")
    with files.replacing(path) as a, files.replacing(path) as b:
        assert a != b
        open(a, "w").write("a")
        open(b, "w").write("b")
    assert open(path).read() in "ab" and os.listdir(tmp_path) == ["confusion.png"]


# --------------------------------------------------------------- a kill at any write
class Killed(BaseException):
    """kill -9 as a test can have it: nothing of ours catches it."""


@once_with_the_operators  # our writes' order: alike on Paddle 2.6, whose save other tests run
def test_a_kill_at_every_write_leaves_a_run_that_resume_finishes_consistently(archive, tmp_path, monkeypatch):
    args = TINY + ["--epochs", "2", "--data-file", archive]
    train_cifar10.main(args + ["--output-dir", str(tmp_path / "whole")])
    whole = checkpoint.load(str(tmp_path / "whole" / "last.pdckpt"))["model"]
    real = files.replacing
    writes = []

    def counting(path):
        writes.append(os.path.basename(path))
        if len(writes) == kill_at:
            raise Killed(path)
        return real(path)
    monkeypatch.setattr(files, "replacing", counting)
    monkeypatch.setattr(checkpoint, "replacing", counting)
    kill_at = 0
    train_cifar10.main(args + ["--output-dir", str(tmp_path / "count")])
    total, names = len(writes), list(writes)
    assert {"config.yaml", "last.pdckpt", "best.pdckpt", "metrics.csv", "curves.png", "results.yaml"} <= set(names)
    for kill_at in range(1, total + 1):
        out, writes[:] = tmp_path / f"k{kill_at}", []
        with pytest.raises(Killed):
            train_cifar10.main(args + ["--output-dir", str(out)])
        writes[:] = [None] * total  # no more kills
        if not (out / "last.pdckpt").exists():  # killed before the first checkpoint: a new run starts over
            shutil.rmtree(out)
            train_cifar10.main(args + ["--output-dir", str(out)])
        else:
            train_cifar10.main(["--resume", str(out)])
        results = yaml.safe_load(open(out / "results.yaml"))
        assert checkpoint.load(str(out / "best.pdckpt"))["epoch"] == results["best_epoch"], names[kill_at - 1]
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        assert [r["epoch"] for r in rows] == ["1", "2"] and (out / "curves.png").stat().st_size > 0
        assert not list(out.glob(".*.tmp"))
        last = checkpoint.load(str(out / "last.pdckpt"))["model"]
        for k in whole:  # exactly the uninterrupted run
            np.testing.assert_array_equal(np.asarray(last[k]), np.asarray(whole[k]), err_msg=f"{names[kill_at - 1]} {k}")


# ------------------------------------------------------------ signals in every phase
def test_sigterm_while_the_archive_loads_is_one_line(archive, tmp_path):
    slow = "import data, time; load = data.load_cifar\n" \
           "data.load_cifar = lambda *a: (print('LOADING', flush=True), time.sleep(30), load(*a))[2]"
    proc = start(hooked(slow, "train_cifar10.py", *TINY, "--data-file", archive, "--output-dir", tmp_path / "o"))
    lines = []
    wait_for(proc, "LOADING", lines)
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, lines)
    assert proc.returncode == 143, text
    assert text.strip().splitlines()[-1] == "terminated: nothing was saved" and "Traceback" not in text


@kernel_independent
def test_sigterm_to_the_process_group_with_workers_saves_the_position(archive, tmp_path):
    out = tmp_path / "run"
    proc = start(script("train_cifar10.py", *TINY, "--num-workers", "2", "--epochs", "50", "--data-file", archive,
                        "--output-dir", out), start_new_session=True)
    lines = []
    wait_for(proc, "epoch 2 step 2/", lines)
    os.killpg(proc.pid, signal.SIGTERM)  # what timeout, Slurm and docker stop send
    text = finish(proc, lines)
    assert proc.returncode == 143, text
    for noise in ("Traceback", "FatalError", "SystemError", "killed by signal"):
        assert noise not in text, text
    assert f"terminated: checkpoint in {out / 'last.pdckpt'}; continue with --resume {out}" in text
    state = checkpoint.load(str(out))
    assert state["epoch"] == 1 and state["progress"]["step"] >= 2
    assert not list(out.glob(".*.tmp"))


def children_of(pid):
    """The processes whose parent is ``pid``, from /proc."""
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == pid:
            kids.append(int(entry))
    return kids


def running(pid):
    """Whether ``pid`` exists and has not ended (a zombie has ended: nothing reaps it here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the processes from /proc (Linux)")
@kernel_independent
def test_kill_9_of_the_main_process_ends_its_workers(archive, tmp_path):
    """The kernel's out-of-memory kill of the main process left its DataLoader workers
    waiting for work for good, each holding its memory (data.end_with_the_main_process)."""
    proc = start(script("train_cifar10.py", *TINY, "--num-workers", "2", "--epochs", "50", "--data-file", archive,
                        "--output-dir", tmp_path / "run"))
    wait_for(proc, "epoch 1 step 2/", [])
    workers = children_of(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if running(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)  # not left to outlive the tests
    assert len(workers) == 2 and not left, (workers, left)
    shm = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    assert not [f for f in shm for w in workers if f.startswith(f"paddle_{w}_")]  # their batches gone too


@once_with_the_operators  # our handler's: alike on Paddle 2.6, whose SIGTERM other tests send
def test_a_second_sigterm_while_the_interrupt_checkpoint_is_written(archive, tmp_path):
    slow = "import checkpoint, time; save = checkpoint.save_run\n" \
           "def slow(*a):\n    print('SAVING', flush=True); time.sleep(3); save(*a)\n" \
           "checkpoint.save_run = slow"
    out = tmp_path / "run"
    proc = start(hooked(slow, "train_cifar10.py", *TINY, "--epochs", "50", "--data-file", archive, "--output-dir", out))
    lines = []
    wait_for(proc, "epoch 1 step 2/", lines)
    proc.send_signal(signal.SIGTERM)
    wait_for(proc, "SAVING", lines)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    text = finish(proc, lines)
    assert proc.returncode == 143 and "terminated: checkpoint in" in text and "Traceback" not in text, text
    assert checkpoint.load(str(out))["progress"]["step"] >= 2 and not list(out.glob(".*.tmp"))


@kernel_independent
def test_ctrl_c_during_the_final_report_and_resume_writes_it(archive, tmp_path):
    slow = "import engine, time; report = engine.final_report\n" \
           "def slow(*a, **k):\n    print('REPORT', flush=True); time.sleep(30); return report(*a, **k)\n" \
           "engine.final_report = slow"
    out = tmp_path / "run"
    proc = start(hooked(slow, "train_cifar10.py", *TINY, "--epochs", "1", "--data-file", archive, "--output-dir", out))
    lines = []
    wait_for(proc, "REPORT", lines)
    proc.send_signal(signal.SIGINT)
    text = finish(proc, lines)
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert (f"interrupted during the final report: the training is finished and saved in {out / 'last.pdckpt'}; "
            f"--resume {out} writes the report") in text
    assert not (out / "results.yaml").exists()
    train_cifar10.main(["--resume", str(out)])
    assert yaml.safe_load(open(out / "results.yaml"))["epochs"] == 1


# ---------------------------------------------------------- no silent fork or relabel
def test_a_fine_tuning_resume_refuses_other_classes(tmp_path):
    tune = ["--model", "resnet20", "--stem", "cifar", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
            "--pretrained", "none"]
    folder = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    finetune.main(tune + ["--data-dir", folder, "--output-dir", str(out)])
    other = make_image_folder(tmp_path / "other", classes=("cats", "dogs", "bats"))
    with pytest.raises(SystemExit) as e:
        finetune.main(["--resume", str(out), "--epochs", "2", "--data-dir", other])
    assert "has the classes bats, cats, dogs, the run was trained on cats, dogs, owls" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # evaluation refuses them too
        eval_script.main(["--ckpt", str(out), "--data-dir", other, "--num-workers", "0"])
    assert "has the classes bats, cats, dogs; the checkpoint was trained on cats, dogs, owls" in str(e.value.code)


# ----------------------------------------------------------------- file-system accidents
def test_a_read_only_run_directory_stops_before_training(archive, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile
    real = tempfile.mkstemp
    out = tmp_path / "ro"

    def read_only(*a, dir=None, **k):  # as root, chmod does not stop us: the file system says no
        if dir is not None and os.path.abspath(dir) == str(out):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(out)])
    assert str(e.value.code) == f"error: --output-dir {out} is not writable (Permission denied); make it writable " \
                                "or pick another --output-dir"
    assert "epoch 1 step" not in capsys.readouterr().out  # nothing trained


def test_eval_prints_its_results_when_the_picture_cannot_be_saved(archive, tmp_path, monkeypatch, capsys):
    import plots
    out = tmp_path / "run"
    train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)])
    capsys.readouterr()

    def refuse(path, *a, **k):
        raise data.UserError(f"could not write {path} (Permission denied: make {out} writable)")
    monkeypatch.setattr(plots, "plot_confusion", refuse)
    result = eval_script.main(["--ckpt", str(out), "--num-workers", "0"])
    captured = capsys.readouterr()
    assert f"top-1 {result['top1']:.4f}" in captured.out and result["confusion_png"] is None
    assert captured.err.startswith("warning: could not write") and "the results above are complete" in captured.err


# ----------------------------------------------------------------- output elsewhere
@once_with_the_operators  # our printing's: alike on Paddle 2.6
def test_a_closed_stdout_never_stops_training_and_ends_a_prediction_quietly(archive, tmp_path):
    out = tmp_path / "run"
    cmd = " ".join(script("train_cifar10.py", *TINY, "--epochs", "2", "--data-file", archive, "--output-dir", out))
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | head -1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert yaml.safe_load(open(out / "results.yaml"))["epochs"] == 2  # trained to the end
    folder = make_image_folder(tmp_path / "imgs", per_class=12)
    cmd = " ".join(script("predict.py", "--ckpt", out, folder, "--batch-size", "4"))
    done = subprocess.run(["bash", "-c", f"{cmd} | head -1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "Broken" not in done.stderr, done.stderr


# ------------------------------------------------------------------ the operator's cache
def test_an_empty_cache_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CPU_KERNELS_CACHE", "")
    monkeypatch.setenv("ONEDNN_CONV_CACHE", "")
    assert build.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "resnet-paddle")
    monkeypatch.setenv("ONEDNN_CONV_CACHE", str(tmp_path))  # the old name, still read
    assert build.cache_root() == str(tmp_path)


def test_each_checkout_builds_into_its_own_folder(monkeypatch):
    """Paddle compiles again when the sources' paths change: a second clone sharing the
    first one's folder rebuilt it at every switch (measured: 37 s at a training run's start)."""
    here = build.build_dir("/headers")
    assert build.build_dir("/headers") == here and build.build_dir("/other-headers") != here
    monkeypatch.setattr(build, "HERE", "/another/clone/cpu_kernels")
    assert build.build_dir("/headers") != here


def test_a_cache_path_with_a_space_is_built_through_a_plain_link(tmp_path):
    spaced = tmp_path / "my cache" / "cpu_kernels-x"
    spaced.mkdir(parents=True)
    link = build.shell_safe(str(spaced))
    assert " " not in link and os.path.realpath(link) == str(spaced.resolve())
    assert build.shell_safe("/plain/path-1.2") == "/plain/path-1.2"


def test_a_build_lock_held_by_a_stopped_process_times_out_naming_it(tmp_path, monkeypatch, capsys):
    holder = start([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import cpu_kernels.build, time\n"
                    f"with cpu_kernels.build.build_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"])
    wait_for(holder, "held", [])
    os.kill(holder.pid, signal.SIGSTOP)
    for _ in range(50):  # the signal takes effect when the holder is next scheduled
        if build.stopped(str(holder.pid)):
            break
        time.sleep(0.1)
    monkeypatch.setattr(build, "BUILD_WAIT_S", 1)
    monkeypatch.setattr(build, "SAY_WAIT_AFTER_S", 0.5)
    try:
        start_time = time.monotonic()
        with pytest.raises(cpu_kernels.Unavailable, match=f"locked by process {holder.pid} for over 1 s"):
            with build.build_lock(str(tmp_path)):
                pass
        assert time.monotonic() - start_time < 10
        assert capsys.readouterr().err == (f"waiting up to 1 s for the CPU operators' build in {tmp_path}: process "
                                           f"{holder.pid} holds its lock and is stopped (kill -CONT or end it)\n")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(cpu_kernels.load()[0] is None, reason="the operator does not build here")
def test_a_library_cut_short_is_told_from_a_whole_one(tmp_path):
    library = os.path.join(os.path.dirname(cpu_kernels.load()[0].__file__), "cpu_kernels_op.so")
    assert build.whole_library(library)
    data = open(library, "rb").read()
    for name, content in (("cut.so", data[:-1]), ("half.so", data[: len(data) // 2]), ("text.so", b"not a library")):
        (tmp_path / name).write_bytes(content)
        assert not build.whole_library(str(tmp_path / name)), name


# In a process of its own (Paddle aborts when one process registers the operator twice):
# Paddle's builder stands in by putting this process's build back, as compiling it again
# would (55 s; every suite's first build runs the builder for real), and counts its calls.
REBUILD = """import shutil, sys
sys.path.insert(0, sys.argv[1])
import cpu_settings, cpu_kernels
from paddle.utils import cpp_extension
real, calls = cpp_extension.load, []
def load(**kw):
    calls.append(kw["name"])
    shutil.copytree(sys.argv[2], kw["build_directory"] + "/cpu_kernels_op", symlinks=True)
    return real(**kw)
cpp_extension.load = load
print(cpu_kernels.load(), calls)
"""


@once_with_the_operators
@pytest.mark.skipif(cpu_kernels.load()[0] is None, reason="the operator does not build here")
def test_a_truncated_library_in_the_cache_is_rebuilt_once(tmp_path):
    cache = tmp_path / "with space"
    built = build.build_dir(build.find_headers(build.library_version()))  # this process's build
    shutil.copytree(built, cache / os.path.basename(built), symlinks=True)
    library = next(cache.glob("cpu_kernels-*/cpu_kernels_op/cpu_kernels_op.so"))
    library.write_bytes(library.read_bytes()[:1000])
    done = subprocess.run([sys.executable, "-c", REBUILD, ROOT, os.path.join(built, "cpu_kernels_op")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, CPU_KERNELS_CACHE=str(cache)))
    assert done.stdout.strip().endswith(", None) ['cpu_kernels_op']"), done.stdout + done.stderr  # built once, loaded
    assert library.stat().st_size > 100_000
    assert "cut short: building it again" in next(cache.glob("cpu_kernels-*/build.log")).read_text()


# ------------------------------------------------------------------- images as people have them
def test_a_phone_photo_is_seen_as_shown(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    img.save(tmp_path / "phone.jpg", exif=exif)
    shown = data.load_image(str(tmp_path / "phone.jpg"))
    assert shown.size == (20, 40)  # portrait, as the phone shows it
    top = np.asarray(shown)[:20].mean()
    assert top > 200  # the stored left half is on top after the rotation


def test_a_link_to_a_parent_or_another_class_is_followed_never(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    before = data.list_images(os.path.join(folder, "cats"))
    os.symlink(folder, os.path.join(folder, "cats", "loop"))  # to the parent: forever
    os.symlink(os.path.join(folder, "dogs"), os.path.join(folder, "cats", "dogs_too"))  # another class
    os.makedirs(os.path.join(folder, "cats", "more"))
    Image.new("RGB", (8, 8)).save(os.path.join(folder, "cats", "more", "x.png"))
    os.symlink(os.path.join(folder, "cats", "more"), os.path.join(folder, "cats", "more_again"))  # walked twice
    after = data.list_images(os.path.join(folder, "cats"))
    assert len(after) == len(before) + 1
    assert len(data.ImageFolder(folder)) == 3 * 8 + 1


def test_out_of_memory_is_one_line_with_the_batch_size(archive, tmp_path, monkeypatch):
    def no_memory(*a, **k):
        raise MemoryError("(ResourceExhausted) Fail to alloc memory of 1099511627776 size")
    monkeypatch.setattr(engine, "train_one_epoch", no_memory)
    with pytest.raises(SystemExit) as e:
        train_cifar10.main(TINY + ["--data-file", archive, "--output-dir", str(tmp_path / "o")])
    assert str(e.value.code) == "error: out of memory training or validating resnet20 at --batch-size 40: try --batch-size 20"


def test_bench_without_torch_is_one_line(monkeypatch):
    import builtins
    import bench
    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(SystemExit) as e:
        bench.main(["--impl", "torch", "--model", "resnet20", "--steps", "1"])
    assert str(e.value.code) == "error: the torch rows need PyTorch, for comparison only: pip install torch==2.13.0"


def test_saved_files_get_the_mode_open_would_give_them(tmp_path):
    path = tmp_path / "results.yaml"
    files.write_yaml(str(path), {"a": 1})
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files.UMASK)


def test_a_worker_stopped_while_it_exits_prints_nothing():
    """SIGTERM to the process group can reach a DataLoader worker of the epoch just ended,
    in its exit path (seen once under load on Paddle 2.6: a KeyboardInterrupt traceback
    from multiprocessing's finalizers). Only inside Paddle's worker loop does it stop it."""
    import sys
    import data
    assert data.quiet_worker_exit(15, sys._getframe()) is None  # exiting: nothing raised

    def _worker_loop():  # the name of Paddle's worker target (io/dataloader/worker.py)
        data.quiet_worker_exit(15, sys._getframe())

    with pytest.raises(KeyboardInterrupt):
        _worker_loop()
