"""`revnets reproduce`: every experiment's grid runs end to end at the tiny budget, resumes and skips.

The runs train tiny networks for one epoch on an image folder of 10 classes x 10 images written here:
they check the pipeline, not the accuracy.
"""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from revnets.cli import main, reproduce
from revnets.cli.train import parse_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ROOT/{train,test}/<class>/*.png: 10 classes, 10 train and 4 test images each, 32x32 RGB."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 4  # a little signal in the colour balance
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return root


def reproduce_cli(experiment: str, out: Path, folder: Path, *extra: str) -> int:
    return main(["reproduce", experiment, "--budget", "tiny", "--out", str(out), "--dataset", "folder",
                 "--data-dir", str(folder), "--device", "cpu", *extra])


@pytest.mark.parametrize("experiment", reproduce.EXPERIMENTS)
def test_tiny_budget_runs_every_experiment_end_to_end(experiment, folder, tmp_path):
    assert reproduce_cli(experiment, tmp_path, folder) == 0
    rows = reproduce.read_summary_csv(tmp_path / "summary.csv")
    runs = reproduce.grid(experiment, "tiny", {})
    assert [r["run"] for r in rows] == sorted(run.name for run in runs)
    for row in rows:
        assert row["experiment"] == experiment and row["epochs"] >= 1 and row["params"] > 0
        assert 0 <= row["final_acc"] <= 1 and 0 <= row["best_test_acc"] <= 1
        assert (tmp_path / row["run"] / "summary.json").exists()
    assert (tmp_path / f"{experiment}.png").stat().st_size > 0


def test_second_invocation_skips_finished_runs(folder, tmp_path, monkeypatch):
    assert reproduce_cli("subsampling", tmp_path, folder) == 0
    summaries = sorted(tmp_path.glob("*/summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]

    def no_training(config):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(reproduce, "train", no_training)
    assert reproduce_cli("subsampling", tmp_path, folder) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes


def test_a_finished_run_with_other_settings_is_refused(folder, tmp_path, capsys):
    assert reproduce_cli("subsampling", tmp_path, folder, "--models", "hamiltonian-4x4") == 0
    assert reproduce_cli("subsampling", tmp_path, folder, "--models", "hamiltonian-4x4", "--lr", "0.5") == 2
    assert "holds a run with other settings: lr=0.1 (grid: 0.5)" in capsys.readouterr().err


def test_interrupted_run_is_resumed_from_last_checkpoint(folder, tmp_path, monkeypatch):
    assert reproduce_cli("subsampling", tmp_path, folder) == 0
    run = reproduce.grid("subsampling", "tiny", {})[0]
    finished = json.loads((tmp_path / run.name / "summary.json").read_text())
    (tmp_path / run.name / "summary.json").unlink()  # killed after its last checkpoint
    trained, real_train = [], reproduce.train

    def recording(config):
        trained.append(config)
        return real_train(config)
    monkeypatch.setattr(reproduce, "train", recording)
    assert reproduce_cli("subsampling", tmp_path, folder) == 0
    assert len(trained) == 1 and Path(trained[0].resume) == tmp_path / run.name
    resumed = json.loads((tmp_path / run.name / "summary.json").read_text())
    assert resumed["final_acc"] == finished["final_acc"]


@pytest.mark.parametrize("budget", ["small", "paper"])
@pytest.mark.parametrize("experiment", reproduce.EXPERIMENTS)
def test_dry_run_prints_train_commands_that_parse(experiment, budget, tmp_path, capsys):
    assert main(["reproduce", experiment, "--budget", budget, "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(reproduce.grid(experiment, budget, {}))
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["revnets", "train"]
        config = parse_config(words[2:])
        assert Path(config.out).parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_subsampling_runs_see_the_same_number_of_images_up_to_the_epoch_cap():
    recipe = reproduce.RECIPES["subsampling", "paper"]
    for run in reproduce.grid("subsampling", "paper", {}):
        subset = reproduce.TRAIN_SIZE * run.fraction
        epochs = run.flags["epochs"]
        assert run.flags["batch_size"] <= subset and epochs <= recipe.max_epochs
        if epochs < recipe.max_epochs:
            assert abs(epochs * subset - recipe.images) <= subset / 2 + 1
        assert run.flags["milestones"] == (round(epochs / 2), round(epochs * 3 / 4), epochs)


def test_a_batch_cut_to_the_subset_scales_the_learning_rate():
    (run,) = reproduce.grid("subsampling", "small", {}, models=["resnet-4x4"], fractions=[0.001], seeds=[0])
    assert run.flags["batch_size"] == 50 and run.flags["lr"] == pytest.approx(0.4 * 50 / 512, rel=1e-2)


def test_lr_replaces_the_budget_learning_rate_before_the_batch_scaling():
    (run,) = reproduce.grid("subsampling", "small", {}, models=["resnet-4x4"], fractions=[0.001], seeds=[0], lr=0.2)
    assert run.flags["lr"] == pytest.approx(0.2 * 50 / 512, rel=1e-2)
    (run,) = reproduce.grid("table1", "paper", {}, models=["resnet-32"], lr=0.05)
    assert run.flags["lr"] == 0.05


def test_grid_names_are_unique_and_restrictable():
    runs = reproduce.grid("subsampling", "small", {}, models=["resnet-4x4"], fractions=[0.01], seeds=[1, 2])
    assert [r.name for r in runs] == ["resnet-4x4-f0.01-s1", "resnet-4x4-f0.01-s2"]
    for experiment, budget in reproduce.RECIPES:
        names = [r.name for r in reproduce.grid(experiment, budget, {})]
        assert len(set(names)) == len(names)


@pytest.mark.parametrize("argv, message", [
    (["table1", "--budget", "cpu"], "table1 has no budget 'cpu'"),
    (["subsampling", "--fractions", "0"], "fractions must lie in (0, 1]"),
    (["table1", "--models", "vgg-16"], "unknown model vgg-16"),
])
def test_bad_grid_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["reproduce", *argv, "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_summary_csv_keeps_rows_of_other_runs(tmp_path):
    row = dict(experiment="deep", run="a-s0", model="a", fraction=1.0, seed=0, epochs=1, final_acc=0.5,
               best_test_acc=0.5, wall_s=1.5, peak_mb=10.0, params=100)
    reproduce.write_summary_csv(tmp_path, [row])
    reproduce.write_summary_csv(tmp_path, [dict(row, run="b-s0", final_acc=0.25)])
    rows = reproduce.read_summary_csv(tmp_path / "summary.csv")
    assert [(r["run"], r["final_acc"]) for r in rows] == [("a-s0", 0.5), ("b-s0", 0.25)]


def test_summary_row_takes_the_epochs_of_train_defaults_from_the_summary():
    (run,) = reproduce.grid("table1", "paper", {}, models=["hamiltonian-74"])
    assert "epochs" not in run.flags  # the paper budget leaves the recipe to `revnets train`
    row = reproduce.summary_row(run, dict(epochs=160, final_acc=0.9, best_test_acc=0.91, wall_s=1.0, peak_mb=2.0,
                                          params=3))
    assert row["epochs"] == 160 and row["run"] == "hamiltonian-74-s0" and list(row) == list(reproduce.CSV_FIELDS)


def test_plot_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["reproduce", "deep", "--out", str(tmp_path), "--plot"]) == 2
    assert "no finished deep runs" in capsys.readouterr().err


def test_norm_reaches_only_the_stable_schemes_runs():
    runs = reproduce.grid("subsampling", "cpu", {}, fractions=[0.01], seeds=[0], norm="none")
    flags = {run.flags["model"]: run.flags.get("norm") for run in runs}
    assert flags == {"hamiltonian-74": "none", "resnet-32": None}
    for run in runs:  # and the printed command carries it
        assert ("--norm none" in run.command(Path("out"))) == (run.flags["model"] == "hamiltonian-74")
