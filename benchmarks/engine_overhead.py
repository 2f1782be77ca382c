"""What the engine's safeguards cost per training step: replaying the forward (random-number state
before every coupling, training modes and h recorded) and the drift check of the first backward.

    python benchmarks/engine_overhead.py             # one Hamiltonian unit of 18 blocks
    python benchmarks/engine_overhead.py --record    # append the table to BENCHMARKS.md

Four variants of one training step, interleaved step by step in one process (in rotating order) so that
they share the machine's load: plain autograd; the memory-efficient engine as it ships; the engine with the replay
bookkeeping switched off ("bare", what the engine cost before it replayed anything); and the engine
with the drift check forced on every step (it runs at the first backward of each chain only).
Times are the process's CPU time (one thread), which other processes on a shared machine disturb
less than wall-clock time.
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
    engine.Replay.record, engine._settings = (lambda self, loop: loop(engine._ignore)), (lambda blocks, modules: [])
    try:
        yield
    finally:
        engine.Replay.record, engine._settings = saved


@contextmanager
def checked():
    """The drift check of the first backward, on every step."""
    engine._CHECKED.clear()
    yield


def bookkeeping_us(unit, a: torch.Tensor, b: torch.Tensor, rounds: int = 500) -> dict:
    """CPU time per step (us) of the replay bookkeeping alone (recording the settings and the
    random-number states, entering the backward's replay context) and of one drift check."""
    blocks = tuple(unit.blocks)
    steps = engine.chain_steps(blocks, engine.chain_parameters(blocks)[1])
    t = time.process_time()
    for _ in range(rounds):
        replay = engine.Replay(blocks, a.device)
        replay.record(lambda before: [before(k) for k in range(len(steps))])
        with replay():
            pass
    replay_us = 1e6 * (time.process_time() - t) / rounds
    t = time.process_time()
    for _ in range(rounds // 10):
        engine.relative_error((a, b), (b, a))
    return dict(replay=replay_us, check=1e6 * (time.process_time() - t) / (rounds // 10))


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
    names = list(variants)
    for i in range(args.repeats + 1):
        for name in names[i % 4:] + names[:i % 4]:  # rotate the order: no variant always follows plain
            model, context = variants[name]
            model.zero_grad(set_to_none=False)
            with context():
                t = time.process_time()
                train_step(model, x, y, None)
                if i:  # the first round warms up
                    times[name].append(time.process_time() - t)
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    rows = [dict(variant=v, ms=ms[v], ratio=f"{ms[v] / ms['plain']:.3f}",
                 vs_bare=f"{100 * (ms[v] / ms['reversible, bare'] - 1):+.1f}%") for v in variants]
    model = variants["reversible"][0]
    a, b = model.units[0].chain_input(model.stem(x))
    cost = bookkeeping_us(model.units[0], a.detach(), b.detach())
    table = markdown(rows, ["variant", "ms", "ratio", "vs_bare"]) + (
        f"\n\nMeasured alone: the replay bookkeeping {cost['replay']:.0f} us per step "
        f"({cost['replay'] / (10 * ms['reversible']):.2f}% of the memory-efficient step), one drift check "
        f"{cost['check']:.0f} us ({cost['check'] / (10 * ms['reversible']):.2f}%, first backward of each chain only).")
    print(table)
    if args.record:
        record("Engine safeguards: replay bookkeeping and drift check", "cpu", table,
               f"`{args.model}`, one unit of {args.blocks} blocks at {args.channels} channels, batch {args.batch}, "
               f"{args.size}x{args.size} inputs, fp32; CPU time, median of {args.repeats} interleaved rounds "
               "after a warm-up round. "
               "ratio: to plain autograd; vs_bare: to the engine without replay bookkeeping.")


if __name__ == "__main__":
    main()
