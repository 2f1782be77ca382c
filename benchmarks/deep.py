"""1,202 layers: peak memory of a full training step (parameters, gradients and SGD momentum
included) for hamiltonian-1202 and resnet-1202, and the largest batch that fits on the GPU.

    python benchmarks/deep.py --record            # GPU: batch 128 and the largest batch
    python benchmarks/deep.py --batch 4           # CPU: peak resident memory at a small batch
"""
import argparse
import json
import resource
import sys
import time

import torch

from common import build, markdown, measure_in_child, record, train_step


def peak_step(name: str, batch: int, device: str, amp: str | None) -> dict:
    """Peak memory (MB) from before the model exists to after one SGD step, and the step's time."""
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build(name, "reversible").to(device)  # ResNet has no memory-efficient mode: plain autograd
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    times = []
    for _ in range(2):  # the second step has momentum buffers: the steady state
        t = time.perf_counter()
        train_step(model, x, y, amp)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(model=name, batch=batch, peak_mb=(peak - base) / 2**20, ms=1e3 * times[-1])


def largest_batch(name: str, device: str, amp: str | None, start: int) -> int:
    """Doubling, then bisection, over batch sizes; each try in a fresh process."""
    def fits(b):
        return "error" not in measure_in_child(__file__, dict(name=name, batch=b, device=device, amp=amp))
    lo, hi = 0, start
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 50):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hamiltonian-1202", "resnet-1202"])
    p.add_argument("--batch", type=int, default=128 if gpu else 4)
    p.add_argument("--amp", choices=["bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search (always skipped on CPU)")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(peak_step(**json.loads(args.child))))
        return
    rows = []
    for name in args.models:
        row = measure_in_child(__file__, dict(name=name, batch=args.batch, device=args.device, amp=args.amp))
        if args.device.startswith("cuda") and not args.no_search:
            row["largest_batch"] = largest_batch(name, args.device, args.amp, start=args.batch)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    table = markdown(rows, ["model", "batch", "peak_mb", "ms", "largest_batch"])
    print(table)
    if args.record:
        record("1,202 layers: peak memory and largest batch", args.device, table,
               f"One SGD step with momentum after a first one, 32x32 inputs, amp {args.amp or 'off'}; peak_mb counts "
               "everything the step holds (parameters, gradients, momentum, activations) from before the model was "
               "built. largest_batch: the largest batch whose step ran without running out of GPU memory.")


if __name__ == "__main__":
    main()
