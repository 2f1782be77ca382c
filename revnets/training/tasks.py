"""What differs between an image run and a text run; everything else is the one `Run`.

A task is made from a run's settings on one process (`rank` of `world`, on `device`) and reads and
checks its data when it is made. It says how the run's model is recorded (`record`), which
optimiser trains it, which batches an epoch has, how a trained epoch is measured (`evaluate`) and
scored (`score`: `metric`, higher or lower is better), and how an epoch and a run are reported.

  image  CIFAR-10/100, STL-10, an image folder or digits: SGD (the paper's recipe), an epoch one
         pass over the training images (augmented on the device), validation and test loss and
         accuracy; best.pt: the highest validation accuracy (test accuracy without a validation split).
  text   UTF-8 text: AdamW, an epoch --steps-per-epoch steps on random windows of the training
         split (drawn from (seed, step, rank) only, so a resumed run is bitwise an uninterrupted
         one on CPU), bits per character on the held-out split (`text.bits_per_char`); best.pt:
         the lowest.
"""
import math
import sys

import torch
from torch import nn

from .. import inference
from .distributed import all_reduce
from .progress import duration
from .settings import Config, growths
from .step import autocast, totals
from . import data, sources, text


class ImageTask:
    metric, higher, unit = "acc", True, "images"
    fields = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "images_per_s",
              "peak_mb", "epoch_s")

    def __init__(self, config: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.config, self.world = config, world
        self.ds = data.subsample(data.load_dataset(config.dataset, config.data_dir, config.download),
                                 config.train_fraction, config.seed, config.val_fraction)
        self.stats = data.channel_stats(self.ds.train_x)  # stored in every checkpoint's record
        mean, std = self.stats
        common = dict(mean=mean, std=std, device=device, seed=config.seed, rank=rank, world_size=world)
        self.train_loader = data.Loader(self.ds.train_x, self.ds.train_y, config.batch_size, train=True,
                                        padding=self.ds.padding, **common)
        self.val_loader = None if self.ds.val_x is None else \
            data.Loader(self.ds.val_x, self.ds.val_y, config.batch_size, train=False, **common)
        self.test_loader = data.Loader(self.ds.test_x, self.ds.test_y, config.batch_size, train=False, **common)
        self.steps_per_epoch = len(self.train_loader)

    def interface(self) -> dict:
        """What a model of this data needs to be used: classes, input channels and size, standardisation."""
        mean, std = self.stats
        return dict(classes=list(self.ds.classes), in_channels=self.ds.train_x.shape[1],
                    image_size=tuple(self.ds.train_x.shape[2:]), mean=mean.float().cpu(), std=std.float().cpu())

    def record(self, grown: int) -> dict:
        c = self.config
        return inference.record(c.model, c.overrides(), "image", not c.plain, grown, **self.interface())

    def check(self, net: nn.Module) -> None:
        """ValueError if the dataset's images do not fit the network."""
        net.check_input(self.ds.train_x[:1])

    def optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def batches(self, epoch: int):
        self.train_loader.set_epoch(epoch)
        for x, y in self.train_loader:
            yield (x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x), y

    def evaluate(self, net: nn.Module) -> dict:
        """Validation (if held out) and test loss and accuracy over all processes."""
        row = dict(val_loss=None, val_acc=None)
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            if loader is not None:
                batches = ((x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x, y)
                           for x, y in loader)
                loss_sum, correct, count = all_reduce(totals(net, batches, self.config.amp), self.world)
                row[f"{split}_loss"], row[f"{split}_acc"] = loss_sum / count, correct / count
        return row

    def score(self, row: dict) -> float:
        return row["val_acc"] if self.val_loader else row["test_acc"]

    def describe(self) -> str:
        ds = self.ds
        val = f"{len(ds.val_y):,} validation / " if ds.val_y is not None else ""
        return f"{ds.name} ({len(ds.train_y):,} train / {val}{len(ds.test_y):,} test images)"

    def notes(self) -> list[str]:
        return [] if self.val_loader else ["no validation split (--val-fraction 0): best.pt is chosen on the test set"]

    @staticmethod
    def epoch_line(row: dict, epochs: int, eta_s: float, memory: str) -> str:
        """e.g. ``epoch 3/20  train 0.4123 87.10%  val 0.3512 89.00%  test 0.3011 90.20%  lr 0.1  2,345 img/s
        12.3 s (ETA 3 min)  peak RSS 413 MB``."""
        val = f"val {row['val_loss']:.4f} {row['val_acc']:.2%}  " if row.get("val_acc") is not None else ""
        return (f"epoch {row['epoch']}/{epochs}  train {row['train_loss']:.4f} {row['train_acc']:.2%}  {val}"
                f"test {row['test_loss']:.4f} {row['test_acc']:.2%}  lr {row['lr']:.4g}  "
                f"{row['images_per_s']:,.0f} img/s  {row['epoch_s']:.1f} s (ETA {duration(eta_s)})  "
                f"{memory} {row['peak_mb']:,.0f} MB")

    def summary(self, rows: list[dict], best_epoch: int) -> dict:
        """The last epoch's test loss and accuracy (final_*), the best epoch's validation and test
        ones (best_*), what the best epoch was chosen on."""
        last = rows[-1] if rows else {}
        best = next((r for r in rows if int(r["epoch"]) == best_epoch), {})
        return dict(final_acc=_value(last, "test_acc"), final_loss=_value(last, "test_loss"), best_epoch=best_epoch,
                    **{f"best_{k}": _value(best, k) for k in ("val_acc", "val_loss", "test_acc", "test_loss")},
                    best_on="validation" if self.val_loader else "test")

    @staticmethod
    def done_line(summary: dict) -> str:
        return (f"test accuracy {summary['final_acc']:.2%} at the last epoch; best epoch {summary['best_epoch']} by "
                f"{summary['best_on']} accuracy (test {summary['best_test_acc']:.2%})")


class TextTask:
    metric, higher, unit = "bpc", False, "tokens"
    fields = ("epoch", "step", "train_loss", "train_acc", "val_bpc", "lr", "tokens_per_s", "peak_mb", "epoch_s")

    def __init__(self, config: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.data = text.load_text(config.data_dir, config.level, config.val_fraction)
        self.steps_per_epoch = config.steps_per_epoch

    def interface(self) -> dict:
        """What a model of this text needs to be used: its vocabulary."""
        return dict(vocab=self.data.vocab.state())

    def record(self, grown: int) -> dict:
        """The record of the run's model: the source's (--init-from; in the scheme of --convert, with
        that scheme's defaults where the run gives no --h or --init), its settings overridden by the
        run's model flags, or the registered model's; with the run's vocabulary."""
        c = self.config
        if c.init_from:
            source = sources.record(c.init_from)
            if source["kind"] != "text":
                raise ValueError(f"--init-from {c.init_from} holds an image model, not a language model")
            kept = {k: v for k, v in source["overrides"].items() if not (c.convert and k in ("scheme", "h", "init"))}
            return {**source, "overrides": {**kept, **c.overrides()}, "memory_efficient": not c.plain,
                    "grown": grown, **self.interface()}
        return inference.record(c.model, c.overrides(), "text", not c.plain, grown, **self.interface())

    def check(self, net: nn.Module) -> None:
        """ValueError if the model's vocabulary has fewer tokens than the text's or a window (--context,
        or the model's context) is longer than the held-out text or the model's positions; else the
        batches are windows of that length."""
        context, tokens = inference.text_sizes(net)
        if self.config.context is not None:  # a Hugging Face model's window may be shorter than its positions
            if self.config.context > context:
                raise ValueError(f"--context {self.config.context} is longer than the model's {context} positions")
            context = self.config.context
        if tokens < len(self.data.vocab):
            raise ValueError(f"the model reads {tokens} tokens, fewer than the {len(self.data.vocab)} of "
                             f"{self.config.data_dir} at --level {self.config.level}")
        if context > len(self.data.val) - 1:
            raise ValueError(f"--context {context} is longer than the held-out text ({len(self.data.val) - 1} "
                             "tokens to predict); use a shorter --context or more text")
        self.context = context

    def optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95))

    def batches(self, epoch: int):
        n = self.steps_per_epoch
        for step in range(epoch * n, (epoch + 1) * n):
            yield self.batch(step)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of global batch `step`: a function of (seed, step, rank) only."""
        c = self.config
        gen = torch.Generator().manual_seed((c.seed * 1_000_003 + step) * self.world + self.rank)
        x, y = text.batch(self.data.train, self.context, c.batch_size // self.world, gen)
        return x.to(self.device), y.to(self.device)

    def evaluate(self, net: nn.Module) -> dict:
        net.eval()
        with autocast(self.device, self.config.amp):
            return dict(val_bpc=text.bits_per_char(net, self.data.val, self.data.tokens_per_char, self.context))

    @staticmethod
    def score(row: dict) -> float:
        return row["val_bpc"]

    def describe(self) -> str:
        d = self.data
        return (f"{self.config.data_dir} ({len(d.train):,} train / {len(d.val):,} held-out tokens, vocabulary "
                f"{len(d.vocab)})")

    @staticmethod
    def notes() -> list[str]:
        return []

    @staticmethod
    def epoch_line(row: dict, epochs: int, eta_s: float, memory: str) -> str:
        """e.g. ``epoch 2/10  train 1.2345 nats/token  val 2.3456 bits/char  lr 0.001  9,876 tokens/s ...``."""
        return (f"epoch {row['epoch']}/{epochs}  train {row['train_loss']:.4f} nats/token  val {row['val_bpc']:.4f} "
                f"bits/char  lr {row['lr']:.3g}  {row['tokens_per_s']:,.0f} tokens/s  {row['epoch_s']:.1f} s "
                f"(ETA {duration(eta_s)})  {memory} {row['peak_mb']:,.0f} MB")

    @staticmethod
    def summary(rows: list[dict], best_epoch: int) -> dict:
        best = next((r for r in rows if int(r["epoch"]) == best_epoch), {})
        return dict(final_bpc=_value(rows[-1] if rows else {}, "val_bpc"), best_bpc=_value(best, "val_bpc"),
                    best_epoch=best_epoch)

    @staticmethod
    def done_line(summary: dict) -> str:
        return (f"validation {summary['final_bpc']:.4f} bits/char at the last epoch (best {summary['best_bpc']:.4f} "
                f"at epoch {summary['best_epoch']})")


TASKS = {"image": ImageTask, "text": TextTask}


def old_record(ckpt: dict, path, ds: data.Dataset | None = None) -> dict:
    """The model record of an image checkpoint saved before checkpoints stored their standardisation
    (before 2026-12-01): the statistics recomputed from the training images its run standardised
    with (the run's own split of `ds`, by default the dataset its settings name), with a note."""
    if not isinstance(ckpt["config"], dict) or "model" not in ckpt["config"]:
        raise ValueError(f"{path} has no model name in its settings")
    config = ckpt["config"]
    if ds is None:
        ds = data.load_dataset(config.get("dataset"), config.get("data_dir"))
    train = ds
    if ds.name == config.get("dataset"):
        train = data.subsample(ds, config.get("train_fraction", 1.0), config.get("seed", 0),
                               config.get("val_fraction", 0.0))
    mean, std = data.channel_stats(train.train_x)
    print(f"note: {path} stores no standardisation (saved before checkpoints did); recomputed from the {ds.name} "
          "training split", file=sys.stderr)
    grown = growths(config.get("grow_at"), ckpt["epoch"])
    return inference.record(config["model"], inference.model_overrides(config), "image", not config.get("plain"),
                            grown, classes=list(ds.classes), in_channels=ds.train_x.shape[1],
                            image_size=tuple(ds.train_x.shape[2:]), mean=mean, std=std)


def _value(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) not in (None, "") else None


def worst(higher: bool) -> float:
    """The score every epoch beats."""
    return -math.inf if higher else math.inf
