"""`revnets models`: the registered models (Table 1 first) with our parameter counts next to the paper's.

Models are built on the meta device, so counting the parameters of the 1,202-layer networks
allocates no memory and takes milliseconds.
"""
import argparse

import torch

from .cli import positive_int
from .networks import MODELS, PAPER_PARAMS, build_model

PAPER_HEADS = (10, 100)  # Table 1 reports CIFAR-10 and CIFAR-100 counts


def count_parameters(name: str, num_classes: int = 10) -> int:
    """Trainable parameters of `build_model(name, num_classes)` (3 input channels)."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def model_table(num_classes: int = 10) -> list[dict]:
    """One row per model: name, scheme, units, channels, params (ours, for a `num_classes` head)
    and paper_params (Table 1's count for that head, in parameters; None when the paper gives none,
    as for a model registered with `register_model`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
    rows = []
    for name, spec in MODELS.items():
        paper = dict(zip(PAPER_HEADS, PAPER_PARAMS.get(name, ()))).get(num_classes)
        rows.append(dict(name=name, scheme=spec["scheme"], units=spec["units"], channels=spec["channels"],
                         params=count_parameters(name, num_classes),
                         paper_params=None if paper is None else round(paper * 1e6)))
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned text columns separated by two spaces, with a dashed rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def run(args: argparse.Namespace) -> int:
    heads = list(dict.fromkeys(args.num_classes))
    tables = {k: model_table(k) for k in heads}
    header = ["model", "scheme", "units", "channels"]
    for k in heads:
        header += [f"params ({k} cl.)", f"paper ({k} cl.)"]
    rows = []
    for i, row in enumerate(tables[heads[0]]):
        cells = [row["name"], row["scheme"], "-".join(map(str, row["units"])), "-".join(map(str, row["channels"]))]
        for k in heads:
            cells += [_millions(tables[k][i]["params"]), _millions(tables[k][i]["paper_params"])]
        rows.append(cells)
    print(format_table(header, rows))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the registered models with parameter counts",
                              description="List the registered models (Table 1 first) with our parameter counts next to the "
                                          "paper's (3 input channels; paper counts exist for 10 and 100 classes).")
    p.add_argument("--num-classes", type=positive_int, nargs="+", default=list(PAPER_HEADS),
                   help="classifier head sizes to count (default: 10 100)")
    p.set_defaults(func=run)
