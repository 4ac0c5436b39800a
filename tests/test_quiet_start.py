"""What a user meets first: a script's start prints nothing of Paddle's (its ccache and
OMP_NUM_THREADS warnings came with every command, even a one-line error)."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, kernel_free

pytestmark = kernel_free  # --help and command lines refused before any step: alike in both Paddle 2.6 suites

SCRIPTS = ("train_cifar10.py", "finetune.py", "eval.py", "predict.py", "export.py", "bench.py", "degradation.py",
           "check_env.py")


def run(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_nothing_on_stderr(script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage:") and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("argv", [["train_cifar10.py", "--epochs", "0"], ["eval.py", "--ckpt", "no/such/run"],
                                  ["finetune.py", "--data-dir", "no/such/folder"]])
def test_a_bad_input_is_our_one_line_alone(argv):
    proc = run(*argv)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_the_cpu_threads_are_still_every_core():
    """Paddle imports with OMP_NUM_THREADS=1 (no warning); both OpenMP runtimes then get the count."""
    code = ("import cpu_settings, ctypes, os, paddle; libs = os.path.join(os.path.dirname(paddle.__file__), 'libs');"
            "print(os.environ['OMP_NUM_THREADS'], ctypes.CDLL('libgomp.so.1').omp_get_max_threads(),"
            "ctypes.CDLL(os.path.join(libs, 'libiomp5.so')).omp_get_max_threads()"
            " if os.path.exists(os.path.join(libs, 'libiomp5.so')) else 'none')")
    proc = run("-c", code)
    n = str(len(os.sched_getaffinity(0)))
    env, gomp, iomp = proc.stdout.split()
    assert env == n and gomp == n and iomp in (n, "none") and proc.stderr == "", proc.stdout + proc.stderr


def test_every_config_key_has_its_comment_as_help_and_its_choices():
    import argparse
    import config
    parser = argparse.ArgumentParser()
    config.add_config_arguments(parser, config.FinetuneConfig)
    actions = {a.dest[len("cfg_"):]: a for a in parser._actions if a.dest.startswith("cfg_")}
    assert set(actions) - set(config.RENAMED) == {f.name for f in config.dataclasses.fields(config.FinetuneConfig)}
    for name, action in actions.items():
        assert not action.help.startswith("(default"), f"{name} has no comment in config.py"
    assert actions["conv"].help == argparse.SUPPRESS  # the old name of cpu_kernels: taken, not listed
    assert actions["stem"].help.startswith("cifar (3x3/1) | imagenet (7x7/2 + max-pool) | auto: a CIFAR net's only "
                                           "one; resnet18..152 the CIFAR stem")  # the comment's second line joined
    assert actions["stem"].help.endswith("(default 'auto')") and actions["stem"].metavar == "{auto,cifar,imagenet}"
    assert actions["epochs"].help == "passes over the training split (default 5)"  # the base's comment, the subclass's default
    assert actions["amp"].metavar == "{true,false}"
