"""`revnets train --dataset text`: a ReversibleTransformer on UTF-8 text, with runs that keep their results.

    revnets train --dataset text --data-dir FILE_OR_DIR --model leapfrog-lm-small --epochs 10 --out runs/lm

An epoch is --steps-per-epoch AdamW steps on random windows of the training split (batches depend
only on (seed, step, rank), so a resumed run is bitwise an uninterrupted one on CPU), then the
held-out split's bits per character (`revnets.text.bits_per_char`). The learning rate warms up
linearly over the first 5% of the steps, then decays by a cosine to a tenth. The run directory
holds config.json, metrics.csv (one row per epoch), last.pt and best.pt (lowest validation bits
per character; with the vocabulary, for `revnets generate`) and summary.json, all written
atomically. A non-finite loss or gradient stops the run before the optimiser applies it and before anything of
that epoch is written:
last.pt keeps the last finite state (exit code 3). DIR/.lock admits one writer. Under torchrun each process draws its own share of every
global batch (DistributedDataParallel); only rank 0 writes.
"""
import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__, checkpoint, text
from .files import write_json
from .loop import AMP_DTYPES, NonFiniteError, autocast, train_step
from .progress import MetricsCSV
from .rundir import RunDir
from .train import all_reduce, peak_mb, setup_distributed, wrap
from .transformer import LM_MODELS, MLPS, ReversibleTransformer, build_lm

FIELDS = ("epoch", "step", "train_loss", "val_bpc", "lr", "tokens_per_s", "peak_mb")
PLACE = ("resume", "device", "out")


@dataclass
class LMConfig:
    """Every setting of a text run; context and h default to the model's."""
    data_dir: str
    dataset: str = "text"
    model: str = "leapfrog-lm-small"
    level: str = "char"
    val_fraction: float = 0.1
    context: int | None = None
    h: float | None = None
    mlp: str = "standard"
    dropout: float = 0.0
    plain: bool = False
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    amp: str = "off"
    compile: bool = False
    seed: int = 0
    device: str | None = None
    out: str | None = None
    resume: str | None = None

    def __post_init__(self):
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.out = self.out or self.resume or f"runs/text-{self.model}-seed{self.seed}"
        if self.model not in LM_MODELS:
            raise ValueError(f"unknown language model {self.model!r}; valid names: {', '.join(LM_MODELS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"unknown --mlp {self.mlp!r}; expected one of {', '.join(MLPS)}")
        if self.level not in text.LEVELS:
            raise ValueError(f"unknown --level {self.level!r}; expected one of {', '.join(text.LEVELS)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown --amp {self.amp!r}; expected one of {', '.join(AMP_DTYPES)}")
        for key in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1; got {getattr(self, key)}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"--context must be at least 1; got {self.context}")

    def model_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("context", "h") if getattr(self, k) is not None} | dict(
            mlp=self.mlp, dropout=self.dropout, memory_efficient=not self.plain)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `revnets train --dataset text` that image runs do not have."""
    a = p.add_argument
    a("--level", help="text tokens: char (default) or byte")
    a("--context", type=int, help="tokens per window (default: the model's)")
    a("--steps-per-epoch", type=int, help="text runs: optimiser steps between validations (default: 100)")
    a("--dropout", type=float, help="text runs: dropout of the transformer (default: 0)")
    a("--mlp", help="text runs: the blocks' MLP, standard (default) or symmetric (Eq. 7's K^T s(K y))")


def config_from_args(args: argparse.Namespace) -> LMConfig:
    """LMConfig from `revnets train` flags; ValueError for a flag that text runs do not use. With
    --resume DIR the saved settings, which given flags must match."""
    names = {f.name for f in fields(LMConfig)}
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    unused = sorted(k for k in given if k not in names)
    if unused:
        raise ValueError("--dataset text does not use " + ", ".join("--" + k.replace("_", "-") for k in unused))
    if "resume" not in given:
        if "data_dir" not in given:
            raise ValueError("--dataset text needs --data-dir FILE_OR_DIR (UTF-8 text)")
        return LMConfig(**given)
    run = Path(given["resume"])
    if not (run / "last.pt").is_file() or not (run / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run}: no last.pt and config.json there")
    saved = json.loads((run / "config.json").read_text())
    saved = LMConfig(**{k: saved[k] for k in names if k in saved})
    differ = [k for k, v in given.items() if k not in PLACE and getattr(saved, k) != v]
    if differ:
        raise ValueError(f"--resume {run}: the run was started with different settings: "
                         + ", ".join(f"{k}={getattr(saved, k)!r}" for k in differ))
    return replace(saved, resume=str(run), out=str(run), device=given.get("device", saved.device))


def main(args: argparse.Namespace) -> int:
    """`revnets train --dataset text`, dispatched from `revnets.train`; exit code 3 on a non-finite
    loss or gradient, as there."""
    try:
        train(config_from_args(args))
    except NonFiniteError as e:
        print(f"revnets train: stopped: {e}", file=sys.stderr)
        return 3
    return 0


def schedule(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of `total` steps, then cosine decay to 0.1."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def load_lm(path: str | Path, device="cpu") -> tuple[ReversibleTransformer, text.Vocabulary]:
    """The model of a text run's checkpoint in evaluation mode, and its vocabulary."""
    ckpt = checkpoint.load(path)
    if "vocab" not in ckpt or not isinstance(ckpt["config"], dict) or ckpt["config"].get("dataset") != "text":
        raise ValueError(f"{path} is not a checkpoint of a text run (revnets train --dataset text)")
    config = ckpt["config"]
    vocab = text.Vocabulary(**ckpt["vocab"])
    kw = {k: config[k] for k in ("context", "h", "mlp") if config.get(k) is not None}
    model = build_lm(config["model"], len(vocab), **kw)
    checkpoint.load_state(model, ckpt["model"], path)
    return model.to(device).eval(), vocab


class Run:
    """One text run: model, optimiser, data and files, across epochs."""

    def __init__(self, config: LMConfig, on_epoch=None):
        self.config = c = config
        self.on_epoch = on_epoch
        self.rank, self.world, self.device = setup_distributed(c.device)
        if c.batch_size % self.world:
            raise ValueError(f"--batch-size {c.batch_size} must be a multiple of the {self.world} processes")
        self.out, self.dir = Path(c.out), RunDir(c.out)
        if self.rank == 0:
            self.dir.check_writable(resume=c.resume is not None)
        ckpt = checkpoint.load(self.dir.last, map_location=self.device) if c.resume else None
        self.data = text.load_text(c.data_dir, c.level, c.val_fraction)
        if ckpt and ckpt["vocab"] != self.data.vocab.state():
            raise ValueError(f"{c.data_dir} gives another vocabulary than the run's {self.out / 'last.pt'}")
        torch.manual_seed(c.seed)
        self.net = build_lm(c.model, len(self.data.vocab), **c.model_kwargs()).to(self.device)
        self.model = wrap(self.net, c, self.device, self.world)
        self.flat = _Flat(self.model)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95))
        total = c.epochs * c.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: schedule(s, total))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        self.start, self.best_bpc, self.best_epoch, self.wall = 0, math.inf, 0, 0.0
        if ckpt:
            self._restore(ckpt)
        self.metrics = MetricsCSV(self.out / "metrics.csv", FIELDS)

    def _restore(self, ckpt: dict) -> None:
        checkpoint.load_state(self.net, ckpt["model"], self.out / "last.pt")
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"], self.device)
        self.start, self.best_bpc, self.best_epoch, self.wall = (ckpt["epoch"], ckpt["best_bpc"], ckpt["best_epoch"],
                                                                 ckpt["wall_s"])

    def state(self, epoch: int) -> dict:
        state = dict(model=self.net.state_dict(), config=asdict(self.config), epoch=epoch,
                     optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     rng=checkpoint.rng_state(self.device),
                     best_bpc=self.best_bpc, best_epoch=self.best_epoch, wall_s=self.wall,
                     vocab=self.data.vocab.state())
        if self.config.amp == "fp16":
            state["scaler"] = self.scaler.state_dict()
        return state

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of global batch `step`: a function of (seed, step, rank) only."""
        c = self.config
        gen = torch.Generator().manual_seed((c.seed * 1_000_003 + step) * self.world + self.rank)
        x, y = text.batch(self.data.train, self.net.context, c.batch_size // self.world, gen)
        return x.to(self.device), y.to(self.device)

    def train_epoch(self, epoch: int) -> dict:
        """--steps-per-epoch steps; train loss (nats per token, over all processes), lr, tokens/s."""
        c, n = self.config, self.config.steps_per_epoch
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        lr, t0 = self.sched.get_last_lr()[0], time.perf_counter()
        for step in range(epoch * n, (epoch + 1) * n):
            x, y = self.batch(step)
            try:  # the step is not applied when its loss or gradient is not finite
                loss, _ = train_step(self.flat, self.opt, x, y.flatten(), amp=c.amp, scaler=self.scaler)
            except NonFiniteError as e:
                kept = f"{self.dir.last} keeps epoch {epoch}" if epoch else "nothing was written"
                raise NonFiniteError(e.what, f"{e} at step {step + 1} (epoch {epoch + 1}); {kept}, the last "
                                     "finite state (a resume repeats the same steps: start a new run with a "
                                     "lower --lr)") from None
            self.sched.step()
            loss_sum += loss.double()
        loss_sum, = all_reduce(loss_sum[None], self.world)
        seconds = time.perf_counter() - t0
        return dict(train_loss=loss_sum / (n * self.world), lr=lr, step=(epoch + 1) * n,
                    tokens_per_s=n * c.batch_size * x.shape[1] / seconds)

    def validate(self) -> float:
        self.net.eval()
        with autocast(self.device, self.config.amp):
            return text.bits_per_char(self.net, self.data.val, self.data.tokens_per_char, self.net.context)

    def fit(self) -> dict:
        """Train (rank 0 holding the run directory's lock) and write the summary."""
        if self.rank != 0:
            return self._fit()
        with self.dir.locked():
            self._begin()
            return self._fit()

    def _fit(self) -> dict:
        c = self.config
        for epoch in range(self.start, c.epochs):
            t0 = time.perf_counter()
            row = self.train_epoch(epoch)
            row.update(epoch=epoch + 1, val_bpc=self.validate(), peak_mb=peak_mb(self.device))
            if row["val_bpc"] < self.best_bpc:
                self.best_bpc, self.best_epoch = row["val_bpc"], epoch + 1
            self.wall += time.perf_counter() - t0
            if self.rank == 0:
                self._write_epoch(row)
            if self.on_epoch is not None:
                self.on_epoch(row)
        return self._finish()

    def _begin(self) -> None:
        if self.config.resume is None:
            write_json(self.dir.config, {**asdict(self.config), "versions": dict(
                revnets=__version__, torch=torch.__version__, python=platform.python_version())})
        self.metrics.keep_until(self.start)
        params = sum(p.numel() for p in self.net.parameters())
        what = f"resuming after epoch {self.start}" if self.start else "training"
        print(f"revnets train: {what} {self.config.model} ({params:,} parameters) on {self.config.data_dir} "
              f"({len(self.data.train):,} train / {len(self.data.val):,} held-out tokens, vocabulary "
              f"{len(self.data.vocab)}), {self.device}; results in {self.out}/", flush=True)

    def _write_epoch(self, row: dict) -> None:
        self.metrics.append(row)
        self.dir.save(self.state(row["epoch"]), best=self.best_epoch == row["epoch"])
        print(f"epoch {row['epoch']}/{self.config.epochs}  train {row['train_loss']:.4f} nats/token  "
              f"val {row['val_bpc']:.4f} bits/char  lr {row['lr']:.3g}  {row['tokens_per_s']:,.0f} tokens/s",
              flush=True)

    def _finish(self) -> dict:
        rows = self.metrics.read() if self.rank == 0 else []
        summary = dict(model=self.config.model, dataset="text", epochs=self.config.epochs,
                       final_bpc=float(rows[-1]["val_bpc"]) if rows else None, best_bpc=self.best_bpc,
                       best_epoch=self.best_epoch, wall_s=self.wall,
                       params=sum(p.numel() for p in self.net.parameters()), out=str(self.out))
        if self.rank == 0:
            self.dir.write_summary(summary)
            print(f"done: validation {summary['final_bpc']:.4f} bits/char (best {self.best_bpc:.4f} at epoch "
                  f"{self.best_epoch}), {self.wall:.1f} s; results in {self.out}/", flush=True)
        return summary


class _Flat(nn.Module):
    """The model with its logits (N, T, V) as (N T, V): what `loop.train_step`'s cross-entropy reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(0, 1)


def train(config: LMConfig, on_epoch=None) -> dict:
    """Train as `config` says; returns the summary (also in out/summary.json).

    `on_epoch(row)`, if given, is called with each epoch's metrics after its checkpoint is written
    (an exception raised there stops the run as a kill would).
    """
    import torch.distributed as dist
    owns_group = not dist.is_initialized()
    try:
        summary = Run(config, on_epoch).fit()
        if dist.is_initialized():
            dist.barrier()
        return summary
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
