"""`revnets reproduce`: the paper's experiments (Section 4) as grids of `revnets train` runs.

    table1       Table 1: the five architectures of the first row (and the deeper row) on CIFAR-10
    subsampling  Figure 3: Hamiltonian vs ResNet, 4 units of 4 blocks, channels 16-64-128-256,
                 trained on 20% down to 0.05% of CIFAR-10, three seeds
    deep         1,202 layers: hamiltonian-1202 and resnet-1202, with their peak memory

Each run is one `revnets train` command in its own sub-directory of --out, trained on the whole
training split as in the paper (`--val-fraction 0`) and reported by its final test accuracy, named
from its settings (e.g. `hamiltonian-4x4-f0.01-s0`). A run with summary.json is finished and skipped, one
with only last.pt was interrupted and is resumed, so rerunning the same command after a kill
continues the grid. After every run `OUT/summary.csv` is rewritten (one row per finished run);
at the end the figure is drawn into `OUT/<experiment>.png` (`--plot` redraws it alone).

Budgets (--budget) are the recipes:
    paper  the paper's Appendix: SGD, batch 100, lr 0.1 / 10 at epochs 80 and 120, 160 epochs
           (80K steps; Hamiltonian-1202: 80K steps at batch 32)
    small  minutes per model on one GPU: one-cycle, batch 512 with the learning rate scaled, bf16
    cpu    subsampling only: the smallest fractions on a few CPU cores
    tiny   the pipeline check of the test suite and CPU smoke runs: tiny networks, one epoch
"""
import argparse
import csv
import json
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..files import atomic_write, save_png
from ..models import model_scheme
from ..training import train
from ..training.settings import changed_settings
from .plot import read_metrics
from .train import parse_config

EXPERIMENTS = ("table1", "subsampling", "deep")
BUDGETS = ("tiny", "cpu", "small", "paper")
CSV_FIELDS = ("experiment", "run", "model", "fraction", "seed", "epochs", "final_acc", "best_test_acc", "wall_s",
              "peak_mb", "params")
TRAIN_SIZE = 50_000  # CIFAR-10's training images: a subsampling run's epochs are sized from it
FIGURE3_FRACTIONS = (0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005)

TABLE1_ROW1 = ("resnet-32", "revnet-38", "hamiltonian-74", "midpoint-26", "leapfrog-26")
TABLE1_ROW2 = ("resnet-110", "revnet-110", "hamiltonian-218", "midpoint-62", "leapfrog-62")
FIGURE3_MODELS = {"hamiltonian-4x4": "hamiltonian-74", "resnet-4x4": "resnet-32"}
DEEP_MODELS = {"hamiltonian-1202": "hamiltonian-1202", "resnet-1202": "resnet-1202"}
FIGURE3_NET = dict(units=(4, 4, 4, 4), channels=(16, 64, 128, 256))
TINY_NET = dict(units=(1, 1, 1), channels=(8, 16, 32))
PAPER: dict = {}  # `revnets train`'s defaults are the paper's recipe (and STL-10's for --dataset stl10)
SMALL = dict(batch_size=512, lr=0.4, schedule="onecycle", amp="bf16")


@dataclass(frozen=True)
class Recipe:
    """One experiment at one budget: the models (label -> `--model`), the grid and the train flags.

    `images`, when set, sizes each run as images seen (epochs = images / subset size, at least one and
    at most `max_epochs`), so that a run on 0.05% of the data takes about as many steps as one on 20%;
    the cap bounds the cost of the test pass that ends every epoch.
    """
    models: dict[str, str]
    train: dict
    fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    images: int | None = None
    max_epochs: int | None = None


RECIPES: dict[tuple[str, str], Recipe] = {
    ("table1", "tiny"): Recipe({m: m for m in TABLE1_ROW1}, dict(epochs=1, batch_size=16, **TINY_NET)),
    ("table1", "small"): Recipe({m: m for m in TABLE1_ROW1 + TABLE1_ROW2}, dict(epochs=40, **SMALL)),
    ("table1", "paper"): Recipe({m: m for m in TABLE1_ROW1 + TABLE1_ROW2}, PAPER),
    ("subsampling", "tiny"): Recipe(FIGURE3_MODELS, dict(batch_size=16, units=(1, 1, 1, 1), channels=(8, 16, 16, 32)),
                                    fractions=(0.5,), images=50, max_epochs=1),
    ("subsampling", "cpu"): Recipe(FIGURE3_MODELS, dict(batch_size=25, lr=0.05, schedule="cosine", **FIGURE3_NET),
                                   fractions=(0.01, 0.005, 0.002, 0.001, 0.0005), images=10_000, max_epochs=20),
    ("subsampling", "small"): Recipe(FIGURE3_MODELS, dict(**SMALL, **FIGURE3_NET), fractions=FIGURE3_FRACTIONS,
                                     seeds=(0, 1, 2), images=2_000_000, max_epochs=400),
    ("subsampling", "paper"): Recipe(FIGURE3_MODELS, dict(milestones=(80, 120, 160), **FIGURE3_NET),
                                     fractions=FIGURE3_FRACTIONS, seeds=(0, 1, 2), images=8_000_000, max_epochs=1600),
    ("deep", "tiny"): Recipe(DEEP_MODELS, dict(epochs=1, batch_size=32, units=(3, 3, 3), channels=(8, 16, 32))),
    ("deep", "small"): Recipe(DEEP_MODELS, dict(epochs=10, batch_size=128, lr=0.1, schedule="onecycle", amp="bf16")),
    # The paper's 80K steps at its Hamiltonian-1202 batch of 32 (51 epochs), decays at 50% and 75%.
    ("deep", "paper"): Recipe(DEEP_MODELS, dict(batch_size=32, epochs=51, milestones=(26, 38, 51))),
}


@dataclass(frozen=True)
class Run:
    """One cell of a grid: a `revnets train` command and the sub-directory it writes."""
    experiment: str
    model: str
    fraction: float
    seed: int
    flags: dict = field(hash=False)

    @property
    def name(self) -> str:
        frac = f"-f{self.fraction:g}" if self.fraction < 1 else ""
        return f"{self.model}{frac}-s{self.seed}"

    def argv(self, out: Path) -> list[str]:
        """The `revnets train` arguments of this run, writing into out / name."""
        return [*_to_argv(self.flags), "--out", str(out / self.name)]

    def command(self, out: Path) -> str:
        return shlex.join(["revnets", "train", *self.argv(out)])


def _to_argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        argv.append("--" + key.replace("_", "-"))
        argv += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return argv


def grid(experiment: str, budget: str, data: dict, models=None, fractions=None, seeds=None,
         lr: float | None = None, norm: str | None = None) -> list[Run]:
    """The runs of `experiment` at `budget`; `data` holds the dataset flags shared by every run.

    `models`, `fractions` and `seeds` restrict the grid (None: the recipe's); `lr` replaces the
    recipe's learning rate (a learning-rate sweep: give each value its own --out); `norm` is the
    normalisation inside the Hamiltonian, MidPoint and Leapfrog residual functions (`revnets train
    --norm`; ResNet and RevNet keep their BatchNorm).
    """
    if (experiment, budget) not in RECIPES:
        valid = sorted(b for e, b in RECIPES if e == experiment)
        raise ValueError(f"{experiment} has no budget {budget!r}; expected one of {', '.join(valid)}")
    recipe = RECIPES[experiment, budget]
    if lr is not None:
        recipe = replace(recipe, train={**recipe.train, "lr": lr})
    models = _check_subset("model", models, tuple(recipe.models))
    runs = []
    for label in models:
        for fraction in fractions or recipe.fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"training fractions must lie in (0, 1]; got {fraction}")
            for seed in seeds if seeds is not None else recipe.seeds:
                flags = dict(model=recipe.models[label], **data, **recipe.train, seed=seed, val_fraction=0)
                if norm and model_scheme(flags["model"]).has_step:
                    flags["norm"] = norm
                if fraction < 1:
                    flags["train_fraction"] = fraction
                if recipe.images:
                    flags.update(_sized_by_images(recipe, fraction))
                runs.append(Run(experiment, label, fraction, seed, flags))
    return runs


def _check_subset(what: str, chosen, valid: tuple) -> tuple:
    unknown = set(chosen or ()) - set(valid)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(sorted(unknown))} for this experiment; "
                         f"expected {', '.join(valid)}")
    return tuple(chosen or valid)


def _sized_by_images(recipe: Recipe, fraction: float) -> dict:
    """Epochs, batch (no larger than the subset, learning rate scaled with it) and step-schedule
    milestones (at the same share of the run as the paper's 80, 120 of 160) of a subsampling run."""
    subset = max(1, round(TRAIN_SIZE * fraction))
    epochs = min(recipe.max_epochs, max(1, round(recipe.images / subset)))
    batch = recipe.train.get("batch_size", 100)
    sized = dict(epochs=epochs, batch_size=min(batch, subset))
    if subset < batch:
        sized["lr"] = float(f"{recipe.train.get('lr', 0.1) * subset / batch:.3g}")
    if "milestones" in recipe.train:
        sized["milestones"] = tuple(max(1, round(epochs * m / 160)) for m in recipe.train["milestones"])
    return sized


def run_grid(runs: list[Run], out: Path) -> list[dict]:
    """Train every run of the grid in turn (skipping finished ones, resuming interrupted ones).

    After each run `out/summary.csv` is refreshed. Returns the summary rows of the grid.
    """
    rows = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.command(out)}", flush=True)
        rows.append(summary_row(run, execute(run, out)))
        write_summary_csv(out, rows)
    return rows


def execute(run: Run, out: Path) -> dict:
    """The summary of `run`: read when it finished before, else from training (resumed from last.pt)."""
    run_dir, argv = out / run.name, run.argv(out)
    if (run_dir / "summary.json").exists():
        _check_settings(run_dir, parse_config(argv))
        print(f"  finished before: {run_dir / 'summary.json'}", flush=True)
        return json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "last.pt").exists():
        print(f"  resuming from {run_dir / 'last.pt'}", flush=True)
        argv += ["--resume", str(run_dir)]
    return train(parse_config(argv))


def _check_settings(run_dir: Path, wanted) -> None:
    """ValueError unless the finished run in run_dir was trained with the settings `wanted` (a
    `revnets.training.settings.Config`)."""
    differ = changed_settings(json.loads((run_dir / "config.json").read_text()), wanted)
    if differ:
        raise ValueError(f"{run_dir} holds a run with other settings: "
                         + ", ".join(f"{k}={a!r} (grid: {b!r})" for k, (a, b) in differ.items())
                         + "; use another --out for another budget or learning rate")


def summary_row(run: Run, summary: dict) -> dict:
    """One line of summary.csv, CSV_FIELDS, from a run and its summary.json."""
    return dict(experiment=run.experiment, run=run.name, model=run.model, fraction=run.fraction, seed=run.seed,
                **{k: summary.get(k) for k in CSV_FIELDS[5:]})


def write_summary_csv(out: Path, rows: list[dict]) -> Path:
    """Merge `rows` into out/summary.csv (rows of other runs already there are kept), atomically."""
    path = out / "summary.csv"
    merged = {(r["experiment"], r["run"]): r for r in read_summary_csv(path)}
    merged.update({(r["experiment"], r["run"]): r for r in rows})

    def write(f):
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(merged[k] for k in sorted(merged))
    atomic_write(path, write, text=True)
    return path


def read_summary_csv(path: Path) -> list[dict]:
    """The rows of a summary.csv ([] when there is none), numbers as float or int."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


def plot(experiment: str, out: Path) -> Path:
    """Draw `out/<experiment>.png` from out/summary.csv (and the runs' metrics.csv for table1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_summary_csv(out / "summary.csv") if r["experiment"] == experiment]
    if not rows:
        raise FileNotFoundError(f"no finished {experiment} runs in {out / 'summary.csv'}; run the experiment first")
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    {"table1": _plot_curves, "subsampling": _plot_fractions, "deep": _plot_memory}[experiment](ax, rows, out)
    path = save_png(fig, out / f"{experiment}.png")
    plt.close(fig)
    return path


def _plot_fractions(ax, rows: list[dict], out: Path) -> None:
    """Figure 3: final test accuracy (%) against the training fraction, mean and std over seeds."""
    import numpy as np
    for model in sorted({r["model"] for r in rows}):
        fractions = sorted({r["fraction"] for r in rows if r["model"] == model})
        accs = [[r["final_acc"] for r in rows if r["model"] == model and r["fraction"] == f] for f in fractions]
        ax.errorbar([100 * f for f in fractions], [100 * np.mean(a) for a in accs],
                    yerr=[100 * np.std(a) for a in accs], marker="o", capsize=3, label=model)
    percents = sorted({100 * r["fraction"] for r in rows})
    ax.set(xscale="log", xlabel="training data (% of the training set)", ylabel="test accuracy (%)")
    ax.set_xticks(percents, [f"{p:g}%" for p in percents], minor=False)
    ax.minorticks_off()
    ax.legend(title="mean and std over seeds")


def _plot_curves(ax, rows: list[dict], out: Path) -> None:
    """Table 1: test accuracy (%) per epoch of every run, from its metrics.csv."""
    for row in rows:
        metrics = read_metrics(out / row["run"])
        ax.plot(metrics["epoch"], [100 * a for a in metrics["test_acc"]], marker=".",
                label=f"{row['model']} ({100 * row['final_acc']:.2f}%)")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch (final in brackets)")
    ax.legend(fontsize="small")


def _plot_memory(ax, rows: list[dict], out: Path) -> None:
    """1,202 layers: peak memory (MB) of each run, its final accuracy written on the bar."""
    bars = ax.bar([r["run"] for r in rows], [r["peak_mb"] or 0 for r in rows])
    ax.bar_label(bars, [f"{100 * r['final_acc']:.2f}%" for r in rows])
    ax.set(ylabel="peak memory (MB)", title="peak memory of each run (final test accuracy on its bar)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="rerun an experiment of the paper as a grid of train runs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--out", type=Path, required=True, help="directory of the runs, summary.csv and figures")
    p.add_argument("--budget", choices=BUDGETS, default="small", help="the recipe (default: small)")
    p.add_argument("--dataset", default="cifar10", help="passed to every run (default: cifar10)")
    p.add_argument("--data-dir", help="passed to every run (default: ./data)")
    p.add_argument("--device", help="passed to every run (default: cuda when available, else cpu)")
    p.add_argument("--models", nargs="+", help="run only these models of the grid (default: all)")
    p.add_argument("--fractions", nargs="+", type=float, help="run only these training fractions (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, help="run only these seeds (default: all)")
    p.add_argument("--lr", type=float, help="learning rate of every run instead of the budget's (use its own --out; "
                                            "default: the budget's)")
    p.add_argument("--norm", help="normalisation inside the Hamiltonian, MidPoint and Leapfrog residual functions "
                                  "(revnets train --norm: batch or none; default: batch)")
    p.add_argument("--dry-run", action="store_true", help="print the train commands, run nothing")
    p.add_argument("--plot", action="store_true", help="only redraw the figure from finished runs")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.plot:
        print(plot(args.experiment, args.out))
        return 0
    data = {k: v for k, v in dict(dataset=args.dataset, data_dir=args.data_dir, device=args.device).items() if v}
    runs = grid(args.experiment, args.budget, data, args.models, args.fractions, args.seeds, args.lr, args.norm)
    if args.dry_run:
        print("\n".join(run.command(args.out) for run in runs))
        return 0
    run_grid(runs, args.out)
    print(f"summary: {args.out / 'summary.csv'}\nfigure: {plot(args.experiment, args.out)}")
    return 0
