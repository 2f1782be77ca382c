"""A run directory (`revnets train --out DIR`): its files, one writer at a time, and the checks that
let a killed or finished run go on.

    config.json    every setting (`settings.config_dict`), and "extended" when --resume grew the run
    metrics.csv    one row per epoch (the task's fields)
    last.pt        the state after the last finished epoch: model, optimiser, schedule, RNG
    best.pt        the state after the best epoch (validation score; test accuracy without a validation split)
    summary.json   written when the run ends

config.json and metrics.csv are written with the first epoch's checkpoint: a run that stops before
it leaves nothing behind.

A lock (DIR/.lock, an flock holding the owner's pid) admits one writer; the kernel releases it when
its owner dies, so a lock left by a killed run is taken over with a note, and the temporary files
of a write it was killed in are removed. Checkpoints are written last.pt first, then best.pt, with
Ctrl-C held back in between; a kill between the two (or any other) is repaired on resume
(`RunDir.repair`).
"""
import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from .. import checkpoint
from ..files import DiskFull, check_directory, deferred_interrupt, write_json
from .settings import GROWABLE, PLACE, Config, changed_settings, check_extension, config_dict

RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", "summary.json")


class RunDir:
    """The files of one run under `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config, self.last, self.best, self.summary = (self.path / f for f in
                                                           ("config.json", "last.pt", "best.pt", "summary.json"))

    def check_writable(self, config: Config) -> None:
        """ValueError unless `config`'s run can be written here: a directory (or none yet) in a
        writable place that, unless the run resumes, holds no run files but the config.json of a
        start of this run that saved nothing."""
        check_directory(self.path)
        if config.resume:
            return
        if self.last.exists():
            raise ValueError(f"{self.path} already holds a run; continue it with --resume {self.path} "
                             "or choose another --out")
        others = [f for f in RUN_FILES
                  if (self.path / f).exists() and not (f == "config.json" and self._started(config))]
        if others:
            raise ValueError(f"{self.path} holds {', '.join(others)} of another run or program, which a run would "
                             "overwrite; choose another --out")

    def _started(self, config: Config) -> bool:
        """Whether config.json is that of a start of `config`'s run (one stopped before its first epoch)."""
        try:
            return not changed_settings(json.loads(self.config.read_text()), config)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # not a run's config.json
            return False

    def resume_checkpoint(self, config: Config, device) -> dict:
        """last.pt, on `device`, if `config` continues its run (the same settings; --epochs and
        --milestones may grow it, `config.check_extension`); ValueError naming what differs."""
        ckpt = checkpoint.load(self.last, map_location=device)
        if not isinstance(ckpt["config"], dict):
            raise ValueError(f"{self.last} has no settings (its config is a {type(ckpt['config']).__name__})")
        differ = {k: v for k, v in changed_settings(ckpt["config"], config).items() if k not in GROWABLE}
        if differ:
            raise ValueError(f"{self.last} was saved by a run with other settings: "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items()))
        saved = Config.from_dict({**ckpt["config"], **{k: getattr(config, k) for k in PLACE}})
        check_extension(saved, config, ckpt["epoch"])
        return ckpt

    def stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of last.pt: whether it changed between reading and locking."""
        return (lambda s: (s.st_mtime_ns, s.st_size))(self.last.stat()) if self.last.exists() else None

    @contextlib.contextmanager
    def locked(self):
        """Hold DIR/.lock (created with DIR if need be) for the block; ValueError if another process
        holds it, or if it is not a file. Temporary files of the run's files left by a killed writer
        (`files.atomic_write`'s) are removed once it is held. A directory created here and left
        empty is removed again."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(self.path, 4096, 0) from None
            raise ValueError(f"--out {self.path}: cannot be made a directory ({e.strerror})") from None
        lock = self.path / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never write through a link
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(lock, 4096, 0) from None
            raise ValueError(f"{lock} cannot be the lock of {self.path} ({e.strerror}): remove it if no "
                             "revnets train uses it") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino  # not unlinked meanwhile
            except BlockingIOError:
                held = False
            content = os.pread(fd, 64, 0).strip()
            owner = f"pid {content.decode()}" if content.isdigit() else "pid unknown"
            if not held:
                raise ValueError(f"{self.path} is in use by another revnets train ({owner}); wait "
                                 "for it to end or choose another --out")
            if content:
                print(f"note: taking over {lock}, left by {owner}, which no longer holds it", flush=True)
            os.ftruncate(fd, 0)
            try:
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFull(lock, 4096, 0) from None
                raise
            self._remove_temporaries()
            try:
                yield self
            finally:
                os.unlink(lock)
        finally:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only if nothing was written

    def _remove_temporaries(self) -> None:
        """Delete the temporary files a writer killed inside `files.atomic_write` left of the run's
        files (.last.pt.XXXX.tmp, ...), with a note: under the lock, no other writer is using them."""
        stale = [p for name in RUN_FILES for p in self.path.glob(f".{name}.*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            print(f"note: removed {', '.join(p.name for p in stale)} (left by a killed run)", flush=True)

    def repair(self, last: dict) -> None:
        """After a kill, make best.pt agree with last.pt (the kill fell between the two) and drop a
        summary.json of an earlier end (the run goes on). ValueError if the best epoch is lost."""
        best_epoch = last.get("best_epoch", 0)
        held = checkpoint.load(self.best)["epoch"] if self.best.exists() else None
        if best_epoch and held != best_epoch:
            if best_epoch != last["epoch"]:
                raise ValueError(f"{self.best} holds epoch {held}, not the run's best epoch {best_epoch}, which no "
                                 "file holds any more; restore it or start a new run")
            checkpoint.save(self.best, last)
            print(f"note: repaired {self.best} (the run was stopped before it held epoch {best_epoch})", flush=True)
        self.summary.unlink(missing_ok=True)

    def write_config(self, config: Config, start: int) -> None:
        """config.json of `config`, `start` epochs in; a resumed run that grew keeps the record of
        each extension under "extended" (after_epoch, and the epochs and milestones it had)."""
        content = config_dict(config)
        if start:
            saved = json.loads(self.config.read_text())
            content["extended"] = saved.get("extended", [])
            if (saved["epochs"], tuple(saved["milestones"])) != (config.epochs, config.milestones):
                content["extended"].append(dict(after_epoch=start, epochs=saved["epochs"],
                                                milestones=saved["milestones"]))
        write_json(self.config, content)

    def save(self, state: dict, best: bool) -> None:
        """last.pt, then best.pt when `best`; a Ctrl-C waits until both are written."""
        with deferred_interrupt():
            checkpoint.save(self.last, state)
            if best:
                checkpoint.save(self.best, state)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary, summary)
