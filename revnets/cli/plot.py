"""`revnets plot`: loss, accuracy, bits-per-character and learning-rate curves of one or more runs
(image or text), read from their metrics.csv.

One colour per run (labelled by the run directory's name and its model's name from config.json);
training curves dashed, validation dotted, test solid; accuracy in %, epochs on integer ticks. A
figure is drawn for each quantity some run has (bits per character: text runs).
matplotlib (the `train` extra) is imported only here, with the non-interactive Agg backend.
"""
import argparse
import json
import math
from pathlib import Path

from ..files import read_csv, save_png

CURVES = {"loss": ("train_loss", "val_loss", "test_loss"), "accuracy": ("train_acc", "val_acc", "test_acc"),
          "bpc": ("val_bpc",), "lr": ("lr",)}
YLABELS = {"loss": "cross-entropy", "accuracy": "accuracy (%)", "bpc": "bits per character", "lr": "learning rate"}
STYLES = {"train": "--", "val": ":", "test": "-", "lr": "-"}
REQUIRED = ("epoch", "train_loss")


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """The columns of `run_dir/metrics.csv` as float lists (blank cells and absent columns become NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a run directory written by `revnets train --out DIR`")
    rows = read_csv(path)
    missing = [c for c in REQUIRED if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no rows or lacks the columns {', '.join(missing)}; "
                         f"expected {', '.join(REQUIRED)}")
    try:
        return {c: [float(r[c]) if r.get(c) else math.nan for r in rows]
                for c in ("epoch", *(c for cols in CURVES.values() for c in cols))}
    except ValueError as e:
        raise ValueError(f"{path}: a value is not a number ({e})") from None


def run_label(run_dir: str | Path) -> str:
    """`name: model name` of a run, the model's name from its config.json when there is one."""
    config = Path(run_dir) / "config.json"
    name = json.loads(config.read_text()).get("name") if config.is_file() else None
    return f"{Path(run_dir).resolve().name}: {name}" if name else Path(run_dir).resolve().name


def plot_runs(run_dirs: list[str | Path], prefix: str | Path) -> list[Path]:
    """Write `<prefix>-<quantity>.png` (atomically) for each quantity of CURVES that some run has
    (loss, accuracy, bpc, lr); return their paths."""
    runs = {Path(d).resolve().name: (run_label(d), read_metrics(d)) for d in run_dirs}
    if len(runs) < len(run_dirs):
        raise ValueError("run directories need distinct names to label the curves; "
                         f"got {', '.join(map(str, run_dirs))}")
    try:
        import matplotlib
    except ImportError:
        raise ValueError("revnets plot needs matplotlib: pip install 'revnets[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for quantity, columns in CURVES.items():
        if all(math.isnan(v) for _, m in runs.values() for col in columns for v in m[col]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        scale = 100 if quantity == "accuracy" else 1
        for i, (label, m) in enumerate(runs.values()):
            for col in columns:
                split = col.split("_")[0]
                if not all(math.isnan(v) for v in m[col]):
                    ax.plot(m["epoch"], [scale * v for v in m[col]], STYLES[split], color=f"C{i}",
                            label=label if quantity == "lr" else f"{label} ({split})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = YLABELS[quantity]
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel} per epoch",
               yscale="log" if quantity == "lr" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(save_png(fig, f"{prefix}-{quantity}.png"))
        plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> int:
    for path in plot_runs(args.run_dirs, args.out):
        print(path)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw loss, accuracy, bits-per-character and learning-rate curves of "
                                           "runs into PNGs",
                              description="Draw the curves of one or more `revnets train` runs (their metrics.csv) "
                                          "into PREFIX-loss.png, PREFIX-accuracy.png, PREFIX-bpc.png (text runs) "
                                          "and PREFIX-lr.png.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.csv")
    p.add_argument("--out", default="curves", metavar="PREFIX",
                   help="output path prefix (default: curves, giving curves-loss.png, curves-accuracy.png, ...)")
    p.set_defaults(func=run)
