"""`revnets eval`: test loss and accuracy of a saved checkpoint on a dataset's test split.

Test images are standardised as the run standardised them: with the channel statistics of its
training split (without the validation images it held out, and reduced to the run's stratified
subset under --train-fraction). Checkpoints do not store these statistics, so the training split
must be present where the test split is read.
"""
import argparse

import torch
from torch import nn

from . import checkpoint, data
from .cli import positive_int
from .config import check_device
from .loop import AMP_DTYPES, evaluate
from .progress import bar


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
    training split, or the run's own split of it (`data.subsample`) when evaluating on its dataset."""
    if ds.name == config.get("dataset"):
        ds = data.subsample(ds, config.get("train_fraction", 1.0), config.get("seed", 0),
                            config.get("val_fraction", 0.0))
    return data.channel_stats(ds.train_x)


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = checkpoint.load_model(args.checkpoint, device=device)
    ds = data.load_dataset(args.dataset, args.data_dir)
    check_compatible(model, ds, args.checkpoint)
    mean, std = training_stats(ds, config)
    loader = data.Loader(ds.test_x, ds.test_y, args.batch_size, mean=mean, std=std, device=device, train=False)
    result = evaluate(model, bar(loader, f"evaluating {args.checkpoint}"), args.amp)
    print(f"{config.get('name', config['model'])} on {ds.name} test ({result['images']} images): "
          f"loss {result['loss']:.4f}  accuracy {100 * result['acc']:.2f}%")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test loss and accuracy of a checkpoint",
                              description="Evaluate a checkpoint (last.pt or best.pt of a run) on a dataset's "
                                          "test split, standardised with its training split's channel statistics.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt file written by `revnets train`")
    p.add_argument("--dataset", required=True, choices=data.DATASETS, help="the test split to evaluate on")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (see `revnets train --help`; default: ./data)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images per batch (default: 1000)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="autocast precision on the device (default: off)")
    p.set_defaults(func=run)
