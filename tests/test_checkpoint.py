"""Checkpoints: atomic writes, loading without running code, clear refusals."""
import pickle
from pathlib import Path

import pytest
import torch

from revnets import checkpoint, inference
from revnets.training import Config
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
    assert [growths(config, e) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    assert growths(Config(), 5) == 0


def test_rng_state_restores_the_random_number_stream():
    state = rng_state(torch.device("cpu"))
    first = torch.rand(5)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)
