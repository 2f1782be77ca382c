"""`revnets eval`: test loss and accuracy of a saved image checkpoint on a dataset's test split.

The dataset is the run's (its config names it and its data directory) unless --dataset or
--data-dir say otherwise. Test images are standardised as the run standardised them, with the
statistics its checkpoint's model record stores (`revnets.inference`), so only the test split is
read. A checkpoint saved before checkpoints stored them gets them recomputed from the dataset's
training split (without the validation images the run held out, and reduced to its stratified
subset under --train-fraction), as `tasks.old_record` does. A language model's checkpoint is
measured by its run (bits per character) and used by `revnets generate`.
"""
import argparse

import torch

from .. import checkpoint, inference
from ..training import data
from ..training.progress import bar
from ..training.settings import check_device
from ..training.step import AMP_DTYPES, evaluate
from ..training.tasks import old_record
from . import positive_int


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


def classifier_record(ckpt: dict, path: str) -> dict | None:
    """The model record of an image checkpoint (`inference.record_of`: None when saved before
    checkpoints stored their standardisation); ValueError for a language model's checkpoint."""
    rec = inference.record_of(ckpt, path)
    if rec is not None and rec.get("kind") == "text":
        raise ValueError(f"{path} holds a language model, not an image classifier: sample from it with "
                         "revnets generate (its run measured its bits per character, in metrics.csv)")
    return rec


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = checkpoint.load(args.checkpoint)
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    rec = classifier_record(ckpt, args.checkpoint)
    ds = dataset_of(args, config, test_only=rec is not None)
    model = inference.from_checkpoint(ckpt, args.checkpoint, rec or old_record(ckpt, args.checkpoint, ds)).to(device)
    check_compatible(model, ds, args.checkpoint)
    channels = ds.test_x.shape[1]  # the model standardises: batches are pixels / 255
    loader = data.Loader(ds.test_x, ds.test_y, args.batch_size, mean=torch.zeros(channels), std=torch.ones(channels),
                         device=device, train=False)
    result = evaluate(model, bar(loader, f"evaluating {args.checkpoint}"), args.amp)
    label = config.get("name") or config.get("model") or args.checkpoint
    print(f"{label} on {ds.name} test ({result['images']} images): "
          f"loss {result['loss']:.4f}  accuracy {100 * result['acc']:.2f}%")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test loss and accuracy of a checkpoint",
                              description="Evaluate a checkpoint (last.pt or best.pt of a run) on a dataset's "
                                          "test split (default: the run's), standardised as the run did.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt file written by `revnets train`")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="the test split to evaluate on (default: the run's dataset)")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's when --dataset "
                                                    "is the run's, else ./data; see `revnets train --help`)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images per batch (default: 1000)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="off",
                   help="autocast precision on the device (default: off)")
    p.set_defaults(func=run)
