"""The residual steps of the paper, each an exactly invertible block on a pair of states.

Every reversible scheme is a chain of additive couplings

    (a, b) -> (b, sign * a + update(b)),   sign = +1 or -1,

whose exact inverse is (b, c) -> (sign * (c - update(b)), b):

    Hamiltonian, Eq. (10), state (Y, Z):        Y += h K1^T s(K1 Z + b1), then Z -= h K2^T s(K2 Y + b2)
    RevNet, Eq. (19), state (Y, Z):             Y += F(Z), then Z += G(Y)
    MidPoint, Eq. (15), state (Y_{j-1}, Y_j):   Y_{j+1} = Y_{j-1} + 2h s((K - K^T) Y_j + b)
    Leapfrog, Eq. (17), state (Y_{j-1}, Y_j):   Y_{j+1} = -Y_{j-1} + 2 Y_j - h^2 K^T s(K Y_j + b)

A block lists its couplings; `forward` and `inverse` follow from them, and the memory-efficient
engine (`revnets.reversible`) back-propagates through them one coupling at a time.

"In principle, any linear operator can be used within the Hamiltonian framework" (Section 3): K is
a `Linear` on dense features (N, C) (`dim=0`) or a 3^dim convolution on (N, C, *spatial) with
`dim` = 1, 2 or 3, and K^T is its true adjoint, <K x, y> = <x, K^T y>: the transposed matrix, or
the transposed convolution with the same weight. One class per scheme serves every `dim`.

What the rest of the library asks of a scheme is declared on its block class, with defaults on
`ReversibleBlock` for a state split into equal channel halves (Y, Z): how a unit starts (`entry`:
the unit's first block, which may widen the state by zero padding, Section 4), how a feature map
becomes its pair of states (`split`) and back (`merge`), the ODE the block steps
(`vector_field`, for `revnets.analysis`), its `stability_bound` and whether it is a `two_step`
scheme (for `revnets.grow`). ResNet's basic block (He et al. 2016) is the non-reversible baseline.
"""
import math
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Callable[[int], nn.Module] | str | None
Act = Callable[[], nn.Module]
Field = Callable[[Tensor], Tensor]

DIMS = (0, 1, 2, 3)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_BATCH_NORM = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Coupling(NamedTuple):
    """One additive coupling (a, b) -> (b, sign * a + update(b)).

    `step` and `unstep` are its sign arithmetic, written once: the float engine, the fixed-point
    engine (on int64 increments) and the blocks all call them.
    """

    sign: int
    update: Callable[[Tensor], Tensor]

    def step(self, a: Tensor, u: Tensor) -> Tensor:
        """c = sign * a + u."""
        return a + u if self.sign > 0 else u - a

    def unstep(self, c: Tensor, u: Tensor) -> Tensor:
        """a = sign * (c - u), the inverse of `step`."""
        return c - u if self.sign > 0 else u - c

    def __call__(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return b, self.step(a, self.update(b))

    def invert(self, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return self.unstep(c, self.update(b)), b


class ReversibleBlock(nn.Module):
    """A block (a, b) -> (a', b') made of additive couplings, with an exact inverse.

    A subclass defines `__init__(channels, ..., dim=2)` and `couplings()`; everything else has a
    default for the state (Y, Z), each C/2 channels. Blocks are built as block(channels, dim=dim, **kw),
    `kw` the scheme's defaults and overrides (`register_scheme` refuses a class without `dim`).
    """

    stability_bound: ClassVar[float | None] = None  # largest stable h |lambda| (analysis.check_step_size)
    two_step: ClassVar[bool] = False  # state (Y_{j-1}, Y_j): two points of a trajectory (multilevel.grow)

    def couplings(self) -> tuple[Coupling, ...]:
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor, before: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
        """The couplings in order, calling `before(i)` ahead of coupling i if given (the engine replays
        random numbers with it, through the block's own call, where FSDP gathers its parameters)."""
        for i, coupling in enumerate(self.couplings()):
            if before is not None:
                before(i)
            a, b = coupling(a, b)
        return a, b

    def inverse(self, a: Tensor, b: Tensor, before: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
        """The exact inverse: the couplings' inverses from the last, `before(i)` ahead of coupling i."""
        couplings = self.couplings()
        for i in reversed(range(len(couplings))):
            if before is not None:
                before(i)
            a, b = couplings[i].invert(a, b)
        return a, b

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        """The first block of a unit: one block at C_in channels, then each state zero-padded to C_out / 2."""
        return Widen(cls(c_in, **kw), c_out // 2)

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        """Equal channel-wise partition into (Y, Z) (Section 3)."""
        return x.chunk(2, dim=1)

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        return torch.cat((a, b), dim=1)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """The right-hand side F of the block's ODE x' = F(x) and the point x of the input (a, b)."""
        raise ValueError(f"{type(self).__name__} declares no vector field: define "
                         "vector_field(a, b) -> (F, x) for its Jacobian spectrum")


def operator(c_in: int, c_out: int, dim: int = 2, bias: bool = True, stride: int = 1) -> nn.Module:
    """K: a `Linear` C_in -> C_out for dim 0, else a 3^dim convolution with padding 1."""
    check_dim(dim)
    if dim == 0:
        return nn.Linear(c_in, c_out, bias=bias)
    return _CONV[dim](c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def adjoint(v: Tensor, weight: Tensor, dim: int) -> Tensor:
    """K^T v for the operator K with this `weight` (bias excluded): <K x, v> = <x, K^T v>."""
    return F.linear(v, weight.t()) if dim == 0 else _CONV_T[dim](v, weight, padding=1)


def apply(u: Tensor, weight: Tensor, bias: Tensor | None, dim: int) -> Tensor:
    """K u + b for an operator of this shape (the weight may be a transformed copy of K's)."""
    return F.linear(u, weight, bias) if dim == 0 else _CONV_F[dim](u, weight, bias, padding=1)


def transposed_weight(weight: Tensor, dim: int) -> Tensor:
    """The weight of K^T as an operator of K's kind: swap in and out channels, flip the kernel."""
    return weight.transpose(0, 1).flip(tuple(range(2, 2 + dim)))


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return operator(c_in, c_out, 2, bias, stride)


def make_norm(norm: Norm, channels: int, dim: int = 2) -> nn.Module:
    """The normalisation: None (identity), "batch" (BatchNorm of the operator's `dim`) or a factory C -> module."""
    if norm is None:
        return nn.Identity()
    if isinstance(norm, str):
        if norm != "batch":
            raise ValueError(f"norm must be None, 'batch' or a callable channels -> module; got {norm!r}")
        return _BATCH_NORM[dim](channels)
    return norm(channels)


def pad_channels(x: Tensor, channels: int) -> Tensor:
    """Zero-pad (N, C, *spatial) to (N, channels, *spatial): the paper's way to widen a unit."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, channels - x.shape[1]))


def _check_even(channels: int, name: str) -> None:
    if channels % 2:
        raise ValueError(f"{name} splits its channels into two equal halves (Y, Z); got odd channels={channels}")


H_MAX = math.sqrt(torch.finfo(torch.float32).max)  # Leapfrog steps with h^2, a float32 number


def check_step(h: float) -> float:
    """h if it is a step size: a finite number > 0 (0 would be the identity) whose square float32
    holds (h < H_MAX, 1.8e19); ValueError otherwise."""
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not (math.isfinite(h) and h > 0):
        raise ValueError(f"h (the step size) must be a finite number > 0; got {h!r}")
    if h >= H_MAX:
        raise ValueError(f"h (the step size) must be below {H_MAX:.3g}, where h^2 overflows float32; got {h!r}")
    return h


def check_positive(**sizes: int) -> None:
    """ValueError naming the first of the keyword `sizes` (channels, depth, num_classes, ...) that
    is not an integer >= 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_dim(dim: int) -> None:
    if dim not in DIMS:
        raise ValueError(f"dim must be 0 (dense), 1, 2 or 3 (convolution over that many spatial axes); got {dim!r}")


class SymmetricLayer(nn.Module):
    """u -> scale * K^T s(N(K u + b)), the two-layer residual function of Eq. (7).

    K is `operator(C, C, dim)` and K^T its adjoint with the same weight, so the Jacobian
    K^T diag(s') K is symmetric positive semi-definite. (N, C, *spatial) -> (N, C, *spatial).
    The step's scale (h, -h or -h^2) multiplies K^T's weight: no extra pass over the activations.
    """

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = None, dim: int = 2):
        super().__init__()
        self.dim = dim
        self.conv = operator(channels, channels, dim, bias=norm is None)
        self.norm = make_norm(norm, channels, dim)
        self.act = act()

    def forward(self, u: Tensor, scale: float = 1.0) -> Tensor:
        return adjoint(self.act(self.norm(self.conv(u))), scale * self.conv.weight, self.dim)


class AntisymmetricLayer(nn.Module):
    """u -> s(N((K - K^T) u + b)), Eq. (13), with Jacobian diag(s') (K - K^T) of Eq. (14).

    K^T is an operator of K's own kind (`transposed_weight`): for a convolution with padding 1 the
    one that swaps in and out channels and flips the kernel. So K - K^T is one operator with an
    antisymmetric weight.
    """

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = None, dim: int = 2):
        super().__init__()
        self.dim = dim
        self.conv = operator(channels, channels, dim, bias=norm is None)
        self.norm = make_norm(norm, channels, dim)
        self.act = act()

    def forward(self, u: Tensor) -> Tensor:
        w = self.conv.weight
        antisymmetric = w - transposed_weight(w, self.dim)
        return self.act(self.norm(apply(u, antisymmetric, self.conv.bias, self.dim)))


class Widen(nn.Module):
    """Run a block, then zero-pad both states to `channels` (the first block of a unit)."""

    def __init__(self, block: nn.Module, channels: int):
        super().__init__()
        self.block, self.channels = block, channels

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.block(a, b)
        return pad_channels(a, self.channels), pad_channels(b, self.channels)


class HamiltonianBlock(ReversibleBlock):
    """Verlet step of the two-layer Hamiltonian system (7), Eq. (10):

        Y_{j+1} = Y_j + h K1^T s(K1 Z_j + b1)
        Z_{j+1} = Z_j - h K2^T s(K2 Y_{j+1} + b2)

    State (Y, Z), each (N, C/2, *spatial). Symplectic; the Jacobian (9) has imaginary eigenvalues.
    Verlet on a second-order system is stable for h |lambda| < 2 (Eq. 21 with alpha beta = -(h omega)^2).
    """

    stability_bound = 2.0

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None, dim: int = 2):
        super().__init__()
        _check_even(channels, "HamiltonianBlock")
        self.h = check_step(h)
        self.k1 = SymmetricLayer(channels // 2, act, norm, dim)
        self.k2 = SymmetricLayer(channels // 2, act, norm, dim)

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self._dy), Coupling(+1, self._dz)

    def _dy(self, z: Tensor) -> Tensor:
        return self.k1(z, self.h)

    def _dz(self, y: Tensor) -> Tensor:
        return self.k2(y, -self.h)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (7)-(8), x = (Y, Z): F = (K1^T s(K1 Z + b1), -K2^T s(K2 Y + b2))."""
        def field(x: Tensor) -> Tensor:
            y, z = x.chunk(2, dim=1)
            return torch.cat((self.k1(z, 1.0), self.k2(y, -1.0)), dim=1)
        return field, torch.cat((a, b), dim=1)


class MidPointBlock(ReversibleBlock):
    """Midpoint step with an antisymmetric operator, Eq. (15):

        Y_{j+1} = Y_{j-1} + 2h s((K_j - K_j^T) Y_j + b_j)

    State (Y_{j-1}, Y_j), each (N, C, *spatial). With `euler=True` it is the first step of a unit,
    the forward Euler step Y_1 = Y_0 + h s((K - K^T) Y_0 + b) of Eq. (12) on the state (Y_0, Y_0).
    (Eq. (15) prints the j = 0 case without Y_0; the text says forward Euler, as here.)
    The midpoint rule on imaginary eigenvalues has roots xi = i h omega +- sqrt(1 - (h omega)^2):
    stable for h |lambda| < 1.
    """

    stability_bound = 1.0
    two_step = True

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None,
                 euler: bool = False, dim: int = 2):
        super().__init__()
        self.h, self.euler = check_step(h), euler
        self.f = AntisymmetricLayer(channels, act, norm, dim)

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(+1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        return (self.h if self.euler else 2 * self.h) * self.f(y)

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        return Widen(cls(c_in, euler=True, **kw), c_out)

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        return b

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (13), x = Y_j: F = s((K - K^T) Y + b), Jacobian (14)."""
        return self.f, b


class LeapfrogBlock(ReversibleBlock):
    """Leapfrog step of Y'' = -K^T s(K Y + b), Eq. (16)-(17):

        Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T s(K_j Y_j + b_j)

    State (Y_{j-1}, Y_j), each (N, C, *spatial); the inverse is Eq. (18). A unit starts from the
    state (0, Y_0), which gives the paper's first step Y_1 = 2 Y_0 - h^2 K_0^T s(K_0 Y_0 + b_0).
    Stable for h |lambda| < 2, as Verlet.
    """

    stability_bound = 2.0
    two_step = True

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None, dim: int = 2):
        super().__init__()
        self.h = check_step(h)
        self.f = SymmetricLayer(channels, act, norm, dim)

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(-1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        return torch.add(self.f(y, -self.h**2), y, alpha=2)

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        return Widen(cls(c_in, **kw), c_out)

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), x

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        return b

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (16) as a first-order system, x = (Y, V = Y'): F = (V, -K^T s(K Y + b)).

        The velocity is the discrete one, (Y_j - Y_{j-1}) / h; J does not depend on it.
        """
        def field(x: Tensor) -> Tensor:
            y, v = x.chunk(2, dim=1)
            return torch.cat((v, self.f(y, -1.0)), dim=1)
        return field, torch.cat((b, (b - a) / self.h), dim=1)


class AdditiveCoupling(ReversibleBlock):
    """RevNet's coupling (Gomez et al. 2017), Eq. (19): Y_{j+1} = Y_j + F(Z_j), Z_{j+1} = Z_j + G(Y_{j+1}).

    F and G are any modules mapping a state to a tensor of its shape: this is how to make your own
    residual functions reversible.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self.f), Coupling(+1, self.g)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (19) with h = 1 folded into F and G, x = (Y, Z): F = (F(Z), G(Y))."""
        def field(x: Tensor) -> Tensor:
            y, z = x.chunk(2, dim=1)
            return torch.cat((self.f(z), self.g(y)), dim=1)
        return field, torch.cat((a, b), dim=1)


def residual_function(c_in: int, c_out: int, act: Act = nn.ReLU, norm: Norm = "batch", dim: int = 2) -> nn.Sequential:
    """N-s-K-N-s-K (C_in -> C_out, K = `operator(..., dim)`), RevNet's pre-activation residual function."""
    return nn.Sequential(make_norm(norm, c_in, dim), act(), operator(c_in, c_out, dim, bias=False),
                         make_norm(norm, c_out, dim), act(), operator(c_out, c_out, dim, bias=False))


class RevNetBlock(AdditiveCoupling):
    """RevNet block: `AdditiveCoupling` with unconstrained residual functions F, G on C/2 channels."""

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = "batch", dim: int = 2):
        _check_even(channels, "RevNetBlock")
        super().__init__(residual_function(channels // 2, channels // 2, act, norm, dim),
                         residual_function(channels // 2, channels // 2, act, norm, dim))

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        return RevNetEntry(c_in, c_out, **kw)


class RevNetEntry(nn.Module):
    """RevNet's widening block (Gomez et al. 2017): Y' = pad(Y) + F(Z), Z' = pad(Z) + G(Y'),
    with F mapping C_in/2 -> C_out/2 channels. Not invertible; a unit keeps its activations."""

    def __init__(self, c_in: int, c_out: int, act: Act = nn.ReLU, norm: Norm = "batch", dim: int = 2):
        super().__init__()
        _check_even(c_in, "RevNetEntry")
        _check_even(c_out, "RevNetEntry")
        self.c_out = c_out
        self.f = residual_function(c_in // 2, c_out // 2, act, norm, dim)
        self.g = residual_function(c_out // 2, c_out // 2, act, norm, dim)

    def forward(self, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        y = pad_channels(y, self.c_out // 2) + self.f(z)
        z = pad_channels(z, self.c_out // 2) + self.g(y)
        return y, z


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): s(x' + N(conv(s(N(conv(x)))))), Eq. (1).

    With stride 2 the first convolution halves the resolution and maps C_in -> C_out channels, and
    the shortcut x' is average pooling plus zero padding (the parameter-free shortcut 'A').
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, act: Act = nn.ReLU, norm: Norm = "batch"):
        super().__init__()
        self.c_out, self.stride = c_out, stride
        self.conv1, self.norm1 = conv3x3(c_in, c_out, stride), make_norm(norm, c_out)
        self.conv2, self.norm2 = conv3x3(c_out, c_out), make_norm(norm, c_out)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = pad_channels(F.avg_pool2d(x, self.stride) if self.stride > 1 else x, self.c_out)
        out = self.act(self.norm1(self.conv1(x)))
        return self.act(shortcut + self.norm2(self.conv2(out)))
