"""Trained models that carry their preprocessing: a checkpoint's `metadata`, and `load`.

Every checkpoint of `revnets train` holds, next to the weights, what inference needs (``meta``):

    {"network": {"model": name, "units", "channels", "h", "norm", "segment", "exact", "plain",
                 "grown": growths so far},
     "classes": [name, ...], "in_channels": C, "image_size": (H, W),
     "mean": (C,) float32, "std": (C,) float32}    # the training split's channel statistics

`load(path)` rebuilds a `Classifier`: the network behind its standardisation, so that it takes
images as they are decoded (floats in [0, 1]) and `torch.export` / ONNX exports include the
preprocessing. A checkpoint saved before ``meta`` existed still loads: its statistics are
recomputed from the training split its config names (`training_stats`), with a one-line note.
"""
import os
import sys

import torch
from torch import Tensor, nn

from . import checkpoint, data
from .config import growths, model_from_config

NETWORK_KEYS = ("model", "units", "channels", "h", "norm", "segment", "exact", "plain")  # model_from_config's


class Classifier(nn.Module):
    """A trained network behind its input standardisation: images in [0, 1] -> logits.

    (N, C, H, W) float in [0, 1] -> (N, len(classes)): x' = (x - mean) / std per channel, then
    `net`. `classes` names the outputs; `image_size` is the training images' (H, W).
    """

    def __init__(self, net: nn.Module, mean: Tensor, std: Tensor, classes: list[str], image_size: tuple[int, int]):
        super().__init__()
        self.net, self.classes, self.image_size = net, list(classes), tuple(image_size)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1))

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1] (divide uint8 pixels by 255); got {x.dtype}")
        return self.net((x - self.mean) / self.std)


def metadata(config: dict, ds: data.Dataset, stats: tuple[Tensor, Tensor], epoch: int) -> dict:
    """The ``meta`` of a checkpoint saved after `epoch` epochs of a run with `config` (a dict of its
    settings) on `ds`, whose training split has the channel statistics `stats` = (mean, std)."""
    network = {k: config.get(k) for k in NETWORK_KEYS}
    mean, std = stats
    return dict(network={**network, "grown": growths(config, epoch)}, classes=list(ds.classes),
                in_channels=ds.train_x.shape[1], image_size=tuple(ds.train_x.shape[2:]),
                mean=mean.float().cpu(), std=std.float().cpu())


def training_stats(ds: data.Dataset, config: dict) -> tuple[Tensor, Tensor]:
    """(mean, std), each (C,), of the training images a run with `config` standardised with: the whole
    training split, or the run's own split of it (`data.subsample`) when evaluating on its dataset."""
    if ds.name == config.get("dataset"):
        ds = data.subsample(ds, config.get("train_fraction", 1.0), config.get("seed", 0),
                            config.get("val_fraction", 0.0))
    return data.channel_stats(ds.train_x)


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> Classifier:
    """The trained model of a checkpoint, in eval mode on `device` (default: cpu), e.g.
    ``model = revnets.load("runs/h74/best.pt"); probs = model(images).softmax(1)`` with images
    (N, C, H, W) float in [0, 1]; ``model.classes`` names the outputs."""
    return from_checkpoint(checkpoint.load(path), path).to(device or "cpu").eval()


def from_checkpoint(ckpt: dict, path: str | os.PathLike, ds: data.Dataset | None = None) -> Classifier:
    """The Classifier of `ckpt` (`checkpoint.load`'s dict, read from `path`). A checkpoint without
    ``meta`` is standardised with `training_stats` of `ds` (default: the dataset its config names)."""
    meta = ckpt.get("meta")
    if meta is None:
        return _from_old_checkpoint(ckpt, path, ds)
    net_settings = meta["network"]
    net = model_from_config(net_settings, len(meta["classes"]), meta["in_channels"], net_settings["grown"])
    checkpoint.load_state(net, ckpt["model"], path)
    checkpoint.check_finite(ckpt["model"], path)
    return Classifier(net, meta["mean"], meta["std"], meta["classes"], meta["image_size"])


def _from_old_checkpoint(ckpt: dict, path: str | os.PathLike, ds: data.Dataset | None) -> Classifier:
    net, config = checkpoint.load_model(path)
    if ds is None:
        ds = data.load_dataset(config.get("dataset"), config.get("data_dir"))
    print(f"note: {path} stores no standardisation (saved before checkpoints did); recomputed from "
          f"the {ds.name} training split", file=sys.stderr)
    mean, std = training_stats(ds, config)
    return Classifier(net, mean, std, ds.classes, ds.train_x.shape[2:])
