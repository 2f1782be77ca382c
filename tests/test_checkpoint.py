"""Checkpoints: atomic writes, loading without running code, clear refusals; what a killed writer
leaves in a run directory (temporary files, its lock) and how a resume deals with it."""
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from revnets import checkpoint, inference
from revnets.cli import main
from revnets.training import Config
from revnets.training.rundir import RunDir
from revnets.training.run import rng_state, set_rng_state
from revnets.training.settings import growths

CONFIG = dict(model="hamiltonian-74", units=(1, 1, 1), channels=(8, 16, 32), h=None, plain=False)


def _ckpt(**config):
    """A network and a checkpoint of it with its model record (grey 4x4 images of 10 classes)."""
    torch.manual_seed(0)
    cfg = {**CONFIG, **config}
    rec = inference.record(cfg["model"], inference.model_overrides(cfg), "image", classes=[str(i) for i in range(10)],
                           in_channels=3, image_size=(8, 8), mean=torch.zeros(3), std=torch.ones(3))
    model = inference.build_network(rec)
    return model, dict(model=model.state_dict(), config=cfg, epoch=1, record=rec)


def test_save_replaces_atomically_and_load_round_trips(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    model, ckpt = _ckpt()
    checkpoint.save(path, ckpt)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 1 and loaded["config"] == ckpt["config"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)


def test_load_rebuilds_the_network_from_its_record(tmp_path):
    model, ckpt = _ckpt(h=0.05)
    checkpoint.save(tmp_path / "best.pt", ckpt)
    rebuilt = inference.load(tmp_path / "best.pt")
    x = torch.randn(2, 3, 8, 8)
    assert {b.h for unit in rebuilt.net.units for b in unit} == {0.05} and not rebuilt.training
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


class Payload:
    """Unpickling this object would create `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save(dict(model={}, config=CONFIG, epoch=1, extra=Payload(marker)), path)
    with pytest.raises(ValueError, match="evil.pt"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match="evil.pt"):
        inference.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    path.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(ValueError, match="foreign.pt"):
        checkpoint.load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "last.pt"
    checkpoint.save(path, _ckpt()[1])
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00not a checkpoint" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match="last.pt"):
        checkpoint.load(path)


def test_missing_keys_and_non_dicts_are_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"a.pt .*missing config, epoch"):
        checkpoint.load(tmp_path / "a.pt")
    torch.save([1, 2], tmp_path / "b.pt")
    with pytest.raises(ValueError, match="b.pt .*list"):
        checkpoint.load(tmp_path / "b.pt")
    with pytest.raises(FileNotFoundError, match="c.pt"):
        checkpoint.load(tmp_path / "c.pt")


def test_weights_that_do_not_fit_the_record_are_refused(tmp_path):
    _, ckpt = _ckpt()
    ckpt["record"]["overrides"]["units"] = (2, 1, 1)  # the weights are of a 1-1-1 network
    checkpoint.save(tmp_path / "mismatch.pt", ckpt)
    with pytest.raises(ValueError, match=r"mismatch.pt does not match the model: .*units.0.blocks.0"):
        inference.load(tmp_path / "mismatch.pt")
    _, ckpt = _ckpt()
    ckpt["record"]["overrides"]["channels"] = (8, 16, 64)
    checkpoint.save(tmp_path / "size.pt", ckpt)
    with pytest.raises(ValueError, match=r"size.pt does not match the model: .*size mismatch"):
        inference.load(tmp_path / "size.pt")


def test_growths_count_the_grow_epochs_before_the_checkpoint():
    config = Config(epochs=6, grow_at=(2, 4))
    assert [growths(config.grow_at, e) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    assert growths(Config().grow_at, 5) == 0 == growths(None, 5)


def test_rng_state_restores_the_random_number_stream():
    state = rng_state(torch.device("cpu"))
    first = torch.rand(5)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)


# ---- what a killed writer leaves in its run directory ----------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run of a tiny network on digits (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--dataset", "digits", "--model", "hamiltonian-74", "--units", "1", "1", "1",
                 "--channels", "8", "8", "8", "--batch-size", "200", "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_a_resume_removes_the_temporary_files_of_a_killed_write(finished, tmp_path, capsys):
    """A kill inside `files.atomic_write` leaves .NAME.XXXX.tmp next to a run file; taking the lock
    removes those of the run's files (no other writer can be using them), and nothing else."""
    run = shutil.copytree(finished, tmp_path / "run")
    stale = [".last.pt.k1l2e3.tmp", ".best.pt.abcd.tmp", ".metrics.csv.x.tmp", ".summary.json.y.tmp"]
    for name in [*stale, ".notes.txt.z.tmp"]:
        (run / name).write_bytes(b"half a file")
    (run / ".best.pt.dir.tmp").mkdir()  # not a file a writer left: kept
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert sorted(p.name for p in run.glob(".*")) == [".best.pt.dir.tmp", ".notes.txt.z.tmp"]  # the lock is gone too
    note = next(line for line in capsys.readouterr().out.splitlines() if "left by a killed run" in line)
    assert all(name in note for name in stale) and checkpoint.load(run / "last.pt")["epoch"] == 2


def test_a_lock_that_names_no_pid_is_taken_over_and_a_directory_refused(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / ".lock").write_bytes(b"\xff\xfe\x80 not UTF-8")  # nobody holds its flock
    with RunDir(run).locked():
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
    assert capsys.readouterr().out == f"note: taking over {run}/.lock, left by pid unknown, which no longer holds it\n"
    (run / ".lock").mkdir()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {run}/.lock cannot be the lock of {run} (" in err, err
    assert checkpoint.load(run / "last.pt")["epoch"] == 1 and (run / ".lock").is_dir()


def test_a_lock_that_is_a_link_is_refused_and_its_target_left_alone(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (run / ".lock").symlink_to(precious)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run}/.lock cannot be the lock of {run}" in err, err
    assert precious.read_text() == "keep me" and checkpoint.load(run / "last.pt")["epoch"] == 1


TINY_RUN = ["train", "--dataset", "digits", "--model", "hamiltonian-74", "--units", "1", "1", "1", "--channels", "8",
            "8", "8", "--batch-size", "200", "--epochs", "1"]


@pytest.mark.parametrize("name", ["config.json", "metrics.csv", "summary.json"])
def test_a_new_run_refuses_a_directory_holding_files_it_would_overwrite(tmp_path, capsys, name):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_text("a user's file")
    assert main([*TINY_RUN, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds {name} of another run or program" in err, err
    assert (tmp_path / "out" / name).read_text() == "a user's file"


def test_a_start_that_saved_only_its_config_starts_again(tmp_path):
    """A run stopped before its first checkpoint (a full disk) leaves config.json: the same command runs."""
    from revnets.cli.train import parse_config
    from revnets.training.settings import config_dict
    from revnets.files import write_json
    out = tmp_path / "out"
    write_json(out / "config.json", config_dict(parse_config([*TINY_RUN[1:], "--out", str(out)])))
    assert main([*TINY_RUN, "--out", str(out)]) == 0 and checkpoint.load(out / "last.pt")["epoch"] == 1
    assert main([*TINY_RUN, "--lr", "0.5", "--out", str(tmp_path / "other")]) == 0
    write_json(tmp_path / "other2" / "config.json", config_dict(parse_config([*TINY_RUN[1:], "--out", str(out)])))
    assert main([*TINY_RUN, "--lr", "0.5", "--out", str(tmp_path / "other2")]) == 2  # another run's settings


@pytest.mark.parametrize("content", [b"garbage\nmore,stuff\n", b"epoch,lr\n\xff\xfe,1\n", b"epoch,lr\none,1\n"])
def test_a_damaged_metrics_csv_stops_a_resume_before_anything_is_written(finished, tmp_path, capsys, content):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "metrics.csv").write_bytes(content)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run}/metrics.csv is not a metrics.csv of a run" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
