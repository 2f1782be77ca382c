"""Files that survive a kill: every file revnets writes goes through `atomic_write`.

The content is made in memory first; then a temporary file next to the target is written, flushed,
fsynced and renamed over the target, so a kill leaves the old file or the new one, never half of
one, and a disk without room for the content raises `DiskFull` (naming the file and the space it
needs) before anything is written. JSON, CSV and PNG writers on top of it are used by `checkpoint`,
`training.data`, `training.progress`, `cli.plot`, `cli.analyze`, `cli.reproduce` and the run
directory (`training.rundir`). `deferred_interrupt` holds a Ctrl-C back while a group of files is
written; `check_directory` checks an output directory before anything is written into it.
"""
import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path


class DiskFull(OSError):
    """A file that does not fit on its disk; `path`, and `needed` and `free` bytes."""

    def __init__(self, path: Path, needed: int, free: int, message: str | None = None):
        super().__init__(errno.ENOSPC, message or f"no space left for {path}: it needs {_mb(needed)} and "
                                                  f"{_mb(free)} are free on its disk")
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def atomic_write(path: str | os.PathLike, write, text: bool = False) -> None:
    """Call write(file) on an in-memory file (binary, or text with `text`), then write its content to
    a temporary file next to `path`, flush, fsync and rename it over `path`: a kill leaves the old
    file or the new one, and a failure nothing. `DiskFull` when the disk has not room for it."""
    path = Path(path)
    buffer = io.StringIO(newline="") if text else io.BytesIO()
    write(buffer)
    content = buffer.getvalue().encode() if text else buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if len(content) > free:
        raise DiskFull(path, len(content), free)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like any data file (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, len(content), shutil.disk_usage(path.parent).free) from None
        raise
    except BaseException:
        os.unlink(tmp)
        raise


def check_directory(path: str | os.PathLike) -> None:
    """ValueError unless `path` (given as --out) is a directory, or can be made one, in a place this
    process may write: nothing on the way is a file and the nearest existing directory is writable."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory" if existing == path else
                         f"--out {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write in {existing} (permission denied)")


def finite(obj):
    """JSON-safe copy of `obj`: NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: dict, indent: int = 2) -> None:
    """`obj` as JSON (non-finite numbers as null), written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n"), text=True)


def write_csv(path: str | os.PathLike, fields: tuple[str, ...], rows: list[dict]) -> None:
    """`rows` (dicts; missing keys blank, others ignored) under a header of `fields`, written atomically."""
    def write(f):
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, write, text=True)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV file with a header, as dicts of strings ([] when there is no file)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to `path` as a PNG (120 dpi), atomically; return the path."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return path


@contextlib.contextmanager
def deferred_interrupt():
    """Hold SIGINT (Ctrl-C) back until the block has run, then raise KeyboardInterrupt: files written
    together (a run's checkpoints) are all written or none. Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
