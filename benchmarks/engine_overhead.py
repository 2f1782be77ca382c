"""What the engine's safeguards cost per training step: replaying the forward (random-number state
before every coupling, training modes and h recorded) and the drift check of the first backward.

    python benchmarks/engine_overhead.py             # one Hamiltonian unit of 18 blocks
    python benchmarks/engine_overhead.py --record    # append the table to BENCHMARKS.md

Four variants of one training step, interleaved step by step in one process so that they share the
machine's load: plain autograd; the memory-efficient engine as it ships; the engine with the replay
bookkeeping switched off ("bare", what the engine cost before it replayed anything); and the engine
with the drift check forced on every step (it runs at the first backward of each chain only).
"""
import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from common import build, markdown, record, train_step
from revnets import engine


@contextmanager
def bare():
    """The engine without its replay bookkeeping: no random-number states, no recorded settings."""
    saved = engine.Replay.record, engine._settings
    engine.Replay.record, engine._settings = (lambda self, k: None), (lambda blocks: [])
    try:
        yield
    finally:
        engine.Replay.record, engine._settings = saved


@contextmanager
def checked():
    """The drift check of the first backward, on every step."""
    engine._CHECKED.clear()
    yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hamiltonian-74")
    p.add_argument("--blocks", type=int, default=18)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    shape = dict(units=(args.blocks,), channels=(args.channels,))
    variants = {"plain": (build(args.model, "plain", **shape), nullcontext),
                "reversible": (build(args.model, "reversible", **shape), nullcontext),
                "reversible, bare": (build(args.model, "reversible", **shape), bare),
                "reversible, check every step": (build(args.model, "reversible", **shape), checked)}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    times = {v: [] for v in variants}
    for i in range(args.repeats + 1):
        for name, (model, context) in variants.items():
            model.zero_grad(set_to_none=False)
            with context():
                t = time.perf_counter()
                train_step(model, x, y, None)
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - t)
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    rows = [dict(variant=v, ms=ms[v], ratio=f"{ms[v] / ms['plain']:.3f}",
                 vs_bare=f"{100 * (ms[v] / ms['reversible, bare'] - 1):+.1f}%") for v in variants]
    table = markdown(rows, ["variant", "ms", "ratio", "vs_bare"])
    print(table)
    if args.record:
        record("Engine safeguards: replay bookkeeping and drift check", "cpu", table,
               f"`{args.model}`, one unit of {args.blocks} blocks at {args.channels} channels, batch {args.batch}, "
               f"{args.size}x{args.size} inputs, fp32; median of {args.repeats} interleaved rounds after a warm-up round. "
               "ratio: to plain autograd; vs_bare: to the engine without replay bookkeeping.")


if __name__ == "__main__":
    main()
