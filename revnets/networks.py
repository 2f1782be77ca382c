"""The paper's networks (Section 4, Table 1) and reversible stacks over any linear operator.

A `ReversibleUnit` is [pool] -> split -> entry block -> n - 1 reversible blocks -> merge; the
blocks after the entry run through the memory-efficient engine, so its memory does not grow
with n. `Network` is the paper's image classifier made of such units: every unit after the first
halves the resolution by average pooling, its entry reads the previous unit's channels and the
unit's width is reached by zero padding. `ReversibleStack` is one unit of any scheme at one width
on dense features or 1-, 2- or 3-D signals.

Models are named settings of a `Network` (`MODELS`, Table 1); `register_model` adds one.
"""
import fnmatch
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ReversibleBlock, _check_dim, conv3x3
from . import exact as fixed_point
from .engine import AutoSegment, _segment_length, reversible, sequential
from .schemes import SCHEMES, Scheme, get_scheme


class ReversibleUnit(nn.Module):
    """One unit: [pool] -> split -> entry block -> n - 1 reversible blocks -> merge.

    (N, C_in, *spatial) -> (N, C, *spatial'), spatial' = spatial / 2 when `pool` (dim 2 only).
    `block`: a `ReversibleBlock` class, built as block(C, dim=dim, **kw). `segment`: blocks per
    state the engine stores (None: pure reversal; an integer k; "auto": `engine.AutoSegment`, whose
    last choice and its memory are `unit.segment.choice`). `exact`: keep the chain's state in fixed
    point and reverse it bit for bit (`revnets.exact`; no segments needed).
    """

    def __init__(self, block: type[ReversibleBlock], c_in: int, c: int, n: int, pool: bool,
                 memory_efficient: bool = True, segment: int | str | None = None, exact: bool = False,
                 dim: int = 2, **kw):
        super().__init__()
        if not (isinstance(block, type) and issubclass(block, ReversibleBlock)):
            raise ValueError(f"a reversible unit needs a ReversibleBlock class; got {block!r}")
        _check_dim(dim)
        if pool and dim != 2:
            raise ValueError(f"a unit pools 2-D feature maps only; got pool=True with dim={dim}")
        self.block, self.pool, self.memory_efficient = block, pool, memory_efficient
        self.segment = AutoSegment() if segment == "auto" else segment
        if segment != "auto":
            _segment_length(segment, n)
        if exact and segment is not None:
            raise ValueError(f"exact reversal stores no segments; got exact=True with segment={segment!r}")
        self.exact = bool(exact)
        self.name = "reversible unit"  # what the engine's drift warning calls it; Network sets "units[i]"
        self.entry = block.entry(c_in, c, dim=dim, **kw)
        self.blocks = nn.ModuleList(block(c, dim=dim, **kw) for _ in range(n - 1))

    def __iter__(self):
        """The unit's blocks in order, the entry first (without its zero padding)."""
        yield getattr(self.entry, "block", self.entry)
        yield from self.blocks

    def chain_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[pool] -> split -> entry: the state (a, b) that enters the reversible blocks."""
        if self.pool:
            x = F.avg_pool2d(x, 2)
        return self.entry(*self.block.split(x))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.chain_input(x)
        if self.exact:
            out = (fixed_point.reversible if self.memory_efficient else fixed_point.sequential)(self.blocks, a, b)
        elif not self.memory_efficient:
            out = sequential(self.blocks, a, b)
        else:
            segment = self.segment(self.blocks, a, b) if isinstance(self.segment, AutoSegment) else self.segment
            out = reversible(self.blocks, a, b, segment, name=self.name)
        return self.block.merge(*out)


class ReversibleStack(ReversibleUnit):
    """`depth` blocks of a reversible scheme on `channels` channels: (N, C, *spatial) -> same shape.

    `dim` 0: dense features (N, C), K a `Linear`; `dim` 1, 2, 3: (N, C, L), (N, C, H, W),
    (N, C, D, H, W), K a 3^dim convolution with padding 1. The scheme's registered defaults
    apply unless `block_kw` overrides them (h, act, norm, ...; `segment` and `exact` as for
    `ReversibleUnit`). The first block is the scheme's entry (MidPoint's forward Euler step), which
    keeps its activations; the other depth - 1 run through the engine: memory O(1) in depth when
    `memory_efficient`, plain autograd otherwise (same parameters, one state_dict loads into both).
    """

    def __init__(self, scheme: "str | Scheme", channels: int, depth: int, dim: int = 2,
                 memory_efficient: bool = True, **block_kw):
        record = get_scheme(scheme)
        if not record.reversible:
            raise ValueError(f"ReversibleStack needs a reversible scheme "
                             f"({', '.join(s for s in SCHEMES if SCHEMES[s].reversible)}); got {record.name!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"ReversibleStack needs depth >= 1 (an integer number of blocks); got {depth!r}")
        _check_overrides(f"ReversibleStack({record.name})", block_kw, _settings(record))
        super().__init__(record.block, channels, channels, depth, pool=False, memory_efficient=memory_efficient,
                         dim=dim, **{**record.defaults, **block_kw})
        self.scheme, self.channels, self.dim = record.name, channels, dim

    @property
    def depth(self) -> int:
        return 1 + len(self.blocks)

    def chain_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        return super().chain_input(x)

    def check_input(self, x: Tensor) -> None:
        spatial = ("L",), ("H", "W"), ("D", "H", "W")
        expected = ", ".join(("N", str(self.channels), *(spatial[self.dim - 1] if self.dim else ())))
        if x.dim() != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"ReversibleStack({self.scheme}, dim={self.dim}) expects input of shape "
                             f"({expected}); got {tuple(x.shape)}")


def plain_unit(block: type[nn.Module], c_in: int, c: int, n: int, pool: bool, memory_efficient: bool = True,
               **kw) -> nn.Sequential:
    """He et al.'s unit of a non-reversible scheme: a strided block C_in -> C, then n - 1 blocks C -> C
    (plain autograd whatever `memory_efficient` says)."""
    stride = 2 if pool else 1
    return nn.Sequential(block(c_in, c, stride, **kw), *(block(c, c, **kw) for _ in range(n - 1)))


class Network(nn.Module):
    """conv3x3-N-s stem -> units -> [N-s] -> global average pool -> linear, Section 4.

    (N, in_channels, H, W) -> (N, num_classes); H and W divisible by 2^(len(units) - 1). `scheme`:
    a registered scheme name (`revnets.schemes.SCHEMES`); `kw` its block settings.
    """

    def __init__(self, scheme: str, units: Sequence[int], channels: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10, memory_efficient: bool = True, **kw):
        super().__init__()
        record = get_scheme(scheme)
        if len(units) != len(channels) or not units or min(units) < 1:
            raise ValueError(f"units and channels need one positive entry per unit; got units={tuple(units)}, "
                             f"channels={tuple(channels)}")
        if any(c_out < c_in for c_in, c_out in zip(channels, channels[1:])):
            raise ValueError(f"channels must not decrease from unit to unit (zero padding widens); got {tuple(channels)}")
        self.scheme, self.in_channels, self.channels = record.name, in_channels, tuple(channels)
        act = kw.get("act", nn.ReLU)
        self.stem = nn.Sequential(conv3x3(in_channels, channels[0]), nn.BatchNorm2d(channels[0]), act())
        make = ReversibleUnit if record.reversible else plain_unit
        self.units = nn.ModuleList(
            make(record.block, c_in, c, n, pool=i > 0, memory_efficient=memory_efficient, **kw)
            for i, (c_in, c, n) in enumerate(zip((channels[0], *channels), channels, units)))
        for i, unit in enumerate(self.units):
            if isinstance(unit, ReversibleUnit):
                unit.name = f"units[{i}]"
        # ResNet's blocks end in s(); the reversible states leave the last unit un-normalised.
        self.final = nn.Sequential(nn.BatchNorm2d(channels[-1]), act()) if record.reversible else nn.Identity()
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.stem(x).to(self.head.weight.dtype)  # reversible states stay in the parameters' precision
        for unit in self.units:
            x = unit(x)
        return self.head(self.final(x).mean(dim=(2, 3)))

    def check_input(self, x: Tensor) -> None:
        step = 2 ** (len(self.units) - 1)
        expected = f"(N, {self.in_channels}, H, W) with H and W positive multiples of {step}"
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % step or x.shape[3] % step \
                or min(x.shape[2:]) < step:
            raise ValueError(f"{type(self).__name__}({self.scheme}) expects input of shape {expected}; "
                             f"got {tuple(x.shape)}")

    @property
    def units_spec(self) -> tuple[int, ...]:
        """Blocks per unit, the entry included."""
        return tuple(sum(1 for _ in unit) for unit in self.units)

    @property
    def memory_efficient(self) -> bool:
        """Whether the reversible units rebuild activations in the backward (the engine) instead
        of storing them (plain autograd); False for ResNet, which has no reversible unit.

        Settable on a built model, e.g. ``model.memory_efficient = False`` to train or debug with
        plain autograd: parameters, outputs and gradients stay the same.
        """
        units = self._reversible_units()
        return bool(units) and all(u.memory_efficient for u in units)

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        units = self._reversible_units()
        if value and not units:
            raise ValueError(f"a {self.scheme} network has no reversible units to run memory-efficiently; "
                             "expected memory_efficient=False")
        for unit in units:
            unit.memory_efficient = bool(value)

    def _reversible_units(self) -> list[ReversibleUnit]:
        return [u for u in self.units if isinstance(u, ReversibleUnit)]


MODELS: dict[str, dict] = {}


def register_model(name: str, scheme: str, units: Sequence[int], channels: Sequence[int], **overrides) -> None:
    """Register a named `Network`: ``build_model(name)`` builds `scheme` with these units and channels,
    and `overrides` (the scheme's block settings, `segment`, `exact`) in place of the scheme's defaults.
    A name can be registered once; the settings are checked now.
    """
    if not (isinstance(name, str) and name):
        raise ValueError(f"a model name must be a non-empty string; got {name!r}")
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    record = get_scheme(scheme)
    _check_overrides(name, overrides, _settings(record))
    units, channels = tuple(units), tuple(channels)
    if len(units) != len(channels) or not units or min(units) < 1 or min(channels) < 1:
        raise ValueError(f"{name} needs one positive number of blocks and of channels per unit; "
                         f"got units={units}, channels={channels}")
    MODELS[name] = dict(scheme=record.name, units=units, channels=channels, **overrides)


def _settings(record: Scheme) -> list[str]:
    """The keyword settings a scheme's units take: its defaults, and segment, exact if reversible."""
    return [*record.defaults] + (["segment", "exact"] if record.reversible else [])


def _check_overrides(what: str, overrides: dict, valid: list[str]) -> None:
    unknown = set(overrides) - set(valid)
    if unknown:
        raise ValueError(f"{what} has no setting {', '.join(sorted(unknown))}; valid overrides: {', '.join(valid)}")


# Table 1. ResNet-1202's row prints channels 32-64-128, but its 19.4M parameters are 16-32-64
# (He et al.'s ResNet-1202), which we use.
register_model("resnet-32", scheme="resnet", units=(5, 5, 5), channels=(16, 32, 64))
register_model("resnet-110", scheme="resnet", units=(18, 18, 18), channels=(16, 32, 64))
register_model("resnet-1202", scheme="resnet", units=(200, 200, 200), channels=(16, 32, 64))
register_model("revnet-38", scheme="revnet", units=(3, 3, 3), channels=(32, 64, 112))
register_model("revnet-110", scheme="revnet", units=(9, 9, 9), channels=(32, 64, 128))
register_model("hamiltonian-74", scheme="hamiltonian", units=(6, 6, 6), channels=(32, 64, 112))
register_model("hamiltonian-218", scheme="hamiltonian", units=(18, 18, 18), channels=(32, 64, 128))
register_model("hamiltonian-1202", scheme="hamiltonian", units=(100, 100, 100), channels=(32, 64, 128))
register_model("midpoint-26", scheme="midpoint", units=(4, 4, 4), channels=(32, 64, 112))
register_model("midpoint-62", scheme="midpoint", units=(10, 10, 10), channels=(32, 64, 128))
register_model("leapfrog-26", scheme="leapfrog", units=(4, 4, 4), channels=(32, 64, 112))
register_model("leapfrog-62", scheme="leapfrog", units=(10, 10, 10), channels=(32, 64, 128))

# Table 1's parameter counts in millions: (CIFAR-10, CIFAR-100). A model without an entry has no paper count.
PAPER_PARAMS: dict[str, tuple[float, float | None]] = {
    "resnet-32": (0.46, 0.47), "resnet-110": (1.73, 1.73), "resnet-1202": (19.4, None),
    "revnet-38": (0.46, 0.48), "revnet-110": (1.73, 1.74),
    "hamiltonian-74": (0.43, 0.44), "hamiltonian-218": (1.68, 1.69), "hamiltonian-1202": (9.70, None),
    "midpoint-26": (0.50, 0.51), "midpoint-62": (1.78, 1.79),
    "leapfrog-26": (0.50, 0.51), "leapfrog-62": (1.78, 1.79),
}

# Normalisations inside the residual functions, by the name `revnets train --norm` takes.
NORMS: dict[str, type[nn.Module] | None] = {"batch": nn.BatchNorm2d, "none": None}


def model_scheme(name: str) -> Scheme:
    """The scheme record of a registered model; ValueError listing the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return get_scheme(MODELS[name]["scheme"])


def list_models(pattern: str | None = None) -> list[str]:
    """The registered model names (Table 1's first) that `build_model` accepts, optionally only those
    matching the shell-style `pattern` (``list_models("hamiltonian-*")``)."""
    return [n for n in MODELS if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, memory_efficient: bool = True,
                **overrides) -> Network:
    """Build a registered network by name, e.g. ``build_model("hamiltonian-74")``.

    Overrides: ``units=(n1, n2, n3[, n4])``, ``channels=(...)`` and the scheme's residual-function
    settings (``h``, ``act``, ``norm``); reversible schemes also take ``segment`` (None, an integer k
    or "auto": blocks per state the engine stores, see `revnets.engine`) and ``exact=True``
    (fixed-point state, bit-exact reversal, see `revnets.exact`). ``memory_efficient=False``
    gives the same module (same parameter names) trained with plain autograd.
    """
    record = model_scheme(name)
    spec = dict(MODELS[name])
    _check_overrides(name, overrides, ["units", "channels", *_settings(record)])
    spec = {**record.defaults, **spec, **overrides}
    return Network(num_classes=num_classes, in_channels=in_channels, memory_efficient=memory_efficient, **spec)
