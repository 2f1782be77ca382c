"""Training-step time, peak memory and gradient error: memory-efficient vs plain autograd vs
torch.utils.checkpoint, in fp32 and bf16 autocast, per model and depth.

    python benchmarks/step_time.py                    # CPU defaults, or the GPU when there is one
    python benchmarks/step_time.py --record           # append the table to BENCHMARKS.md

Each model is one unit of n blocks at `--channels` (the field's setting: a Hamiltonian unit of 64
channels on 32x32 inputs), built with `revnets.build_model(name, units=(n,), channels=(C,))`.
`ratio` is the step time over plain autograd's in the same precision; `grad_err` is
||g - g64|| / ||g64|| against a float64 plain-autograd reference on the same input.
"""
import argparse
import json
import sys

import torch

from common import markdown, measure_in_child, measure_interleaved, record

MODES = ("plain", "checkpoint", "reversible")


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hamiltonian-74"],
                   help="registry names (their scheme is what matters), "
                        "e.g. hamiltonian-74 midpoint-26 leapfrog-26 revnet-38")
    p.add_argument("--blocks", type=int, nargs="+", default=[18, 100, 300] if gpu else [18, 100])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=128 if gpu else 16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--repeats", type=int, default=10 if gpu else 3)
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_interleaved(**json.loads(args.child))))
        return
    rows = []
    for name in args.models:
        for n in args.blocks:
            for precision in args.precisions:
                amp = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[precision]
                config = dict(name=name, modes=list(MODES), batch=args.batch, size=args.size, device=args.device,
                              amp=amp, repeats=args.repeats, units=(n,), channels=(args.channels,))
                result = measure_in_child(__file__, config)
                for row in result if isinstance(result, list) else [result]:
                    row.update(blocks=n, scheme=name.split("-")[0])
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    table = markdown(rows, ["scheme", "blocks", "amp", "mode", "ms", "ratio", "peak_mb", "grad_err"])
    print(table)
    if args.record:
        record("Step time, memory and gradient error", args.device, table,
               f"One unit of n blocks at {args.channels} channels, batch {args.batch}, {args.size}x{args.size} inputs; "
               "one training step (forward, cross-entropy, backward); the three modes' steps interleaved in one "
               "process, median of the timed rounds after one warm-up round. peak_mb (GPU only): the step's peak "
               "allocator memory above what was held before it; CPU memory: memory_vs_depth.py. grad_err: against "
               "a float64 plain-autograd reference.")


if __name__ == "__main__":
    main()
