"""Every command README.md and README_cn.md show still parses: each `python SCRIPT ...`
(in a bash block or inline) is given to that script's own argument parser, which must
accept all of it; every requirements file a `pip install -r` names exists."""
import argparse
import importlib
import os
import re
import shlex

import pytest

from helpers import ROOT

READMES = ("README.md", "README_cn.md")


def shown_lines(text):
    """The command lines of a README: bash blocks (continuations joined) and inline code."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    lines += re.findall(r"`((?:python|pip) [^`]+)`", text)
    return lines


def commands(line):
    """shlex words of one shown line, comments and `...` left out, VAR=value prefixes too."""
    words = [w for w in shlex.split(line, comments=True) if w != "..."]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before a command
        words.pop(0)
    return words


def script_call(words):
    """(module name, its arguments) of a python command of ours, else None."""
    if words[:1] != ["python"] or words[1:2] == ["-c"]:
        return None
    if words[1:3] == ["-m", "paddle.distributed.launch"]:
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:
            return "(no script)", []
        return words[scripts[0]], words[scripts[0] + 1:]
    if words[1] == "-m":
        if words[2].startswith("pytest"):
            return None
        return words[2], words[3:]
    return words[1], words[2:]


def every_command():
    found = []
    for readme in READMES:
        for line in shown_lines(open(os.path.join(ROOT, readme), encoding="utf-8").read()):
            words = commands(line)
            if words:
                found.append((readme, line.strip(), words))
    return found


class Parsed(BaseException):
    """Raised by the patched parse_args: the arguments parsed, nothing run."""


CALLS = [c for c in every_command() if script_call(c[2])]


def test_the_readmes_show_commands():
    scripts = {script_call(w)[0] for _, _, w in CALLS}
    assert {"train_cifar10.py", "eval.py", "finetune.py", "predict.py", "export.py", "bench.py",
            "degradation.py", "check_env.py", "models.summary", "models.convert"} <= scripts


@pytest.mark.parametrize("readme,line,words", CALLS,
                         ids=[f"{r}-{script_call(w)[0]}-{n}" for n, (r, _, w) in enumerate(CALLS)])
def test_shown_command_parses(readme, line, words, monkeypatch, capsys):
    target, args = script_call(words)
    if target.endswith(".py"):
        assert os.path.isfile(os.path.join(ROOT, target)), f"{readme}: no {target} for `{line}`"
    module = importlib.import_module(target[:-3] if target.endswith(".py") else target)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, argv=None, namespace=None):
        raise Parsed(original(self, argv, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    try:
        module.main(args)
    except Parsed:
        return
    except SystemExit as e:
        if args == ["--help"] and e.code == 0 and "usage:" in capsys.readouterr().out:
            return
        pytest.fail(f"{readme}: `{line}` does not parse: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{readme}: `{line}` ran without parsing its arguments")


def test_requirements_files_shown_exist():
    for readme, line, words in every_command():
        if words[:2] == ["pip", "install"] and "-r" in words:
            name = words[words.index("-r") + 1]
            assert os.path.isfile(os.path.join(ROOT, name)), f"{readme}: `{line}` names no file {name}"
