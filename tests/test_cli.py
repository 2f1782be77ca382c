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


def test_import_registers_a_users_schemes_and_models_before_the_command():
    """`revnets --import user_scheme models` in a fresh process (the module in the current directory):
    its models are listed, with "-" where the paper gives no count."""
    done = subprocess.run([sys.executable, "-m", "revnets.cli", "--import", "user_scheme", "models", "--num-classes",
                           "10"], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("user-tanh-6 "))
    assert row.split()[1:4] == ["user-tanh", "2-2-2", "8-16-16"] and row.split()[-1] == "-"


def test_imported_models_are_valid_names_for_the_commands(tmp_path, capsys):
    argv = ["--import", "user_scheme", "train", "--model", "user-tanh-6", "--grow-at", "1", "--epochs", "2",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "--grow-at halves the step size h, which user-tanh-6 does not have" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_import_of_a_missing_module_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as end:
        main(["--import", "no_such_module_xyz", "models"])
    assert end.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "revnets: error: --import no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"]

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
