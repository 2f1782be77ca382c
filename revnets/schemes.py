"""The scheme registry: one record per residual scheme, which the rest of the library asks.

A scheme is a block class and its defaults. The block class says how it steps (`couplings`, or
`forward` for a non-reversible block), how a unit starts (`entry`, `split`, `merge`), the ODE it
discretises (`vector_field`), its `stability_bound` and whether it is `two_step`; see
`revnets.blocks.ReversibleBlock`, which declares the defaults. Adding a scheme is one class and one
call::

    class Additive(revnets.ReversibleBlock):
        def __init__(self, channels, width=8, dim=2):
            super().__init__()
            op = revnets.blocks.operator  # Linear (dim 0) or 3^dim convolution
            self.f = nn.Sequential(op(channels // 2, width, dim), nn.Tanh(), op(width, channels // 2, dim))
            self.g = nn.Sequential(op(channels // 2, width, dim), nn.Tanh(), op(width, channels // 2, dim))

        def couplings(self):
            return revnets.Coupling(+1, self.f), revnets.Coupling(+1, self.g)

    revnets.register_scheme("additive", Additive, width=8)

after which `Network`, `ReversibleStack`, `register_model`, analysis and the command line take the
name "additive". A scheme may also name its transformer layer (`layer=`, see `revnets.layers`): then
`ReversibleTransformer` and the language models take the name too.
"""
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from .blocks import BasicBlock, HamiltonianBlock, LeapfrogBlock, MidPointBlock, ReversibleBlock, RevNetBlock
from .layers import HamiltonianLayer, Layer, LeapfrogLayer, MidPointLayer, ResidualLayer, RevNetLayer


@dataclass(frozen=True)
class Scheme:
    """A registered scheme: its `name`, its `block` class, the keyword `defaults` its blocks are built
    with, and its transformer `layer` class (None: no language models).

    `reversible`: the block is a `ReversibleBlock` (its units run through the memory-efficient
    engine); otherwise it is built as `block(c_in, c_out, stride, **kw)`, as ResNet's basic block.
    `has_step`: its defaults name a step size h (`revnets.grow` halves it). `bound`: the largest
    stable h |lambda| (None: no stability guarantee). `two_step`: the state is two trajectory points.
    """

    name: str
    block: type[nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    layer: type[Layer] | None = None

    @property
    def reversible(self) -> bool:
        return issubclass(self.block, ReversibleBlock)

    @property
    def has_step(self) -> bool:
        return "h" in self.defaults

    @property
    def bound(self) -> float | None:
        return getattr(self.block, "stability_bound", None)

    @property
    def two_step(self) -> bool:
        return getattr(self.block, "two_step", False)

    def layer_step(self, h: float | None) -> dict:
        """The step setting of this scheme's transformer layers: {"h": h} (default 1, the residual
        network's own step) where it has a step size, else {}; ValueError for an h it has not."""
        if h is not None and not self.has_step:
            raise ValueError(f"the {self.name} scheme has no step size h; got h={h}")
        return dict(h=1.0 if h is None else h) if self.has_step else {}


SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, block_cls: type[nn.Module], layer: type[Layer] | None = None, **defaults) -> Scheme:
    """Register `block_cls` under `name`, built with keyword `defaults` unless overridden; returns its record.

    `block_cls`: a `ReversibleBlock` subclass built as `block_cls(channels, dim=dim, **kw)` (kw: the
    defaults and the overrides; a class whose `__init__` takes no `dim` is refused), or a
    non-reversible `nn.Module` taking `(c_in, c_out, stride, **kw)`.
    `layer`: the scheme's transformer layer, a `revnets.layers.Layer` subclass, reversible (also a
    `ReversibleBlock`) exactly when the block is, taking `h` when the defaults do. A name can be
    registered once.
    """
    if not (isinstance(name, str) and name):
        raise ValueError(f"a scheme name must be a non-empty string; got {name!r}")
    if name in SCHEMES:
        raise ValueError(f"scheme {name!r} is already registered (to {SCHEMES[name].block.__name__})")
    if not (isinstance(block_cls, type) and issubclass(block_cls, nn.Module)):
        raise ValueError(f"register_scheme expects an nn.Module class for {name!r}; got {block_cls!r}")
    unknown = [key for key in defaults if not _takes(block_cls, key)]
    if unknown:
        raise ValueError(f"scheme {name!r}: {block_cls.__name__}.__init__ takes no {', '.join(unknown)}, given as "
                         "defaults")
    if issubclass(block_cls, ReversibleBlock) and not _takes(block_cls, "dim"):
        raise ValueError(f"scheme {name!r}: {block_cls.__name__}.__init__ must take dim (blocks are built as "
                         "block(channels, dim=dim, **kw); dim 0: dense features, 1-3: a convolution over that many "
                         "axes): add `dim: int = 2` to its parameters")
    if layer is not None and not (isinstance(layer, type) and issubclass(layer, Layer)
                                  and issubclass(layer, ReversibleBlock) == issubclass(block_cls, ReversibleBlock)):
        raise ValueError(f"register_scheme expects for {name!r} a revnets.layers.Layer class that is a ReversibleBlock "
                         f"exactly when {block_cls.__name__} is; got layer={layer!r}")
    SCHEMES[name] = Scheme(name, block_cls, MappingProxyType(dict(defaults)), layer)
    return SCHEMES[name]


def _takes(block_cls: type, keyword: str) -> bool:
    """Whether `block_cls(...)` accepts `keyword` (named, or through **kw)."""
    parameters = inspect.signature(block_cls).parameters.values()
    return any(p.name == keyword and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in parameters)


def get_scheme(scheme: "str | Scheme") -> Scheme:
    """The record of a scheme name (a record is returned as it is); ValueError naming the registered ones."""
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def reversible_layer_scheme(scheme: str) -> Scheme:
    """The record of a reversible scheme with a transformer layer (what a residual language model
    converts into); ValueError naming those schemes."""
    record = get_scheme(scheme)
    if not (record.reversible and record.layer is not None):
        raise ValueError(f"expected a reversible scheme with a transformer layer "
                         f"({', '.join(s for s, r in SCHEMES.items() if r.reversible and r.layer)}); got {scheme!r}")
    return record


# The paper's schemes. BatchNorm inside K^T s(N(K y + b)) and h = 0.1 trained best of
# {no norm, BatchNorm} x {0.1, 1.0} in benchmarks/defaults.py (README, "Defaults").
register_scheme("hamiltonian", HamiltonianBlock, HamiltonianLayer, h=0.1, act=nn.ReLU, norm="batch")
register_scheme("midpoint", MidPointBlock, MidPointLayer, h=0.1, act=nn.ReLU, norm="batch")
register_scheme("leapfrog", LeapfrogBlock, LeapfrogLayer, h=0.1, act=nn.ReLU, norm="batch")
register_scheme("revnet", RevNetBlock, RevNetLayer, act=nn.ReLU, norm="batch")
register_scheme("resnet", BasicBlock, ResidualLayer, act=nn.ReLU, norm="batch")
