"""`revnets train --dataset text` and `revnets generate`: runs, resume, guards, sampling, bad input."""
import json
from pathlib import Path

import pytest
import torch

from revnets import checkpoint, lm
from revnets.cli import main
from revnets.transformer import SymmetricMLP

TINY = str(Path(__file__).parent / "data" / "tiny.txt")
FLAGS = ["train", "--dataset", "text", "--data-dir", TINY, "--model", "leapfrog-lm-tiny", "--context", "16",
         "--batch-size", "4", "--steps-per-epoch", "3", "--epochs", "2"]


def test_train_writes_a_run_with_bits_per_char(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FLAGS + ["--out", str(out)]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "step", "train_loss", "val_bpc"] and len(rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["best_bpc"] < 8 and summary["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["model"] == "leapfrog-lm-tiny"
    assert "bits/char" in capsys.readouterr().out


def test_resume_is_bitwise_on_cpu(tmp_path):
    config = lm.config_from_args(__import__("argparse").Namespace(
        dataset="text", data_dir=TINY, model="hamiltonian-lm-tiny", context=16, batch_size=4, steps_per_epoch=3,
        epochs=3, out=str(tmp_path / "whole")))
    lm.train(config)

    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        lm.train(lm.LMConfig(**{**config.__dict__, "out": str(cut)}), on_epoch=kill)
    assert main(["train", "--dataset", "text", "--resume", str(cut)]) == 0
    whole, resumed = (checkpoint.load(d / "last.pt") for d in (tmp_path / "whole", cut))
    assert resumed["epoch"] == 3
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[1:] and \
        [r.split(",")[:4] for r in (tmp_path / "whole" / "metrics.csv").read_text().splitlines()] == \
        [r.split(",")[:4] for r in (cut / "metrics.csv").read_text().splitlines()]


def test_non_finite_loss_stops_before_writing_the_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FLAGS + ["--lr", "1e20", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "stopped: non-finite" in err and "(epoch 1); nothing was written" in err
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("content, flags, match", [
    (b"", [], "is empty"),
    (b"ab\xc3(", [], "is not UTF-8 text"),
    (b"some text here", ["--units", "2"], "--dataset text does not use --units"),
    (b"some text here", ["--model", "leapfrog-lm-huge"], "unknown language model"),
    (b"some text here", ["--mlp", "gated"], "unknown --mlp 'gated'; expected one of standard, symmetric"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, content, flags, match):
    (tmp_path / "t.txt").write_bytes(content)
    out = tmp_path / "run"
    args = ["train", "--dataset", "text", "--data-dir", str(tmp_path / "t.txt"), "--out", str(out), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main(FLAGS + ["--out", str(out)]) == 0
    return out / "best.pt"


def test_generate_deterministic_under_a_seed(trained, capsys):
    def run(*extra):
        assert main(["generate", "--checkpoint", str(trained), "--prompt", "And God", "--tokens", "30", *extra]) == 0
        return capsys.readouterr().out
    first = run("--seed", "3")
    assert first.startswith("And God") and len(first.rstrip("\n")) == len("And God") + 30
    assert run("--seed", "3") == first and run("--seed", "4") != first
    assert run("--top-k", "1") == run("--temperature", "0")


def test_symmetric_mlp_run_and_its_checkpoint_load_with_that_mlp(tmp_path):
    out = tmp_path / "run"
    assert main(FLAGS + ["--epochs", "1", "--mlp", "symmetric", "--out", str(out)]) == 0
    model, _ = lm.load_lm(out / "best.pt")
    assert all(isinstance(b.mlp, SymmetricMLP) for b in model.blocks)
    assert main(["train", "--dataset", "text", "--resume", str(out), "--mlp", "standard"]) == 2  # not that run's


def test_generate_rejects_unknown_characters_and_foreign_checkpoints(trained, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "€", "--tokens", "3"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    checkpoint.save(tmp_path / "image.pt", dict(model={}, config={"model": "hamiltonian-74"}, epoch=1))
    assert main(["generate", "--checkpoint", str(tmp_path / "image.pt"), "--prompt", "a"]) == 2
    assert "not a checkpoint of a text run" in capsys.readouterr().err
