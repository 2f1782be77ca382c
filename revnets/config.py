"""A run's settings: `Config`, the `revnets train` flags that fill it, and the network it builds.

Recipe (Appendix): SGD with momentum 0.9, learning rate 0.1 divided by 10 at epochs 80, 120 and
160 of 160 (50, 75 and 100 % of the run: the milestones scale with --epochs unless given), weight
decay 2e-4 and weight smoothness decay 2e-4 (Eq. 22), batch 100 (the paper's 80K steps at 500
steps per epoch). STL-10: decays at 60, 80 and 100 of 500 epochs, weight decay 5e-4, smoothness
3e-4, batch 128 (about the paper's 20K steps: 39 steps per epoch). A flag that is given overrides
the recipe. Weight decay applies to every parameter, as in the paper's SGD.

`Config` checks every setting when it is made (ValueError naming the flag), so that a bad one is
refused before anything is read or written.
"""
import argparse
import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data import DATASETS
from .loop import AMP_DTYPES
from .networks import MODELS, NORMS, build_model, model_scheme

RECIPE = dict(epochs=160, batch_size=100, milestones=(80, 120, 160), weight_decay=2e-4, smoothness=2e-4)
RECIPES = {"stl10": dict(epochs=500, batch_size=128, milestones=(60, 80, 100), weight_decay=5e-4, smoothness=3e-4)}
SCHEDULES = ("step", "cosine", "onecycle")
PLACE = ("resume", "device", "out")  # where a run goes on, not what it computes: free to change on resume
GROWABLE = ("epochs", "milestones")  # may change on resume: a run goes on for longer (`check_extension`)
ARCHITECTURE = ("units", "channels", "h", "norm")  # the settings that make a model other than its Table 1 row
EARLIER = {"val_fraction": 0.0}  # what runs saved before a setting existed did (no validation split)


@dataclass
class Config:
    """Every setting of a run. None means the dataset's recipe (RECIPE, RECIPES; the milestones scaled
    to the epochs) or, for device, CUDA when available."""
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
    val_fraction: float = 0.1
    out: str | None = None
    resume: str | None = None
    init_from: str | None = None
    drift_every: int = 0
    drift_threshold: float = 1e-3
    grow_at: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        recipe = RECIPES.get(self.dataset, RECIPE)
        if self.milestones is None and self.epochs is not None:  # the recipe's decays at the same share of the run
            self.milestones = tuple(sorted({max(1, round(m * self.epochs / recipe["epochs"])) for m in recipe["milestones"]}))
        for key, value in recipe.items():
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
        """ValueError (FileNotFoundError for paths) naming the first setting that cannot run."""
        _choice("dataset", self.dataset, DATASETS)
        scheme = model_scheme(self.model)  # ValueError naming the registered models
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("amp", self.amp, AMP_DTYPES)
        if self.norm is not None:
            _choice("norm", self.norm, NORMS)
        for key, low in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("drift_every", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{_flag(key)} must be at least {low}; got {getattr(self, key)}")
        _positive("lr", self.lr)
        _positive("drift_threshold", self.drift_threshold)
        if self.h is not None:
            _positive("h", self.h)
        for key in ("weight_decay", "smoothness"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{_flag(key)} must be finite and >= 0; got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must lie in [0, 1); got {self.momentum}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train-fraction must lie in (0, 1]; got {self.train_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in [0, 1) (0: no validation split); got {self.val_fraction}")
        for key in ("units", "channels"):
            if getattr(self, key) is not None and (not getattr(self, key) or min(getattr(self, key)) < 1):
                raise ValueError(f"--{key} must be positive numbers; got {' '.join(map(str, getattr(self, key)))}")
        if list(self.milestones) != sorted(set(self.milestones)) or min(self.milestones, default=1) < 1:
            raise ValueError(f"--milestones must be increasing positive epochs; got {self.milestones}")
        if self.segment is not None and self.segment != "auto" and not (self.segment.isdigit() and int(self.segment)):
            raise ValueError(f"--segment must be 'auto' or a positive number of blocks; got {self.segment!r}")
        if self.grow_at and not scheme.has_step:
            raise ValueError(f"--grow-at halves the step size h, which {self.model} does not have")
        if any(not 1 <= g < self.epochs for g in self.grow_at):
            raise ValueError(f"--grow-at epochs must lie in [1, {self.epochs}); got {self.grow_at}")
        if self.data_dir is not None and not self.download and not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {self.data_dir} does not exist")
        if self.init_from is not None and self.resume is None and not Path(self.init_from).is_file():
            raise ValueError(f"--init-from {self.init_from}: no such checkpoint file")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from config.json (unknown keys, such as the library versions, are ignored; a
        setting missing from an older run takes its EARLIER value)."""
        d = {**EARLIER, **d}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {_flag(key)} {value!r}; expected one of {', '.join(valid)}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{_flag(key)} must be finite and > 0; got {value}")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def model_name(config: Config | dict) -> str:
    """The model's name as reported: its Table 1 name, with the settings that change it, e.g.
    ``hamiltonian-74 (units 1-1-1, h 0.05)``."""
    c = asdict(config) if isinstance(config, Config) else config
    parts = [f"{k} {'-'.join(map(str, c[k])) if isinstance(c[k], (list, tuple)) else c[k]}"
             for k in ARCHITECTURE if c.get(k) is not None]
    return f"{c['model']} ({', '.join(parts)})" if parts else c["model"]


def changed_settings(saved: dict, config: Config) -> dict[str, tuple]:
    """{name: (saved value, config's value)} of each setting, PLACE aside, in which `config` differs
    from `saved`, a run's settings as config.json or a checkpoint hold them (tuples as lists)."""
    saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**EARLIER, **saved}.items()}
    return {k: (saved.get(k), v) for k, v in asdict(config).items() if k not in PLACE and saved.get(k) != v}


def check_extension(saved: Config, config: Config, done: int) -> None:
    """ValueError unless `config` continues `saved`, `done` epochs in, as a longer run: more or as many
    epochs, the step schedule's decays already passed unchanged (cosine and one-cycle have their
    shape fixed by the epochs, so they cannot grow)."""
    if (config.epochs, config.milestones) == (saved.epochs, saved.milestones):
        return
    if config.epochs < done:
        raise ValueError(f"--epochs {config.epochs}: the run has already trained {done} epochs")
    if config.schedule != "step" and config.epochs != saved.epochs:
        raise ValueError(f"--epochs: the {config.schedule} schedule has its shape fixed by its {saved.epochs} epochs "
                         f"and cannot be extended; start a new run from its weights with --init-from")
    passed = [m for m in saved.milestones if m <= done]
    if [m for m in config.milestones if m <= done] != passed:
        raise ValueError(f"--milestones {config.milestones}: the decays at {passed} have already happened "
                         f"({done} epochs trained); only later ones can move")


def config_dict(config: Config) -> dict:
    """config.json's content: every setting, the model's reported name and the versions that ran it."""
    return {**asdict(config), "name": model_name(config),
            "versions": {"revnets": __version__, "torch": torch.__version__, "python": platform.python_version()}}


def check_device(name: str) -> torch.device:
    """The torch device `name` if this machine has it; ValueError otherwise."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # "cuda" without CUDA, "cuda:7" on a 2-GPU machine, ...
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} is not usable here ({str(e).splitlines()[0]}); "
                         "expected e.g. cpu, cuda, cuda:1") from None
    return device


def model_from_config(config: dict, num_classes: int, in_channels: int, grown: int = 0) -> nn.Module:
    """The network a run with `config` trains (before its weights are loaded), after `grown` growths."""
    overrides = {k: (tuple(config[k]) if k in ("units", "channels") else config[k])
                 for k in ("units", "channels", "h") if config.get(k) is not None}
    if config.get("exact"):
        overrides["exact"] = True
    if config.get("norm") is not None:
        overrides["norm"] = NORMS[config["norm"]]
    if config.get("segment") is not None:
        overrides["segment"] = config["segment"] if config["segment"] == "auto" else int(config["segment"])
    model = build_model(config["model"], num_classes=num_classes, in_channels=in_channels,
                        memory_efficient=not config.get("plain", False), **overrides)
    if grown:
        from .multilevel import grow
        for _ in range(grown):
            model = grow(model)
    return model


def growths(config: dict, epoch: int) -> int:
    """How many times a run has grown its network by the end of `epoch` completed epochs."""
    return sum(g < epoch for g in config.get("grow_at") or ())


# --- command line ------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `revnets train`; defaults are suppressed so that a Config sees only given flags,
    and each help text names its default."""
    d = Config.__dataclass_fields__
    a = p.add_argument
    a("--dataset", choices=(*DATASETS, "text"), help="what to train on; text: UTF-8 files and a language model "
                                                    "(--model <scheme>-lm-small, revnets.lm) (default: digits, offline)")
    a("--data-dir", help="where the dataset lives: CIFAR archive, stl10_binary, or image-folder root "
                         "(default: ./data; digits needs none)")
    a("--download", action="store_true", help="fetch CIFAR archives from their official address")
    a("--model", metavar="NAME", help=f"a Table 1 name: {', '.join(MODELS)} "
                                                            "(default: hamiltonian-74)")
    a("--units", type=int, nargs="+", metavar="N", help="blocks per unit, e.g. 2 2 2 (default: the model's)")
    a("--channels", type=int, nargs="+", metavar="C", help="channels per unit (default: the model's)")
    a("--h", type=float, help="step size of the reversible blocks, > 0 (default: the scheme's)")
    a("--norm", choices=list(NORMS), help="normalisation inside the residual functions (default: batch)")
    a("--segment", help="store the state every K blocks ('auto': K from the measured drift; default: never)")
    a("--exact", action="store_true", help="fixed-point state: bit-exact reversal at any depth")
    a("--plain", action="store_true", help="store activations (plain autograd) instead of rebuilding them")
    a("--epochs", type=int, help="default: 160 (500 for stl10); with --resume, more epochs continue a run")
    a("--batch-size", type=int, help="global batch (default: 100; 128 for stl10)")
    a("--lr", type=float, help=f"initial (peak for onecycle) learning rate (default: {d['lr'].default})")
    a("--momentum", type=float, help=f"SGD momentum (default: {d['momentum'].default})")
    a("--weight-decay", type=float, help="default: 2e-4 (5e-4 for stl10)")
    a("--smoothness", type=float, help="weight smoothness decay, Eq. 22 (default: 2e-4; 3e-4 for stl10)")
    a("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {d['schedule'].default})")
    a("--milestones", type=int, nargs="+", metavar="E",
      help="epochs where step divides the lr by 10 (default: 50, 75 and 100 %% of --epochs, 80 120 160 for "
           "160; stl10 12, 16, 20 %%)")
    a("--amp", choices=tuple(AMP_DTYPES), help=f"autocast precision (default: {d['amp'].default})")
    a("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, help=f"seed of initialisation, splits and batches, >= 0 (default: {d['seed'].default})")
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    a("--train-fraction", type=float, help="class-stratified share of the training images trained on, in (0, 1] "
                                           f"(default: {d['train_fraction'].default})")
    a("--val-fraction", type=float, help="class-stratified share of the training set held out to choose best.pt, "
                                         f"in [0, 1); 0: none, best chosen on test (default: {d['val_fraction'].default})")
    a("--out", help="run directory (default: runs/<dataset>-<model>-seed<seed>)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last.pt (default: a new run)")
    a("--init-from", metavar="CKPT", help="start a new run from the weights of a checkpoint (default: random)")
    a("--drift-every", type=int, metavar="K", help="measure reversal drift every K steps (default: 0, off)")
    a("--drift-threshold", type=float, help="warn when a unit's reversal error exceeds this "
                                            f"(default: {d['drift_threshold'].default})")
    a("--grow-at", type=int, nargs="+", metavar="E", help="split every block in two (h / 2) after epoch E "
                                                          "(default: never)")


def parse_config(argv: list[str]) -> Config:
    """The Config of `revnets train ARGV`."""
    parser = argparse.ArgumentParser(prog="revnets train", argument_default=argparse.SUPPRESS)
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from parsed flags; with --resume DIR the saved settings, which given flags must match
    (--epochs and --milestones may grow the run, see `check_extension`)."""
    names = {f.name for f in fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "resume" not in given:
        return Config(**given)
    run = Path(given["resume"])
    if not (run / "last.pt").is_file() or not (run / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run}: no last.pt and config.json there (not a run directory "
                                "or killed before its first epoch)")
    saved = Config.from_dict({**json.loads((run / "config.json").read_text()), "resume": str(run)})
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()}
    differ = [k for k, v in given.items() if k not in PLACE + GROWABLE and getattr(saved, k) != v]
    if "out" in given and Path(given["out"]).resolve() != run.resolve():
        differ.append("out")
    if differ:
        raise ValueError(f"--resume {run}: the run was started with different settings: "
                         + ", ".join(f"{k}={getattr(saved, k)!r}" for k in differ))
    return replace(saved, resume=str(run), out=str(run), device=given.get("device", saved.device),
                   **{k: given[k] for k in GROWABLE if k in given})
