"""The two floors of a training step: arithmetic over the matrix units' rate, bytes over memory
bandwidth. Counted (not timed) on any device, per image, for plain and memory-efficient training.

    python benchmarks/floor.py --model hamiltonian-74 --amp bfloat16 --bandwidth 3.0e12 --flops 7.9e14

FLOPs come from torch.utils.flop_counter's formulas. Bytes are counted per aten operator (every input read
and every output written once): `all ops` is what the unfused eager step moves; `conv only` counts
only the convolutions' (and their gradients') inputs, outputs and weights, the floor if every
elementwise operation were fused into a convolution. Rates: the H100 readings of this workplace
(about 3.0 TB/s device-to-device copy, about 790 TFLOP/s bf16 matrix product).
"""
import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from common import build, markdown, record, train_step

CONV = ("convolution", "conv")


class Counter(TorchDispatchMode):
    """Sums FLOPs and the bytes of every operator's tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.flops = self.all = self.conv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        self.all += moved
        if any(name in func.__name__ for name in CONV):
            self.conv += moved
        return out


def count(name: str, mode: str, batch: int, size: int, amp: str | None, **overrides) -> dict:
    model = build(name, mode, **overrides)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    counter = Counter()
    with counter:
        train_step(model, x, y, amp)
    return dict(model=name, mode=mode, gflop=counter.flops / batch / 1e9,
                mb_all=counter.all / batch / 2**20, mb_conv=counter.conv / batch / 2**20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hamiltonian-74", "resnet-32"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--amp", choices=["bfloat16", "float16"])
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s")
    p.add_argument("--flops", type=float, default=7.9e14, help="FLOP/s of the matrix units")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    rows = []
    for name in args.models:
        for mode in ("plain", "reversible"):
            row = count(name, mode, args.batch, args.size, args.amp)
            floors = {"us_flops": 1e6 * row["gflop"] * 1e9 / args.flops,
                      "us_bytes_all": 1e6 * row["mb_all"] * 2**20 / args.bandwidth,
                      "us_bytes_conv": 1e6 * row["mb_conv"] * 2**20 / args.bandwidth}
            row.update(floors, img_per_s_floor=1e6 / max(floors.values()))
            rows.append(row)
    table = markdown(rows, ["model", "mode", "gflop", "mb_all", "mb_conv", "us_flops", "us_bytes_all",
                            "us_bytes_conv", "img_per_s_floor"])
    notes = (f"Counted, not timed. Per image, {args.amp or 'fp32'}, {args.size}x{args.size} inputs. us_*: microseconds "
             f"at {args.bandwidth:.2g} B/s and {args.flops:.2g} FLOP/s; img_per_s_floor: images/s if the step took "
             "only the largest of the three times (the unfused eager floor).")
    print(table + "\n\n" + notes)
    if args.record:
        record("Floors of a training step (bytes and FLOPs per image)", "cpu", table, notes)


if __name__ == "__main__":
    main()
