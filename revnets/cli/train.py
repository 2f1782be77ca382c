"""`revnets train`: train an image classifier or a language model, in a run that stops on faults,
keeps its results and goes on after a kill (`revnets.training`).

    revnets train --dataset digits --model hamiltonian-74 --epochs 20 --out runs/h74
    revnets train --dataset text --data-dir book.txt --model leapfrog-lm-small --out runs/lm
    revnets train --resume runs/lm            # either kind: the run directory says which
"""
import argparse

from ..inference import LEVELS
from ..layers import INITS, MLPS
from ..models import MODELS
from ..training import settings, train
from ..training.data import DATASETS
from ..training.settings import NORMS, SCHEDULES, Config, config_from_flags
from ..training.step import AMP_DTYPES
from . import Parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `revnets train`; defaults are suppressed so that a Config sees only given flags,
    and each help text names its default."""
    d = Config.__dataclass_fields__
    image, text = settings.RECIPES["image"], settings.RECIPES["text"]
    a = p.add_argument
    a("--dataset", choices=(*DATASETS, "text"), help="what to train on; text: UTF-8 files and a language model "
                                                     "(default: digits, offline)")
    a("--data-dir", help="where the dataset lives: CIFAR archive, stl10_binary, image-folder root, or a UTF-8 text "
                         "file or directory of them (default: ./data; digits needs none)")
    a("--download", action="store_true", help="fetch CIFAR archives from their official address")
    a("--model", metavar="NAME", help=f"a registered model: {', '.join(MODELS)} (`revnets models`; default: "
                                      f"{image['model']}, for text {text['model']})")
    a("--units", type=int, nargs="+", metavar="N", help="blocks per unit, e.g. 2 2 2 (default: the model's)")
    a("--channels", type=int, nargs="+", metavar="C", help="channels per unit (default: the model's)")
    a("--h", type=float, help="step size of the reversible blocks, finite and > 0 (default: the scheme's)")
    a("--norm", choices=NORMS, help="normalisation inside the residual functions (default: batch)")
    a("--context", type=int, help="text: tokens per window (default: the model's)")
    a("--mlp", choices=MLPS, help="text: the layers' MLP, standard or symmetric (Eq. 7's K^T s(K y)) "
                                  "(default: standard)")
    a("--dropout", type=float, help="text: dropout of the transformer (default: 0)")
    a("--init", choices=INITS, help="text: where a two-step scheme starts: at rest or from the fixed point before "
                                    "the first layer (default: rest; fixed-point with --convert)")
    a("--segment", help="store the state every K blocks ('auto': K from the measured drift; default: never)")
    a("--exact", action="store_true", help="fixed-point state: bit-exact reversal at any depth")
    a("--plain", action="store_true", help="store activations (plain autograd) instead of rebuilding them")
    a("--level", choices=LEVELS, help="text: tokens are characters or UTF-8 bytes (default: char)")
    a("--epochs", type=int, help=f"default: {image['epochs']} (500 for stl10, {text['epochs']} for text); with "
                                 "--resume, more epochs continue a run")
    a("--steps-per-epoch", type=int, help=f"text: optimiser steps between validations (default: "
                                          f"{text['steps_per_epoch']})")
    a("--batch-size", type=int, help=f"global batch (default: {image['batch_size']}; 128 for stl10; "
                                     f"{text['batch_size']} windows for text)")
    a("--lr", type=float, help=f"initial (peak for onecycle and warmup) learning rate (default: {image['lr']}; "
                               f"{text['lr']} for text)")
    a("--momentum", type=float, help=f"images: SGD momentum (default: {image['momentum']})")
    a("--weight-decay", type=float, help=f"default: {image['weight_decay']} (5e-4 for stl10, {text['weight_decay']} "
                                         "for text's AdamW)")
    a("--smoothness", type=float, help="images: weight smoothness decay, Eq. 22 (default: 2e-4; 3e-4 for stl10)")
    a("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {image['schedule']}; "
                                            f"{text['schedule']} for text: linear over 5%% of the steps, then a "
                                            "cosine to a tenth)")
    a("--milestones", type=int, nargs="+", metavar="E",
      help="epochs where step divides the lr by 10 (default: 50, 75 and 100 %% of --epochs, 80 120 160 for "
           "160; stl10 12, 16, 20 %%)")
    a("--amp", choices=tuple(AMP_DTYPES), help=f"autocast precision (default: {d['amp'].default})")
    a("--channels-last", action="store_true", help="images: NHWC memory format (faster convolutions on GPUs)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--fsdp", action="store_true", help="under torchrun, shard every block and the root with FSDP2 instead of "
                                          "DistributedDataParallel (default: DDP)")
    a("--seed", type=int, help=f"seed of initialisation, splits and batches, >= 0 (default: {d['seed'].default})")
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    a("--train-fraction", type=float, help="images: class-stratified share of the training images trained on, "
                                           f"in (0, 1] (default: {image['train_fraction']})")
    a("--val-fraction", type=float, help="images: class-stratified share of the training set held out to choose "
                                         "best.pt, in [0, 1), 0: none, best chosen on test; text: the share at the "
                                         f"end held out, in (0, 1) (default: {d['val_fraction'].default})")
    a("--out", help="run directory (default: runs/<dataset>-<model>-seed<seed>)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last.pt (default: a new run)")
    a("--init-from", metavar="CKPT", help="start a new run from the weights of a checkpoint, or for text of a "
                                          "Hugging Face model directory (save_pretrained; default: random)")
    a("--convert", metavar="SCHEME", help="text: train the --init-from model with its layers run as SCHEME ("
                                          "midpoint, leapfrog, hamiltonian, revnet; default: as it is)")
    a("--distill", action="store_true", help="text: fit the --init-from model's next-token distribution (KL) "
                                             "instead of the text's tokens")
    a("--drift-every", type=int, metavar="K", help="measure reversal drift every K steps (default: 0, off)")
    a("--drift-threshold", type=float, help="warn when a chain's reversal error exceeds this "
                                            f"(default: {d['drift_threshold'].default})")
    a("--grow-at", type=int, nargs="+", metavar="E", help="split every block in two (h / 2) after epoch E "
                                                          "(default: never)")


def parse_config(argv: list[str]) -> Config:
    """The Config of `revnets train ARGV`."""
    parser = Parser(prog="revnets train", argument_default=argparse.SUPPRESS)
    add_arguments(parser)
    return config_from_flags(vars(parser.parse_args(argv)))


def add_parser(subparsers) -> None:
    paragraphs = settings.__doc__.split("\n\n")[1:3] + __doc__.split("\n\n")[1:2]
    p = subparsers.add_parser("train", help="train an image classifier or a language model",
                              description="\n\n".join(paragraphs), formatter_class=argparse.RawDescriptionHelpFormatter,
                              argument_default=argparse.SUPPRESS)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    train(config_from_flags({k: v for k, v in vars(args).items() if k not in ("func", "command")}))
    return 0
