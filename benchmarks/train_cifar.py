"""Short-budget CIFAR-10 training of hamiltonian-74 and resnet-32 through `revnets.training.train`:
the whole dataset in device memory, augmented there, one-cycle learning rate; bf16 autocast and
channels-last on a GPU.

    tar -xJf ../shared/data/cifar10-jpg.tar.xz -C /tmp/cifar10
    python benchmarks/train_cifar.py --data-dir /tmp/cifar10 --record       # 30 epochs, batch 512
    python benchmarks/train_cifar.py --data-dir /tmp/cifar10 --train-fraction 0.01 --epochs 1   # the path, on a CPU

Each model trains in its own run directory under --out (config.json, metrics.csv, checkpoints,
summary.json). `test acc` is the final epoch's, `images/s` the mean over epochs of the training
throughput, `wall` the training and evaluation time of all epochs (data loading excluded).
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch

from revnets.cli.train import parse_config
from revnets.training import train
from common import markdown, record

COLUMNS = ["model", "params", "epochs", "batch", "test acc", "best-epoch test acc", "images/s", "wall s", "peak MB"]


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 image folder: ROOT/{train,test}/<class>/*.jpg")
    p.add_argument("--models", nargs="+", default=["hamiltonian-74", "resnet-32"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4, help="one-cycle peak learning rate")
    p.add_argument("--train-fraction", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--amp", default=None, choices=["off", "bf16", "fp16"], help="default: bf16 on a GPU, off on a CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None, help="default: runs/train_cifar/<date-time>")
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    out = Path(args.out or f"runs/train_cifar/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    rows = []
    for name in args.models:
        argv = ["--dataset", "folder", "--data-dir", args.data_dir, "--model", name, "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--schedule", "onecycle",
                "--amp", args.amp or ("bf16" if on_gpu else "off"), "--device", args.device,
                "--train-fraction", str(args.train_fraction), "--out", str(out / name)]
        argv += ["--channels-last"] * on_gpu + ["--compile"] * args.compile
        s = train(parse_config(argv))
        rows.append({"model": name, "params": f"{s['params'] / 1e6:.3f}M", "epochs": args.epochs,
                     "batch": args.batch_size, "test acc": f"{s['final_acc']:.2%}",
                     "best-epoch test acc": f"{s['best_test_acc']:.2%}",
                     "images/s": f"{s['images_per_s']:,.0f}", "wall s": f"{s['wall_s']:.1f}",
                     "peak MB": f"{s['peak_mb']:,.0f}"})
    table = markdown(rows, COLUMNS)
    print(table)
    if args.record:
        notes = (f"CIFAR-10 from the JPEG folder, {args.train_fraction:g} of the training set; one-cycle to lr "
                 f"{args.lr:g}, SGD momentum 0.9, weight decay and smoothness decay 2e-4; runs in `{out}`.")
        record(f"Short-budget CIFAR-10 training ({args.device})", args.device, table, notes)


if __name__ == "__main__":
    sys.exit(main())
