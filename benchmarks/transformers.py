"""Reversible transformers on real text: every scheme with one shared CPU budget, and memory in depth.

    OMP_NUM_THREADS=1 python benchmarks/transformers.py        # about 10 minutes on one core

Text: the King James Bible of Debian's `bible-kjv-text` (installed with apt-get when missing; the
`bible` program of `bible-kjv` decodes it), character level, the last 10% held out. Every scheme
trains the same model size (width 64, 6 blocks, 4 heads, context 64; about 0.31M parameters) on the
same batches for the same number of AdamW steps; validation bits per character every STEPS / 10
steps on the first 8,192 held-out characters. Then, in a fresh process per configuration, one
training step at depths 6, 24 and 96: bytes of the activations autograd saves (saved_tensors_hooks)
and the process's peak memory growth (ru_maxrss); and the step time of each scheme against
`residual` at depth 24 (steps interleaved, median). Writes docs/figures/transformers.json and
docs/figures/transformers-bpc.png and prints the tables.
"""
import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, markdown, measure_in_child

from revnets import checkpoint, plot
from revnets.text import batch, bits_per_char, load_text
from revnets.transformer import SCHEMES, ReversibleTransformer

SIZE = dict(width=64, heads=4, context=64)
BATCH = 32


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


def train(scheme: str, data, steps: int, lr: float, val) -> dict:
    torch.manual_seed(0)
    model = ReversibleTransformer(len(data.vocab), depth=6, scheme=scheme, **SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)  # the same batches for every scheme
    curve, t0 = [], time.perf_counter()
    for step in range(steps + 1):
        if step % (steps // 10) == 0:
            model.eval()
            curve.append((step, bits_per_char(model, val, data.tokens_per_char, SIZE["context"])))
            model.train()
            print(f"  {scheme} step {step}: {curve[-1][1]:.3f} bits/char", flush=True)
        if step == steps:
            break
        x, y = batch(data.train, SIZE["context"], BATCH, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return dict(scheme=scheme, params=sum(p.numel() for p in model.parameters()), curve=curve,
                val_bpc=curve[-1][1], train_s=time.perf_counter() - t0)


def step_once(model, x) -> None:
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()


def memory(scheme: str, depth: int) -> dict:
    """In a fresh process: saved activation bytes of one forward and peak RSS growth of one step."""
    torch.manual_seed(0)
    model = ReversibleTransformer(80, depth=depth, scheme=scheme, **SIZE)
    x = torch.randint(0, 80, (BATCH, SIZE["context"] + 1), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_once(model, x)  # first: the process's high-water mark is then this step's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    params, saved = {p.data_ptr() for p in model.parameters()}, 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size() if t.data_ptr() not in params else 0
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x[:, :-1]).sum()
    return dict(scheme=scheme, depth=depth, saved_mb=saved / 2**20, peak_mb=peak / 1024)


def step_times(depth: int, rounds: int) -> dict[str, float]:
    """Median ms of one training step per scheme, the schemes' steps interleaved (fair under load)."""
    torch.manual_seed(0)
    models = {s: ReversibleTransformer(80, depth=depth, scheme=s, **SIZE) for s in SCHEMES}
    x = torch.randint(0, 80, (BATCH, SIZE["context"] + 1), generator=torch.Generator().manual_seed(0))
    times = {s: [] for s in SCHEMES}
    for r in range(rounds + 1):
        for s, model in models.items():
            t = time.perf_counter()
            step_once(model, x)
            if r:
                times[s].append(1e3 * (time.perf_counter() - t))
    return {s: statistics.median(v) for s, v in times.items()}


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        steps, bpc = zip(*run["curve"])
        ax.plot(steps, bpc, marker="o", ms=3, label=run["scheme"])
    ax.set(xlabel="training step", ylabel="validation bits per character",
           title="KJV, character level, 0.31M parameters, 6 blocks")
    ax.set_ylim(top=min(5, max(max(b for _, b in r["curve"][1:]) for r in runs) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    plot.save_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=Path("/tmp/kjv.txt"), help="where the decoded KJV is kept")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--depths", type=int, nargs="+", default=[6, 24, 96])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
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
    runs = [train(s, data, args.steps, args.lr, val) for s in SCHEMES]
    mem = [measure_in_child(__file__, dict(scheme=s, depth=d)) for d in args.depths for s in SCHEMES]
    times = step_times(24, rounds=5)
    for run in runs:
        run["step_ms_depth24"] = times[run["scheme"]]
        run["vs_residual"] = times[run["scheme"]] / times["residual"]
    result = dict(command="OMP_NUM_THREADS=1 python benchmarks/transformers.py " + " ".join(sys.argv[1:]),
                  torch=torch.__version__, size=SIZE, batch=BATCH, steps=args.steps, lr=args.lr,
                  runs=runs, memory=mem)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(args.out / "transformers.json", lambda f: f.write(json.dumps(result, indent=1) + "\n"),
                            text=True)
    figure(runs, args.out / "transformers-bpc.png")
    print(markdown(runs, ["scheme", "params", "val_bpc", "train_s", "step_ms_depth24", "vs_residual"]))
    print(markdown(mem, ["scheme", "depth", "saved_mb", "peak_mb"]))


if __name__ == "__main__":
    main()
