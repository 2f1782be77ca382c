"""Training throughput (images/s) on CIFAR-sized inputs: forward, backward and SGD step, with the
options that matter on a GPU (bf16 autocast, channels-last, torch.compile of the whole model).

    python benchmarks/throughput.py --record                          # GPU defaults
    python benchmarks/throughput.py --batch 32 --steps 3 --amp none   # CPU, to prove the path
"""
import argparse
import json
import sys
import time

import torch

from common import build, markdown, measure_in_child, record, train_step


def images_per_s(name: str, mode: str, batch: int, device: str, amp: str | None, channels_last: bool,
                 compile: bool, steps: int) -> dict:
    model = build(name, mode).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile else model
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        train_step(run, x, y, amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t) / steps
    return dict(model=name, mode=mode, batch=batch, amp=amp or "fp32", channels_last=channels_last,
                compile=compile, ms=1e3 * seconds, images_per_s=batch / seconds)


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hamiltonian-74", "resnet-32"])
    p.add_argument("--batch", type=int, default=512 if gpu else 32)
    p.add_argument("--amp", default="bfloat16", choices=["bfloat16", "float16", "none"])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--steps", type=int, default=50 if gpu else 3)
    p.add_argument("--variants", nargs="+", default=["eager", "channels_last", "compile"],
                   choices=["eager", "channels_last", "compile", "plain"],
                   help="plain = channels-last with plain autograd instead of the memory-efficient engine")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(images_per_s(**json.loads(args.child))))
        return
    amp = None if args.amp == "none" else args.amp
    rows = []
    for name in args.models:
        for variant in args.variants:
            config = dict(name=name, mode="plain" if variant == "plain" else "reversible", batch=args.batch,
                          device=args.device, amp=amp, channels_last=variant != "eager",
                          compile=variant == "compile", steps=args.steps)
            rows.append(measure_in_child(__file__, config))
            print(json.dumps(rows[-1]), file=sys.stderr)
    table = markdown(rows, ["model", "mode", "batch", "amp", "channels_last", "compile", "ms", "images_per_s", "error"])
    print(table)
    if args.record:
        record("Training throughput", args.device, table,
               f"Synthetic 32x32 inputs resident on the device, batch {args.batch}, SGD step included, "
               f"mean over {args.steps} steps after 3 warm-up steps.")


if __name__ == "__main__":
    main()
