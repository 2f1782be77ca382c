"""`revnets plot`: loss and accuracy curves of one or more runs, read from their metrics.csv.

One colour per run (labelled by the run directory's name); training curves dashed, test curves solid.
matplotlib (the `train` extra) is imported only here, with the non-interactive Agg backend.
"""
import argparse
import csv
import math
from pathlib import Path

from .checkpoint import atomic_write

CURVES = {"loss": ("train_loss", "test_loss"), "accuracy": ("train_acc", "test_acc")}


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """The columns of `run_dir/metrics.csv` as float lists (blank cells become NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a run directory written by `revnets train --out DIR`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = ["epoch", *(c for pair in CURVES.values() for c in pair)]
    missing = [c for c in needed if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no rows or lacks the columns {', '.join(missing)}; expected {', '.join(needed)}")
    try:
        return {c: [float(r[c]) if r[c] else math.nan for r in rows] for c in needed}
    except ValueError as e:
        raise ValueError(f"{path}: a value is not a number ({e})") from None


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure to `path` as a PNG (120 dpi), atomically; return the path."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return path


def plot_runs(run_dirs: list[str | Path], prefix: str | Path) -> list[Path]:
    """Write `<prefix>_loss.png` and `<prefix>_accuracy.png` (each written atomically); return their paths."""
    runs = {Path(d).resolve().name: read_metrics(d) for d in run_dirs}
    if len(runs) < len(run_dirs):
        raise ValueError(f"run directories need distinct names to label the curves; got {', '.join(map(str, run_dirs))}")
    try:
        import matplotlib
    except ImportError:
        raise ValueError("revnets plot needs matplotlib: pip install 'revnets[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for quantity, (train_col, test_col) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for i, (name, m) in enumerate(runs.items()):
            ax.plot(m["epoch"], m[train_col], "--", color=f"C{i}", label=f"{name} (train)")
            ax.plot(m["epoch"], m[test_col], "-", color=f"C{i}", label=f"{name} (test)")
        ax.set(xlabel="epoch", ylabel=quantity, title=f"{quantity} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(save_png(fig, f"{prefix}_{quantity}.png"))
        plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> int:
    for path in plot_runs(args.run_dirs, args.out):
        print(path)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw loss and accuracy curves of runs into PNGs",
                              description="Draw the loss and accuracy curves of one or more `revnets train` runs "
                                          "(their metrics.csv) into <out>_loss.png and <out>_accuracy.png.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.csv")
    p.add_argument("--out", default="curves", metavar="PNG_PREFIX",
                   help="output path prefix (default: ./curves, giving curves_loss.png and curves_accuracy.png)")
    p.set_defaults(func=run)
