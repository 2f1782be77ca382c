"""The `revnets` command as a user's shell sees it."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revnets.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch):
    """`revnets models | head -n 1`: head exits, the next write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w", buffering=1) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["models"]) == 1


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "revnets.cli", "--help"], capture_output=True, text=True)
    for command in ("train", "eval", "predict", "models", "plot", "analyze", "reproduce"):
        assert command in done.stdout


@pytest.mark.parametrize("argv", [["train", "--schedule", "bogus"], ["train", "--bogus"], ["analyze"], ["frobnicate"]])
def test_a_usage_error_is_one_line_and_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as end:
        main(argv)
    err = capsys.readouterr().err
    assert end.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err


@pytest.mark.parametrize("text, ok", [("3", True), ("0", False), ("-2", False), ("x", False)])
def test_positive_int_accepts_counts_only(text, ok):
    from revnets.cli import positive_int
    if ok:
        assert positive_int(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(text)


def test_library_modules_import_no_command_module():
    """Data flows one way: cli -> commands -> library; the library never imports a command module."""
    library = ["config", "rundir", "files", "loop", "train", "data", "checkpoint", "inference", "progress", "engine",
               "networks", "transformer", "text", "lm"]
    commands = ["cli", "evaluate", "predict", "plot", "report", "reproduce", "zoo", "generate"]
    code = (f"import sys; import {', '.join('revnets.' + m for m in library)}; "
            f"print([m for m in {commands} if 'revnets.' + m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["defaults.py", "drift.py"])
def test_benchmarks_train_through_the_library_step(script):
    source = (ROOT / "benchmarks" / script).read_text()
    assert "train_step(" in source and "opt.step()" not in source
