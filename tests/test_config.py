"""A run's settings: every bad one refused before anything is written, the recipe's schedule scaled
to the epochs, the reported model name, and help that shows choices and defaults."""
import argparse
import os
import re

import pytest
import torch

from revnets import cli
from revnets.cli.train import parse_config
from revnets.inference import model_overrides
from revnets.training import Config
from revnets.training.settings import check_extension, config_dict, model_name

TINY = ["--units", "1", "1", "1", "--channels", "8", "16", "32", "--batch-size", "200", "--epochs", "1"]


@pytest.mark.parametrize("flags, message", [
    (["--channels", "0", "16", "16"], "--channels must be positive numbers; got 0 16 16"),
    (["--units", "0", "1", "1"], "--units must be positive numbers"),
    (["--units", "1", "1", "1", "1", "1", "--channels", "8", "8", "8", "8", "8"],
     r"expects input of shape .* got \(1, 1, 8, 8\)"),
    (["--h", "0"], r"h \(the step size\) must be a finite number > 0; got 0.0"),
    (["--h", "nan"], r"h \(the step size\) must be a finite number > 0; got nan"),
    (["--h", "inf"], r"h \(the step size\) must be a finite number > 0; got inf"),
    (["--h", "1e30"], r"h \(the step size\) must be below 1.84e\+19, where h\^2 overflows float32; got 1e\+30"),
    (["--context", "16"], "--context: not a setting of image runs"),
    (["--lr", "nan"], "--lr must be finite and > 0; got nan"),
    (["--lr", "-1"], "--lr must be finite and > 0"),
    (["--lr", "inf"], "--lr must be finite and > 0"),
    (["--momentum", "1"], r"--momentum must lie in \[0, 1\)"),
    (["--weight-decay", "-1"], "--weight-decay must be finite and >= 0"),
    (["--seed", "-1"], "--seed must be at least 0; got -1"),
    (["--val-fraction", "1"], r"--val-fraction must lie in \[0, 1\)"),
    (["--milestones", "3", "2"], "--milestones must be increasing positive epochs"),
    (["--device", "foo"], "device 'foo' is not usable here"),
    (["--device", "cuda:99"], "device 'cuda:99' is not usable here"),
    (["--device", "meta"], "device 'meta' holds no data"),
    (["--init-from", "/nonexistent.pt"], "--init-from /nonexistent.pt: no such checkpoint file"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", ""], "--out must name a directory; got ''"),
    (["--segment", "\u00b2"], "--segment must be 'auto' or a positive number of blocks; got '\u00b2'"),
])
def test_bad_settings_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "run" / "nested"
    flags = [f.format(file=tmp_path / "file") for f in flags]
    assert cli.main(["train", *TINY, "--out", str(out), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "device 'cuda' is not usable here" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_directory_is_refused(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "ro" / "run")]) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_step_milestones_scale_with_the_epochs_unless_given():
    assert Config(epochs=160).milestones == (80, 120, 160)
    assert Config(epochs=30).milestones == (15, 22, 30)  # 50, 75, 100 % of the run
    assert Config(epochs=30, milestones=(10, 20)).milestones == (10, 20)
    assert Config().milestones == (80, 120, 160) and Config(dataset="stl10").milestones == (60, 80, 100)
    assert Config(dataset="stl10", epochs=50).milestones == (6, 8, 10)
    assert Config(epochs=2).milestones == (1, 2)


def test_model_overrides_take_every_given_model_setting_as_the_model_takes_it():
    given = dict(model="hamiltonian-74", units=[2, 2, 2], h=0.5, norm="none", segment="3", exact=False, lr=0.1)
    assert model_overrides(given) == dict(units=(2, 2, 2), h=0.5, norm=None, segment=3)
    assert model_overrides(dict(segment="auto", mlp="symmetric", dropout=0.0)) == dict(
        segment="auto", mlp="symmetric", dropout=0.0)  # dropout 0 was given: kept


def test_a_resized_model_is_named_after_its_overrides(tmp_path):
    config = parse_config(["--units", "1", "1", "1", "--h", "0.05", "--out", str(tmp_path)])
    assert model_name(config) == "hamiltonian-74 (units 1-1-1, h 0.05)"
    assert config_dict(config)["name"] == model_name(config)
    assert model_name(Config(model="resnet-32")) == "resnet-32"


def test_a_run_grows_only_forward():
    saved = Config(epochs=4, milestones=(2, 3))
    check_extension(saved, Config(epochs=8, milestones=(2, 3)), 4)
    check_extension(saved, Config(epochs=8, milestones=(2, 6)), 2)  # the decay at 3 has not happened yet
    with pytest.raises(ValueError, match="already trained 4 epochs"):
        check_extension(saved, Config(epochs=3, milestones=(2, 3)), 4)
    with pytest.raises(ValueError, match=r"decays at \[2, 3\] have already happened"):
        check_extension(saved, Config(epochs=8, milestones=(2, 6)), 4)
    with pytest.raises(ValueError, match="cosine schedule has its shape fixed"):
        check_extension(Config(epochs=4, schedule="cosine"), Config(epochs=8, schedule="cosine"), 4)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", list(_subcommands()))
def test_every_option_in_help_shows_its_choices_and_default(name):
    parser = _subcommands()[name]
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required or action.help == argparse.SUPPRESS:
            continue  # positionals, switches, required options and --help/--version have no default to show
        assert "default" in (action.help or ""), f"{name} {action.option_strings[0]}: no default in its help"
        if action.choices is not None:
            shown = parser.format_help()
            assert all(str(c) in shown for c in action.choices), f"{name} {action.option_strings[0]}"


def test_the_api_takes_a_segment_length_as_a_number():
    assert Config(dataset="digits", segment=3).overrides()["segment"] == 3
    with pytest.raises(ValueError, match="--segment must be 'auto' or a positive number of blocks; got 0"):
        Config(dataset="digits", segment=0)


def test_fsdp_without_fsdp2_in_torch_is_refused(monkeypatch):
    from torch.distributed import fsdp
    monkeypatch.delattr(fsdp, "fully_shard")  # as in torch < 2.6
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--fsdp needs PyTorch's FSDP2 \(torch >= 2.6\)"):
        Config(dataset="digits", fsdp=True)
