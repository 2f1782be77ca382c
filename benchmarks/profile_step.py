"""Where a training step spends its time: the PyTorch profiler's table for one model.

    python benchmarks/profile_step.py --model hamiltonian-74 --batch 128
    python benchmarks/profile_step.py --model hamiltonian-74 --plain     # plain autograd, to compare
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import build, train_step


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hamiltonian-74")
    p.add_argument("--batch", type=int, default=128 if gpu else 32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--amp", choices=["bfloat16", "float16"])
    p.add_argument("--plain", action="store_true", help="plain autograd instead of the memory-efficient engine")
    p.add_argument("--units", type=int, nargs="+", help="blocks per unit (default: the model's)")
    p.add_argument("--channels", type=int, nargs="+", help="channels per unit (default: the model's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    overrides = {k: tuple(v) for k, v in (("units", args.units), ("channels", args.channels)) if v}
    model = build(args.model, "plain" if args.plain else "reversible", **overrides).to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    for _ in range(2):  # warm-up: kernel selection, allocator
        train_step(model, x, y, args.amp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        train_step(model, x, y, args.amp)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
