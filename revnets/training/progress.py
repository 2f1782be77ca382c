"""What long steps show and a training run keeps: progress bars, one line per epoch, metrics.csv.

The epoch bar (tqdm) shows loss, accuracy, images/s (tokens/s) and the ETA when stdout is a
terminal; in a log file (stdout not a TTY) only the one-line epoch summaries appear. Other long steps (decoding an
image folder, evaluating, analysing) show a bar on stderr when it is a terminal, else one line
when they start. TensorBoard logging is used when the optional `tensorboard` package is importable.
"""
import csv
import importlib.util
import os
import sys
from pathlib import Path

from ..files import read_csv, write_csv


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

    `step(stats)` advances one batch; `stats() -> (loss, acc, per_s)` (per_s: `unit`, images or
    tokens, per second) is called only every `every` batches and only when the bar is shown, since
    on a GPU it waits for the device.
    """

    def __init__(self, total: int, epoch: int, epochs: int, unit: str = "images", enabled: bool | None = None,
                 every: int = 10):
        from tqdm import tqdm  # the `train` extra; imported here so that `revnets --help` works without it
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.every, self.unit = every, {"images": "img"}.get(unit, unit)
        self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", file=sys.stdout, leave=False,
                        dynamic_ncols=True, disable=not self.enabled)

    def step(self, stats) -> None:
        if self.enabled and (self.bar.n % self.every == 0 or self.bar.n == self.bar.total - 1):
            loss, acc, per_s = stats()
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.2%} {per_s:,.0f} {self.unit}/s", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class MetricsCSV:
    """metrics.csv, one row per epoch under a header of `fields`, rewritten atomically with each row.

    `keep_until(epoch)` drops rows after `epoch` (a resumed run rewrites the epochs that its
    checkpoint does not hold).
    """

    def __init__(self, path: str | os.PathLike, fields: tuple[str, ...]):
        self.path, self.fields = Path(path), tuple(fields)

    def keep_until(self, epoch: int, row: dict | None = None) -> None:
        """Keep the rows up to `epoch`; `row`, that epoch's row, is added if the file lacks it (a run
        stopped between its checkpoint and this file)."""
        rows = [r for r in self.read() if int(r["epoch"]) <= epoch]
        if row is not None and not any(int(r["epoch"]) == epoch for r in rows):
            rows.append(row)
        write_csv(self.path, self.fields, rows)

    def append(self, row: dict) -> None:
        """Add one row; the file is rewritten atomically, so a kill never leaves half a row."""
        write_csv(self.path, self.fields, [*self.read(), row])

    def read(self) -> list[dict]:
        """The rows; ValueError naming the file unless each has an integer epoch."""
        try:
            rows = read_csv(self.path)
            for r in rows:
                int(r["epoch"])
        except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path} is not a metrics.csv of a run ({type(e).__name__}: {e}); move it "
                             "away to go on without its rows") from None
        return rows


def tensorboard_writer(log_dir: str | os.PathLike):
    """A `torch.utils.tensorboard.SummaryWriter` on `log_dir`, or None when tensorboard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))
