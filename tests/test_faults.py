"""The faults of real machines (issue 41): a run killed before its first checkpoint, a
refused run in a notebook's process, and the odd environments and inputs users bring.
Subprocesses where a signal, a limit or an interpreter flag is involved."""
import os
import resource
import signal
import subprocess
import sys

import pytest

import files
import train_cifar10
from helpers import make_cifar_archive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet20", "--batch-size", "40", "--val-size", "40", "--num-workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp("data") / "c.tar.gz", n_train=200, n_test=40))


def run(*args, **kw):
    """A script of ours in a fresh interpreter: (exit code, everything it printed)."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, **kw)
    return done.returncode, done.stdout


def one_line_error(text):
    """The last line of a refused command's output, after checking it is ours and alone."""
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


# ------------------------------------------------- a run with no checkpoint yet
def test_a_run_killed_before_its_first_checkpoint_starts_again(archive, tmp_path):
    out = tmp_path / "run"
    command = ["-u", "train_cifar10.py", *TINY, "--epochs", "1", "--data-file", archive, "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 1 step 1/" in line:
            proc.send_signal(signal.SIGKILL)  # as the OOM killer does
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == ["config.yaml"]
    code, text = run("train_cifar10.py", "--resume", str(out))
    assert code != 0 and one_line_error(text) == (
        f"error: --resume {out}: no checkpoint in it; the run stopped before its first one: start it again with the "
        "command that made it, without --resume")
    code, text = run(*command)
    assert code == 0, text
    assert os.path.exists(out / "last.pdckpt") and os.path.exists(out / "results.yaml")


def test_a_finished_run_is_still_refused_to_a_new_one(archive, tmp_path):
    out = tmp_path / "run"
    train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)])
    code, text = run("train_cifar10.py", *TINY, "--epochs", "1", "--data-file", archive, "--output-dir", str(out))
    assert code != 0 and "already holds a run" in one_line_error(text)


# ------------------------------------------------------------------ notebooks
def test_a_refused_run_leaves_the_lock_for_a_resume_from_a_terminal(archive, tmp_path):
    """A notebook's second fit into the same folder is refused; the kernel keeps running,
    and a --resume from a terminal must not find the run locked by it."""
    out = tmp_path / "run"
    args = TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)]
    train_cifar10.main(args)
    with pytest.raises(SystemExit):
        train_cifar10.main(args)  # the notebook's second fit
    assert str(out) not in files._held
    code, text = run("train_cifar10.py", "--resume", str(out), "--epochs", "2")
    assert code == 0, text


# ------------------------------------------------------------ DataLoader workers
@pytest.mark.parametrize("sig,said", [
    (signal.SIGKILL, "was killed by signal Killed (SIGKILL is what the kernel's out-of-memory killer sends"),
    (signal.SIGTERM, "ended unexpectedly (a signal sent to it alone?)"),
])
def test_a_worker_killed_is_one_line_and_resume_continues(tmp_path, sig, said):
    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=440, n_test=40)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-u", "train_cifar10.py", *TINY, "--num-workers", "2", "--epochs", "2",
                             "--data-file", str(archive), "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1 step 2/" in line:
            workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
            os.kill(int(workers[0]), sig)
            break
    text = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, text
    last = one_line_error(text)
    assert said in last and last.endswith(f"continue with --resume {out}"), text
    code, text = run("train_cifar10.py", "--resume", str(out))
    assert code == 0, text


# ------------------------------------------------------------------ resource limits
def file_size_limit(n):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def test_a_file_size_limit_at_start_is_one_line(archive, tmp_path):
    code, text = run("train_cifar10.py", *TINY, "--epochs", "1", "--data-file", archive, "--output-dir",
                     str(tmp_path / "run"), preexec_fn=file_size_limit(0))
    assert code == 1 and one_line_error(text) == (
        "error: a file-size limit (ulimit -f) stops this process writing (File too large): raise it "
        "(ulimit -f unlimited)")


def test_a_file_size_limit_while_a_checkpoint_is_saved_keeps_the_run_as_it_was(archive, tmp_path):
    out = tmp_path / "run"
    train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)])
    before = {name: (out / name).read_bytes() for name in ("last.pdckpt", "results.yaml")}
    code, text = run("train_cifar10.py", "--resume", str(out), "--epochs", "2", preexec_fn=file_size_limit(1 << 20))
    assert code == 1 and one_line_error(text) == (
        f"error: could not write {out / 'last.pdckpt'} (File too large: a file-size limit (ulimit -f) is below it; "
        "raise it (ulimit -f unlimited)); what was saved before is intact")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*.tmp"))


def test_an_address_space_limit_too_small_for_paddle_is_one_line(tmp_path):
    limit = 1000 << 20  # Paddle 3.3.1 fails to map its libraries under it
    code, text = run("eval.py", "--help", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert code == 1 and one_line_error(text) == (
        "error: the address-space limit (ulimit -v) is 1000 MB; Paddle needs about 1.5 GB of addresses to load "
        "and train: raise it (ulimit -v unlimited)")


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_omp_num_threads_that_is_no_number_is_one_line(value):
    code, text = run("eval.py", "--help", env=dict(os.environ, OMP_NUM_THREADS=value))
    assert code == 1 and one_line_error(text) == (
        f"error: OMP_NUM_THREADS={value} is not a number of threads: set it to a whole number such as 2, or unset it")
