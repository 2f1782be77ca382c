"""A run's settings: `Config`, its recipes, and how a run's settings change when it is resumed.

One `Config` holds every setting of an image run and of a text run; `dataset` chooses the task
("text": a language model on UTF-8 text; any other: an image classifier). A setting of the other
task is refused. None means the task's recipe:

  images (Appendix): SGD with momentum 0.9, learning rate 0.1 divided by 10 at epochs 80, 120 and 160
    of 160 (50, 75 and 100 % of the run: the milestones scale with --epochs unless given), weight
    decay 2e-4 and weight smoothness decay 2e-4 (Eq. 22), batch 100 (the paper's 80K steps at 500
    steps per epoch). STL-10: decays at 60, 80 and 100 of 500 epochs, weight decay 5e-4,
    smoothness 3e-4, batch 128 (about the paper's 20K steps: 39 steps per epoch). Weight decay
    applies to every parameter, as in the paper's SGD.
  text: AdamW (betas 0.9, 0.95, weight decay 0.1) at learning rate 1e-3, batches of 32 windows,
    10 epochs of 100 steps, the learning rate warmed up linearly over the first 5% of the steps,
    then decayed by a cosine to a tenth ("warmup").

A flag that is given overrides the recipe. `Config` checks every setting when it is made
(ValueError naming the flag, or the API's own message for a model setting: the model is built on
the meta device), so that a bad one is refused before anything is read or written.
"""
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .. import __version__
from ..inference import HF, LEVELS, MODEL_FLAGS, model_overrides
from ..layers import INITS, MLPS
from ..models import build_model, model_scheme, spec
from ..schemes import Scheme, get_scheme, reversible_layer_scheme
from . import sources
from .data import DATASETS
from .step import AMP_DTYPES

TASKS = ("image", "text")
_IMAGE = dict(model="hamiltonian-74", epochs=160, batch_size=100, milestones=(80, 120, 160), lr=0.1, momentum=0.9,
              weight_decay=2e-4, smoothness=2e-4, schedule="step", train_fraction=1.0)
RECIPES = {"image": _IMAGE,
           "stl10": dict(_IMAGE, epochs=500, batch_size=128, milestones=(60, 80, 100), weight_decay=5e-4,
                         smoothness=3e-4),
           "text": dict(model="leapfrog-lm-small", epochs=10, batch_size=32, milestones=(5, 8, 10), lr=1e-3,
                        weight_decay=0.1, schedule="warmup", steps_per_epoch=100, level="char")}
# The settings only one task has: given to a run of the other task, they are refused.
TASK_FIELDS = {"image": ("download", "units", "channels", "norm", "momentum", "smoothness", "channels_last",
                         "train_fraction"),
               "text": ("level", "context", "mlp", "dropout", "steps_per_epoch", "init", "convert", "distill")}
SCHEDULES = ("step", "cosine", "onecycle", "warmup")
NORMS = ("batch", "none")
PLACE = ("resume", "device", "out", "fsdp")  # where a run goes on, not what it computes: free to change on resume
GROWABLE = ("epochs", "milestones")  # may change on resume: a run goes on for longer (`check_extension`)
EARLIER = {"val_fraction": 0.0}  # what image runs saved before a setting existed did (no validation split)


@dataclass
class Config:
    """Every setting of a run. None means the task's recipe (RECIPES; the milestones scaled to the
    epochs), or, for device, CUDA when available."""
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str | None = None
    units: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    h: float | None = None
    norm: str | None = None
    context: int | None = None
    mlp: str | None = None
    dropout: float | None = None
    init: str | None = None
    segment: str | None = None
    exact: bool = False
    plain: bool = False
    level: str | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    smoothness: float | None = None
    schedule: str | None = None
    milestones: tuple[int, ...] | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    fsdp: bool = False
    seed: int = 0
    device: str | None = None
    train_fraction: float | None = None
    val_fraction: float = 0.1
    out: str | None = None
    resume: str | None = None
    init_from: str | None = None
    convert: str | None = None
    distill: bool = False
    drift_every: int = 0
    drift_threshold: float = 1e-3
    grow_at: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.dataset not in (*DATASETS, "text"):
            raise ValueError(f"unknown --dataset {self.dataset!r}; expected one of {', '.join((*DATASETS, 'text'))}")
        other = TASK_FIELDS["image" if self.task == "text" else "text"]
        given = [f.name for f in fields(self) if f.name in other and getattr(self, f.name) != f.default]
        if given:
            raise ValueError(f"{', '.join(map(_flag, given))}: not a setting of {self.task} runs "
                             f"(--dataset {self.dataset})")
        if self.init_from and self.task == "text" and self.resume is None:
            held = sources.model_name(self.init_from)  # the model of the weights the run starts from
            if self.model not in (None, held):
                raise ValueError(f"--model {self.model}: --init-from {self.init_from} holds "
                                 f"{'a Hugging Face model' if held == HF else held}; leave --model out "
                                 "(--convert SCHEME trains it in another scheme)")
            self.model = held
        layer = get_scheme(self.convert).layer if self.convert else None
        if self.init is None and layer is not None and layer.two_step:
            self.init = "fixed-point"  # a converted model starts as Gal et al. retrofit it
        recipe = RECIPES["stl10" if self.dataset == "stl10" else self.task]
        if self.milestones is None and self.epochs is not None:  # the recipe's decays at the same share of the run
            self.milestones = tuple(sorted({max(1, round(m * self.epochs / recipe["epochs"]))
                                            for m in recipe["milestones"]}))
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

    @property
    def task(self) -> str:
        return "text" if self.dataset == "text" else "image"

    @property
    def scheme(self) -> Scheme | None:
        """The scheme the run trains in: --convert's, else the registered model's (None for a
        Hugging Face model trained as it is)."""
        if self.convert:
            return get_scheme(self.convert)
        return model_scheme(self.model) if self.model != HF else None

    def validate(self) -> None:
        """ValueError (FileNotFoundError for paths) naming the first setting that cannot run."""
        self.check_source()
        scheme = self.scheme  # ValueError naming the registered models
        kind = spec(self.model)["kind"] if self.model != HF else "text"
        if kind != self.task:
            raise ValueError(f"--model {self.model} is a{'n image' if kind == 'image' else ' text'} model; "
                             + ("--dataset text trains language models (e.g. leapfrog-lm-small)" if self.task == "text"
                                else "language models train with --dataset text"))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("amp", self.amp, AMP_DTYPES)
        for key, valid in (("norm", NORMS), ("level", LEVELS), ("mlp", MLPS), ("init", INITS)):
            if getattr(self, key) is not None:
                _choice(key, getattr(self, key), valid)
        for key, low in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("drift_every", 0), ("steps_per_epoch", 1),
                         ("context", 1)):
            if getattr(self, key) is not None and getattr(self, key) < low:
                raise ValueError(f"{_flag(key)} must be at least {low}; got {getattr(self, key)}")
        _positive("lr", self.lr)
        _positive("drift_threshold", self.drift_threshold)
        for key in ("weight_decay", "smoothness"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(key)} must be finite and >= 0; got {value}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must lie in [0, 1); got {self.momentum}")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train-fraction must lie in (0, 1]; got {self.train_fraction}")
        low = "[0" if self.task == "image" else "(0"
        if not (0 <= self.val_fraction < 1 and (self.val_fraction > 0 or self.task == "image")):
            raise ValueError(f"--val-fraction must lie in {low}, 1) (image runs: 0 for no validation split); "
                             f"got {self.val_fraction}")
        for key in ("units", "channels"):
            if getattr(self, key) is not None and (not getattr(self, key) or min(getattr(self, key)) < 1):
                raise ValueError(f"--{key} must be positive numbers; got {' '.join(map(str, getattr(self, key)))}")
        if list(self.milestones) != sorted(set(self.milestones)) or min(self.milestones, default=1) < 1:
            raise ValueError(f"--milestones must be increasing positive epochs; got {self.milestones}")
        if self.segment is not None and self.segment != "auto" and not (
                str(self.segment).isdecimal() and int(self.segment)):
            raise ValueError(f"--segment must be 'auto' or a positive number of blocks; got {self.segment!r}")
        self.check_fsdp()
        if self.grow_at and not (scheme and scheme.has_step and self.model != HF):
            raise ValueError(f"--grow-at halves the step size h, which {self.model} does not have")
        if any(not 1 <= g < self.epochs for g in self.grow_at):
            raise ValueError(f"--grow-at epochs must lie in [1, {self.epochs}); got {self.grow_at}")
        self.check_model()
        if not self.out:
            raise ValueError("--out must name a directory; got ''")
        if self.data_dir is not None and not self.download and not Path(self.data_dir).exists():
            raise FileNotFoundError(f"--data-dir {self.data_dir} does not exist")
        if self.task == "text" and self.data_dir is None:
            raise ValueError("--dataset text needs --data-dir FILE_OR_DIR (UTF-8 text)")

    def check_source(self) -> None:
        """The checks of --init-from, --convert and --distill: a source that exists; conversion and
        distillation only from one, conversion into a reversible scheme with a transformer layer; a
        Hugging Face model takes no sizes of the library's own models."""
        if self.init_from is not None and self.resume is None and not (
                Path(self.init_from).is_file() or sources.is_hf(self.init_from)):
            raise ValueError(f"--init-from {self.init_from}: no such checkpoint file or Hugging Face model directory")
        for key in ("convert", "distill"):
            if getattr(self, key) and self.init_from is None:
                raise ValueError(f"{_flag(key)} works on the model of --init-from CHECKPOINT_OR_HF_DIR, "
                                 "which is missing")
        if self.convert:
            try:
                reversible_layer_scheme(self.convert)
            except ValueError as e:
                raise ValueError(f"--convert: {e}") from None
        if self.model == HF:  # revnets.hf.reversible's settings; --context sets the window
            taken = ("context", "h", "init") if self.convert else ("context",)
            given = [k for k in model_overrides(asdict(self)) if k not in taken]
            if given:
                raise ValueError(f"{', '.join(map(_flag, given))}: not a setting of a Hugging Face model"
                                 f"{'' if self.convert else ' that is not converted (--convert)'}")

    def check_fsdp(self) -> None:
        """--fsdp needs processes to shard over (torchrun) and the engine's sharded path: not the
        fixed-point engine, nor what measures a chain outside the calls that gather its parameters."""
        if not self.fsdp:
            return
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            raise ValueError(f"--fsdp needs PyTorch's FSDP2 (torch >= 2.6); this is torch {torch.__version__}")
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError("--fsdp shards the model over the processes of torchrun; start the run with "
                             "torchrun --nproc_per_node N -m revnets.cli train ... (N >= 2)")
        given = [flag for flag, on in (("--exact", self.exact), ("--drift-every", self.drift_every),
                                       ("--segment auto", self.segment == "auto"), ("--grow-at", self.grow_at)) if on]
        if given:
            raise ValueError(f"--fsdp cannot shard a run with {', '.join(given)}: they compute with a block's "
                             "parameters outside the calls in which FSDP gathers them")

    def check_model(self) -> None:
        """Build the model on the meta device (no memory): its own checks of every model setting."""
        if self.model == HF:
            return  # checked when the run builds it from the source's config
        size = dict(vocab_size=256) if self.task == "text" else {}
        try:
            with torch.device("meta"):
                build_model(self.model, **size, **self.overrides())
        except TypeError as e:  # a registered user scheme that does not take a setting
            raise ValueError(f"--model {self.model}: {e}") from None

    def overrides(self) -> dict:
        """The model settings of this run, as `build_model` (or `revnets.hf.reversible`) takes them:
        the model flags given, and --convert's scheme."""
        found = model_overrides(asdict(self)) | ({"scheme": self.convert} if self.convert else {})
        if self.model == HF:
            found.pop("context", None)  # the window of the run, not a setting of the model (TextTask.check)
        return found

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from config.json (unknown keys, such as the library versions, are ignored; a
        setting missing from an older image run takes its EARLIER value)."""
        d = {**(EARLIER if d.get("dataset") != "text" else {}), **d}
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
    """The model's name as reported: its registered name, with the settings that change it, e.g.
    ``hamiltonian-74 (units 1-1-1, h 0.05)``."""
    c = asdict(config) if isinstance(config, Config) else config
    parts = [f"{k} {'-'.join(map(str, c[k])) if isinstance(c[k], (list, tuple)) else c[k]}"
             for k in (*MODEL_FLAGS, "convert") if k not in ("segment", "exact") and c.get(k) is not None]
    model = f"Hugging Face model {c['init_from']}" if c["model"] == HF else c["model"]
    return f"{model} ({', '.join(parts)})" if parts else model


def changed_settings(saved: dict, config: Config) -> dict[str, tuple]:
    """{name: (saved value, config's value)} of each setting, PLACE aside, in which `config` differs
    from `saved`, a run's settings as config.json or a checkpoint hold them (both completed by the
    same recipe, so that a run saved before a setting existed compares by what it did)."""
    then = asdict(Config.from_dict({**saved, **{k: getattr(config, k) for k in PLACE}}))
    return {k: (then[k], v) for k, v in asdict(config).items() if k not in PLACE and then[k] != v}


def check_extension(saved: Config, config: Config, done: int) -> None:
    """ValueError unless `config` continues `saved`, `done` epochs in, as a longer run: more or as many
    epochs, the step schedule's decays already passed unchanged (the other schedules have their
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
    if device.type == "meta":
        raise ValueError(f"device {name!r} holds no data (tensors without storage); expected e.g. cpu, cuda, cuda:1")
    return device


def growths(grow_at, epoch: int) -> int:
    """How many times a run growing at epochs `grow_at` (--grow-at) has grown its network by the
    end of `epoch` completed epochs."""
    return sum(g < epoch for g in grow_at or ())


def config_from_flags(given: dict) -> Config:
    """The Config of a `revnets train` command from the flags it was given (name: value); with
    --resume DIR the saved settings, which given flags must match (--epochs and --milestones may
    grow the run, see `check_extension`)."""
    names = {f.name for f in fields(Config)}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if k in names}
    if "resume" not in given:
        return Config(**given)
    run = Path(given["resume"])
    if not (run / "last.pt").is_file() or not (run / "config.json").is_file():
        raise FileNotFoundError(f"--resume {run}: no last.pt and config.json there (not a run directory "
                                "or killed before its first epoch)")
    content = read_json(run / "config.json")
    saved = Config.from_dict({**content, "resume": str(run), "out": str(run), "fsdp": given.get("fsdp", False),
                              "device": given.get("device", content.get("device"))})  # --fsdp: this invocation's
    differ = [k for k, v in given.items() if k not in PLACE + GROWABLE and getattr(saved, k) != v]
    if "out" in given and Path(given["out"]).resolve() != run.resolve():
        differ.append("out")
    if differ:
        raise ValueError(f"--resume {run}: the run was started with different settings: "
                         + ", ".join(f"{k}={getattr(saved, k)!r}" for k in differ))
    return replace(saved, **{k: given[k] for k in GROWABLE if k in given})


def read_json(path: Path) -> dict:
    """A run's config.json; ValueError naming it when it is not a JSON object."""
    try:
        content = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, expected a JSON object of settings")
    return content
