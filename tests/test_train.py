"""`revnets train` on images: the recipe's defaults, validation, schedules that grow, runs started from
weights, clear refusals (what every run does, image or text, is in test_run.py)."""
import csv
import json
import re

import pytest
import torch

from revnets import checkpoint, cli, inference
from revnets.cli.train import parse_config
from revnets.engine import AutoSegment
from revnets.training import Config, Run, train
from revnets.training import data, progress
from revnets.training.rundir import RUN_FILES
from revnets.training.step import evaluate
from revnets.training.tasks import ImageTask

TINY = ["--model", "hamiltonian-74", "--units", "1", "1", "1", "--channels", "8", "16", "32",
        "--batch-size", "200"]


def _run(tmp_path, *flags, on_epoch=None):
    config = parse_config([*TINY, "--out", str(tmp_path), *flags])
    return train(config, on_epoch=on_epoch)


def _accuracy(path, split="test", amp="off"):
    """Accuracy of a digits checkpoint's network on a split, standardised with its record's statistics
    and evaluated as a run evaluates (the same loader, batches and autocast)."""
    ckpt = checkpoint.load(path)
    rec = inference.record_of(ckpt, path)
    ds = data.subsample(data.load_dataset("digits"), 1.0, ckpt["config"]["seed"], ckpt["config"]["val_fraction"])
    x, y = (ds.val_x, ds.val_y) if split == "val" else (ds.test_x, ds.test_y)
    loader = data.Loader(x, y, 200, mean=rec["mean"], std=rec["std"], device="cpu", train=False)
    return evaluate(inference.from_checkpoint(ckpt, path).net, loader, amp)["acc"]


def _exit_code(argv):
    """`revnets ARGV`'s exit code, from a usage error (argparse exits) or from a refused setting."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_epoch_digits_run_writes_every_file(tmp_path, capsys):
    run = tmp_path / "run"
    summary = _run(run, "--epochs", "2", "--schedule", "cosine", "--lr", "0.2")
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["units"] == [1, 1, 1] and config["weight_decay"] == 2e-4
    assert config["versions"]["torch"] == torch.__version__ and "revnets" in config["versions"]
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and tuple(rows[0]) == ImageTask.fields
    assert all(float(r[k]) > 0 for r in rows for k in ImageTask.fields)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["final_acc"] == float(rows[-1]["test_acc"]) and summary["best_on"] == "validation"
    best = rows[summary["best_epoch"] - 1]
    assert summary["best_val_acc"] == max(float(r["val_acc"]) for r in rows) == float(best["val_acc"])
    assert summary["best_test_acc"] == float(best["test_acc"])
    assert summary["params"] > 0 and summary["wall_s"] > 0 and summary["peak_mb"] > 0
    # best.pt holds the weights that scored best on the validation images, held out of training
    ds = data.subsample(data.load_dataset("digits"), 1.0, 0, 0.1)
    assert (len(ds.train_y), len(ds.val_y)) == (1293, 144)
    torch.testing.assert_close(inference.record_of(checkpoint.load(run / "best.pt"), run)["mean"],
                               data.channel_stats(ds.train_x)[0])  # the training images' statistics
    assert _accuracy(run / "best.pt", "val") == pytest.approx(summary["best_val_acc"], abs=1e-12)
    assert _accuracy(run / "best.pt") == pytest.approx(summary["best_test_acc"], abs=1e-12)
    out = capsys.readouterr().out.splitlines()  # not a TTY: no bar, one line per epoch
    assert out[0].startswith("revnets train:") and str(run) in out[0]
    assert "hamiltonian-74 (units 1-1-1, channels 8-16-32)" in out[0] and "144 validation" in out[0]
    assert re.search(r"\d s \(ETA \d+ s\)  process peak RSS [\d,]+ MB", out[1]), out[1]
    assert [line.split()[1] for line in out[1:3]] == ["1/2", "2/2"] and f"results in {run}/" in out[-1]


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet-33"], "unknown model 'resnet-33'; valid names: resnet-32,"),
    (["--train-fraction", "0"], r"--train-fraction must lie in \(0, 1\]; got 0.0"),
    (["--train-fraction", "1.5"], r"--train-fraction must lie in \(0, 1\]; got 1.5"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "--data-dir /nonexistent/cifar does not exist"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet' \\(choose from 'cifar10',"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no last.pt"),
    (["--epochs", "4", "--grow-at", "4"], r"--grow-at epochs must lie in \[1, 4\)"),
    (["--model", "revnet-38", "--grow-at", "4"], "--grow-at halves the step size h, which revnet-38 does not have"),
])
def test_bad_flags_end_with_one_line_and_exit_code_2(argv, message, capsys):
    assert _exit_code(["train", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("revnets train: error: ")
    assert re.search(message, captured.err), captured.err


def test_dataset_recipe_fills_only_the_flags_not_given():
    cifar, stl = Config(dataset="cifar10"), Config(dataset="stl10", batch_size=64)
    assert (cifar.batch_size, cifar.milestones, cifar.weight_decay, cifar.smoothness, cifar.epochs) == \
        (100, (80, 120, 160), 2e-4, 2e-4, 160)
    assert (stl.batch_size, stl.milestones, stl.weight_decay, stl.smoothness) == (64, (60, 80, 100), 5e-4, 3e-4)
    assert (cifar.lr, cifar.momentum, cifar.schedule) == (0.1, 0.9, "step")
    assert parse_config(["--dataset", "stl10", "--weight-decay", "0"]).weight_decay == 0


def test_step_schedule_divides_by_ten_at_the_milestones(tmp_path):
    _run(tmp_path, "--epochs", "3", "--milestones", "1", "2", "--lr", "0.05")
    assert [float(r["lr"]) for r in _metrics(tmp_path)] == pytest.approx([0.05, 0.005, 0.0005])


@pytest.mark.parametrize("flags", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16", "--plain"]])
def test_mixed_precision_and_channels_last_run_on_cpu(tmp_path, flags):
    summary = _run(tmp_path, "--epochs", "1", "--train-fraction", "0.3", *flags)
    assert summary["final_acc"] == pytest.approx(_accuracy(tmp_path / "last.pt", amp=flags[1]), abs=1e-12)


def test_train_fraction_trains_on_the_stratified_subset(tmp_path, capsys):
    _run(tmp_path, "--epochs", "1", "--train-fraction", "0.1")
    assert "(129 train / 144 validation / 360 test images)" in capsys.readouterr().out


def test_metrics_csv_keeps_rows_up_to_an_epoch_and_tensorboard_is_optional(tmp_path):
    metrics = progress.MetricsCSV(tmp_path / "metrics.csv", ("epoch", "loss"))
    for e in (1, 2, 3):
        metrics.append({"epoch": e, "loss": 1 / e})
    metrics.keep_until(2)
    assert [r["epoch"] for r in metrics.read()] == ["1", "2"]
    if progress.importlib.util.find_spec("tensorboard") is None:
        assert progress.tensorboard_writer(tmp_path) is None


@pytest.mark.parametrize("enabled", [True, False])
def test_epoch_bar_shows_loss_accuracy_and_throughput_only_when_enabled(enabled, capsys):
    calls = []
    bar = progress.EpochBar(30, 1, 2, "images", enabled=enabled, every=10)
    for _ in range(30):
        bar.step(lambda: calls.append(1) or (0.5, 0.25, 1234.0))
    shown = getattr(bar.bar, "postfix", None)  # tqdm draws it next to the ETA
    assert (shown == "loss 0.5000 acc 25.00% 1,234 img/s") == enabled
    bar.close()
    assert len(calls) == (4 if enabled else 0)  # batches 0, 10, 20 and the last: stats() may wait for a GPU
    assert ("epoch 1/2" in capsys.readouterr().out) == enabled


@pytest.mark.parametrize("flags, check", [
    (["--norm", "none"], lambda chain: not any(isinstance(m, torch.nn.BatchNorm2d) for m in chain.modules())),
    (["--segment", "2"], lambda chain: chain.segment == 2),
    (["--segment", "auto"], lambda chain: isinstance(chain.segment, AutoSegment)),
    (["--exact"], lambda chain: chain.exact),
    (["--plain"], lambda chain: not chain.memory_efficient),
])
def test_block_flags_reach_the_network_and_its_checkpoint(tmp_path, flags, check):
    _run(tmp_path / "run", "--epochs", "1", "--units", "3", "3", "3", *flags)
    model = inference.load(tmp_path / "run" / "last.pt").net
    assert all(check(unit.blocks) for unit in model.units)


@pytest.mark.parametrize("flags", [["--segment", "0"], ["--segment", "many"], ["--norm", "layer"]])
def test_bad_block_flags_end_with_one_line(tmp_path, capsys, flags):
    assert _exit_code(["train", *TINY, "--out", str(tmp_path / "run"), *flags]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_eval_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    _run(tmp_path, "--epochs", "1")
    ckpt = checkpoint.load(tmp_path / "last.pt")
    ckpt["model"]["head.weight"][0, 0] = float("nan")
    checkpoint.save(tmp_path / "nan.pt", ckpt)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nan.pt"), "--dataset", "digits"]) == 2
    assert "nan.pt holds 1 non-finite weights" in capsys.readouterr().err


# ---- validation, runs that grow, runs started from weights ---------------------------------------

def test_without_a_validation_split_best_is_chosen_on_test_and_said_so(tmp_path, capsys):
    summary = _run(tmp_path, "--epochs", "2", "--val-fraction", "0")
    rows = _metrics(tmp_path)
    assert summary["best_on"] == "test" and summary["best_val_acc"] is None
    assert summary["best_test_acc"] == max(float(r["test_acc"]) for r in rows)
    assert all(r["val_acc"] == "" for r in rows)
    out = capsys.readouterr().out
    assert "(1,437 train / 360 test images)" in out and "best.pt is chosen on the test set" in out


def test_resume_with_more_epochs_continues_as_one_longer_run_bitwise(tmp_path):
    flags = ["--seed", "2", "--lr", "0.05"]
    longer = _run(tmp_path / "long", *flags, "--epochs", "3", "--milestones", "1", "2")
    _run(tmp_path / "grown", *flags, "--epochs", "2")  # default milestones for 2 epochs: 1 and 2
    with pytest.raises(ValueError, match="different settings: lr=0.05"):
        parse_config(["--resume", str(tmp_path / "grown"), "--epochs", "3", "--lr", "0.1"])
    grown = train(parse_config(["--resume", str(tmp_path / "grown"), "--epochs", "3"]))
    assert [r["lr"] for r in _metrics(tmp_path / "grown")] == [r["lr"] for r in _metrics(tmp_path / "long")]
    a, b = checkpoint.load(tmp_path / "long" / "last.pt"), checkpoint.load(tmp_path / "grown" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert grown["final_acc"] == longer["final_acc"] and grown["epochs"] == 3
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["epochs"] == 3 and config["extended"] == [dict(after_epoch=2, epochs=2, milestones=[1, 2])]
    with pytest.raises(ValueError, match="already trained 3 epochs"):
        train(parse_config(["--resume", str(tmp_path / "grown"), "--epochs", "2"]))


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path):
    _run(tmp_path / "first", "--epochs", "1")
    weights = checkpoint.load(tmp_path / "first" / "last.pt")["model"]
    run = Run(parse_config([*TINY, "--epochs", "1", "--out", str(tmp_path / "second"), "--init-from",
                            str(tmp_path / "first" / "last.pt")]))
    assert run.start == 0 and all(torch.equal(run.net.state_dict()[k], weights[k]) for k in weights)
    assert not (tmp_path / "second").exists()  # making a Run writes nothing
    with pytest.raises(ValueError, match="last.pt does not match the model"):
        Run(parse_config([*TINY, "--channels", "8", "8", "8", "--out", str(tmp_path / "third"),
                          "--init-from", str(tmp_path / "first" / "last.pt")]))
    run.fit()
    (tmp_path / "first" / "last.pt").unlink()  # a run started from weights resumes from its own
    assert train(parse_config(["--resume", str(tmp_path / "second"), "--epochs", "2"]))["epochs"] == 2


def test_long_steps_print_one_line_each_when_not_a_terminal(capsys):
    assert list(progress.bar(range(3), "decoding", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == "decoding (3)\n"
    assert progress.duration(42) == "42 s" and progress.duration(600) == "10 min" and progress.duration(9000) == "2.5 h"


def test_resume_may_move_the_decays_that_have_not_happened_yet(tmp_path):
    flags = ["--train-fraction", "0.2", "--val-fraction", "0"]
    _run(tmp_path / "whole", *flags, "--epochs", "5", "--milestones", "3", "4")
    _run(tmp_path / "grown", *flags, "--epochs", "2", "--milestones", "3")
    train(parse_config(["--resume", str(tmp_path / "grown"), "--epochs", "5", "--milestones", "3", "4"]))
    lrs = [float(r["lr"]) for r in _metrics(tmp_path / "grown")]
    assert lrs == [float(r["lr"]) for r in _metrics(tmp_path / "whole")] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])


def test_a_run_saved_before_validation_splits_existed_resumes_without_one(tmp_path):
    def kill_after_1(row):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--epochs", "2", "--val-fraction", "0", on_epoch=kill_after_1)
    config = json.loads((tmp_path / "config.json").read_text())  # as an older revnets wrote it: no
    old = {k: v for k, v in config.items() if k not in ("val_fraction", "init_from")}  # val_fraction, init_from
    (tmp_path / "config.json").write_text(json.dumps(old))
    ckpt = checkpoint.load(tmp_path / "last.pt")
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("val_fraction", "init_from")}
    checkpoint.save(tmp_path / "last.pt", ckpt)
    assert train(parse_config(["--resume", str(tmp_path)]))["best_on"] == "test"
