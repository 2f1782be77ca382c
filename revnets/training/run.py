"""One training run, for every task: a run that stops on faults, keeps its results and can go on.

`Run(config).fit()` trains the model `config` names on its task's data (`revnets.training.tasks`:
images or text), one epoch at a time: train, measure (validation and test accuracy, or held-out
bits per character), write. The run directory (`rundir.RunDir`) holds config.json, metrics.csv,
last.pt and best.pt (the best epoch by the task's score) and summary.json, with one writer at a
time. `--resume DIR` continues DIR from last.pt (model, optimiser, schedule, RNG, epoch): on CPU
with a fixed seed the result is bitwise that of an uninterrupted run, because batches depend only
on (seed, epoch) or (seed, step); with a larger --epochs a finished run goes on (step schedule;
its decays already passed stay). `--init-from CKPT` starts a new run from a checkpoint's weights.

A non-finite loss, gradient or weight stops the run before it is saved (`NonFiniteError`, exit
code 3): last.pt and best.pt keep the last finite epoch. Ctrl-C stops it between two files
(`Interrupted`, exit code 130) and says how to continue. Every setting and the data are checked
before the run directory is made. Under torchrun, see `revnets.training.distributed`.

--grow-at E: at the start of epoch E (after E epochs) every reversible block is split in two with
h halved (`revnets.multilevel.grow`). The optimiser then keeps its settings and schedule position
but restarts its momentum, since the grown network's parameters are new tensors.
"""
import contextlib
import math
import time
from collections import Counter
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint, inference
from ..analysis import DriftMonitor
from ..engine import AutoSegment
from ..files import DiskFull
from ..multilevel import grow
from ..networks import chains
from . import distributed, sources
from .progress import EpochBar, MetricsCSV, tensorboard_writer
from .rundir import RUN_FILES, RunDir
from .settings import Config, growths, model_name
from .step import NonFiniteError, train_step
from .tasks import TASKS, worst


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where it stopped and how to continue."""


def rng_state(device: torch.device) -> dict:
    """The default generators' states, for a checkpoint's "rng": CPU, and CUDA on a GPU run."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved (the CUDA state only on a GPU run that saved one)."""
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def make_schedule(config: Config, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The learning-rate schedule, stepped once per batch: step (divided by 10 at each milestone),
    cosine, onecycle, or warmup (linear over the first 5% of the steps, then a cosine to a tenth)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in config.milestones], 0.1)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total))


def warmup_cosine(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of `total` steps, then cosine decay to 0.1."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


class Run:
    """One training run: state that lives across epochs (task, model, optimiser, metrics, files).
    Making it reads and checks everything and writes nothing; `fit` takes the directory's lock and
    trains."""

    def __init__(self, config: Config, on_epoch=None):
        self.config, self.on_epoch = config, on_epoch
        self.rank, self.world, self.device = distributed.setup(config.device)
        if config.batch_size % self.world:
            raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {self.world} processes")
        self.dir = RunDir(config.out)
        if self.rank == 0:
            self.dir.check_writable(config)
        self.resumed = self.dir.resume_checkpoint(config, self.device) if config.resume else None
        self.stamp = self.dir.stamp()
        self.task = TASKS[config.task](config, self.device, self.rank, self.world)
        self.start, self.best, self.best_epoch, self.wall, self.times = 0, worst(self.task.higher), 0, 0.0, []
        self.resumed_row = None
        torch.manual_seed(config.seed)
        self.record = self._record()
        self.net = self._placed(inference.build_network(self.record))
        self.task.check(self.net)
        if self.resumed:
            checkpoint.load_state(self.net, self.resumed["model"], self.dir.last)
        elif config.init_from:  # a resumed run has its own weights
            checkpoint.load_state(self.net, sources.weights(config.init_from), config.init_from)
        self.teacher = sources.teacher(config.init_from, self.device) if config.distill else None
        if config.fsdp:  # the weights are in place: shard them
            distributed.shard(self.net, config.amp)
        self.model = distributed.wrap(self.net, self.device, 1 if config.fsdp else self.world, config.compile)
        self.opt = self.task.optimizer(self.net.parameters())
        self.sched = make_schedule(config, self.opt, self.task.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        if self.resumed:
            self._restore(self.resumed)
        self.drift = DriftMonitor(config.drift_every, config.drift_threshold) if config.drift_every else None
        self.fields = self.task.fields + (("drift_max",) if config.drift_every else ())
        self.metrics = MetricsCSV(self.dir.path / "metrics.csv", self.fields)
        if config.resume and self.rank == 0:
            self.metrics.read()  # a damaged metrics.csv stops the run before anything is written
        self.tb, self.written = None, False

    def _placed(self, net: nn.Module) -> nn.Module:
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.config.channels_last else net

    def _record(self) -> dict:
        """The model record: a resumed run's own (its model as saved, grown as often), else the task's."""
        saved = inference.record_of(self.resumed, self.dir.last) if self.resumed else None
        if saved is None:
            return self.task.record(growths(self.config.grow_at, self.resumed["epoch"]) if self.resumed else 0)
        if _plain(self.task.interface()) != _plain({k: saved.get(k) for k in self.task.interface()}):
            raise ValueError(f"{self.config.data_dir or self.config.dataset} gives other data (classes, image size "
                             f"or vocabulary) than the run's {self.dir.last}")
        return saved

    def _restore(self, ckpt: dict) -> None:
        path = self.dir.last
        try:
            distributed.load_optimizer_state(self.net, self.opt, ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: optimiser state does not match the run ({e})") from None
        if self.config.schedule == "step":  # the milestones of a run that grew (--resume --epochs/--milestones)
            self.sched.milestones = Counter(m * self.task.steps_per_epoch for m in self.config.milestones)
        for segment, saved in zip(self._auto_segments(), ckpt.get("segments", ())):
            segment.load_state_dict(saved)
        set_rng_state(ckpt["rng"], self.device)
        self.start, self.best, self.resumed_row = ckpt["epoch"], ckpt[f"best_{self.task.metric}"], ckpt.get("row")
        self.best_epoch, self.wall = ckpt.get("best_epoch", 0), ckpt.get("wall_s", 0.0)

    def grow(self) -> None:
        """Split every block (h / 2); the optimiser keeps settings and schedule, restarts momentum."""
        self.net = self._placed(grow(self.net))
        self.record = {**self.record, "grown": self.record["grown"] + 1}
        self.model = distributed.wrap(self.net, self.device, self.world, self.config.compile)
        self.opt.param_groups[0]["params"] = list(self.net.parameters())
        self.opt.state.clear()

    def state(self, epoch: int) -> dict:
        """The checkpoint after `epoch` epochs (collective under --fsdp: every process calls it)."""
        state = dict(model=distributed.model_state(self.net), config=asdict(self.config), epoch=epoch,
                     record=self.record, optimizer=distributed.optimizer_state(self.net, self.opt),
                     scheduler=self.sched.state_dict(), rng=rng_state(self.device),
                     best_epoch=self.best_epoch, wall_s=self.wall, **{f"best_{self.task.metric}": self.best})
        if self.config.amp == "fp16":
            state["scaler"] = self.scaler.state_dict()
        if self._auto_segments():
            state["segments"] = [s.state_dict() for s in self._auto_segments()]
        return state

    def _auto_segments(self) -> list[AutoSegment]:
        """The model's chains' `segment="auto"` measurers, in order (their counts resume too)."""
        return [c.segment for c in chains(self.net) if isinstance(c.segment, AutoSegment)]

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of the task's batches; returns the train loss and accuracy (over all processes),
        lr and throughput (images or tokens per second)."""
        c, n, unit = self.config, self.task.steps_per_epoch, self.task.unit
        self.model.train()
        bar = EpochBar(n, epoch + 1, c.epochs, unit, enabled=None if self.rank == 0 else False)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * count, correct, count
        drift, lr, t0 = None, self.opt.param_groups[0]["lr"], time.perf_counter()
        for i, (x, y) in enumerate(self.task.batches(epoch)):
            try:
                loss, out = train_step(self.model, self.opt, x, y, smoothness=c.smoothness or 0.0, amp=c.amp,
                                       scaler=self.scaler, net=self.net, teacher=self.teacher)
            except NonFiniteError as e:
                bar.close()
                raise self._fault(e.what, f"at epoch {epoch + 1}, step {i + 1} of {n}") from None
            self.sched.step()
            sums += torch.stack([loss.double() * y.numel(), (out.argmax(-1) == y).sum().double(),
                                 sums.new_tensor(y.numel())])
            if self.drift is not None:
                errors = self.drift.step(self.net, x, epoch * n + i)
                if errors:
                    drift = max(drift or 0.0, max(errors.values()))
            bar.step(lambda: (sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item(),
                              sums[2].item() / (time.perf_counter() - t0)))
        bar.close()
        loss_sum, correct, count = distributed.all_reduce(sums, self.world)
        return {"train_loss": loss_sum / count, "train_acc": correct / count, "lr": lr, "step": (epoch + 1) * n,
                f"{unit}_per_s": count / (time.perf_counter() - t0), "drift_max": drift}

    def _kept(self) -> str:
        """What the run directory holds, in words."""
        if not self.dir.last.exists():
            return "nothing was saved" + (" but config.json" if self.dir.config.exists() else "")
        saved = checkpoint.load(self.dir.last)
        best = checkpoint.load(self.dir.best)["epoch"] if self.dir.best.exists() else None
        return f"{self.dir.last} holds epoch {saved['epoch']}" + (
            f" and {self.dir.best} epoch {best}" if best else f" ({self.dir.best} is written when the run resumes)")

    def _fault(self, what: str, where: str) -> NonFiniteError:
        """The one-line report of a non-finite value: where, what the files hold, what to try."""
        h = " or --h" if self.config.scheme and self.config.scheme.has_step else ""
        return NonFiniteError(what, f"non-finite {what} {where}; training stopped, {self._kept()}. Try a smaller "
                                    f"--lr (now {self.config.lr:g}){h}, then start again or --init-from a checkpoint")

    def fit(self) -> dict:
        epoch = self.start
        with self.dir.locked() if self.rank == 0 else contextlib.nullcontext():
            try:
                if self.rank == 0:
                    self._begin()
                for epoch in range(self.start, self.config.epochs):
                    self._epoch(epoch)
            except KeyboardInterrupt:
                raise self._interrupted(epoch) from None
            except DiskFull as e:
                raise DiskFull(e.path, e.needed, e.free, f"{e}; {self._kept()}. Free the space and "
                               + (f"continue with: revnets train --resume {self.dir.path}" if self.dir.last.exists()
                                  else "start again")) from None
            return self._finish()

    def _epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        if epoch in self.config.grow_at:
            self.grow()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row = self.train_epoch(epoch)
        distributed.broadcast_buffers(self.net, self.world)
        row.update(self.task.evaluate(self.net))
        if distributed.nonfinite(self.net, self.world):
            raise self._fault("weights", f"after epoch {epoch + 1}")
        score = self.task.score(row)
        if (score > self.best) if self.task.higher else (score < self.best):
            self.best, self.best_epoch = score, epoch + 1
        self.times.append(time.perf_counter() - t0)
        self.wall += self.times[-1]  # training and evaluation, up to this epoch's checkpoint
        row.update(epoch=epoch + 1, peak_mb=distributed.peak_mb(self.device), epoch_s=self.times[-1])
        state = self.state(epoch + 1) if self.rank == 0 or distributed.sharded(self.net) else None
        if self.rank == 0:
            self._write_epoch(row, state)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def _interrupted(self, epoch: int) -> Interrupted:
        if self.dir.last.exists():
            return Interrupted(f"interrupted at epoch {epoch + 1}; continue with: "
                               f"revnets train --resume {self.dir.path}")
        return Interrupted(f"interrupted at epoch {epoch + 1}, before any epoch was saved; start again")

    def _begin(self) -> None:
        if self.dir.stamp() != self.stamp:
            raise ValueError(f"{self.dir.last} changed while this run was starting (another run on {self.dir.path}?)")
        if self.resumed:
            self.dir.repair(self.resumed)
        self.resumed = None  # its tensors are in the model and optimiser now
        self.tb = tensorboard_writer(self.dir.path)
        what = f"resuming after epoch {self.start} of {self.config.epochs}" if self.start else "training"
        world = f", {self.world} processes" if self.world > 1 else ""
        print(f"revnets train: {what} {model_name(self.config)} ({_params(self.net):,} parameters) on "
              f"{self.task.describe()}, {self.device}{world}; results in {self.dir.path}/", flush=True)
        for note in self.task.notes():
            print(f"note: {note}", flush=True)

    def _write_epoch(self, row: dict, state: dict) -> None:
        """config.json (with the first epoch written), the checkpoints (holding the epoch's metrics
        row), then metrics.csv: a run stopped in between resumes with its files in step."""
        if not self.written:
            self.dir.write_config(self.config, self.start)
        self.dir.save({**state, "row": row}, best=self.best_epoch == row["epoch"])
        if not self.written:
            self.metrics.keep_until(self.start, self.resumed_row)
            self.written = True
        self.metrics.append(row)
        left = self.config.epochs - row["epoch"]
        print(self.task.epoch_line(row, self.config.epochs, left * sum(self.times) / len(self.times),
                                   distributed.memory_label(self.device))
              + (f"  drift {row['drift_max']:.2e}" if row.get("drift_max") is not None else ""), flush=True)
        if self.tb is not None:
            for key in self.fields[1:]:
                if row.get(key) is not None:
                    self.tb.add_scalar(key, row[key], row["epoch"])
            self.tb.flush()

    def _finish(self) -> dict:
        rows = self.metrics.read() if self.rank == 0 else []
        per_s = f"{self.task.unit}_per_s"
        summary = dict(model=self.config.model, name=model_name(self.config), dataset=self.config.dataset,
                       epochs=self.config.epochs, **self.task.summary(rows, self.best_epoch),
                       **{per_s: sum(float(r[per_s]) for r in rows) / len(rows) if rows else None},
                       peak_mb=max((float(r["peak_mb"]) for r in rows), default=None),
                       wall_s=self.wall, params=_params(self.net), out=str(self.dir.path))
        if self.rank == 0:
            self.dir.write_summary(summary)
            if self.tb is not None:
                self.tb.close()
            print(f"done: {self.task.done_line(summary)}, {self.wall:.1f} s; results in {self.dir.path}/ "
                  f"({', '.join(RUN_FILES)})", flush=True)
        return summary


def _plain(interface: dict) -> dict:
    """A record's interface (classes, image size, vocabulary, ...) in plain values, for comparison."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, tuple) else v)
            for k, v in interface.items()}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(config: Config, on_epoch=None) -> dict:
    """Train as `config` says; returns the summary (also in out/summary.json).

    `on_epoch(row)`, if given, is called with each epoch's metrics after its checkpoint is written
    (an exception raised there stops the run as a kill would). Raises NonFiniteError when a loss,
    gradient or weight stops being finite, `Interrupted` on Ctrl-C.
    """
    owns_group = not dist.is_initialized()
    try:
        summary = Run(config, on_epoch).fit()
        if dist.is_initialized():
            dist.barrier()  # all ranks done before any tears the group down (gloo aborts otherwise)
        return summary
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
