"""The paper's networks (Section 4, Table 1): stem, units of blocks, global pooling, classifier.

Every unit after the first halves the resolution by average pooling; its first block (the entry)
reads the previous unit's channels and the unit's width is reached by zero padding. A reversible
unit keeps the entry's activations and the input of its remaining n - 1 blocks, which run through
the memory-efficient engine: its memory does not grow with n.
"""
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (BasicBlock, HamiltonianBlock, LeapfrogBlock, MidPointBlock, ReversibleBlock,
                     RevNetBlock, conv3x3)
from . import exact as fixed_point
from .engine import AutoSegment, _segment_length, reversible, sequential

SCHEMES: dict[str, type[nn.Module]] = {
    "hamiltonian": HamiltonianBlock,
    "midpoint": MidPointBlock,
    "leapfrog": LeapfrogBlock,
    "revnet": RevNetBlock,
    "resnet": BasicBlock,
}


class ReversibleUnit(nn.Module):
    """One unit: [pool] -> split -> entry block -> n - 1 reversible blocks -> merge.

    (N, C_in, H, W) -> (N, C, H', W'), H' = H / 2 when `pool`. `segment`: blocks per state the
    engine stores (None: pure reversal; an integer k; "auto": `engine.AutoSegment`, whose last
    choice and its memory are `unit.segment.choice`). `exact`: keep the chain's state in fixed
    point and reverse it bit for bit (`revnets.exact`; no segments needed).
    """

    def __init__(self, block: type[ReversibleBlock], c_in: int, c: int, n: int, pool: bool,
                 memory_efficient: bool = True, segment: int | str | None = None, exact: bool = False, **kw):
        super().__init__()
        self.block, self.pool, self.memory_efficient = block, pool, memory_efficient
        self.segment = AutoSegment() if segment == "auto" else segment
        if segment != "auto":
            _segment_length(segment, n)
        if exact and segment is not None:
            raise ValueError(f"exact reversal stores no segments; got exact=True with segment={segment!r}")
        self.exact = bool(exact)
        self.name = "reversible unit"  # what the engine's drift warning calls it; Network sets "units[i]"
        self.entry = block.entry(c_in, c, **kw)
        self.blocks = nn.ModuleList(block(c, **kw) for _ in range(n - 1))

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


def resnet_unit(c_in: int, c: int, n: int, pool: bool, memory_efficient: bool = True, **kw) -> nn.Sequential:
    """He et al.'s unit: a strided basic block C_in -> C, then n - 1 basic blocks (plain autograd)."""
    stride = 2 if pool else 1
    return nn.Sequential(BasicBlock(c_in, c, stride, **kw), *(BasicBlock(c, c, **kw) for _ in range(n - 1)))


class Network(nn.Module):
    """conv3x3-N-s stem -> units -> [N-s] -> global average pool -> linear, Section 4.

    (N, in_channels, H, W) -> (N, num_classes); H and W divisible by 2^(len(units) - 1).
    """

    def __init__(self, scheme: str, units: Sequence[int], channels: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10, memory_efficient: bool = True, **kw):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
        if len(units) != len(channels) or not units or min(units) < 1:
            raise ValueError(f"units and channels need one positive entry per unit; got units={tuple(units)}, "
                             f"channels={tuple(channels)}")
        if any(c_out < c_in for c_in, c_out in zip(channels, channels[1:])):
            raise ValueError(f"channels must not decrease from unit to unit (zero padding widens); got {tuple(channels)}")
        self.scheme, self.in_channels = scheme, in_channels
        self.units_spec, self.channels = tuple(units), tuple(channels)
        act = kw.get("act", nn.ReLU)
        self.stem = nn.Sequential(conv3x3(in_channels, channels[0]), nn.BatchNorm2d(channels[0]), act())
        make = resnet_unit if scheme == "resnet" else _reversible_unit(SCHEMES[scheme])
        self.units = nn.ModuleList(
            make(c_in, c, n, pool=i > 0, memory_efficient=memory_efficient, **kw)
            for i, (c_in, c, n) in enumerate(zip((channels[0], *channels), channels, units)))
        for i, unit in enumerate(self.units):
            if isinstance(unit, ReversibleUnit):
                unit.name = f"units[{i}]"
        # ResNet's blocks end in s(); the reversible states leave the last unit un-normalised.
        self.final = nn.Identity() if scheme == "resnet" else nn.Sequential(nn.BatchNorm2d(channels[-1]), act())
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


def _reversible_unit(block: type[ReversibleBlock]):
    def make(c_in: int, c: int, n: int, pool: bool, memory_efficient: bool = True, **kw) -> ReversibleUnit:
        return ReversibleUnit(block, c_in, c, n, pool, memory_efficient, **kw)
    return make


# Table 1. ResNet-1202's row prints channels 32-64-128, but its 19.4M parameters are 16-32-64
# (He et al.'s ResNet-1202), which we use.
MODELS: dict[str, dict] = {
    "resnet-32": dict(scheme="resnet", units=(5, 5, 5), channels=(16, 32, 64)),
    "resnet-110": dict(scheme="resnet", units=(18, 18, 18), channels=(16, 32, 64)),
    "resnet-1202": dict(scheme="resnet", units=(200, 200, 200), channels=(16, 32, 64)),
    "revnet-38": dict(scheme="revnet", units=(3, 3, 3), channels=(32, 64, 112)),
    "revnet-110": dict(scheme="revnet", units=(9, 9, 9), channels=(32, 64, 128)),
    "hamiltonian-74": dict(scheme="hamiltonian", units=(6, 6, 6), channels=(32, 64, 112)),
    "hamiltonian-218": dict(scheme="hamiltonian", units=(18, 18, 18), channels=(32, 64, 128)),
    "hamiltonian-1202": dict(scheme="hamiltonian", units=(100, 100, 100), channels=(32, 64, 128)),
    "midpoint-26": dict(scheme="midpoint", units=(4, 4, 4), channels=(32, 64, 112)),
    "midpoint-62": dict(scheme="midpoint", units=(10, 10, 10), channels=(32, 64, 128)),
    "leapfrog-26": dict(scheme="leapfrog", units=(4, 4, 4), channels=(32, 64, 112)),
    "leapfrog-62": dict(scheme="leapfrog", units=(10, 10, 10), channels=(32, 64, 128)),
}

# Table 1's parameter counts in millions: (CIFAR-10, CIFAR-100).
PAPER_PARAMS: dict[str, tuple[float, float | None]] = {
    "resnet-32": (0.46, 0.47), "resnet-110": (1.73, 1.73), "resnet-1202": (19.4, None),
    "revnet-38": (0.46, 0.48), "revnet-110": (1.73, 1.74),
    "hamiltonian-74": (0.43, 0.44), "hamiltonian-218": (1.68, 1.69), "hamiltonian-1202": (9.70, None),
    "midpoint-26": (0.50, 0.51), "midpoint-62": (1.78, 1.79),
    "leapfrog-26": (0.50, 0.51), "leapfrog-62": (1.78, 1.79),
}

# Normalisations inside the residual functions, by the name `revnets train --norm` takes.
NORMS: dict[str, type[nn.Module] | None] = {"batch": nn.BatchNorm2d, "none": None}

# The paper's three stable schemes (Eq. 10, 15, 17): the ones whose blocks have a step size h.
STABLE_SCHEMES = ("hamiltonian", "midpoint", "leapfrog")

# Per-scheme defaults of the residual functions. BatchNorm inside K^T s(N(K y + b)) and h = 0.1
# trained best of {no norm, BatchNorm} x {0.1, 1.0} in benchmarks/defaults.py (README, "Defaults").
SCHEME_DEFAULTS: dict[str, dict] = {
    "hamiltonian": dict(h=0.1, act=nn.ReLU, norm=nn.BatchNorm2d),
    "midpoint": dict(h=0.1, act=nn.ReLU, norm=nn.BatchNorm2d),
    "leapfrog": dict(h=0.1, act=nn.ReLU, norm=nn.BatchNorm2d),
    "revnet": dict(act=nn.ReLU, norm=nn.BatchNorm2d),
    "resnet": dict(act=nn.ReLU, norm=nn.BatchNorm2d),
}


def list_models() -> list[str]:
    """The model names of Table 1 that `build_model` accepts."""
    return list(MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, memory_efficient: bool = True,
                **overrides) -> Network:
    """Build a Table 1 network by name, e.g. ``build_model("hamiltonian-74")``.

    Overrides: ``units=(n1, n2, n3[, n4])``, ``channels=(...)`` and the scheme's residual-function
    settings (``h``, ``act``, ``norm``); reversible schemes also take ``segment`` (None, an integer k
    or "auto": blocks per state the engine stores, see `revnets.engine`) and ``exact=True``
    (fixed-point state, bit-exact reversal, see `revnets.exact`). ``memory_efficient=False``
    gives the same module (same parameter names) trained with plain autograd.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    spec = dict(MODELS[name])
    defaults = SCHEME_DEFAULTS[spec["scheme"]]
    valid = ["units", "channels", *defaults] + (["segment", "exact"] if spec["scheme"] != "resnet" else [])
    unknown = set(overrides) - set(valid)
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))}; valid overrides: {', '.join(valid)}")
    spec.update(defaults)
    spec.update(overrides)
    return Network(num_classes=num_classes, in_channels=in_channels, memory_efficient=memory_efficient, **spec)
