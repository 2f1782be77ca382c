"""Peak memory and time of one training step versus blocks per unit, memory-efficient vs plain.

    python benchmarks/memory_vs_depth.py                      # CPU, or the GPU when there is one
    python benchmarks/memory_vs_depth.py --record             # append the table to BENCHMARKS.md
"""
import argparse
import json
import sys

import torch

from common import measure, measure_in_child, markdown, record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hamiltonian-74")
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 18, 100, 300, 1000])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-plain-blocks", type=int, default=300, help="skip plain autograd beyond this depth")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    rows = []
    for n in args.blocks:
        for mode in ("reversible", "plain"):
            if mode == "plain" and n > args.max_plain_blocks:
                continue
            config = dict(name=args.model, mode=mode, batch=args.batch, size=args.size, device=args.device,
                          amp=None, repeats=args.repeats, grad_error=False,
                          units=(n,) * len(args.channels), channels=tuple(args.channels))
            row = measure_in_child(__file__, config)
            row["blocks per unit"] = n
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    table = markdown(rows, ["model", "blocks per unit", "mode", "ms", "peak_mb", "param_mb"])
    print(table)
    if args.record:
        record("Memory and time versus depth", args.device, table,
               f"One training step (forward, cross-entropy, backward) of `{args.model}` with units of n blocks, "
               f"channels {args.channels}, batch {args.batch}, {args.size}x{args.size} inputs; peak_mb is the "
               "peak memory of the step above what the process held before it (CPU: resident set, GPU: allocator), "
               "after the model was built: gradients included (param_mb is the size of the parameters, and so of their "
               "gradients).")


if __name__ == "__main__":
    main()
