"""`revnets eval`: test loss and accuracy of a saved checkpoint on a dataset's test split.

The dataset is the run's (its config names it and its data directory) unless --dataset or
--data-dir say otherwise. Test images are standardised as the run standardised them, with the
statistics its checkpoint stores (`inference.metadata`), so only the test split is read. A
checkpoint saved before checkpoints stored them gets them recomputed from the dataset's training
split (reduced to the run's stratified subset under --train-fraction), as `inference.training_stats`.
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, data, inference
from .cli import positive_int

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def totals(model: nn.Module, batches, amp: str = "off") -> torch.Tensor:
    """(loss sum, correct, images), float64 (3,) on the batches' device, of `model` (put in eval mode).

    `batches` yields (x (b, C, H, W) float32, y (b,) int64) on the model's device. The sums stay on
    the device (one host sync, by the caller), so that `revnets train` can add them over processes.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; expected one of {', '.join(AMP_DTYPES)}")
    model.eval()
    loss_sum, correct, images = 0, 0, 0
    for x, y in batches:
        with autocast(x.device, amp):
            logits = model(x)
        loss_sum = loss_sum + F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct = correct + (logits.argmax(dim=1) == y).sum()
        images += len(y)
    if images == 0:
        raise ValueError("the loader yielded no images to evaluate")
    return torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(images)])


def evaluate(model: nn.Module, loader, amp: str = "off") -> dict:
    """Mean cross-entropy and accuracy of `model` (put in eval mode) over every batch of `loader`.

    `loader` yields (x (b, C, H, W) float32, y (b,) int64) on the model's device.
    Returns {"loss": float, "acc": float in [0, 1], "images": int}.
    """
    loss_sum, correct, images = totals(model, loader, amp).tolist()
    return {"loss": loss_sum / images, "acc": correct / images, "images": int(images)}


def autocast(device: torch.device, amp: str):
    """Autocast to `amp`'s dtype (AMP_DTYPES) on `device`; no autocast for "off"."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def check_compatible(model: inference.Classifier, ds: data.Dataset, checkpoint_path: str) -> None:
    """ValueError unless the model's input channels and classes match the dataset's."""
    model_shape = (model.in_channels, len(model.classes))
    data_shape = (ds.test_x.shape[1], len(ds.classes))
    if model_shape != data_shape:
        raise ValueError(f"{checkpoint_path} holds a model for {model_shape[0]}-channel images and "
                         f"{model_shape[1]} classes, but {ds.name} has {data_shape[0]} channels and "
                         f"{data_shape[1]} classes")


def dataset_of(args: argparse.Namespace, config: dict, test_only: bool) -> data.Dataset:
    """The dataset to evaluate on: --dataset and --data-dir where given, else the run's (`config`)."""
    name = args.dataset or config.get("dataset")
    if name is None:
        raise ValueError(f"{args.checkpoint} names no dataset; pass --dataset")
    data_dir = args.data_dir or (config.get("data_dir") if name == config.get("dataset") else None)
    return data.load_dataset(name, data_dir, train=not test_only)


def run(args: argparse.Namespace) -> int:
    device = torch_device(args.device)
    ckpt = checkpoint.load(args.checkpoint)
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    ds = dataset_of(args, config, test_only="meta" in ckpt)
    model = inference.from_checkpoint(ckpt, args.checkpoint, ds).to(device)
    check_compatible(model, ds, args.checkpoint)
    channels = ds.test_x.shape[1]  # the model standardises: batches are pixels / 255
    loader = data.Loader(ds.test_x, ds.test_y, args.batch_size, mean=torch.zeros(channels), std=torch.ones(channels),
                         device=device, train=False)
    result = evaluate(model, loader, args.amp)
    print(f"{config.get('model', 'model')} on {ds.name} test ({result['images']} images): "
          f"loss {result['loss']:.4f}  accuracy {100 * result['acc']:.2f}%")
    return 0


def torch_device(name: str | None) -> torch.device:
    """The named torch device (default: cuda when available, else cpu); ValueError if unusable here."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test loss and accuracy of a checkpoint",
                              description="Evaluate a checkpoint (last.pt or best.pt of a run) on a dataset's "
                                          "test split (default: the run's), standardised as the run did.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt file written by `revnets train`")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the run's dataset")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's when --dataset "
                                                    "is the run's; see `revnets train --help`)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1000)
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="autocast precision on the device")
    p.set_defaults(func=run)
