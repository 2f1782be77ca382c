"""`revnets train`: the paper's recipe (`revnets.config`), a run that stops on faults and can go on.

Each epoch trains on the training images, then measures the held-out validation split (default 10 %
of the training set, seeded and class-stratified; `--val-fraction 0`: none) and the test split;
best.pt is the epoch of best validation accuracy (of test accuracy without a validation split).
The run directory (`revnets.rundir`) holds config.json, metrics.csv, last.pt, best.pt and
summary.json, with one writer at a time. `--resume DIR` continues DIR from last.pt (model,
optimiser, schedule, RNG, epoch): on CPU with a fixed seed the result is bitwise that of an
uninterrupted run, because batches depend only on (seed, epoch); with a larger --epochs a
finished run goes on (step schedule; its decays already passed stay). `--init-from CKPT` starts a
new run from a checkpoint's weights.

A non-finite loss, gradient or weight stops the run before it is saved (exit code 3): last.pt and
best.pt keep the last finite epoch. Ctrl-C stops it between two files (exit code 130) and says how
to continue. Every setting and the data are checked before the run directory is made.

Under torchrun (RANK and WORLD_SIZE set; ``torchrun --nproc_per_node N -m revnets.cli train ...``)
each process trains on its share of every global batch with DistributedDataParallel (nccl on CUDA,
gloo on CPU); BatchNorm uses per-process statistics; metrics are summed over processes; only rank 0
writes files.

--grow-at E: at the start of epoch E (after E epochs) every reversible block is split in two with
h halved (`revnets.multilevel.grow`). The optimiser then keeps its settings and schedule position
but restarts its momentum, since the grown network's parameters are new tensors.
"""
import argparse
import contextlib
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, data, inference
from . import config as settings
from .config import Config, add_arguments, check_device, config_from_args, growths, model_from_config, model_name
from .loop import NonFiniteError, totals, train_step
from .networks import model_scheme
from .progress import FIELDS, EpochBar, MetricsCSV, epoch_line, tensorboard_writer
from .rundir import RUN_FILES, RunDir


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where it stopped and how to continue."""


# --- pieces of a run ---------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, this process's device); joins torchrun's process group if there is one."""
    distributed = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        return 0, 1, check_device(device)
    if device == "cuda":  # one GPU per process
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), check_device(device)


def load_data(config: Config) -> data.Dataset:
    """The dataset split as the run uses it: validation held out, training reduced (`data.subsample`)."""
    return data.subsample(data.load_dataset(config.dataset, config.data_dir, config.download),
                          config.train_fraction, config.seed, config.val_fraction)


def loaders(config: Config, ds: data.Dataset, device: torch.device, rank: int = 0, world: int = 1, stats=None):
    """(train, validation or None, test) Loaders; all standardise with `stats` = (mean, std), by
    default the training images' channel statistics."""
    mean, std = stats if stats is not None else data.channel_stats(ds.train_x)
    common = dict(mean=mean, std=std, device=device, seed=config.seed, rank=rank, world_size=world)
    val = None if ds.val_x is None else data.Loader(ds.val_x, ds.val_y, config.batch_size, train=False, **common)
    return (data.Loader(ds.train_x, ds.train_y, config.batch_size, train=True, padding=ds.padding, **common), val,
            data.Loader(ds.test_x, ds.test_y, config.batch_size, train=False, **common))


def make_model(config: Config, ds: data.Dataset, device: torch.device, grown: int = 0) -> nn.Module:
    """The run's network, seeded by config.seed, after `grown` growths, on `device`; ValueError if the
    dataset's images do not fit it."""
    torch.manual_seed(config.seed)
    model = model_from_config(asdict(config), len(ds.classes), ds.train_x.shape[1], grown)
    model.check_input(ds.train_x[:1])
    return _placed(model, config, device)


def _placed(model: nn.Module, config: Config, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def make_optimizer(config: Config, model: nn.Module, steps_per_epoch: int):
    """SGD and its schedule, stepped once per batch."""
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    if config.schedule == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in config.milestones], 0.1)
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=total)
    return opt, sched


def wrap(model: nn.Module, config: Config, device: torch.device, world: int) -> nn.Module:
    """What the training step calls: the model, in DDP when distributed, compiled with --compile."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if config.compile else model


def all_reduce(t: torch.Tensor, world: int) -> list[float]:
    """The (n,) tensor `t` summed over processes (itself when not distributed), as floats: one host sync."""
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def peak_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory since the last reset; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_label(device: torch.device) -> str:
    """What `peak_mb` measures on `device`, as the epoch line labels it."""
    return "GPU allocator peak" if device.type == "cuda" else "process peak RSS"


# --- the run -----------------------------------------------------------------------------------

class Run:
    """One training run: state that lives across epochs (model, optimiser, metrics, files). Making it
    reads and checks everything and writes nothing; `fit` takes the directory's lock and trains."""

    def __init__(self, config: Config, on_epoch=None):
        self.config, self.on_epoch = config, on_epoch
        self.rank, self.world, self.device = setup_distributed(config.device)
        self.dir = RunDir(config.out)
        if self.rank == 0:
            self.dir.check_writable(resume=config.resume is not None)
        self.resumed = self.dir.resume_checkpoint(config, self.device) if config.resume else None
        self.stamp = self.dir.stamp()
        self.ds = load_data(config)
        self.stats = data.channel_stats(self.ds.train_x)  # stored in every checkpoint (inference.metadata)
        self.train_loader, self.val_loader, self.test_loader = loaders(config, self.ds, self.device, self.rank,
                                                                       self.world, self.stats)
        self.start, self.best_acc, self.best_epoch, self.wall, self.times = 0, -1.0, 0, 0.0, []
        grown = growths(asdict(config), self.resumed["epoch"]) if self.resumed else 0
        self.net = make_model(config, self.ds, self.device, grown)
        if config.init_from and not self.resumed:  # a resumed run has its own weights
            self._init_from(config.init_from)
        self.model = wrap(self.net, config, self.device, self.world)
        self.opt, self.sched = make_optimizer(config, self.net, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        if self.resumed:
            self._restore(self.resumed)
        self.drift = None
        if config.drift_every:
            from .drift import DriftMonitor
            self.drift = DriftMonitor(config.drift_every, config.drift_threshold)
        self.metrics = MetricsCSV(self.dir.path / "metrics.csv", FIELDS + (("drift_max",) if config.drift_every else ()))
        self.tb = None

    def _init_from(self, path: str) -> None:
        state = checkpoint.load(path)["model"]
        if checkpoint.count_nonfinite(state):
            raise ValueError(f"--init-from {path}: it holds non-finite weights")
        checkpoint.load_state(self.net, state, path)

    def _restore(self, ckpt: dict) -> None:
        path = self.dir.last
        checkpoint.load_state(self.net, ckpt["model"], path)
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: optimiser state does not match the run ({e})") from None
        if self.config.schedule == "step":  # the milestones of a run that grew (--resume --epochs/--milestones)
            self.sched.milestones = Counter(m * len(self.train_loader) for m in self.config.milestones)
        checkpoint.set_rng_state(ckpt["rng"], self.device)
        self.start, self.best_acc = ckpt["epoch"], ckpt["best_acc"]
        self.best_epoch, self.wall = ckpt.get("best_epoch", 0), ckpt.get("wall_s", 0.0)

    def grow(self) -> None:
        """Split every block (h / 2); the optimiser keeps settings and schedule, restarts momentum."""
        from .multilevel import grow
        self.net = _placed(grow(self.net), self.config, self.device)
        self.model = wrap(self.net, self.config, self.device, self.world)
        self.opt.param_groups[0]["params"] = list(self.net.parameters())
        self.opt.state.clear()

    def state(self, epoch: int) -> dict:
        state = dict(model=self.net.state_dict(), config=asdict(self.config), epoch=epoch,
                     optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     rng=checkpoint.rng_state(self.device),
                     best_acc=self.best_acc, best_epoch=self.best_epoch, wall_s=self.wall,
                     meta=inference.metadata(asdict(self.config), self.ds, self.stats, epoch))
        if self.config.amp == "fp16":
            state["scaler"] = self.scaler.state_dict()
        return state

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns train loss/acc (over all processes), lr, images/s."""
        c, n = self.config, len(self.train_loader)
        self.model.train()
        self.train_loader.set_epoch(epoch)
        bar = EpochBar(n, epoch + 1, c.epochs, enabled=None if self.rank == 0 else False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct, count, drift, t0 = torch.zeros_like(loss_sum), 0, None, time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        for i, (x, y) in enumerate(self.train_loader):
            x = self.batch(x)
            try:
                loss, out = train_step(self.model, self.opt, x, y, smoothness=c.smoothness, amp=c.amp,
                                       scaler=self.scaler, net=self.net)
            except NonFiniteError as e:
                bar.close()
                raise self._fault(e.what, f"at epoch {epoch + 1}, step {i + 1} of {n}") from None
            self.sched.step()
            loss_sum += loss.double() * len(y)
            correct += (out.argmax(1) == y).sum()
            count += len(y)
            if self.drift is not None:
                errors = self.drift.step(self.net, x, epoch * n + i)
                if errors:
                    drift = max(drift or 0.0, max(errors.values()))
            bar.step(lambda: (loss_sum.item() / count, correct.item() / count, count / (time.perf_counter() - t0)))
        bar.close()
        loss_sum, correct, count = all_reduce(torch.stack([loss_sum, correct, loss_sum.new_tensor(count)]), self.world)
        return dict(train_loss=loss_sum / count, train_acc=correct / count, lr=lr,
                    images_per_s=count / (time.perf_counter() - t0), drift_max=drift)

    def _fault(self, what: str, where: str) -> NonFiniteError:
        """The one-line report of a non-finite value: where, what the files hold, what to try."""
        done = self.start + len(self.times)
        kept = (f"{self.dir.last} holds epoch {done}, the last finite one, and {self.dir.best} epoch {self.best_epoch}"
                if done else "nothing was saved (no finite epoch yet)")
        h = " or --h" if model_scheme(self.config.model).has_step else ""
        return NonFiniteError(what, f"non-finite {what} {where}; training stopped, {kept}. Try a smaller --lr "
                                    f"(now {self.config.lr:g}){h}, then start again or --init-from a checkpoint")

    def evaluate(self, loader) -> tuple[float, float]:
        """(loss, accuracy) over the whole split of `loader` and all processes."""
        if self.world > 1:  # rank 0's BatchNorm statistics, as in its checkpoint (DDP's next forward does the same)
            for buffer in self.net.buffers():
                dist.broadcast(buffer, 0)
        batches = ((self.batch(x), y) for x, y in loader)
        loss_sum, correct, count = all_reduce(totals(self.net, batches, self.config.amp), self.world)
        return loss_sum / count, correct / count

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
            return self._finish()

    def _epoch(self, epoch: int) -> None:
        c, t0 = self.config, time.perf_counter()
        if epoch in c.grow_at:
            self.grow()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row = self.train_epoch(epoch)
        row["val_loss"], row["val_acc"] = self.evaluate(self.val_loader) if self.val_loader else (None, None)
        row["test_loss"], row["test_acc"] = self.evaluate(self.test_loader)
        if checkpoint.count_nonfinite(self.net.state_dict()):
            raise self._fault("weights", f"after epoch {epoch + 1}")
        score = row["val_acc"] if self.val_loader else row["test_acc"]
        if score > self.best_acc:
            self.best_acc, self.best_epoch = score, epoch + 1
        self.times.append(time.perf_counter() - t0)
        self.wall += self.times[-1]  # training and evaluation, up to this epoch's checkpoint
        row.update(epoch=epoch + 1, peak_mb=peak_mb(self.device), epoch_s=self.times[-1])
        if self.rank == 0:
            self._write_epoch(row)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def _interrupted(self, epoch: int) -> Interrupted:
        if self.dir.last.exists():
            return Interrupted(f"interrupted at epoch {epoch + 1}; continue with: revnets train --resume {self.dir.path}")
        return Interrupted(f"interrupted at epoch {epoch + 1}, before any epoch was saved; start again")

    def _begin(self) -> None:
        c = self.config
        if self.dir.stamp() != self.stamp:
            raise ValueError(f"{self.dir.last} changed while this run was starting (another run on {self.dir.path}?)")
        if self.resumed:
            self.dir.repair(self.resumed)
        self.resumed = None  # its tensors are in the model and optimiser now
        self.dir.write_config(c, self.start)
        self.metrics.keep_until(self.start)
        self.tb = tensorboard_writer(self.dir.path)
        ds, world = self.ds, f", {self.world} processes" if self.world > 1 else ""
        what = f"resuming after epoch {self.start} of {c.epochs}" if self.start else "training"
        val = f"{len(ds.val_y):,} validation / " if ds.val_y is not None else ""
        print(f"revnets train: {what} {model_name(c)} ({_params(self.net):,} parameters) on {ds.name} "
              f"({len(ds.train_y):,} train / {val}{len(ds.test_y):,} test images), {self.device}{world}; "
              f"results in {self.dir.path}/", flush=True)
        if ds.val_y is None:
            print("note: no validation split (--val-fraction 0): best.pt is chosen on the test set", flush=True)

    def _write_epoch(self, row: dict) -> None:
        self.metrics.append(row)
        self.dir.save(self.state(row["epoch"]), best=self.best_epoch == row["epoch"])
        left = self.config.epochs - row["epoch"]
        print(epoch_line(row, self.config.epochs, left * sum(self.times) / len(self.times), memory_label(self.device)),
              flush=True)
        if self.tb is not None:
            for key in FIELDS[1:]:
                if row.get(key) is not None:
                    self.tb.add_scalar(key, row[key], row["epoch"])
            self.tb.flush()

    def _finish(self) -> dict:
        summary = dict(model=self.config.model, name=model_name(self.config), dataset=self.config.dataset,
                       epochs=self.config.epochs, **summarize(self.metrics.read() if self.rank == 0 else [],
                                                              self.best_epoch),
                       best_on="validation" if self.val_loader else "test", wall_s=self.wall,
                       params=_params(self.net), out=str(self.dir.path))
        if self.rank == 0:
            self.dir.write_summary(summary)
            if self.tb is not None:
                self.tb.close()
            print(f"done: test accuracy {summary['final_acc']:.2%} at the last epoch; best epoch {self.best_epoch} "
                  f"by {summary['best_on']} accuracy (test {summary['best_test_acc']:.2%}), {self.wall:.1f} s; "
                  f"results in {self.dir.path}/ ({', '.join(RUN_FILES)})", flush=True)
        return summary


def summarize(rows: list[dict], best_epoch: int) -> dict:
    """summary.json's measurements from metrics.csv's rows: the last epoch's test loss and accuracy
    (final_*), the best epoch's validation and test ones (best_*), mean images/s, peak memory."""
    last = rows[-1] if rows else {}
    best = next((r for r in rows if int(r["epoch"]) == best_epoch), {})
    value = lambda row, key: float(row[key]) if row.get(key) else None  # noqa: E731
    return dict(final_acc=value(last, "test_acc"), final_loss=value(last, "test_loss"), best_epoch=best_epoch,
                **{f"best_{k}": value(best, k) for k in ("val_acc", "val_loss", "test_acc", "test_loss")},
                images_per_s=sum(float(r["images_per_s"]) for r in rows) / len(rows) if rows else None,
                peak_mb=max((float(r["peak_mb"]) for r in rows), default=None))


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


# --- command line ------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    paragraphs = settings.__doc__.split("\n\n")[1:2] + __doc__.split("\n\n")[1:3]
    p = subparsers.add_parser("train", help="train a network with the paper's recipe", description="\n\n".join(
        paragraphs), formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    add_arguments(p)
    from . import lm  # text runs (lm imports this module)
    lm.add_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad input (cli), 3 stopped on a non-finite value, 130 interrupted."""
    if getattr(args, "dataset", None) == "text":  # language models: their own loop
        from . import lm
        return lm.main(args)
    try:
        train(config_from_args(args))
    except NonFiniteError as e:
        print(f"revnets train: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(f"revnets train: {e or 'interrupted before training began; nothing was written'}", file=sys.stderr)
        return 130
    return 0
