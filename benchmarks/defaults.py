"""How the step size h and normalisation inside the residual functions train: the study behind
the Hamiltonian, MidPoint and Leapfrog defaults (README, "Defaults").

    tar -xJf ../shared/data/cifar10-jpg.tar.xz -C /tmp/cifar10
    python benchmarks/defaults.py --data /tmp/cifar10 --record

Each configuration trains from scratch on a seeded, class-stratified subset of CIFAR-10 (paper's
augmentation, SGD with momentum 0.9, one-cycle learning rate peaking at 0.1, weight decay and smoothness
decay 2e-4 as in the paper's Appendix) and is tested on a fixed subset of the test set. Each step is
`revnets train`'s (`revnets.training.train_step`); train_loss is the cross-entropy of the last step (NaN
when a step diverged).
"""
import argparse
import json
import math
import sys
import time

import torch
from torch import nn

import revnets
from revnets.training import NonFiniteError, data, train_step
from common import markdown, record

# (model, units, norm, h); widths are half the paper's so that the grid fits a CPU.
GRID = [(m, u, norm, h)
        for m, u in (("hamiltonian-74", (6, 6, 6)), ("midpoint-26", (4, 4, 4)), ("leapfrog-26", (4, 4, 4)))
        for norm in ("none", "batch") for h in (0.1, 1.0)]
GRID += [("hamiltonian-218", (18, 18, 18), norm, h) for norm, h in (("none", 0.1), ("none", 1.0), ("batch", 0.1))]
GRID += [("resnet-32", (5, 5, 5), "batch", None), ("revnet-38", (3, 3, 3), "batch", None)]
NORMS = {"none": None, "batch": nn.BatchNorm2d}


def train_one(name, units, norm, h, ds, train_idx, test_idx, args) -> dict:
    torch.manual_seed(args.seed)
    channels = (8, 16, 32) if name.startswith("resnet") else (16, 32, 56)
    kw = dict(units=units, channels=channels, norm=NORMS[norm], **({} if h is None else {"h": h}))
    model = revnets.build_model(name, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=2e-4)
    x, y = ds.train_x[train_idx], ds.train_y[train_idx]
    mean, std = data.channel_stats(x)
    batches = data.Loader(x, y, args.batch, mean=mean, std=std, device="cpu", train=True, padding=ds.padding,
                          seed=args.seed)
    test = data.Loader(ds.test_x[test_idx], ds.test_y[test_idx], 500, mean=mean, std=std, device="cpu", train=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * len(batches), pct_start=0.15)
    start, loss = time.perf_counter(), torch.tensor(math.nan)
    try:
        for epoch in range(args.epochs):
            model.train()
            batches.set_epoch(epoch)
            for x, y in batches:
                loss = train_step(model, opt, x, y, smoothness=2e-4)[0]  # revnets train's step
                sched.step()
    except NonFiniteError:  # diverged: reported as a NaN training loss
        loss = torch.tensor(math.nan)
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    return dict(model=name, units="-".join(map(str, units)), norm=norm, h=h if h is not None else "-",
                params=sum(p.numel() for p in model.parameters()), train_loss=loss.item(),
                test_acc=100 * correct / len(test_idx), minutes=(time.perf_counter() - start) / 60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 image folder (train/<class>, test/<class>)")
    p.add_argument("--train-fraction", type=float, default=0.1)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, nargs="*", help="indices into the grid")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    ds = data.load_dataset("folder", args.data)
    train = data.stratified_subset(ds.train_y, args.train_fraction, args.seed)
    test = data.stratified_subset(ds.test_y, args.test_images / len(ds.test_y), args.seed)
    rows = []
    for i, config in enumerate(GRID):
        if args.only is None or i in args.only:
            rows.append(train_one(*config, ds, train, test, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = markdown(rows, ["model", "units", "norm", "h", "params", "train_loss", "test_acc", "minutes"])
    print(table)
    if args.record:
        record("Defaults study: step size and normalisation", "cpu", table,
               f"CIFAR-10 JPEG copy, {len(train)} training images (stratified, seed {args.seed}), {len(test)} test "
               f"images, {args.epochs} epochs, batch {args.batch}, one-cycle lr {args.lr}, weight decay and smoothness "
               "decay 2e-4, widths 16-32-56 (ResNet 8-16-32). One seed: differences of a point or two are noise.")


if __name__ == "__main__":
    main()
