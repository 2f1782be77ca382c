"""Text runs and `revnets generate`: what only language models have (what every run does is in
test_run.py): bad text refused, the symmetric MLP kept, sampling, the context checked against the text."""
import json
import re
from pathlib import Path

import pytest
import torch

import revnets
from revnets import checkpoint
from revnets.cli import main
from revnets.layers import SymmetricMLP

TINY = str(Path(__file__).parent / "data" / "tiny.txt")
TEXT = b"some text here " * 4
FLAGS = ["train", "--dataset", "text", "--data-dir", TINY, "--model", "leapfrog-lm-tiny", "--context", "16",
         "--batch-size", "4", "--steps-per-epoch", "3", "--epochs", "2"]


def _exit_code(argv):
    """`revnets ARGV`'s exit code, from a usage error (argparse exits) or from a refused setting."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_train_writes_a_run_with_bits_per_char(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FLAGS + ["--out", str(out)]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["epoch", "step", "train_loss", "train_acc", "val_bpc"] and len(rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_bpc"] == min(float(r.split(",")[4]) for r in rows[1:]) and summary["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["model"] == "leapfrog-lm-tiny"
    assert "bits/char" in capsys.readouterr().out


@pytest.mark.parametrize("content, flags, match", [
    (b"", [], "is empty"),
    (b"ab\xc3(", [], "is not UTF-8 text"),
    (TEXT, ["--units", "2"], "--units: not a setting of text runs"),
    (TEXT, ["--model", "leapfrog-lm-huge"], "unknown model 'leapfrog-lm-huge'"),
    (TEXT, ["--model", "hamiltonian-74"], "hamiltonian-74 is an image model; --dataset text trains"),
    (TEXT, ["--mlp", "gated"], "argument --mlp: invalid choice: 'gated'"),
    (TEXT, ["--context", "100"], "--context 100 is longer than the held-out text"),
    (TEXT, ["--lr", "inf"], "--lr must be finite and > 0; got inf"),
    (TEXT, ["--h", "inf"], r"h \(the step size\) must be a finite number > 0; got inf"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, content, flags, match):
    (tmp_path / "t.txt").write_bytes(content)
    out = tmp_path / "run"
    args = ["train", "--dataset", "text", "--data-dir", str(tmp_path / "t.txt"), "--model", "leapfrog-lm-tiny",
            "--context", "4", "--out", str(out), *flags]
    assert _exit_code(args) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


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


def test_load_gives_the_language_model_that_generate_uses(trained, capsys):
    model = revnets.load(trained)
    assert isinstance(model, revnets.LanguageModel) and not model.training and model.context == 16
    text = model.generate("And God", 30, temperature=0)
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "And God", "--tokens", "30",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text + "\n"
    with torch.no_grad():
        ids = model.vocab.encode(text)[None]
        assert model(ids[:, -17:-1])[0, -1].argmax() == ids[0, -1]  # greedy: the last token is the argmax


def test_symmetric_mlp_run_and_its_checkpoint_load_with_that_mlp(tmp_path):
    out = tmp_path / "run"
    assert main(FLAGS + ["--epochs", "1", "--mlp", "symmetric", "--out", str(out)]) == 0
    model = revnets.load(out / "best.pt")
    assert all(isinstance(b.mlp, SymmetricMLP) for b in model.net.blocks)
    assert main(["train", "--resume", str(out), "--mlp", "standard"]) == 2  # not that run's


def test_generate_rejects_unknown_characters_bad_settings_and_image_checkpoints(trained, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "€", "--tokens", "3"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    cases = [(["--temperature", "nan"], "--temperature must be a finite number >= 0"),
             (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
             (["--device", "foo"], "device 'foo' is not usable here"),
             (["--device", "cuda:99"], "device 'cuda:99' is not usable here")]  # no build has 100 GPUs
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda' is not usable here"))
    for flags, match in cases:
        assert main(["generate", "--checkpoint", str(trained), "--prompt", "a", *flags]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    checkpoint.save(tmp_path / "image.pt", dict(model={}, config={"model": "hamiltonian-74"}, epoch=1))
    assert main(["generate", "--checkpoint", str(tmp_path / "image.pt"), "--prompt", "a"]) == 2
    assert "holds an image classifier, not a language model: classify images with revnets predict" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["predict", "{tmp}/x.png"], ["analyze", "--out", "{tmp}/report"]])
def test_a_language_models_checkpoint_given_to_an_image_command_says_to_use_generate(trained, tmp_path, capsys,
                                                                                     command):
    name, *rest = [a.format(tmp=tmp_path) for a in command]
    assert main([name, "--checkpoint", str(trained), *rest]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt holds a language model, not an image classifier: sample from it with " \
        "revnets generate" in err, err
    assert not (tmp_path / "report").exists()
