"""The paper's networks (Section 4), reversible stacks over any linear operator, and the chain
of reversible blocks they (and `ReversibleTransformer`) are made of.

A `ReversibleChain` runs its blocks through the memory-efficient engine, so its memory does not
grow with its length. A `ReversibleUnit` is [pool] -> split -> entry block -> a chain of n - 1
blocks -> merge. `Network` is the paper's image classifier made of such units: every unit after
the first halves the resolution by average pooling, its entry reads the previous unit's channels
and the unit's width is reached by zero padding. `ReversibleStack` is one unit of any scheme at one
width on dense features or 1-, 2- or 3-D signals. `smoothness_penalty` is Eq. (22) on a Network.

Named models (Table 1, language-model sizes) are in `revnets.models`.
"""
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # public since torch 2.5; FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = ()

from .blocks import ReversibleBlock, check_dim, check_positive, conv3x3
from . import exact as fixed_point
from .engine import AutoSegment, segment_length, reversible, sequential
from .schemes import SCHEMES, Scheme, get_scheme


class ReversibleChain(nn.ModuleList):
    """A chain of `ReversibleBlock`s on a state pair: (a, b) -> (a', b'), each (N, C, *spatial).

    How it runs: `memory_efficient` (the engine, `revnets.engine.reversible`: activations rebuilt
    by exact inversion, memory O(1) in depth; False: plain autograd, `engine.sequential`);
    `segment`: blocks per state the engine stores (None: pure reversal; an integer k; "auto":
    `engine.AutoSegment`, whose last choice and its memory are `chain.segment.choice`); `exact`:
    keep the state in fixed point and reverse it bit for bit (`revnets.exact`; no segments needed).
    `name` names the chain in the engine's drift warning. A `ModuleList`: its blocks are its
    children 0, 1, ..., as they are in a checkpoint.
    """

    def __init__(self, blocks=(), memory_efficient: bool = True, segment: int | str | None = None,
                 exact: bool = False, name: str = "reversible chain"):
        super().__init__(blocks)
        for block in self:
            if not isinstance(block, ReversibleBlock):
                raise ValueError(f"a reversible chain holds ReversibleBlocks; got {type(block).__name__}")
        if segment != "auto":
            segment_length(segment, len(self))
        if exact and segment is not None:
            raise ValueError(f"exact reversal stores no segments; got exact=True with segment={segment!r}")
        self.memory_efficient, self.exact, self.name = memory_efficient, bool(exact), name
        self.segment = AutoSegment() if segment == "auto" else segment

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if self.exact:
            return (fixed_point.reversible if self.memory_efficient else fixed_point.sequential)(self, a, b)
        if not self.memory_efficient:
            return sequential(self, a, b)
        return reversible(self, a, b, self.segment, name=self.name)


def chains(model: nn.Module) -> list[ReversibleChain]:
    """The reversible chains of `model`, in `model.modules()` order."""
    return [m for m in model.modules() if isinstance(m, ReversibleChain)]


class MemoryEfficient:
    """`memory_efficient` of a module: whether its reversible chains rebuild activations in the
    backward (the engine) instead of storing them (plain autograd); False without any chain (ResNet).

    Settable on a built model, e.g. ``model.memory_efficient = False`` to train or debug with plain
    autograd: parameters, outputs and gradients stay the same.
    """

    @property
    def memory_efficient(self) -> bool:
        found = chains(self)
        return bool(found) and all(c.memory_efficient for c in found)

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        found = chains(self)
        if value and not found:
            raise ValueError(f"a {getattr(self, 'scheme', type(self).__name__)} model has no reversible chain to run "
                             "memory-efficiently; expected memory_efficient=False")
        for chain in found:
            chain.memory_efficient = bool(value)


class ReversibleUnit(MemoryEfficient, nn.Module):
    """One unit: [pool] -> split -> entry block -> n - 1 reversible blocks -> merge.

    (N, C_in, *spatial) -> (N, C, *spatial'), spatial' = spatial / 2 when `pool` (dim 2 only).
    `block`: a `ReversibleBlock` class, built as block(C, dim=dim, **kw). The n - 1 blocks after the
    entry are a `ReversibleChain` (`unit.blocks`), run as `memory_efficient`, `segment` and `exact`
    say (see there).
    """

    def __init__(self, block: type[ReversibleBlock], c_in: int, c: int, n: int, pool: bool,
                 memory_efficient: bool = True, segment: int | str | None = None, exact: bool = False,
                 dim: int = 2, **kw):
        super().__init__()
        if not (isinstance(block, type) and issubclass(block, ReversibleBlock)):
            raise ValueError(f"a reversible unit needs a ReversibleBlock class; got {block!r}")
        check_dim(dim)
        if pool and dim != 2:
            raise ValueError(f"a unit pools 2-D feature maps only; got pool=True with dim={dim}")
        self.block, self.pool = block, pool
        self.entry = block.entry(c_in, c, dim=dim, **kw)
        self.blocks = ReversibleChain((block(c, dim=dim, **kw) for _ in range(n - 1)), memory_efficient, segment,
                                      exact, name="reversible unit")

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
        return self.block.merge(*self.blocks(*self.chain_input(x)))


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
        check_positive(channels=channels, depth=depth)
        check_overrides(f"ReversibleStack({record.name})", block_kw, scheme_settings(record))
        super().__init__(record.block, channels, channels, depth, pool=False, memory_efficient=memory_efficient,
                         dim=dim, **{**record.defaults, **block_kw})
        self.scheme, self.channels, self.dim = record.name, channels, dim

    @property
    def depth(self) -> int:
        return 1 + len(self.blocks)

    def chain_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        check_float(x, f"ReversibleStack({self.scheme})")
        return super().chain_input(x)

    def check_input(self, x: Tensor) -> None:
        spatial = ("L",), ("H", "W"), ("D", "H", "W")
        expected = ", ".join(("N", str(self.channels), *(spatial[self.dim - 1] if self.dim else ())))
        if x.dim() != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"ReversibleStack({self.scheme}, dim={self.dim}) expects input of shape "
                             f"({expected}); got {tuple(x.shape)}")


def check_float(x: Tensor, name: str) -> None:
    """ValueError unless `x` is a floating-point tensor (the input of a network of `name`)."""
    if not x.is_floating_point():
        raise ValueError(f"{name} expects floating-point input (of its parameters' dtype, or any under autocast); "
                         f"got {x.dtype}")


def plain_unit(block: type[nn.Module], c_in: int, c: int, n: int, pool: bool, memory_efficient: bool = True,
               **kw) -> nn.Sequential:
    """He et al.'s unit of a non-reversible scheme: a strided block C_in -> C, then n - 1 blocks C -> C
    (plain autograd whatever `memory_efficient` says)."""
    stride = 2 if pool else 1
    return nn.Sequential(block(c_in, c, stride, **kw), *(block(c, c, **kw) for _ in range(n - 1)))


class Network(MemoryEfficient, nn.Module):
    """conv3x3-N-s stem -> units -> [N-s] -> global average pool -> linear, Section 4.

    (N, in_channels, H, W) -> (N, num_classes); H and W divisible by 2^(len(units) - 1). `scheme`:
    a registered scheme name (`revnets.schemes.SCHEMES`); `kw` its block settings.
    """

    def __init__(self, scheme: str, units: Sequence[int], channels: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10, memory_efficient: bool = True, **kw):
        super().__init__()
        record = get_scheme(scheme)
        check_units(units, channels)
        check_positive(in_channels=in_channels, num_classes=num_classes)
        self.scheme, self.in_channels, self.channels = record.name, in_channels, tuple(channels)
        act = kw.get("act", nn.ReLU)
        self.stem = nn.Sequential(conv3x3(in_channels, channels[0]), nn.BatchNorm2d(channels[0]), act())
        make = ReversibleUnit if record.reversible else plain_unit
        self.units = nn.ModuleList(
            make(record.block, c_in, c, n, pool=i > 0, memory_efficient=memory_efficient, **kw)
            for i, (c_in, c, n) in enumerate(zip((channels[0], *channels), channels, units)))
        for i, unit in enumerate(self.units):
            if isinstance(unit, ReversibleUnit):
                unit.blocks.name = f"units[{i}]"
        # ResNet's blocks end in s(); the reversible states leave the last unit un-normalised.
        self.final = nn.Sequential(nn.BatchNorm2d(channels[-1]), act()) if record.reversible else nn.Identity()
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        check_float(x, f"{type(self).__name__}({self.scheme})")
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


def scheme_settings(record: Scheme) -> list[str]:
    """The keyword settings a scheme's units take: its defaults, and segment, exact if reversible."""
    return [*record.defaults] + (["segment", "exact"] if record.reversible else [])


def check_overrides(what: str, overrides: dict, valid: list[str]) -> None:
    """ValueError naming the keys of `overrides` that are not `valid` settings of `what`."""
    unknown = set(overrides) - set(valid)
    if unknown:
        raise ValueError(f"{what} has no setting {', '.join(sorted(unknown))}; valid overrides: {', '.join(valid)}")


def check_units(units: Sequence[int], channels: Sequence[int]) -> None:
    """ValueError unless `units` (blocks per unit) and `channels` (per unit) are sequences of
    positive integers, one of each per unit, the channels not decreasing (zero padding widens)."""
    sequences = all(isinstance(s, Sequence) and not isinstance(s, str) for s in (units, channels))
    if not (sequences and len(units) == len(channels) > 0 and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in (*units, *channels))):
        raise ValueError(f"units and channels need one positive integer each per unit; got units={units!r}, "
                         f"channels={channels!r}")
    if any(c_out < c_in for c_in, c_out in zip(channels, channels[1:])):
        raise ValueError(f"channels must not decrease from unit to unit (zero padding widens); got {tuple(channels)}")


def smoothness_penalty(model: nn.Module) -> Tensor:
    """R_h(K) = h sum_j sum_k ||(K_{j,k} - K_{j+1,k}) / h||_F^2, Eq. (22).

    Sums over consecutive blocks j, j + 1 of each unit of `model.units` (a `Network`) and over their
    convolution kernels k, pairing the k-th kernel of one block with the k-th of the next where
    their shapes agree (a unit's widening entry block pairs with nothing). h is block j's step (1
    where a block has none: RevNet, ResNet). Returns a scalar that is differentiable in the kernels.
    """
    if not isinstance(model, Network):
        raise ValueError(f"the smoothness penalty of Eq. (22) reads a Network's convolution kernels; got "
                         f"{type(model).__name__}")
    total = torch.zeros((), dtype=model.head.weight.dtype, device=model.head.weight.device)
    for unit in model.units:
        blocks = list(unit)
        kernels = [[_full(m.weight) for m in b.modules() if isinstance(m, nn.Conv2d)] for b in blocks]
        for j in range(len(blocks) - 1):
            h = getattr(blocks[j], "h", 1.0)
            for k0, k1 in zip(kernels[j], kernels[j + 1]):
                if k0.shape == k1.shape:
                    total = total + (k0 - k1).pow(2).sum() / h
    return total


def _full(w: Tensor) -> Tensor:
    """The whole of a parameter that FSDP2 holds sharded (a DTensor between a block's calls),
    differentiably: its gradient goes to this process's shard."""
    return w.full_tensor() if isinstance(w, DTensor) else w
