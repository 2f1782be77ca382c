"""`revnets eval`: test loss and accuracy of a saved checkpoint on a dataset's test split.

Test images are standardised as the run standardised them: with the channel statistics of its
training split (reduced to the run's stratified subset under --train-fraction). Checkpoints do not
store these statistics, so the training split must be present where the test split is read.
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, data
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


def check_compatible(model: nn.Module, ds: data.Dataset, checkpoint_path: str) -> None:
    """ValueError unless the model's input channels and classes match the dataset's."""
    model_shape = (model.in_channels, model.head.out_features)
    data_shape = (ds.test_x.shape[1], len(ds.classes))
    if model_shape != data_shape:
        raise ValueError(f"{checkpoint_path} holds a model for {model_shape[0]}-channel images and "
                         f"{model_shape[1]} classes, but {ds.name} has {data_shape[0]} channels and "
                         f"{data_shape[1]} classes")


def training_stats(ds: data.Dataset, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (C,), of the training images a run with `config` standardised with: the whole
    training split, or its seeded stratified subset when evaluating on the run's own dataset."""
    if ds.name == config.get("dataset"):
        ds = data.subsample(ds, config.get("train_fraction", 1.0), config.get("seed", 0))
    return data.channel_stats(ds.train_x)


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    model, config = checkpoint.load_model(args.checkpoint, device=device)
    ds = data.load_dataset(args.dataset, args.data_dir)
    check_compatible(model, ds, args.checkpoint)
    mean, std = training_stats(ds, config)
    loader = data.Loader(ds.test_x, ds.test_y, args.batch_size, mean=mean, std=std, device=device, train=False)
    result = evaluate(model, loader, args.amp)
    print(f"{config['model']} on {ds.name} test ({result['images']} images): "
          f"loss {result['loss']:.4f}  accuracy {100 * result['acc']:.2f}%")
    return 0


def _device(name: str | None) -> torch.device:
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
                                          "test split, standardised with its training split's channel statistics.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt file written by `revnets train`")
    p.add_argument("--dataset", required=True, choices=data.DATASETS)
    p.add_argument("--data-dir", default=None, help="where the dataset lives (see `revnets train --help`)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1000)
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="autocast precision on the device")
    p.set_defaults(func=run)
