"""`revnets models`, `revnets plot` and `revnets eval`."""
import csv

import pytest

import revnets
from revnets.cli import main
from revnets.networks import MODELS, PAPER_PARAMS
from revnets.plot import plot_runs, read_metrics
from revnets.zoo import model_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "peak_mb"]


# ---- revnets models --------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [10, 100, 7])
def test_model_table_counts_equal_built_models(num_classes):
    rows = model_table(num_classes)
    assert [r["name"] for r in rows] == list(MODELS)
    for row in rows:
        if row["params"] > 2e6:  # building the 1,202-layer networks for real takes too long for this test
            continue
        model = revnets.build_model(row["name"], num_classes=num_classes)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert (row["units"], row["channels"]) == (model.units_spec, model.channels)


def test_model_table_gives_paper_counts_for_paper_heads():
    by_name = {r["name"]: r for r in model_table(100)}
    assert by_name["hamiltonian-74"]["paper_params"] == round(PAPER_PARAMS["hamiltonian-74"][1] * 1e6)
    assert by_name["resnet-1202"]["paper_params"] is None
    assert all(r["paper_params"] is None for r in model_table(7))


def test_models_command_prints_aligned_table(capsys):
    assert main(["models", "--num-classes", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(MODELS)
    column = lines[0].index("params (10 cl.)")
    assert all(line[column - 2:column] == "  " for line in lines)  # every row's column starts at the same place
    assert "hamiltonian-74" in lines[2 + list(MODELS).index("hamiltonian-74")]


def test_models_command_rejects_bad_num_classes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--num-classes", "0"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


# ---- revnets plot ----------------------------------------------------------------------------

def _write_metrics(run_dir, epochs, offset):
    run_dir.mkdir()
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRICS)
        for e in range(1, epochs + 1):
            w.writerow([e, 2 / e + offset, 0.5 + 0.04 * e, 2.2 / e + offset, 0.45 + 0.04 * e, 0.1, 1000.0, 12.5])
    return run_dir


def test_plot_writes_pngs_for_several_runs(tmp_path, capsys):
    a = _write_metrics(tmp_path / "hamiltonian", 5, 0.0)
    b = _write_metrics(tmp_path / "resnet", 5, 0.1)
    prefix = tmp_path / "figs" / "cmp"
    assert main(["plot", str(a), str(b), "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [f"{prefix}_loss.png", f"{prefix}_accuracy.png"]
    for path in printed:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty canvas
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_read_metrics_reads_columns(tmp_path):
    m = read_metrics(_write_metrics(tmp_path / "run", 3, 0.0))
    assert m["epoch"] == [1.0, 2.0, 3.0]
    assert m["test_acc"] == pytest.approx([0.49, 0.53, 0.57])


def test_plot_missing_metrics_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "empty" / "metrics.csv") in err


def test_plot_rejects_metrics_without_curves(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch,lr\n1,0.1\n")
    with pytest.raises(ValueError, match="train_loss"):
        plot_runs([tmp_path / "run"], tmp_path / "x")
