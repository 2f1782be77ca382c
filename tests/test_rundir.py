"""The run directory: one writer, a clean Ctrl-C, and files that agree after a kill at any point."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from revnets import checkpoint, cli, train
from revnets.config import parse_config
from revnets.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--units", "1", "1", "1", "--channels", "8", "16", "32", "--batch-size", "200"]


def test_a_second_writer_is_refused_with_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    with RunDir(run).locked():
        assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another revnets train (pid {os.getpid()})" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    assert not run.exists()  # the lock's own directory, left empty, is removed with it
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    with RunDir(run).locked():
        assert cli.main(["train", "--resume", str(run)]) == 2
    assert not (run / ".lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999\n")  # a pid that cannot exist; nobody holds the flock
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert "taking over" in capsys.readouterr().out and not (run / ".lock").exists()


def test_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path, capsys):
    run = tmp_path / "run"

    def kill_after_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(train.Interrupted):
        train.train(parse_config([*TINY, "--epochs", "3", "--out", str(run)]), on_epoch=kill_after_2)
    # As if killed after last.pt of epoch 2, a new best, was written and before best.pt was:
    last = checkpoint.load(run / "last.pt")
    last.update(best_epoch=2, best_acc=1.0)
    checkpoint.save(run / "last.pt", last)
    older = checkpoint.load(run / "best.pt")
    older["epoch"] = 1
    checkpoint.save(run / "best.pt", older)
    (run / "summary.json").write_text("{}")  # and an older summary, of a shorter run
    summary = train.train(parse_config(["--resume", str(run)]))
    assert "repaired" in capsys.readouterr().out
    best = checkpoint.load(run / "best.pt")  # epoch 3 cannot beat the accuracy of 1.0 written above
    assert best["epoch"] == summary["best_epoch"] == 2 and summary["epochs"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert json.loads((run / "summary.json").read_text()) == summary


def test_a_best_epoch_that_no_file_holds_is_refused(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        train.train(parse_config([*TINY, "--epochs", "3", "--out", str(run)]),
                    on_epoch=lambda row: row["epoch"] == 2 and (_ for _ in ()).throw(KeyboardInterrupt))
    last = checkpoint.load(run / "last.pt")
    last.update(best_epoch=1)
    checkpoint.save(run / "last.pt", last)
    (run / "best.pt").unlink()
    with pytest.raises(ValueError, match="not the run's best epoch 1, which no file holds"):
        train.train(parse_config(["--resume", str(run)]))


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C raising KeyboardInterrupt here and in children, even when the suite itself was started
    with SIGINT ignored (a background job): exec resets a handled signal to its default."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_exits_130_with_one_line_that_says_how_to_continue(tmp_path, sigint_as_in_a_terminal):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "revnets.cli", "train", *TINY, "--epochs", "200", "--out", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (run / "last.pt").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip() == f"revnets train: interrupted at epoch {err.split('epoch ')[1].split(';')[0]}; " \
                          f"continue with: revnets train --resume {run}"
    ckpt = checkpoint.load(run / "last.pt")  # loadable, and the directory is coherent
    assert checkpoint.load(run / "best.pt")["epoch"] == ckpt["best_epoch"] and not (run / ".lock").exists()


def test_ctrl_c_waits_until_a_group_of_files_is_written(sigint_as_in_a_terminal):
    from revnets.files import deferred_interrupt
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("both files written")
    assert done == ["both files written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
