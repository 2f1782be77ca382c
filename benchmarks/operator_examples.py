"""`revnets.ReversibleStack` on dense features, a 1-D signal and 3-D volumes (docs/operators.md).

    python benchmarks/operator_examples.py digits-1d      # each 8x8 digit as a sequence of its 8 rows (8 features each)
    python benchmarks/operator_examples.py digits-dense   # each digit as 64 dense features
    python benchmarks/operator_examples.py volumes        # synthetic 12^3 volumes: a ball or a cross of bars in noise

A classifier is: lift (K from the input's channels to C, BatchNorm, ReLU) -> a memory-efficient
ReversibleStack of `--depth` blocks -> mean over the signal's axes -> linear. Trained with AdamW
and a one-cycle schedule; after every epoch the BatchNorm statistics are recomputed on the
training set (`recalibrate`) and the test accuracy is printed; at the end, the gradient
agreement with plain autograd on one batch and the bytes autograd keeps per training batch.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revnets import ReversibleStack
from revnets.training import data, train_step
from revnets.blocks import make_norm, operator
from revnets.memory import saved_bytes


class Classifier(nn.Module):
    """(N, c_in, *spatial) -> (N, classes) through a ReversibleStack of `depth` blocks on C channels;
    `norm` in the lift and inside the blocks' residual functions."""

    def __init__(self, scheme: str, c_in: int, channels: int, depth: int, dim: int, classes: int,
                 memory_efficient: bool = True, norm: str | None = "batch", **block_kw):
        super().__init__()
        self.lift = nn.Sequential(operator(c_in, channels, dim), make_norm(norm, channels, dim), nn.ReLU())
        self.stack = ReversibleStack(scheme, channels, depth, dim=dim, memory_efficient=memory_efficient, norm=norm,
                                     **block_kw)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stack(self.lift(x))
        return self.head(y.reshape(*y.shape[:2], -1).mean(2))  # dense (N, C): a mean over one entry


def digits(dense: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, revnets' stratified 1,437/360 split, standardised: (N, 64) dense, or
    (N, 8, 8) as sequences of 8 rows with the row's 8 pixels as channels (the rows run along L)."""
    d = data.load_dataset("digits")
    train_x, test_x = (x.float()[:, 0].transpose(1, 2) / 255 for x in (d.train_x, d.test_x))  # (N, column, row)
    mean, std = train_x.mean(), train_x.std()
    train_x, test_x = ((x - mean) / std for x in (train_x, test_x))
    if dense:
        train_x, test_x = train_x.flatten(1), test_x.flatten(1)
    return train_x, d.train_y, test_x, d.test_y


def volumes(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """n noisy (1, size, size, size) volumes holding a ball (label 0) or a cross of three orthogonal
    bars, 3 voxels thick (label 1), of random centre and radius; Gaussian noise of standard deviation 0.3."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    labels = torch.randint(0, 2, (n,), generator=gen)
    radius = (size / 6 + torch.rand(n, generator=gen) * size / 6)[:, None, None, None]
    centre = size / 3 + torch.rand(n, 3, generator=gen) * size / 3
    offset = (grid[None] - centre[:, :, None, None, None]).abs()  # (n, 3, size, size, size)
    ball = offset.pow(2).sum(1).sqrt() <= radius
    thin = offset <= 1.5
    cross = sum((offset[:, i] <= radius) & thin[:, (i + 1) % 3] & thin[:, (i + 2) % 3] for i in range(3)) > 0
    x = torch.where(labels[:, None, None, None] == 0, ball, cross).float()
    return (x + 0.3 * torch.randn(x.shape, generator=gen))[:, None], labels


def recalibrate(model: nn.Module, x: Tensor, batch: int = 256) -> None:
    """BatchNorm running statistics recomputed on x with the final weights (precise BN): the running
    averages of a short, fast-moving training lag behind its weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    for m in norms:
        m.momentum = 0.1


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def saved_mb(model: nn.Module, x: Tensor) -> float:
    """MB of the non-parameter tensors autograd keeps for the backward of one forward on x."""
    return saved_bytes(model, lambda: F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)))[0] / 2**20


def gradient_gap(model: nn.Module, args, x: Tensor, y: Tensor) -> float:
    """||g - g_plain|| / ||g_plain|| of the trained weights on one batch (train mode, float32)."""
    plain = Classifier(**{**args, "memory_efficient": False})
    plain.load_state_dict(model.state_dict())
    grads = []
    for m in (model, plain):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


# Per task: width, blocks, epochs, peak learning rate (and step size) unless given on the command line.
TASKS = {"digits-1d": dict(channels=32, depth=20, epochs=15, lr=3e-3),
         "digits-dense": dict(channels=64, depth=20, epochs=15, lr=3e-3),
         "volumes": dict(channels=8, depth=10, epochs=8, lr=1e-2, h=0.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["digits-1d", "digits-dense", "volumes"])
    p.add_argument("--scheme", default="hamiltonian")
    p.add_argument("--channels", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--h", type=float, help="step size (default: the task's, else the scheme's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    task = {k: v for k, v in TASKS[args.task].items() if getattr(args, k) is None} | \
        {k: v for k, v in vars(args).items() if k in ("channels", "depth", "epochs", "lr", "h") and v is not None}
    torch.manual_seed(args.seed)
    if args.task == "volumes":
        (train_x, train_y), (test_x, test_y) = volumes(384, 12, seed=1), volumes(192, 12, seed=2)
    else:
        train_x, train_y, test_x, test_y = digits(dense=args.task == "digits-dense")
    dim = {"digits-1d": 1, "digits-dense": 0, "volumes": 3}[args.task]
    config = dict(scheme=args.scheme, c_in=train_x.shape[1], channels=task["channels"], depth=task["depth"], dim=dim,
                  classes=int(train_y.max()) + 1, **({"h": task["h"]} if "h" in task else {}))
    model = Classifier(**config)
    epochs = task["epochs"]
    steps = epochs * math.ceil(len(train_x) / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=task["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, task["lr"], total_steps=steps)
    print(f"{args.task}: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}; {args.scheme} stack, dim {dim}, "
          f"{config['channels']} channels, {config['depth']} blocks, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_x))
        total = 0.0
        for i in range(0, len(train_x), args.batch):
            idx = order[i:i + args.batch]
            loss = train_step(model, opt, train_x[idx], train_y[idx])[0]  # revnets train's step
            sched.step()
            total += loss.item() * len(idx)
        recalibrate(model, train_x)
        print(f"epoch {epoch:2d}  train loss {total / len(train_x):.3f}  "
              f"test acc {100 * accuracy(model, test_x, test_y):.2f}%"
              f"  ({time.perf_counter() - start:.0f} s)")
    batch = train_x[: args.batch], train_y[: args.batch]
    print(f"gradient vs plain autograd on one batch: relative difference {gradient_gap(model, config, *batch):.1e}")
    plain = Classifier(**{**config, "memory_efficient": False})
    print(f"autograd keeps per batch of {args.batch}: memory-efficient {saved_mb(model, batch[0]):.2f} MB, "
          f"plain {saved_mb(plain, batch[0]):.2f} MB")


if __name__ == "__main__":
    main()
