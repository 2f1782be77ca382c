"""Memory and step time of `revnets.ReversibleStack` on every operator: dense features (dim 0),
1-D signals, images and 3-D volumes, memory-efficient against plain autograd.

    python benchmarks/operators.py memory             # saved bytes and peak memory at depths 10, 100, 1000
    python benchmarks/operators.py time               # step time at 100 blocks, dims 1-3
    python benchmarks/operators.py memory --record    # also append the table to BENCHMARKS.md

memory: one training step (forward, squared-output loss, backward) per configuration, each in a
fresh process. saved_mb: the non-parameter tensors autograd keeps for the backward
(`torch.autograd.graph.saved_tensors_hooks`); peak_mb: the step's peak allocator memory above what
was held before it (CPU: the profiler's allocation events, `revnets.memory.peak_cpu_bytes`; GPU: the CUDA
allocator), less the parameters' gradients, which the backward allocates in every mode (param_mb
is their size). time: the two modes' steps interleaved in one process, median of the timed rounds
after a warm-up round (CPU: the process's CPU time); ratio = memory-efficient / plain.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from common import markdown, measure_in_child, record
from revnets import ReversibleStack
from revnets.memory import peak_cpu_bytes, saved_bytes

# (channels, batch, spatial) per dim: small enough that plain autograd at depth 1,000 fits in a few hundred MB.
MEMORY_SHAPES = {0: (64, 32, ()), 1: (8, 4, (256,)), 2: (8, 4, (16, 16)), 3: (8, 2, (8, 8, 8))}
TIME_SHAPES = {0: (256, 64, ()), 1: (32, 8, (512,)), 2: (32, 8, (32, 32)), 3: (16, 2, (16, 16, 16))}


def _setup(scheme: str, dim: int, depth: int, memory_efficient: bool, shape: tuple, device: str):
    channels, batch, spatial = shape
    torch.manual_seed(0)
    stack = ReversibleStack(scheme, channels, depth, dim=dim, memory_efficient=memory_efficient).to(device)
    return stack, torch.randn(batch, channels, *spatial, device=device)


def _step(stack, x) -> None:
    stack(x).pow(2).mean().backward()


def measure_memory(scheme: str, dim: int, depth: int, memory_efficient: bool, device: str) -> dict:
    """saved_mb, peak_mb and param_mb of one step (run in a fresh process, after a warm-up step of a
    2-block stack, so that the peak holds no one-time allocation of the first backward)."""
    _step(*_setup(scheme, dim, 2, memory_efficient, MEMORY_SHAPES[dim], device))
    stack, x = _setup(scheme, dim, depth, memory_efficient, MEMORY_SHAPES[dim], device)
    saved = 0

    def step():
        nonlocal saved
        saved, loss = saved_bytes(stack, lambda: stack(x).pow(2).mean())
        loss.backward()
    param_bytes = sum(p.numel() * p.element_size() for p in stack.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_cpu_bytes(step)
    return dict(scheme=scheme, dim=dim, depth=depth, mode="memory-efficient" if memory_efficient else "plain",
                saved_mb=saved / 2**20, peak_mb=(peak - param_bytes) / 2**20, param_mb=param_bytes / 2**20)


def measure_time(scheme: str, dim: int, depth: int, repeats: int, device: str) -> dict:
    """Median step time of plain and memory-efficient, their steps interleaved, and the ratio."""
    stacks = {me: _setup(scheme, dim, depth, me, TIME_SHAPES[dim], device) for me in (False, True)}
    stacks[True][0].load_state_dict(stacks[False][0].state_dict())
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time  # CPU: the process's CPU time (load-robust)
    times = {False: [], True: []}
    for i in range(repeats + 1):
        for me, (stack, x) in stacks.items():
            stack.zero_grad(set_to_none=False)
            sync()
            t = clock()
            _step(stack, x)
            sync()
            if i:
                times[me].append(clock() - t)
    plain, me = (1e3 * statistics.median(times[k]) for k in (False, True))
    channels, batch, spatial = TIME_SHAPES[dim]
    return dict(scheme=scheme, dim=dim, depth=depth, input=f"{batch}x{channels}x" + "x".join(map(str, spatial)),
                plain_ms=plain, efficient_ms=me, ratio=f"{me / plain:.2f}")


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["memory", "time"])
    p.add_argument("--schemes", nargs="+", default=["hamiltonian"])
    p.add_argument("--dims", type=int, nargs="+", default=None, help="default: 0-3 for memory, 1-3 for time")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default: 10 100 1000 (memory), 100 (time)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        config = json.loads(args.child)
        print(json.dumps((measure_memory if config.pop("what") == "memory" else measure_time)(**config)))
        return
    if args.what is None:
        p.error("say what to measure: memory or time")
    dims = args.dims or ([0, 1, 2, 3] if args.what == "memory" else [1, 2, 3])
    depths = args.depths or ([10, 100, 1000] if args.what == "memory" else [100])
    rows = []
    for scheme in args.schemes:
        for dim in dims:
            for depth in depths:
                if args.what == "memory":
                    configs = [dict(scheme=scheme, dim=dim, depth=depth, memory_efficient=me, device=args.device)
                               for me in (False, True)]
                else:
                    configs = [dict(scheme=scheme, dim=dim, depth=depth, repeats=args.repeats, device=args.device)]
                for config in configs:
                    row = measure_in_child(__file__, dict(config, what=args.what))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    columns = ["scheme", "dim", "depth", "mode", "saved_mb", "peak_mb", "param_mb"] if args.what == "memory" \
        else ["scheme", "dim", "depth", "input", "plain_ms", "efficient_ms", "ratio"]
    table = markdown(rows, columns)
    print(table)
    if args.record:
        shapes = MEMORY_SHAPES if args.what == "memory" else TIME_SHAPES
        record(f"ReversibleStack {args.what} on every operator", args.device, table,
               "Input (channels, batch, spatial) per dim: " + ", ".join(f"dim {d}: {shapes[d]}" for d in dims)
               + ". " + __doc__.split("\n\n")[2].replace("\n", " "))


if __name__ == "__main__":
    main()
