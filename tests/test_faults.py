"""The faults of real machines (issue 41): a run killed before its first checkpoint, a
refused run in a notebook's process, and the odd environments and inputs users bring.
Subprocesses where a signal, a limit or an interpreter flag is involved."""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import export
import files
import train_cifar10
from helpers import ROOT, kernel_independent, make_cifar_archive, once_with_the_operators

pytestmark = kernel_independent
TINY = ["--model", "resnet20", "--batch-size", "40", "--val-size", "40", "--num-workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp("data") / "c.tar.gz", n_train=200, n_test=40))


def run(*args, cwd=ROOT, **kw):
    """A script of ours in a fresh interpreter: (exit code, everything it printed)."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, **kw)
    return done.returncode, done.stdout


def run_until(args, marker, act, timeout=120):
    """Start ``python args`` in the repository, call ``act(proc)`` when a line of its output
    holds ``marker``, let it end: (exit code, everything it printed)."""
    proc = subprocess.Popen([sys.executable, "-u", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            act(proc)
            break
    rest = proc.communicate(timeout=timeout)[0]
    return proc.returncode, "".join(lines) + rest


def paddle_version():
    import paddle
    return paddle.__version__


def one_line_error(text):
    """The last line of a refused command's output, after checking it is ours and alone."""
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


# ------------------------------------------------- a run with no checkpoint yet
@once_with_the_operators  # our run folder's: alike on Paddle 2.6
def test_a_run_killed_before_its_first_checkpoint_starts_again(archive, tmp_path):
    out = tmp_path / "run"
    command = ["train_cifar10.py", *TINY, "--epochs", "1", "--data-file", archive, "--output-dir", str(out)]
    code, _ = run_until(command, "epoch 1 step 1/", lambda proc: proc.kill())  # kill -9, as the OOM killer
    assert code == -signal.SIGKILL
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
@once_with_the_operators  # our lock's: alike on Paddle 2.6
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

    def kill_a_worker(proc):
        workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        os.kill(int(workers[0]), sig)
    code, text = run_until(["train_cifar10.py", *TINY, "--num-workers", "2", "--epochs", "2", "--data-file",
                            str(archive), "--output-dir", str(out)], "epoch 1 step 2/", kill_a_worker)
    assert code == 1, text
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


def test_omp_num_threads_that_is_no_number_is_one_line():
    code, text = run("eval.py", "--help", env=dict(os.environ, OMP_NUM_THREADS="abc"))
    assert code == 1 and one_line_error(text) == (
        "error: OMP_NUM_THREADS=abc is not a number of threads: set it to a whole number such as 2, or unset it")


# ------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def finished_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(out)])
    return out


def export_stopped_after_its_save(ckpt, out):
    """export.py --ckpt ckpt --output out, sent SIGTERM once the model and meta.json are
    written (into the temporary folder): (exit status, output)."""
    slow = ("import predictors, time; save = predictors.export\n"
            "def slow(*a, **k):\n    save(*a, **k); print('SAVED', flush=True); time.sleep(30)\n"
            "predictors.export = slow")
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import cpu_settings, export\n{slow}\nexport.main(sys.argv[1:])"
    return run_until(["-c", code, "--ckpt", str(ckpt), "--output", str(out)], "SAVED",
                     lambda proc: proc.send_signal(signal.SIGTERM))


def test_sigterm_during_export_leaves_the_folder_as_it_was(finished_run, tmp_path):
    out = tmp_path / "exported"
    status, text = export_stopped_after_its_save(finished_run, out)
    assert status == 143 and one_line_error(text) == "terminated: nothing was saved", text
    assert not out.exists()  # the folder the export made goes too: no model.*, meta.json or temporary folder


def test_sigterm_during_export_into_a_folder_that_was_there_keeps_it(finished_run, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, text = export_stopped_after_its_save(finished_run, out)
    assert status == 143 and os.listdir(out) == ["notes.txt"], text


def test_an_export_prints_its_own_line_alone(finished_run, tmp_path):
    out = tmp_path / "exported"
    code, text = run("export.py", "--ckpt", str(finished_run), "--output", str(out))
    assert code == 0 and text.splitlines() == [f"exported {out}/model.* and {out}/meta.json"], text  # no Paddle warning


def test_export_into_a_folder_it_cannot_write_is_one_line(finished_run, tmp_path, monkeypatch):
    import errno
    import tempfile
    out = tmp_path / "ro"

    def read_only(*a, **k):  # as root, chmod does not stop us: the file system says no
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(finished_run), "--output", str(out)])
    assert str(e.value.code) == f"error: could not write {out} (Permission denied: make {tmp_path} writable)"
    assert not out.exists()  # made for the export, and left empty: removed


def test_an_export_replaced_with_overwrite_is_whole(finished_run, tmp_path):
    out = tmp_path / "exported"
    export.main(["--ckpt", str(finished_run), "--output", str(out)])
    first = sorted(os.listdir(out))
    export.main(["--ckpt", str(finished_run), "--output", str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == first and "meta.json" in first


# --------------------------------------------------------- odd inputs and environments
def test_a_checkpoint_of_a_newer_version_says_so(finished_run, tmp_path):
    import checkpoint
    import eval as eval_script
    import paddle
    state = checkpoint.load(str(finished_run))
    state["config"]["warmup_shape"] = "cosine"  # a key of a later version
    newer = tmp_path / "newer.pdckpt"
    paddle.save(state, str(newer))
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", str(newer)])
    assert str(e.value.code) == ("error: the checkpoint's config has key(s) this version of the project does not "
                                 "know (warmup_shape): a newer version saved it; update the project (git pull) to "
                                 "read it")


@pytest.mark.parametrize("script,argv,said", [
    ("export.py", ["--ckpt", "x", "--output", "y", "--format", "tflite"],
     "error: argument --format: invalid choice: 'tflite' (choose from 'paddle', 'onnx') (see export.py --help)"),
    ("predict.py", ["photo.jpg"], "error: one of the arguments --ckpt --inference-model --onnx is required "
                                  "(see predict.py --help)"),
])
def test_a_command_line_mistake_is_one_line(script, argv, said):
    code, text = run(script, *argv)
    assert code == 2 and text.strip() == said, text


def test_python_OO_strips_no_docstring_we_need():
    if paddle_version().startswith("2."):  # Paddle 2.x itself needs its docstrings: refused in one line
        code, text = run("-OO", "train_cifar10.py", "--help")
        assert code == 1 and one_line_error(text) == (
            f"error: Paddle {paddle_version()} cannot be imported under python -OO (it builds its docstrings at "
            "import): run without -OO, or use Paddle 3.x")
        return
    code, text = run("-OO", "-m", "models.summary", "resnet20", "--input-size", "32", "--stem", "cifar")
    assert code == 0 and "Traceback" not in text, text


def test_an_image_over_pils_size_limit_is_skipped_and_the_others_predicted(finished_run, tmp_path, monkeypatch,
                                                                           capsys):
    import numpy as np
    from PIL import Image
    import predict
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, side in (("a.png", 32), ("bomb.png", 64), ("b.png", 32)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is over twice it: DecompressionBombError
    results = predict.main(["--ckpt", str(finished_run), str(folder), "--device", "cpu"])
    assert [os.path.basename(p) for p, _ in results] == ["a.png", "b.png"]
    assert f"skipped {folder / 'bomb.png'}: cannot read image (ImageTooLarge)" in capsys.readouterr().err


def test_a_notebooks_own_config_module_is_named_in_one_line(tmp_path):
    (tmp_path / "config.py").write_text("LEARNING_RATE = 0.1\n")  # the user's own
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import config; sys.path.insert(0, {ROOT!r}); "
            "import cpu_settings")
    status, text = run("-c", code, cwd=str(tmp_path))
    assert status == 1 and one_line_error(text) == (
        f"error: {tmp_path / 'config.py'} is imported as this project's config ({os.path.join(ROOT, 'config')}): "
        f"rename yours, or restart the kernel and import cpu_settings first with {ROOT} first on sys.path")


def test_ctrl_c_works_again_in_a_kernel_after_an_interrupted_run(archive, tmp_path, monkeypatch):
    """One Python process as a notebook's kernel: a run stopped by Ctrl-C, then Ctrl-C is
    Python's again (a KeyboardInterrupt), not ignored."""
    import engine
    calls = []

    def interrupted(training, loader, epoch):
        calls.append(epoch)
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    # a kernel's Ctrl-C, also where the tests run in a background job (whose SIGINT is ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):
            train_cifar10.main(TINY + ["--epochs", "1", "--data-file", archive, "--output-dir", str(tmp_path / "run")])
        assert calls == [0]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises at the next bytecode
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_ranks_of_a_cpu_launch_share_the_cores():
    code, text = run("-c", "import cpu_settings; print(cpu_settings.THREADS)",
                     env={k: v for k, v in dict(os.environ, PADDLE_LOCAL_SIZE="2").items() if k != "OMP_NUM_THREADS"})
    assert code == 0 and int(text.strip().splitlines()[-1]) == max(len(os.sched_getaffinity(0)) // 2, 1), text
