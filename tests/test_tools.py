"""`revnets models`, `revnets plot` and `revnets eval`."""
import csv
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import revnets
from revnets import checkpoint
from revnets.cli import main, plot
from revnets.cli.models import count_parameters, model_table
from revnets.cli.plot import plot_runs, read_metrics
from revnets.files import save_png
from revnets.models import MODELS, PAPER_PARAMS
from revnets.training import Config, data, train
from revnets.training.step import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "images_per_s",
           "peak_mb"]


# ---- revnets models --------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [10, 7])
def test_model_table_counts_equal_built_models(num_classes):
    rows = model_table(num_classes)
    assert [r["name"] for r in rows] == list(MODELS)
    for row in rows:
        if row["params"] > 1e6:  # the table counts on the meta device; building the deep ones for real is slow
            continue
        image = row["kind"] == "image"
        model = revnets.build_model(row["name"], **{"num_classes" if image else "vocab_size": num_classes})
        assert row["params"] == sum(p.numel() for p in model.parameters())
        if image:
            assert row["layout"] == f"{'-'.join(map(str, model.units_spec))} / {'-'.join(map(str, model.channels))}"
        else:
            assert row["layout"].startswith(f"{model.tok.embedding_dim} x {len(model.blocks)}")


def test_model_table_gives_paper_counts_for_paper_heads():
    by_name = {r["name"]: r for r in model_table(100)}
    assert by_name["hamiltonian-74"]["paper_params"] == round(PAPER_PARAMS["hamiltonian-74"][1] * 1e6)
    assert by_name["resnet-1202"]["paper_params"] is None
    assert all(r["paper_params"] is None for r in model_table(7))


def test_models_command_prints_aligned_table(capsys):
    assert main(["models", "--num-classes", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(MODELS)
    column = lines[0].index("params (10 out)")
    assert all(line[column - 2:column] == "  " for line in lines)  # every row's column starts at the same place
    assert "hamiltonian-74" in lines[2 + list(MODELS).index("hamiltonian-74")]


def test_a_registered_model_without_a_paper_count_shows_a_dash(capsys):
    """conftest.py registered user-tanh-6 (tests/user_scheme.py), which Table 1 does not list."""
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("user-tanh-6 "))
    ours = [f"{count_parameters('user-tanh-6', k) / 1e6:.2f}M" for k in (10, 100)]
    assert row.split()[1:] == ["image", "user-tanh", "2-2-2", "/", "8-16-16", ours[0], "-", ours[1], "-"]
    assert {r["name"]: r["paper_params"] for r in model_table(10)}["user-tanh-6"] is None


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
            w.writerow([e, 2 / e + offset, 0.5 + 0.04 * e, 2.1 / e + offset, 0.47 + 0.04 * e, 2.2 / e + offset,
                        0.45 + 0.04 * e, 0.1 / e, 1000.0, 12.5])
    return run_dir


def test_plot_writes_pngs_for_several_runs(tmp_path, capsys, monkeypatch):
    a = _write_metrics(tmp_path / "hamiltonian", 5, 0.0)
    b = _write_metrics(tmp_path / "resnet", 5, 0.1)
    (a / "config.json").write_text('{"name": "hamiltonian-74 (units 1-1-1)"}')
    prefix = tmp_path / "figs" / "cmp"
    figures, save = {}, plot.save_png
    monkeypatch.setattr(plot, "save_png",
                        lambda fig, path: figures.setdefault(Path(path).name, fig) and save(fig, path))
    assert main(["plot", str(a), str(b), "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [f"{prefix}-loss.png", f"{prefix}-accuracy.png", f"{prefix}-lr.png"]
    for path in printed:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty canvas
    assert not list((tmp_path / "figs").glob(".*.tmp"))
    accuracy = figures["cmp-accuracy.png"].axes[0]
    assert accuracy.get_ylabel() == "accuracy (%)" and len(accuracy.lines) == 6  # train, val, test per run
    assert max(max(line.get_ydata()) for line in accuracy.lines) == pytest.approx(100 * (0.5 + 0.04 * 5))
    assert all(float(t).is_integer() for t in accuracy.get_xticks())  # epochs are whole numbers
    labels = [line.get_label() for line in accuracy.lines]
    assert "hamiltonian: hamiltonian-74 (units 1-1-1) (val)" in labels and "resnet (test)" in labels
    lr = figures["cmp-lr.png"].axes[0]
    assert list(lr.lines[0].get_ydata()) == pytest.approx([0.1 / e for e in range(1, 6)])


def test_plot_draws_a_text_run_and_an_image_run_together(tmp_path, capsys):
    text = ["--dataset", "text", "--data-dir", str(Path(__file__).parent / "data" / "tiny.txt"), "--model",
            "leapfrog-lm-tiny", "--context", "16", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "2"]
    assert main(["train", *text, "--out", str(tmp_path / "text")]) == 0
    image = _write_metrics(tmp_path / "image", 2, 0.0)
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "text"), str(image), "--out", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"c-{q}.png") for q in ("loss", "accuracy", "bpc", "lr")]
    assert main(["plot", str(image), "--out", str(tmp_path / "i")]) == 0
    assert not (tmp_path / "i-bpc.png").exists()  # image runs have no bits per character


def test_save_png_is_atomic(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "figs" / "a.png")
    first = path.read_bytes()
    assert path == tmp_path / "figs" / "a.png" and first.startswith(PNG_MAGIC)

    def fail(f, **kwargs):
        f.write(b"half a figure")
        raise RuntimeError("disk full")
    fig.savefig = fail
    with pytest.raises(RuntimeError, match="disk full"):
        save_png(fig, path)
    plt.close(fig)
    assert path.read_bytes() == first  # the old figure survives a failed write
    assert not list(path.parent.glob(".*.tmp"))


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


# ---- revnets eval ----------------------------------------------------------------------------

TINY = dict(units=(1, 1, 1), channels=(8, 16, 32))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch run of a tiny Hamiltonian network on half of digits: (last.pt, summary, dataset)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    summary = train(Config(dataset="digits", model="hamiltonian-74", epochs=2, batch_size=50, train_fraction=0.5,
                           seed=3, device="cpu", out=str(out), **TINY))
    return out / "last.pt", summary, data.load_dataset("digits")


def _direct(model, ds, train_x):
    """Test logits computed by hand: standardised with the statistics of the run's training images."""
    mean, std = data.channel_stats(train_x)
    with torch.no_grad():
        return model((ds.test_x.float() / 255 - mean[:, None, None]) / std[:, None, None])


def _held_out(ds, seed):
    held = torch.zeros(len(ds.train_y), dtype=torch.bool)
    held[data.stratified_subset(ds.train_y, 0.1, seed)] = True
    return held


def test_evaluate_equals_direct_computation(digits_run):
    path, summary, ds = digits_run
    model = revnets.load(path).net
    subset = data.stratified_subset(ds.train_y[~_held_out(ds, 3)], 0.5, 3)  # validation held out first
    train_x = ds.train_x[~_held_out(ds, 3)][subset]
    rec = checkpoint.load(path)["record"]  # the run stored the statistics of its own training images
    assert torch.equal(torch.stack([rec["mean"], rec["std"]]), torch.stack(data.channel_stats(train_x)))
    mean, std = rec["mean"], rec["std"]
    result = evaluate(model, data.Loader(ds.test_x, ds.test_y, 64, mean=mean, std=std, device="cpu", train=False))
    logits = _direct(model, ds, train_x)
    assert result["images"] == len(ds.test_y) == 360
    assert result["acc"] == pytest.approx((logits.argmax(1) == ds.test_y).double().mean().item(), abs=1.5 / 360)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, ds.test_y).item(), rel=1e-4)
    assert result["acc"] == pytest.approx(summary["final_acc"], abs=1.5 / 360)  # the run's own evaluation


def test_eval_command_prints_the_runs_accuracy(digits_run, capsys):
    path, summary, ds = digits_run
    assert main(["eval", "--checkpoint", str(path), "--dataset", "digits", "--batch-size", "128"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    printed = float(re.search(r"accuracy ([\d.]+)%", out).group(1))
    assert printed == pytest.approx(100 * summary["final_acc"], abs=100 * 1.5 / 360)
    assert "360 images" in out
    assert "evaluating" in captured.err  # a bar on a terminal, one line in a log


def test_evaluate_bf16_autocast_agrees_with_a_float64_reference(digits_run):
    path, _, ds = digits_run
    model = revnets.load(path).net
    mean, std = data.channel_stats(ds.train_x)
    loader = data.Loader(ds.test_x[:50], ds.test_y[:50], 25, mean=mean, std=std, device="cpu", train=False)
    result = evaluate(model, loader, "bf16")
    with torch.no_grad():
        logits = model.double()(torch.cat([x for x, _ in loader]).double())
    assert result["images"] == 50
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, ds.test_y[:50]).item(), rel=0.05)
    assert result["acc"] == pytest.approx((logits.argmax(1) == ds.test_y[:50]).double().mean().item(), abs=3 / 50)


@pytest.mark.parametrize("argv, expected", [
    (["--checkpoint", "{tmp}/missing.pt", "--dataset", "digits"], "missing.pt"),
    (["--checkpoint", "{tmp}/junk.pt", "--dataset", "digits"], "junk.pt"),
    (["--checkpoint", "{ckpt}", "--dataset", "folder", "--data-dir", "{tmp}/grey"], "3 classes"),
    (["--checkpoint", "{ckpt}", "--dataset", "digits", "--device", "nonsense"], "'nonsense' is not usable here"),
])
def test_eval_bad_inputs_exit_2_with_one_line(argv, expected, digits_run, tmp_path, capsys):
    _write_grey_folder(tmp_path / "grey", classes=3)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path, ckpt=digits_run[0]) for a in argv]
    assert main(["eval", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress lines
    assert len(err) == 1 and expected in err[0]


def _write_grey_folder(root, classes):
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), color=40 * c + i).save(root / split / f"c{c}" / f"{i}.png")
