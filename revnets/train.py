"""`revnets train`: the paper's training recipe, runs that keep their results, DDP under torchrun.

Recipe (Appendix): SGD with momentum 0.9, learning rate 0.1 divided by 10 at epochs 80, 120 and
160, weight decay 2e-4 and weight smoothness decay 2e-4 (Eq. 22), batch 100 for 160 epochs (the
paper's 80K steps at 500 steps per epoch). STL-10: decays at 60, 80 and 100, weight decay 5e-4,
smoothness 3e-4, batch 128, 500 epochs (about the paper's 20K steps: 39 steps per epoch). A flag
that is given overrides the recipe. Weight decay applies to every parameter, as in the paper's SGD.

A run directory (--out) holds config.json (every setting, library versions), metrics.csv (one row
per epoch), last.pt and best.pt (written atomically each epoch) and summary.json. `--resume DIR`
continues DIR from last.pt (model, optimiser, scheduler, RNG, epoch): on CPU with a fixed seed the
result is bitwise that of an uninterrupted run, because batches depend only on (seed, epoch).

Under torchrun (RANK and WORLD_SIZE set; ``torchrun --nproc_per_node N -m revnets.cli train ...``)
each process trains on its share of every global batch with DistributedDataParallel (nccl on CUDA,
gloo on CPU); BatchNorm uses per-process statistics; metrics are summed over processes; only rank 0
writes files.

--grow-at E: at the start of epoch E (after E epochs) every reversible block is split in two with
h halved (`revnets.multilevel.grow`). The optimiser then keeps its settings and schedule position
but restarts its momentum, since the grown network's parameters are new tensors.
"""
import argparse
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import __version__, checkpoint, data
from .evaluate import AMP_DTYPES, autocast, totals
from .networks import MODELS, NORMS, STABLE_SCHEMES
from .progress import FIELDS, EpochBar, MetricsCSV, epoch_line, tensorboard_writer
from .regularization import smoothness_penalty

RECIPE = dict(epochs=160, batch_size=100, milestones=(80, 120, 160), weight_decay=2e-4, smoothness=2e-4)
RECIPES = {"stl10": dict(epochs=500, batch_size=128, milestones=(60, 80, 100), weight_decay=5e-4, smoothness=3e-4)}
SCHEDULES = ("step", "cosine", "onecycle")
RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", "summary.json")
PLACE = ("resume", "device", "out")  # where a run goes on, not what it computes: free to change on resume


@dataclass
class Config:
    """Every setting of a run. None means the dataset's recipe (RECIPE, RECIPES) or, for device,
    CUDA when available."""
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "hamiltonian-74"
    units: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    h: float | None = None
    norm: str | None = None
    segment: str | None = None
    exact: bool = False
    plain: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    smoothness: float | None = None
    schedule: str = "step"
    milestones: tuple[int, ...] | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str | None = None
    train_fraction: float = 1.0
    out: str | None = None
    resume: str | None = None
    drift_every: int = 0
    drift_threshold: float = 1e-3
    grow_at: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for key, value in RECIPES.get(self.dataset, RECIPE).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("units", "channels", "milestones", "grow_at"):
            if getattr(self, key) is not None:
                setattr(self, key, tuple(getattr(self, key)))
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.out is None:
            self.out = self.resume or f"runs/{self.dataset}-{self.model}-seed{self.seed}"
        self.validate()

    def validate(self) -> None:
        if self.dataset not in data.DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {', '.join(data.DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid names: {', '.join(MODELS)}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train-fraction must lie in (0, 1]; got {self.train_fraction}")
        if self.data_dir is not None and not self.download and not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {self.data_dir} does not exist")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown --amp {self.amp!r}; expected one of {', '.join(AMP_DTYPES)}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1; got {getattr(self, key)}")
        if self.norm not in (None, *NORMS):
            raise ValueError(f"unknown --norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        if self.segment is not None and self.segment != "auto" and not (self.segment.isdigit() and int(self.segment)):
            raise ValueError(f"--segment must be 'auto' or a positive number of blocks; got {self.segment!r}")
        if self.drift_every < 0:
            raise ValueError(f"--drift-every must be >= 0 (0: off); got {self.drift_every}")
        if self.grow_at and MODELS[self.model]["scheme"] not in STABLE_SCHEMES:
            raise ValueError(f"--grow-at halves the step size h, which {self.model} does not have")
        if any(not 1 <= g < self.epochs for g in self.grow_at):
            raise ValueError(f"--grow-at epochs must lie in [1, {self.epochs}); got {self.grow_at}")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from config.json (unknown keys, such as the library versions, are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def changed_settings(saved: dict, config: Config) -> dict[str, tuple]:
    """{name: (saved value, config's value)} of each setting, PLACE aside, in which `config` differs
    from `saved`, a run's settings as config.json or a checkpoint hold them (tuples as lists)."""
    saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()}
    return {k: (saved.get(k), v) for k, v in asdict(config).items() if k not in PLACE and saved.get(k) != v}


def config_dict(config: Config) -> dict:
    """config.json's content: every setting and the versions that ran it."""
    return {**asdict(config), "versions": {"revnets": __version__, "torch": torch.__version__,
                                           "python": platform.python_version()}}


# --- command line ------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `revnets train`; defaults are suppressed so that a Config sees only given flags."""
    a = p.add_argument
    a("--dataset", help=f"one of {', '.join(data.DATASETS)}, or text (UTF-8 files; --model <scheme>-lm-tiny|small|base) (default: digits, offline)")
    a("--data-dir", help="where the dataset lives (CIFAR archive, stl10_binary, or image-folder root)")
    a("--download", action="store_true", help="fetch CIFAR archives from their official address")
    a("--model", help=f"a Table 1 name (default: hamiltonian-74): {', '.join(MODELS)}")
    a("--units", type=int, nargs="+", metavar="N", help="blocks per unit, e.g. 2 2 2 (default: the model's)")
    a("--channels", type=int, nargs="+", metavar="C", help="channels per unit (default: the model's)")
    a("--h", type=float, help="step size of the reversible blocks (default: the scheme's)")
    a("--norm", help=f"normalisation inside the residual functions: {', '.join(NORMS)} (default: batch)")
    a("--segment", help="store the state every K blocks ('auto': K from the measured drift; default: never)")
    a("--exact", action="store_true", help="fixed-point state: bit-exact reversal at any depth")
    a("--plain", action="store_true", help="store activations (plain autograd) instead of rebuilding them")
    a("--epochs", type=int, help="default: 160 (500 for stl10)")
    a("--batch-size", type=int, help="global batch (default: 100; 128 for stl10)")
    a("--lr", type=float, help="initial (peak for onecycle) learning rate (default: 0.1)")
    a("--momentum", type=float, help="SGD momentum (default: 0.9)")
    a("--weight-decay", type=float, help="default: 2e-4 (5e-4 for stl10)")
    a("--smoothness", type=float, help="weight smoothness decay, Eq. 22 (default: 2e-4; 3e-4 for stl10)")
    a("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: step)")
    a("--milestones", type=int, nargs="+", metavar="E",
      help="epochs where step divides the lr by 10 (default: 80 120 160; 60 80 100 for stl10)")
    a("--amp", choices=tuple(AMP_DTYPES), help="autocast precision (default: off)")
    a("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, help="seed of initialisation, subset and batches (default: 0)")
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    a("--train-fraction", type=float, help="class-stratified share of the training set, in (0, 1] (default: 1)")
    a("--out", help="run directory (default: runs/<dataset>-<model>-seed<seed>)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    a("--drift-every", type=int, metavar="K", help="measure reversal drift every K steps (default: 0, off)")
    a("--drift-threshold", type=float, help="warn when a unit's reversal error exceeds this (default: 1e-3)")
    a("--grow-at", type=int, nargs="+", metavar="E", help="split every block in two (h / 2) after epoch E")


def parse_config(argv: list[str]) -> Config:
    """The Config of `revnets train ARGV`."""
    parser = argparse.ArgumentParser(prog="revnets train", argument_default=argparse.SUPPRESS)
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from parsed flags; with --resume DIR the saved settings, which given flags must match."""
    names = {f.name for f in fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "resume" not in given:
        return Config(**given)
    run = Path(given["resume"])
    if not (run / "last.pt").is_file() or not (run / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run}: no last.pt and config.json there (not a run directory "
                                "or killed before its first epoch)")
    saved = Config.from_dict(json.loads((run / "config.json").read_text()))
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()}
    differ = [k for k, v in given.items() if k not in PLACE and getattr(saved, k) != v]
    if "out" in given and Path(given["out"]).resolve() != run.resolve():
        differ.append("out")
    if differ:
        raise ValueError(f"--resume {run}: the run was started with different settings: "
                         + ", ".join(f"{k}={getattr(saved, k)!r}" for k in differ))
    return replace(saved, resume=str(run), out=str(run), device=given.get("device", saved.device))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a network with the paper's recipe",
                              description=__doc__.split("\n\n")[1], argument_default=argparse.SUPPRESS)
    add_arguments(p)
    from . import lm  # text runs (imports this module)
    lm.add_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if getattr(args, "dataset", None) == "text":  # language models: their own loop
        from . import lm
        return lm.main(args)
    train(config_from_args(args))
    return 0


# --- pieces of a run ---------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, this process's device); joins torchrun's process group if there is one."""
    distributed = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        return 0, 1, torch.device(device)
    if device == "cuda":  # one GPU per process
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def load_data(config: Config) -> data.Dataset:
    """The dataset, its training split reduced to the seeded stratified subset when --train-fraction < 1."""
    return data.subsample(data.load_dataset(config.dataset, config.data_dir, config.download),
                          config.train_fraction, config.seed)


def loaders(config: Config, ds: data.Dataset, device: torch.device, rank: int = 0, world: int = 1):
    """(train, test) Loaders; both standardise with the training split's channel statistics."""
    mean, std = data.channel_stats(ds.train_x)
    common = dict(mean=mean, std=std, device=device, seed=config.seed, rank=rank, world_size=world)
    return (data.Loader(ds.train_x, ds.train_y, config.batch_size, train=True, padding=ds.padding, **common),
            data.Loader(ds.test_x, ds.test_y, config.batch_size, train=False, **common))


def make_model(config: Config, ds: data.Dataset, device: torch.device, grown: int = 0) -> nn.Module:
    """The run's network, seeded by config.seed, after `grown` growths, on `device`."""
    torch.manual_seed(config.seed)
    model = checkpoint.model_from_config(asdict(config), len(ds.classes), ds.train_x.shape[1], grown)
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


# --- the loop ----------------------------------------------------------------------------------

class Run:
    """One training run: state that lives across epochs (model, optimiser, metrics, files)."""

    def __init__(self, config: Config, on_epoch=None):
        self.config, self.on_epoch = config, on_epoch
        self.rank, self.world, self.device = setup_distributed(config.device)
        self.out = Path(config.out)
        ckpt = self._resume_checkpoint()
        self.ds = load_data(config)
        self.train_loader, self.test_loader = loaders(config, self.ds, self.device, self.rank, self.world)
        self.start, self.best_acc, self.best_epoch, self.wall = 0, -1.0, 0, 0.0
        grown = checkpoint.growths(asdict(config), ckpt["epoch"]) if ckpt else 0
        self.net = make_model(config, self.ds, self.device, grown)
        self.model = wrap(self.net, config, self.device, self.world)
        self.opt, self.sched = make_optimizer(config, self.net, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        if ckpt:
            self._restore(ckpt)
        self.drift = None
        if config.drift_every:
            from .drift import DriftMonitor
            self.drift = DriftMonitor(config.drift_every, config.drift_threshold)
        fields_ = FIELDS + (("drift_max",) if config.drift_every else ())
        self.metrics = MetricsCSV(self.out / "metrics.csv", fields_)
        self.tb = None

    def _resume_checkpoint(self) -> dict | None:
        if self.config.resume is None:
            if (self.out / "last.pt").exists():
                raise ValueError(f"{self.out} already holds a run; continue it with --resume {self.out} "
                                 "or choose another --out")
            return None
        path = self.out / "last.pt"
        ckpt = checkpoint.load(path, map_location=self.device)
        if not isinstance(ckpt["config"], dict):
            raise ValueError(f"{path} has no settings (its config is a {type(ckpt['config']).__name__})")
        differ = changed_settings(ckpt["config"], self.config)
        if differ:
            raise ValueError(f"{path} was saved by a run with other settings: "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items()))
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        path = self.out / "last.pt"
        checkpoint.load_state(self.net, ckpt["model"], path)
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: optimiser state does not match the run ({e})") from None
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
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
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = dict(model=self.net.state_dict(), config=asdict(self.config), epoch=epoch,
                     optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), rng=rng,
                     best_acc=self.best_acc, best_epoch=self.best_epoch, wall_s=self.wall)
        if self.config.amp == "fp16":
            state["scaler"] = self.scaler.state_dict()
        return state

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns train loss/acc (over all processes), lr, images/s."""
        self.model.train()
        self.train_loader.set_epoch(epoch)
        bar = EpochBar(len(self.train_loader), epoch + 1, self.config.epochs, enabled=None if self.rank == 0 else False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct, count, drift, t0 = torch.zeros_like(loss_sum), 0, None, time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        for i, (x, y) in enumerate(self.train_loader):
            x = self.batch(x)
            with autocast(self.device, self.config.amp):
                out = self.model(x)
                loss = F.cross_entropy(out, y)
            total = loss + self.config.smoothness * smoothness_penalty(self.net) if self.config.smoothness else loss
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (out.argmax(1) == y).sum()
            count += len(y)
            if self.drift is not None:
                errors = self.drift.step(self.net, x, epoch * len(self.train_loader) + i)
                if errors:
                    drift = max(drift or 0.0, max(errors.values()))
            bar.step(lambda: (loss_sum.item() / count, correct.item() / count, count / (time.perf_counter() - t0)))
        bar.close()
        loss_sum, correct, count = all_reduce(torch.stack([loss_sum, correct, loss_sum.new_tensor(count)]), self.world)
        return dict(train_loss=loss_sum / count, train_acc=correct / count, lr=lr,
                    images_per_s=count / (time.perf_counter() - t0), drift_max=drift)

    def evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy) over the whole test split and all processes."""
        if self.world > 1:  # rank 0's BatchNorm statistics, as in its checkpoint (DDP's next forward does the same)
            for buffer in self.net.buffers():
                dist.broadcast(buffer, 0)
        batches = ((self.batch(x), y) for x, y in self.test_loader)
        loss_sum, correct, count = all_reduce(totals(self.net, batches, self.config.amp), self.world)
        return loss_sum / count, correct / count

    def fit(self) -> dict:
        c = self.config
        if self.rank == 0:
            self._begin()
        for epoch in range(self.start, c.epochs):
            t0 = time.perf_counter()
            if epoch in c.grow_at:
                self.grow()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            row = self.train_epoch(epoch)
            row["test_loss"], row["test_acc"] = self.evaluate()
            row.update(epoch=epoch + 1, peak_mb=peak_mb(self.device))
            if row["test_acc"] > self.best_acc:
                self.best_acc, self.best_epoch = row["test_acc"], epoch + 1
            self.wall += time.perf_counter() - t0  # training and evaluation, up to this epoch's checkpoint
            if self.rank == 0:
                self._write_epoch(row)
            if self.on_epoch is not None:
                self.on_epoch(row)
        return self._finish()

    def _begin(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.config.resume is None:
            _write_json(self.out / "config.json", config_dict(self.config))
        self.metrics.keep_until(self.start)
        self.tb = tensorboard_writer(self.out)
        params = sum(p.numel() for p in self.net.parameters())
        ds, world = self.ds, f", {self.world} processes" if self.world > 1 else ""
        what = f"resuming after epoch {self.start}" if self.start else "training"
        print(f"revnets train: {what} {self.config.model} ({params:,} parameters) on {ds.name} "
              f"({len(ds.train_y):,} train / {len(ds.test_y):,} test images), {self.device}{world}; "
              f"results in {self.out}/", flush=True)

    def _write_epoch(self, row: dict) -> None:
        self.metrics.append(row)
        state = self.state(row["epoch"])
        checkpoint.save(self.out / "last.pt", state)
        if self.best_epoch == row["epoch"]:
            checkpoint.save(self.out / "best.pt", state)
        print(epoch_line(row, self.config.epochs), flush=True)
        if self.tb is not None:
            for key in FIELDS[1:]:
                self.tb.add_scalar(key, row[key], row["epoch"])
            self.tb.flush()

    def _finish(self) -> dict:
        rows = self.metrics.read() if self.rank == 0 else []
        last = rows[-1] if rows else {}
        images = sum(float(r["images_per_s"]) for r in rows) / len(rows) if rows else None
        summary = dict(model=self.config.model, dataset=self.config.dataset, epochs=self.config.epochs,
                       final_acc=float(last["test_acc"]) if last else None,
                       final_loss=float(last["test_loss"]) if last else None,
                       best_acc=self.best_acc, best_epoch=self.best_epoch, wall_s=self.wall,
                       images_per_s=images, params=sum(p.numel() for p in self.net.parameters()),
                       peak_mb=max((float(r["peak_mb"]) for r in rows), default=None), out=str(self.out))
        if self.rank == 0:
            _write_json(self.out / "summary.json", summary)
            if self.tb is not None:
                self.tb.close()
            print(f"done: test accuracy {summary['final_acc']:.2%} (best {self.best_acc:.2%} at epoch "
                  f"{self.best_epoch}), {self.wall:.1f} s; results in {self.out}/ "
                  f"({', '.join(RUN_FILES)})", flush=True)
        return summary


def _write_json(path: Path, obj: dict) -> None:
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), text=True)


def train(config: Config, on_epoch=None) -> dict:
    """Train as `config` says; returns the summary (also in out/summary.json).

    `on_epoch(row)`, if given, is called with each epoch's metrics after its checkpoint is written
    (an exception raised there stops the run as a kill would).
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
