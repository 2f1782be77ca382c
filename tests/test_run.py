"""The one training run, for both tasks (image and text): its files, resume bitwise after a kill,
one writer, a clean Ctrl-C, repair after a kill between last.pt and best.pt, settings compared on
resume, and faults that stop the run with its last finite epoch kept."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import revnets
from revnets import checkpoint
from revnets.cli import main
from revnets.cli.train import parse_config
from revnets.training import Interrupted, NonFiniteError, Run, run as run_module, train
from revnets.training.rundir import RUN_FILES, RunDir

ROOT = Path(__file__).resolve().parents[1]
TEXT = str(ROOT / "tests" / "data" / "tiny.txt")
TASKS = {  # a tiny run of each task; steps per epoch: 6 (1,293 digits / 200) and 3
    "image": ["--dataset", "digits", "--model", "hamiltonian-74", "--units", "1", "1", "1", "--channels", "8", "16",
              "32", "--batch-size", "200"],
    "text": ["--dataset", "text", "--data-dir", TEXT, "--model", "leapfrog-lm-tiny", "--context", "16",
             "--batch-size", "4", "--steps-per-epoch", "3"],
}
STEPS = {"image": 6, "text": 3}
SCORE = {"image": "val_acc", "text": "val_bpc"}


@pytest.fixture(params=list(TASKS))
def task(request):
    return request.param


def _config(task, out, *flags):
    return parse_config([*TASKS[task], "--out", str(out), *flags])


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


class Killed(Exception):
    pass


def _kill_after(epoch, error=Killed):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise error
    return on_epoch


def test_a_run_writes_every_file_and_a_summary_that_agrees_with_them(task, tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(_config(task, run, "--epochs", "2"))
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["dataset"] == ("text" if task == "text" else "digits")
    assert config["versions"]["torch"] == torch.__version__
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((run / "summary.json").read_text()) == summary
    scores = [float(r[SCORE[task]]) for r in rows]
    best = (max if task == "image" else min)(scores)
    assert summary["best_epoch"] == scores.index(best) + 1
    assert checkpoint.load(run / "best.pt")["epoch"] == summary["best_epoch"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("revnets train: training") and f"results in {run}/" in out[0]
    assert [line.split()[1] for line in out[1:3]] == ["1/2", "2/2"] and out[-1].startswith("done: ")


@pytest.mark.parametrize("flags", [[], ["--segment", "auto"]], ids=["", "segment-auto"])
def test_a_killed_run_resumes_to_the_uninterrupted_result_bitwise(task, tmp_path, flags):
    whole = train(_config(task, tmp_path / "whole", "--epochs", "3", "--seed", "3", *flags))
    with pytest.raises(Killed):
        train(_config(task, tmp_path / "killed", "--epochs", "3", "--seed", "3", *flags), on_epoch=_kill_after(1))
    assert len(_metrics(tmp_path / "killed")) == 1 and not (tmp_path / "killed" / "summary.json").exists()
    with open(tmp_path / "killed" / "metrics.csv", "a") as f:  # killed after epoch 2's row, before its checkpoint
        f.write("2" + ",9" * (len(_metrics(tmp_path / "whole")[0]) - 1) + "\n")
    resumed = train(parse_config(["--resume", str(tmp_path / "killed")]))  # the run directory says which task
    a, b = checkpoint.load(tmp_path / "whole" / "last.pt"), checkpoint.load(tmp_path / "killed" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if flags:  # the drift measurements at the same calls, with the same choices
        assert a["segments"] == b["segments"] and {s["calls"] for s in a["segments"]} == {3 * STEPS[task]}
    drop = ("epoch_s", "images_per_s", "tokens_per_s", "peak_mb")  # timings
    assert [{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "whole")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "killed")]
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["epochs"] == 3


def test_resume_takes_the_runs_settings_and_refuses_other_ones(task, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_config(task, run, "--epochs", "2"), on_epoch=_kill_after(1))
    with pytest.raises(ValueError, match=r"different settings: lr="):
        parse_config(["--resume", str(run), "--lr", "0.5"])
    with pytest.raises(ValueError, match="already holds a run"):
        train(_config(task, run, "--epochs", "2"))
    assert main(["train", "--resume", str(run)]) == 0
    assert len(_metrics(run)) == 2 and "resuming after epoch 1 of 2" in capsys.readouterr().out


def test_settings_of_last_pt_are_compared_on_resume(task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_config(task, run, "--epochs", "2", "--seed", "1"), on_epoch=_kill_after(1))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "seed": 2}))  # config.json and last.pt disagree
    with pytest.raises(ValueError, match=r"last.pt was saved by a run with other settings: seed=1 \(now 2\)"):
        train(parse_config(["--resume", str(run)]))
    good = (run / "last.pt").read_bytes()
    (run / "config.json").write_text(json.dumps(config))
    (run / "last.pt").write_bytes(good[:1000])
    with pytest.raises(ValueError, match="last.pt is not a readable checkpoint"):
        train(parse_config(["--resume", str(run)]))


def test_a_kill_between_last_and_best_is_repaired_on_resume(task, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(_config(task, run, "--epochs", "3"), on_epoch=_kill_after(2, KeyboardInterrupt))
    # As if killed after last.pt of epoch 2, a new best, was written and before best.pt was:
    metric = "best_acc" if task == "image" else "best_bpc"
    last = checkpoint.load(run / "last.pt")
    last.update(best_epoch=2, **{metric: 1.0 if task == "image" else 0.0})  # epoch 3 cannot beat it
    checkpoint.save(run / "last.pt", last)
    older = checkpoint.load(run / "best.pt")
    older["epoch"] = 1
    checkpoint.save(run / "best.pt", older)
    (run / "summary.json").write_text("{}")  # and an older summary, of a shorter run
    summary = train(parse_config(["--resume", str(run)]))
    assert "repaired" in capsys.readouterr().out
    best = checkpoint.load(run / "best.pt")
    assert best["epoch"] == summary["best_epoch"] == 2 and summary["epochs"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert json.loads((run / "summary.json").read_text()) == summary


def test_a_best_epoch_that_no_file_holds_is_refused(task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(_config(task, run, "--epochs", "3"), on_epoch=_kill_after(2, KeyboardInterrupt))
    last = checkpoint.load(run / "last.pt")
    last.update(best_epoch=1)
    checkpoint.save(run / "last.pt", last)
    (run / "best.pt").unlink()
    with pytest.raises(ValueError, match="not the run's best epoch 1, which no file holds"):
        train(parse_config(["--resume", str(run)]))


def test_last_pt_changed_between_reading_and_locking_is_refused(task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_config(task, run, "--epochs", "2"), on_epoch=_kill_after(1))
    resumed = Run(parse_config(["--resume", str(run)]))
    checkpoint.save(run / "last.pt", {**checkpoint.load(run / "last.pt"), "wall_s": 1e9})  # another run wrote it
    with pytest.raises(ValueError, match="last.pt changed while this run was starting"):
        resumed.fit()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(task, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *TASKS[task], "--epochs", "1", "--out", str(run)]
    with RunDir(run).locked():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another revnets train (pid {os.getpid()})" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    assert not run.exists()  # the lock's own directory, left empty, is removed with it
    run.mkdir()
    (run / ".lock").write_text("999999999\n")  # a pid that cannot exist; nobody holds the flock
    assert main(argv) == 0
    assert "taking over" in capsys.readouterr().out and not (run / ".lock").exists()
    with RunDir(run).locked():
        assert main(["train", "--resume", str(run)]) == 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_epoch(task, tmp_path, monkeypatch):
    real, calls = run_module.train_step, []

    def poisoned_in_epoch_2(model, opt, x, y, **kw):  # the real step; NaN after epoch 1
        calls.append(1)
        if len(calls) > STEPS[task]:
            for p in model.parameters():
                p.data.fill_(float("nan"))
        return real(model, opt, x, y, **kw)
    monkeypatch.setattr(run_module, "train_step", poisoned_in_epoch_2)
    with pytest.raises(NonFiniteError, match=rf"non-finite loss at epoch 2, step 1 of {STEPS[task]}; "
                                             r".*last.pt holds epoch 1"):
        train(_config(task, tmp_path, "--epochs", "3"))
    for name in ("last.pt", "best.pt"):
        ckpt = checkpoint.load(tmp_path / name)
        assert ckpt["epoch"] == 1 and checkpoint.count_nonfinite(ckpt["model"]) == 0
    assert len(_metrics(tmp_path)) == 1 and not (tmp_path / "summary.json").exists()


def test_weights_that_overflow_in_the_last_step_of_an_epoch_are_not_saved(task, tmp_path, monkeypatch):
    real, calls = run_module.train_step, []

    def overflowing(model, opt, x, y, **kw):  # the real step; then, at epoch 1's last step, an infinite weight
        result = real(model, opt, x, y, **kw)
        calls.append(1)
        if len(calls) == STEPS[task]:
            opt.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(run_module, "train_step", overflowing)
    with pytest.raises(NonFiniteError, match="non-finite weights after epoch 1; .*nothing was saved"):
        train(_config(task, tmp_path / "run", "--epochs", "2"))
    assert not (tmp_path / "run").exists()  # nothing at all: config.json comes with the first checkpoint


def test_a_diverging_learning_rate_exits_3_with_one_line_and_writes_nothing(task, tmp_path, capsys):
    lr = {"image": "1e6", "text": "1e20"}[task]
    assert main(["train", *TASKS[task], "--epochs", "2", "--lr", lr, "--out", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.match(r"revnets train: stopped: non-finite (loss|gradient) at epoch 1, step \d", err)
    assert "nothing was saved" in err and f"--lr (now {float(lr):g}) or --h" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C raising KeyboardInterrupt here and in children, even when the suite itself was started
    with SIGINT ignored (a background job): exec resets a handled signal to its default."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_exits_130_with_one_line_that_says_how_to_continue(task, tmp_path, sigint_as_in_a_terminal):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "revnets.cli", "train", *TASKS[task], "--epochs", "500",
                              "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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


def test_drift_is_measured_and_the_network_grown_for_either_task(task, tmp_path):
    flags = ["--epochs", "2", "--grow-at", "1", "--drift-every", "2"] + (["--units", "2", "2", "2"] if task == "image"
                                                                         else [])
    summary = train(_config(task, tmp_path / "run", *flags))
    drift = [float(r["drift_max"]) for r in _metrics(tmp_path / "run")]
    assert len(drift) == 2 and all(0 <= d < 1e-4 for d in drift)  # float32 reversal of a stable chain
    model = revnets.load(tmp_path / "run" / "last.pt")  # rebuilt grown, as its record says
    chains = [unit.blocks for unit in model.net.units] if task == "image" else [model.net.blocks]
    assert [len(c) for c in chains] == ([2, 2, 2] if task == "image" else [8])  # 1 or 4 blocks, each split in two
    assert {b.h for c in chains for b in c} == {0.05 if task == "image" else 0.5}
    assert summary["params"] == sum(p.numel() for p in model.net.parameters())


def test_ctrl_c_waits_until_a_group_of_files_is_written(sigint_as_in_a_terminal):
    from revnets.files import deferred_interrupt
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("both files written")
    assert done == ["both files written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_row_lost_between_the_checkpoint_and_metrics_csv_is_restored_on_resume(task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_config(task, run, "--epochs", "3"), on_epoch=_kill_after(2))
    rows = _metrics(run)
    header, *lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join([header, *lines[:-1]]) + "\n")  # killed before epoch 2's row
    train(parse_config(["--resume", str(run)]))
    assert _metrics(run)[:2] == rows and len(_metrics(run)) == 3


def test_a_disk_without_room_stops_before_writing_and_says_what_it_needs(tmp_path, monkeypatch):
    from revnets import files
    (tmp_path / "old.json").write_text("{}")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: __import__("shutil")._ntuple_diskusage(1, 1, 10))
    with pytest.raises(files.DiskFull, match=r"no space left for .*old.json: it needs 0.8 KB and 0.0 KB are free"):
        files.write_json(tmp_path / "old.json", {"a": list(range(100))})
    assert (tmp_path / "old.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB mounted at tmp_path/disk (root can mount one; others skip)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_exits_4_with_files_in_step_and_resumes_once_there_is_room(task, tmp_path, small_disk, capsys):
    train(_config(task, tmp_path / "sized", "--epochs", "1"))
    pages = -(-(tmp_path / "sized" / "last.pt").stat().st_size // 4096)  # tmpfs counts whole pages
    room = 4096 * (2 * pages + 4 + pages // 2)  # last.pt, best.pt and the small files; not a third checkpoint
    subprocess.run(["mount", "-o", f"remount,size={room}", str(small_disk)], check=True)
    run = small_disk / "run"
    assert main(["train", *TASKS[task], "--epochs", "3", "--out", str(run)]) == 4  # epoch 1 fits, epoch 2 does not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"revnets train: stopped: no space left for {run}/\S+: "
                                      r"it needs [\d.]+ [KM]B", err[0])
    assert "holds epoch 1" in err[0] and err[0].endswith(f"continue with: revnets train --resume {run}")
    assert checkpoint.load(run / "last.pt")["epoch"] == 1 and [r["epoch"] for r in _metrics(run)] == ["1"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["train", "--resume", str(run)]) == 0 and [r["epoch"] for r in _metrics(run)] == ["1", "2", "3"]
