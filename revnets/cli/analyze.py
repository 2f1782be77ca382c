"""`revnets analyze`: a stability report (Section 3) of models, as stability.json and PNG figures.

For each model (a Table 1 name, built small by default, or a trained checkpoint) one forward on a
random image (batch of one, N(0, 1) pixels) gives the state entering its first reversible block
after the first unit's entry. That block is analysed (`revnets.analysis`):

  * spectrum of its Jacobian (Eq. 9, 14) at that state, exact up to DENSE_MAX state entries,
    Arnoldi otherwise, and max Re(lambda) along the trajectory of the block repeated N times;
  * growth ||dx_N|| / ||dx_0|| (Eq. 4) through the block repeated N times ("time-invariant") and
    through N re-initialised copies of it ("random"), with the per-block Lyapunov exponent;
  * reversal error of the time-invariant chain in float64, float32 and bfloat16;
  * growth versus h at one depth, and the step-size guard (schemes with a step size);
  * the whole network's per-unit reversal error (`analysis.reversal_error`, float32).

Figures: stability-eigenvalues.png, stability-growth.png, stability-reversal.png,
stability-growth-vs-h.png. Non-finite numbers are written to the JSON as null.
"""
import argparse
import copy
import math
from pathlib import Path

import torch

from .. import analysis, checkpoint, inference
from ..blocks import ReversibleBlock
from ..engine import sequential
from ..files import check_directory, finite, save_png, write_json
from ..models import MODELS, build_model, spec
from ..networks import Network
from ..training.progress import bar
from ..training.tasks import old_record
from . import positive_int
from .eval import classifier_record

DENSE_MAX = 2048
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def spectrum(block: ReversibleBlock, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Summary (radius, max Re, method) and the eigenvalues: exact if small, else converged Ritz values."""
    x = analysis.vector_field(block, a, b)[1]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"method": None, "radius": math.nan, "max_real": math.nan, "max_abs_real": math.nan}, x.new_zeros(0)
    if x.numel() <= DENSE_MAX:
        values = analysis.eigenvalues(block, a, b)
        return {"method": "dense", **analysis.spectral_estimate(values)}, values
    values, residuals = analysis.ritz_values(block, a, b, steps=80)
    summary = analysis.spectral_estimate(values, residuals)
    return {"method": "arnoldi", **summary}, values[residuals <= 1e-6 * summary["radius"]]


def trajectory_spectra(block: ReversibleBlock, a: torch.Tensor, b: torch.Tensor, depths: list[int]) -> list[dict]:
    """Spectrum summary at the state reached after N repetitions of `block` (float64), per depth."""
    blk = copy.deepcopy(block).double()
    state, done, out = (a.double(), b.double()), 0, []
    with torch.no_grad():
        for n in depths:
            state = sequential([blk] * (n - done), *state)
            done = n
            out.append(spectrum(blk, *state)[0])
    return out


def analyze_model(model: Network, x: torch.Tensor, depths: list[int], hs: list[float], h_depth: int,
                  seed: int) -> tuple[dict, torch.Tensor]:
    """The report entry of one model (see the module docstring) and its block's eigenvalues."""
    model.eval()
    block, a, b = analysis.first_block(model, x)
    summary, values = spectrum(block, a, b)
    deepest = depths[-1]
    invariant, rand = [block] * deepest, analysis.random_chain(block, deepest, seed)
    log_g = {"time-invariant": analysis.growth(invariant, a, b, depths, seed),
             "random": analysis.growth(rand, a, b, depths, seed)}
    drift = {name: analysis.reversal_drift(invariant, a, b, depths, dtype) for name, dtype in DTYPES.items()}
    per_depth = [{"depth": n, "max_real": s["max_real"],
                  "growth": {k: _exp(v[i]) for k, v in log_g.items()},
                  "lyapunov": {k: v[i] / n if n else 0.0 for k, v in log_g.items()},
                  "reversal_error": {k: v[i] for k, v in drift.items()}}
                 for i, (n, s) in enumerate(zip(depths, trajectory_spectra(block, a, b, depths)))]
    entry = {"scheme": model.scheme, "h": getattr(block, "h", None),
             "state_entries": analysis.vector_field(block, a, b)[1].numel(), "spectrum": summary,
             "per_depth": per_depth,
             "network_reversal_error": analysis.reversal_error(model, x), "step_size": None, "growth_vs_h": None}
    if block.stability_bound is not None:
        entry["step_size"] = analysis.check_step_size(model, x)
        entry["growth_vs_h"] = {"depth": h_depth, "h": hs, "growth": [
            _exp(analysis.growth([_with_h(block, h)] * h_depth, a, b, [h_depth], seed)[0]) for h in hs]}
    return entry, values


def _exp(log_growth: float) -> float:
    """The growth factor from its log; infinite past the float64 range."""
    return math.exp(log_growth) if log_growth < 709 else math.inf


def _with_h(block: ReversibleBlock, h: float) -> ReversibleBlock:
    block = copy.deepcopy(block)
    block.h = h
    return block


def plot(report: dict, spectra: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """The four PNG figures of a report (written atomically); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = report["architectures"]
    fig, axes = plt.subplots(1, len(archs), figsize=(3.2 * len(archs), 3.2), layout="constrained", squeeze=False)
    for ax, (label, values) in zip(axes[0], spectra.items()):
        ax.scatter(values.real, values.imag, s=4)
        ax.axvline(0, color="k", lw=0.5)
        title = label.replace(" (", "\n(")  # a checkpoint's path on its own line
        ax.set_title(f"{title}\nmax Re = {archs[label]['spectrum']['max_real']:.2g}", fontsize="small")
        ax.set(xlabel="Re", ylabel="Im")
    paths = [save_png(fig, out / "stability-eigenvalues.png")]
    plt.close(fig)
    curves = {"growth": ("growth", ("time-invariant", "random"), "||dx_N|| / ||dx_0|| (Eq. 4)"),
              "reversal": ("reversal_error", tuple(DTYPES), "relative reversal error")}
    for name, (key, kinds, ylabel) in curves.items():
        fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
        for i, (label, entry) in enumerate(archs.items()):
            rows = [r for r in entry["per_depth"] if r["depth"] > 0]
            for kind, style in zip(kinds, ("-", "--", ":")):
                ax.plot([r["depth"] for r in rows], [_nan(r[key][kind]) for r in rows], style, marker="o", ms=3,
                        color=f"C{i}", label=f"{label} ({kind})")
        ax.set(xscale="log", yscale="log", xlabel="depth N (blocks)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
        paths.append(save_png(fig, out / f"stability-{name}.png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, (label, entry) in enumerate(archs.items()):
        if entry["growth_vs_h"]:
            g = entry["growth_vs_h"]
            ax.plot(g["h"], [_nan(v) for v in g["growth"]], "-o", ms=3, color=f"C{i}",
                    label=f"{label} (N = {g['depth']})")
    ax.set(xscale="log", yscale="log", xlabel="step size h", ylabel="growth ||dx_N|| / ||dx_0||")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    paths.append(save_png(fig, out / "stability-growth-vs-h.png"))
    plt.close(fig)
    return paths


def _nan(value: float | None) -> float:
    """A plottable value on a log axis: None and 0 (an exact reversal) become NaN."""
    return math.nan if not value else value


def _models(args: argparse.Namespace) -> list[tuple[str, Network]]:
    overrides = {k: tuple(v) for k, v in (("units", args.units), ("channels", args.channels)) if v}
    models = []
    for name in args.model:
        if spec(name)["kind"] != "image":  # spec: ValueError for a name nobody registered
            raise ValueError(f"--model {name} is a language model; analyze takes image models")
        torch.manual_seed(args.seed)  # the same weights in every report
        models.append((name, build_model(name, **overrides)))
    for path in args.checkpoint:
        ckpt = checkpoint.load(path)
        rec = classifier_record(ckpt, path) or old_record(ckpt, path)
        models.append((f"{rec['model']} ({Path(path).parent.name}/{Path(path).name})",
                       inference.from_checkpoint(ckpt, path, rec).net))
    if not models:
        raise ValueError("nothing to analyze: give --model NAME ... and/or --checkpoint PATH ...")
    return models


def run(args: argparse.Namespace) -> int:
    depths = sorted(set(args.depths))
    if depths[0] < 1:
        raise ValueError(f"--depths must be positive; got {args.depths}")
    if not all(math.isfinite(h) and h > 0 for h in args.h_values):
        raise ValueError(f"--h-values must be finite and > 0; got {args.h_values}")
    check_directory(args.out)
    models = _models(args)
    for label, model in models:  # every model takes the input before anything is written
        model.check_input(torch.zeros(1, model.in_channels, args.size, args.size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"arguments": {k: v for k, v in vars(args).items() if k != "func"},
              "input": f"one N(0, 1) image of {args.size}x{args.size}, seed {args.seed}",
              "depths": depths, "architectures": {}}
    spectra = {}
    for label, model in bar(models, "analysing models"):
        torch.manual_seed(args.seed)
        x = torch.randn(1, model.in_channels, args.size, args.size)
        report["architectures"][label], spectra[label] = analyze_model(
            model.float(), x, depths, args.h_values, args.h_depth, args.seed)
        print(f"{label}: {_line(report['architectures'][label])}", flush=True)
    write_json(out / "stability.json", report, indent=1)
    for path in [out / "stability.json", *plot(finite(report), spectra, out)]:
        print(path)
    return 0


def _line(entry: dict) -> str:
    last = entry["per_depth"][-1]
    return (f"max Re {entry['spectrum']['max_real']:.3g}, radius {entry['spectrum']['radius']:.3g}; "
            f"at N={last['depth']}: "
            f"growth {last['growth']['time-invariant']:.3g} (time-invariant) {last['growth']['random']:.3g} (random), "
            f"reversal error float32 {last['reversal_error']['float32']:.3g}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("analyze",
                              help="stability report: Jacobian spectra, growth through depth, reversal drift",
                              description="Measure the stability of models' blocks (paper, Section 3) and write "
                                          "stability.json and stability-*.png into --out.")
    images = [name for name, spec in MODELS.items() if spec["kind"] == "image"]
    p.add_argument("--model", nargs="+", default=[], metavar="NAME",
                   help=f"image models, built with --units/--channels ({', '.join(images)}; default: none)")
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                   help="trained models (revnets train's .pt; default: none)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--depths", nargs="+", type=int, default=[1, 10, 100, 1000], metavar="N",
                   help="chain depths in blocks (default: 1 10 100 1000)")
    p.add_argument("--units", nargs="+", type=int, default=[2, 2, 2], metavar="N",
                   help="blocks per unit for --model (default: 2 2 2)")
    p.add_argument("--channels", nargs="+", type=int, default=[8, 8, 8], metavar="C",
                   help="channels per unit for --model (default: 8 8 8)")
    p.add_argument("--size", type=positive_int, default=8, help="input height and width (default: 8)")
    p.add_argument("--h-values", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], metavar="H",
                   help="step sizes for growth versus h (default: 0.01 0.03 0.1 0.3 1 3)")
    p.add_argument("--h-depth", type=positive_int, default=100, help="depth of growth versus h (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default: 0)")
    p.set_defaults(func=run)
