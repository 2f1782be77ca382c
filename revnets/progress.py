"""What long steps show and a training run keeps: progress bars, one line per epoch, metrics.csv.

The epoch bar (tqdm) shows loss, accuracy, images/s and the ETA when stdout is a terminal; in a log
file (stdout not a TTY) only the one-line epoch summaries appear. Other long steps (decoding an
image folder, evaluating, analysing) show a bar on stderr when it is a terminal, else one line
when they start. TensorBoard logging is used when the optional `tensorboard` package is importable.
"""
import importlib.util
import os
import sys
from pathlib import Path

from .files import read_csv, write_csv

FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "images_per_s",
          "peak_mb", "epoch_s")


def bar(iterable, desc: str, total: int | None = None, enabled: bool | None = None):
    """`iterable` with a tqdm bar on stderr (default: when stderr is a terminal); otherwise one line,
    ``desc (total)``, printed when the step starts."""
    from tqdm import tqdm
    enabled = sys.stderr.isatty() if enabled is None else enabled
    total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
    if not enabled:
        print(f"{desc} ({total:,})" if total else desc, file=sys.stderr, flush=True)
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True, disable=not enabled)


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


def epoch_line(row: dict, epochs: int, eta_s: float, memory: str) -> str:
    """One line per epoch, e.g. ``epoch 3/20  train 0.4123 87.10%  val 0.3512 89.00%  test 0.3011 90.20%
    lr 0.1  2,345 img/s  12.3 s (ETA 3 min)  peak RSS 413 MB``; `memory` labels peak_mb."""
    val = f"val {row['val_loss']:.4f} {row['val_acc']:.2%}  " if row.get("val_acc") is not None else ""
    line = (f"epoch {row['epoch']}/{epochs}  train {row['train_loss']:.4f} {row['train_acc']:.2%}  {val}"
            f"test {row['test_loss']:.4f} {row['test_acc']:.2%}  lr {row['lr']:.4g}  "
            f"{row['images_per_s']:,.0f} img/s  {row['epoch_s']:.1f} s (ETA {duration(eta_s)})  "
            f"{memory} {row['peak_mb']:,.0f} MB")
    if row.get("drift_max") is not None:
        line += f"  drift {row['drift_max']:.2e}"
    return line


def duration(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class MetricsCSV:
    """metrics.csv, one row per epoch, rewritten atomically with each row.

    `keep_until(epoch)` drops rows after `epoch` (a resumed run rewrites the epochs that its
    checkpoint does not hold).
    """

    def __init__(self, path: str | os.PathLike, fields: tuple[str, ...] = FIELDS):
        self.path, self.fields = Path(path), tuple(fields)

    def keep_until(self, epoch: int) -> None:
        write_csv(self.path, self.fields, [r for r in self.read() if int(r["epoch"]) <= epoch])

    def append(self, row: dict) -> None:
        """Add one row; the file is rewritten atomically, so a kill never leaves half a row."""
        write_csv(self.path, self.fields, [*self.read(), row])

    def read(self) -> list[dict]:
        return read_csv(self.path)


def tensorboard_writer(log_dir: str | os.PathLike):
    """A `torch.utils.tensorboard.SummaryWriter` on `log_dir`, or None when tensorboard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))
