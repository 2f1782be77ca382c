"""What a training run shows and keeps: a progress bar per epoch, one line per epoch, metrics.csv.

The bar (tqdm) shows loss, accuracy, images/s and the ETA when stdout is a terminal; in a log file
(stdout not a TTY) only the one-line epoch summaries appear. TensorBoard logging is used when the
optional `tensorboard` package is importable.
"""
import csv
import importlib.util
import os
import sys
from pathlib import Path

from .checkpoint import atomic_write

FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "peak_mb")


class EpochBar:
    """A per-epoch bar over `total` batches, shown when `enabled` (default: stdout is a terminal).

    `step(stats)` advances one batch; `stats() -> (loss, acc, images_per_s)` is called only every
    `every` batches and only when the bar is shown, since on a GPU it waits for the device.
    """

    def __init__(self, total: int, epoch: int, epochs: int, enabled: bool | None = None, every: int = 10):
        from tqdm import tqdm  # the `train` extra; imported here so that `revnets --help` works without it
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.every = every
        self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", file=sys.stdout, leave=False,
                        dynamic_ncols=True, disable=not self.enabled)

    def step(self, stats) -> None:
        if self.enabled and (self.bar.n % self.every == 0 or self.bar.n == self.bar.total - 1):
            loss, acc, images_per_s = stats()
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.2%} {images_per_s:,.0f} img/s", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def epoch_line(row: dict, epochs: int) -> str:
    """One line per epoch, e.g. ``epoch 3/20  train 0.4123 87.10%  test 0.3011 90.20%  lr 0.1 ...``."""
    line = (f"epoch {row['epoch']}/{epochs}  train {row['train_loss']:.4f} {row['train_acc']:.2%}  "
            f"test {row['test_loss']:.4f} {row['test_acc']:.2%}  lr {row['lr']:.4g}  "
            f"{row['images_per_s']:,.0f} img/s  {row['peak_mb']:,.0f} MB")
    if row.get("drift_max") is not None:
        line += f"  drift {row['drift_max']:.2e}"
    return line


class MetricsCSV:
    """metrics.csv, one row per epoch, flushed as written.

    `keep_until(epoch)` drops rows after `epoch` (a resumed run rewrites the epochs that its
    checkpoint does not hold); the rewrite is atomic.
    """

    def __init__(self, path: str | os.PathLike, fields: tuple[str, ...] = FIELDS):
        self.path, self.fields = Path(path), tuple(fields)

    def keep_until(self, epoch: int) -> None:
        kept = [r for r in self.read() if int(r["epoch"]) <= epoch]

        def write(f):
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(kept)
        atomic_write(self.path, write, text=True)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in self.fields})

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def tensorboard_writer(log_dir: str | os.PathLike):
    """A `torch.utils.tensorboard.SummaryWriter` on `log_dir`, or None when tensorboard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))
