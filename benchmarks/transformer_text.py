"""Reversible transformers on real text: every scheme with one shared CPU budget, and memory in depth.

    OMP_NUM_THREADS=1 python benchmarks/transformer_text.py    # about 20 minutes of one core
    OMP_NUM_THREADS=1 python benchmarks/transformer_text.py --record    # also append the tables to BENCHMARKS.md

Text: the King James Bible of Debian's `bible-kjv-text` (installed with apt-get when missing; the
`bible` program of `bible-kjv` decodes it), character level, the last 10% held out. Every scheme
trains a model of about 0.24M parameters (6 blocks, 4 heads, context 64, width 56, the standard
MLP), and Hamiltonian and Leapfrog also with Eq. (7)'s symmetric MLP (`mlp="symmetric"`, width 68:
its block holds 2/3 of the standard block's weights at equal width; parameters within 1%), on the
same batches (16 windows) for the same number of AdamW steps, at each of two learning rates from
the first initialisation seed, then from the other seeds at the better one; validation bits per
character every STEPS / 10 steps on the first 8,192 held-out characters (mean and range over the
seeds, and the mean curve read at the steps the model makes in `residual`'s time), and
the reversal error of the trained chain (`engine.segment_error`, on held-out windows) and of the
untrained one at depths 24 and 96. Then, in a fresh process per configuration, one training step
at depths 6, 24 and 96 (batch 32): bytes
of the activations autograd saves (saved_tensors_hooks) and the peak of the process's resident
memory during the step above its resident memory before it (Linux VmHWM, reset through
/proc/self/clear_refs), with glibc's default malloc and with a fixed mmap threshold; and the
step time of each scheme against `residual` at depth 24 (steps interleaved, the process's CPU
time, best and median of 15). Writes
docs/figures/transformers.json and docs/figures/transformers-bpc.png and prints the tables.
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import ROOT, markdown, record

from revnets import checkpoint, engine, plot
from revnets.memory import saved_bytes
from revnets.text import batch, bits_per_char, load_text
from revnets.transformer import SCHEMES, ReversibleTransformer

SIZE = dict(heads=4, context=64)
# name -> (scheme, mlp, width): parameters within 1% of each other
MODELS = {**{s: (s, "standard", 56) for s in SCHEMES},
          **{f"{s}/symmetric": (s, "symmetric", 68) for s in ("hamiltonian", "leapfrog")}}
BATCH, TRAIN_BATCH = 32, 16


def lm(name: str, vocab_size: int, depth: int) -> ReversibleTransformer:
    """The shared size of `MODELS[name]` at `depth`."""
    scheme, mlp, width = MODELS[name]
    return ReversibleTransformer(vocab_size, width, depth, scheme=scheme, mlp=mlp, **SIZE)


@torch.no_grad()
def reversal_error(model: ReversibleTransformer, tokens: torch.Tensor) -> float | None:
    """`engine.segment_error` of the model's chain on `tokens` (None for `residual`)."""
    if model.scheme == "residual":
        return None
    return engine.segment_error(model.blocks, *model.chain_input(tokens))


def kjv(path: Path) -> Path:
    """The KJV as one UTF-8 file at `path`, decoded from the Debian package (installed if missing)."""
    if not path.exists():
        if shutil.which("bible") is None:
            subprocess.run("apt-get update -qq && apt-get install -y -qq bible-kjv-text bible-kjv",
                           shell=True, check=True)
        text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
        path.write_text(text, encoding="utf-8")
    return path


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to lr / 10."""
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def train(name: str, data, steps: int, lr: float, val, seed: int) -> dict:
    torch.manual_seed(seed)
    model = lm(name, len(data.vocab), 6)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)  # the same batches for every scheme
    curve, t0 = [], time.perf_counter()
    for step in range(steps + 1):
        if step % (steps // 10) == 0:
            model.eval()
            curve.append((step, bits_per_char(model, val, data.tokens_per_char, SIZE["context"])))
            model.train()
            print(f"  {name} lr {lr:g} step {step}: {curve[-1][1]:.3f} bits/char", flush=True)
        if step == steps:
            break
        x, y = batch(data.train, SIZE["context"], TRAIN_BATCH, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    held_out = torch.stack([val[i:i + SIZE["context"]] for i in range(0, 8 * SIZE["context"], SIZE["context"])])
    return dict(model=name, lr=lr, seed=seed, params=sum(p.numel() for p in model.parameters()), curve=curve,
                val_bpc=curve[-1][1], train_s=time.perf_counter() - t0,
                reversal_error_trained=reversal_error(model.eval(), held_out))


def step_once(model, x) -> None:
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()


def memory(name: str, depth: int) -> dict:
    """In a fresh process: saved activation bytes of one forward and peak memory growth of one step."""
    torch.manual_seed(0)
    model = lm(name, 80, depth)
    x = torch.randint(0, 80, (BATCH, SIZE["context"] + 1), generator=torch.Generator().manual_seed(0))
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM to VmRSS
    step_once(model, x)
    peak = _status_kib("VmHWM") - before
    saved = saved_bytes(model, lambda: model(x[:, :-1]).sum())[0]
    return dict(model=name, depth=depth, saved_mb=saved / 2**20, peak_mb=peak / 1024)


def memory_in_child(name: str, depth: int) -> dict:
    """`memory` in fresh processes, with glibc's malloc as configured by default and with a fixed
    mmap threshold (64 KiB: freed large blocks go back to the system instead of staying resident)."""
    def child(env: dict) -> dict:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(dict(name=name, depth=depth))],
                              capture_output=True, text=True, check=True, env={**os.environ, **env})
        return json.loads(done.stdout.splitlines()[-1])
    row = child({"MALLOC_MMAP_THRESHOLD_": "65536"})
    row["peak_mb_default_malloc"] = child({})["peak_mb"]
    return row


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def step_times(depth: int, rounds: int) -> dict[str, dict[str, float]]:
    """ms of one training step per model: the best and the median of `rounds` steps, the models'
    steps interleaved and timed by the process's CPU time (one thread; other jobs on the machine only
    add time, so the best is the closest to the step's own cost, as `timeit` takes it)."""
    torch.manual_seed(0)
    models = {name: lm(name, 80, depth) for name in MODELS}
    x = torch.randint(0, 80, (BATCH, SIZE["context"] + 1), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in MODELS}
    for r in range(rounds + 1):
        for s, model in models.items():
            t = time.process_time()
            step_once(model, x)
            if r:
                times[s].append(1e3 * (time.process_time() - t))
    return {s: dict(best=min(v), median=statistics.median(v)) for s, v in times.items()}


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        steps, bpc = zip(*run["curve_mean"])
        ax.plot(steps, bpc, marker="o", ms=3, label=f"{run['model']} (lr {run['lr']:g})",
                ls="--" if run["model"].endswith("symmetric") else "-")
    ax.set(xlabel="training step", ylabel="validation bits per character",
           title=f"KJV, character level, 0.24M parameters, 6 blocks; mean of {len(runs[0]['val_bpc_seeds'])} seeds")
    ax.set_ylim(top=min(5, max(max(b for _, b in r["curve_mean"][1:]) for r in runs) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    plot.save_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=Path("/tmp/kjv.txt"), help="where the decoded KJV is kept")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3], help="each scheme's best is reported")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisations; lr chosen on the first")
    p.add_argument("--depths", type=int, nargs="+", default=[6, 24, 96])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(memory(**json.loads(args.child))))
        return
    torch.set_num_threads(1)
    data = load_text(kjv(args.text), "char", val_fraction=0.1)
    val = data.val[:8192]
    print(f"KJV: {len(data.train):,} training / {len(data.val):,} held-out characters, vocabulary "
          f"{len(data.vocab)}", flush=True)
    tried = [train(name, data, args.steps, lr, val, args.seeds[0]) for name in MODELS for lr in args.lr]
    runs = [min((r for r in tried if r["model"] == name), key=lambda r: r["val_bpc"]) for name in MODELS]
    for run in runs:
        seeds = [run] + [train(run["model"], data, args.steps, run["lr"], val, seed) for seed in args.seeds[1:]]
        run["curve_mean"] = [(points[0][0], statistics.mean(bpc for _, bpc in points))
                             for points in zip(*(r["curve"] for r in seeds))]
        run["val_bpc_seeds"] = [r["val_bpc"] for r in seeds]
        run.update(val_bpc_mean=statistics.mean(run["val_bpc_seeds"]), val_bpc_range=" to ".join(
            f"{f(run['val_bpc_seeds']):.3f}" for f in (min, max)))
    tokens = torch.randint(0, len(data.vocab), (8, SIZE["context"]), generator=torch.Generator().manual_seed(0))
    for run in runs:
        run["other_lr_bpc"] = ", ".join(f"{r['val_bpc']:.3f}" for r in tried if r["model"] == run["model"]
                                        and r is not run)
        for depth in (24, 96):
            torch.manual_seed(0)
            run[f"reversal_error_init_depth{depth}"] = reversal_error(lm(run["model"], len(data.vocab), depth), tokens)
    mem = [memory_in_child(name, d) for d in args.depths for name in MODELS]
    times = step_times(24, rounds=15)
    for run in runs:
        best, median = times[run["model"]].values()
        run.update(step_ms_depth24=best, vs_residual=best / times["residual"]["best"],
                   vs_residual_median=median / times["residual"]["median"])
        steps, bpc = zip(*run["curve_mean"])  # the steps it makes in residual's time, on the mean curve
        run["bpc_at_residual_time"] = float(np.interp(args.steps / run["vs_residual"], steps, bpc))
    size = dict(SIZE, models=MODELS)
    result = dict(command="OMP_NUM_THREADS=1 python benchmarks/transformer_text.py " + " ".join(sys.argv[1:]),
                  torch=torch.__version__, size=size, batch=TRAIN_BATCH, steps=args.steps, lrs=args.lr,
                  runs=runs, tried=tried, memory=mem)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(args.out / "transformers.json", lambda f: f.write(json.dumps(result, indent=1) + "\n"),
                            text=True)
    figure(runs, args.out / "transformers-bpc.png")
    three = ("val_bpc", "val_bpc_mean", "vs_residual", "vs_residual_median", "bpc_at_residual_time")
    shown = [{k: f"{v:.3f}" if k in three else v for k, v in r.items()} for r in runs]
    tables = (markdown(shown, ["model", "params", "lr", "val_bpc", "other_lr_bpc", "val_bpc_mean", "val_bpc_range",
                               "train_s", "step_ms_depth24", "vs_residual", "vs_residual_median",
                               "bpc_at_residual_time"]) + "\n\n"
              + markdown(shown, ["model", "reversal_error_trained", "reversal_error_init_depth24",
                                "reversal_error_init_depth96"]) + "\n\n"
              + markdown(mem, ["model", "depth", "saved_mb", "peak_mb", "peak_mb_default_malloc"]))
    print(tables)
    if args.record:
        record("Reversible transformers on the King James Bible", "cpu", tables,
               f"OMP_NUM_THREADS=1. Sizes {json.dumps(size)}, {args.steps} AdamW steps of batch {TRAIN_BATCH} at "
               f"each lr of {args.lr} from seed {args.seeds[0]}, then seeds {args.seeds[1:]} at the better one "
               "(val_bpc: the first seed; val_bpc_mean and val_bpc_range: all seeds). "
               f"Step time: depth 24, batch {BATCH}, CPU time, "
               "best of 15 interleaved steps (vs_residual) and the ratio of medians (vs_residual_median). "
               "Memory: one step in a fresh process, MB; peak_mb with MALLOC_MMAP_THRESHOLD_=65536. "
               "Figure and reading: docs/transformers.md.")


if __name__ == "__main__":
    main()
