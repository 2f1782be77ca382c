"""The `revnets` command as a user's shell sees it."""
import os
import subprocess
import sys

from revnets.cli import main


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch):
    """`revnets models | head -n 1`: head exits, the next write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w", buffering=1) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["models"]) == 1


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "revnets.cli", "--help"], capture_output=True, text=True)
    for command in ("train", "eval", "models", "plot", "analyze", "reproduce"):
        assert command in done.stdout
