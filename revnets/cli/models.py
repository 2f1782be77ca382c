"""`revnets models`: the registered models, image and text (Table 1 first), with their parameter counts
next to the paper's.

Models are built on the meta device, so counting the parameters of the 1,202-layer networks
allocates no memory and takes milliseconds. A language model's head is its vocabulary: it is
counted with as many tokens as an image model has classes.
"""
import argparse

import torch

from ..models import MODELS, PAPER_PARAMS, build_model
from . import positive_int

PAPER_HEADS = (10, 100)  # Table 1 reports CIFAR-10 and CIFAR-100 counts


def count_parameters(name: str, num_classes: int = 10) -> int:
    """Trainable parameters of `build_model(name)` with a head of `num_classes` outputs (3 input
    channels; a language model's vocabulary of `num_classes` tokens)."""
    head = dict(num_classes=num_classes) if MODELS[name]["kind"] == "image" else dict(vocab_size=num_classes)
    with torch.device("meta"):
        model = build_model(name, **head)
    return sum(p.numel() for p in model.parameters())


def layout(spec: dict) -> str:
    """A model's sizes in a few characters: units 6-6-6, channels 32-64-112, or width x depth."""
    if spec["kind"] == "image":
        return f"{'-'.join(map(str, spec['units']))} / {'-'.join(map(str, spec['channels']))}"
    return f"{spec['width']} x {spec['depth']}, {spec['heads']} heads, context {spec['context']}"


def model_table(num_classes: int = 10) -> list[dict]:
    """One row per model: name, kind, scheme, layout, params (ours, for a `num_classes` head) and
    paper_params (Table 1's count for that head, in parameters; None when the paper gives none,
    as for a language model or a model registered with `register_model`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
    rows = []
    for name, spec in MODELS.items():
        paper = dict(zip(PAPER_HEADS, PAPER_PARAMS.get(name, ()))).get(num_classes)
        rows.append(dict(name=name, kind=spec["kind"], scheme=spec["scheme"], layout=layout(spec),
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
    header = ["model", "kind", "scheme", "units / channels or width x depth"]
    for k in heads:
        header += [f"params ({k} out)", f"paper ({k} out)"]
    rows = []
    for i, row in enumerate(tables[heads[0]]):
        cells = [row["name"], row["kind"], row["scheme"], row["layout"]]
        for k in heads:
            cells += [_millions(tables[k][i]["params"]), _millions(tables[k][i]["paper_params"])]
        rows.append(cells)
    print(format_table(header, rows))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the registered models with parameter counts",
                              description=__doc__.split("\n\n")[0]
                              + " Image models have 3 input channels; paper counts exist for 10 and 100 classes.")
    p.add_argument("--num-classes", type=positive_int, nargs="+", default=list(PAPER_HEADS),
                   help="head sizes to count: image classes, or a language model's tokens (default: 10 100)")
    p.set_defaults(func=run)
