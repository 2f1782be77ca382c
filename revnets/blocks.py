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

Each scheme also says how a unit starts (`entry`: the unit's first block, which may widen the
state by zero padding, Section 4), how a feature map becomes its pair of states (`split`) and
back (`merge`). ResNet's basic block (He et al. 2016) is the non-reversible baseline.
"""
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Callable[[int], nn.Module] | None
Act = Callable[[], nn.Module]


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
    """A block (a, b) -> (a', b') made of additive couplings, with an exact inverse."""

    def couplings(self) -> tuple[Coupling, ...]:
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        for coupling in self.couplings():
            a, b = coupling(a, b)
        return a, b

    def inverse(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        for coupling in reversed(self.couplings()):
            a, b = coupling.invert(a, b)
        return a, b

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        """Equal channel-wise partition into (Y, Z) (Section 3)."""
        return x.chunk(2, dim=1)

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        return torch.cat((a, b), dim=1)


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def pad_channels(x: Tensor, channels: int) -> Tensor:
    """Zero-pad (N, C, H, W) to (N, channels, H, W): the paper's way to widen a unit."""
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


def _check_even(channels: int, name: str) -> None:
    if channels % 2:
        raise ValueError(f"{name} splits its channels into two equal halves (Y, Z); got odd channels={channels}")


class SymmetricLayer(nn.Module):
    """u -> scale * K^T s(N(K u + b)), the two-layer residual function of Eq. (7).

    K is a 3x3 convolution C -> C and K^T the transposed convolution with the same weight, so the
    Jacobian K^T diag(s') K is symmetric positive semi-definite. (N, C, H, W) -> (N, C, H, W).
    The step's scale (h, -h or -h^2) multiplies K^T's weight: no extra pass over the activations.
    """

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = None):
        super().__init__()
        self.conv = conv3x3(channels, channels, bias=norm is None)
        self.norm = norm(channels) if norm else nn.Identity()
        self.act = act()

    def forward(self, u: Tensor, scale: float = 1.0) -> Tensor:
        return F.conv_transpose2d(self.act(self.norm(self.conv(u))), scale * self.conv.weight, padding=1)


class AntisymmetricLayer(nn.Module):
    """u -> s(N((K - K^T) u + b)), Eq. (13), with Jacobian diag(s') (K - K^T) of Eq. (14).

    For a 3x3 convolution with padding 1, K^T is the convolution whose weight swaps the in and out
    channels and flips the kernel, so K - K^T is one convolution with an antisymmetric weight.
    """

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = None):
        super().__init__()
        self.conv = conv3x3(channels, channels, bias=norm is None)
        self.norm = norm(channels) if norm else nn.Identity()
        self.act = act()

    def forward(self, u: Tensor) -> Tensor:
        w = self.conv.weight
        antisymmetric = w - w.transpose(0, 1).flip(2, 3)
        return self.act(self.norm(F.conv2d(u, antisymmetric, self.conv.bias, padding=1)))


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

    State (Y, Z), each (N, C/2, H, W). Symplectic; the Jacobian (9) has imaginary eigenvalues.
    """

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None):
        super().__init__()
        _check_even(channels, "HamiltonianBlock")
        self.h = h
        self.k1 = SymmetricLayer(channels // 2, act, norm)
        self.k2 = SymmetricLayer(channels // 2, act, norm)

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self._dy), Coupling(+1, self._dz)

    def _dy(self, z: Tensor) -> Tensor:
        return self.k1(z, self.h)

    def _dz(self, y: Tensor) -> Tensor:
        return self.k2(y, -self.h)

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        return Widen(cls(c_in, **kw), c_out // 2)


class MidPointBlock(ReversibleBlock):
    """Midpoint step with an antisymmetric operator, Eq. (15):

        Y_{j+1} = Y_{j-1} + 2h s((K_j - K_j^T) Y_j + b_j)

    State (Y_{j-1}, Y_j), each (N, C, H, W). With `euler=True` it is the first step of a unit, the
    forward Euler step Y_1 = Y_0 + h s((K - K^T) Y_0 + b) of Eq. (12) on the state (Y_0, Y_0).
    (Eq. (15) prints the j = 0 case without Y_0; the text says forward Euler, which we follow.)
    """

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None,
                 euler: bool = False):
        super().__init__()
        self.h, self.euler = h, euler
        self.f = AntisymmetricLayer(channels, act, norm)

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


class LeapfrogBlock(ReversibleBlock):
    """Leapfrog step of Y'' = -K^T s(K Y + b), Eq. (16)-(17):

        Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T s(K_j Y_j + b_j)

    State (Y_{j-1}, Y_j), each (N, C, H, W); the inverse is Eq. (18). A unit starts from the state
    (0, Y_0), which gives the paper's first step Y_1 = 2 Y_0 - h^2 K_0^T s(K_0 Y_0 + b_0).
    """

    def __init__(self, channels: int, h: float = 0.1, act: Act = nn.ReLU, norm: Norm = None):
        super().__init__()
        self.h = h
        self.f = SymmetricLayer(channels, act, norm)

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


def residual_function(c_in: int, c_out: int, act: Act = nn.ReLU, norm: Norm = nn.BatchNorm2d) -> nn.Sequential:
    """N-s-conv3x3-N-s-conv3x3 (C_in -> C_out), RevNet's pre-activation residual function."""
    norm = norm or (lambda c: nn.Identity())
    return nn.Sequential(norm(c_in), act(), conv3x3(c_in, c_out), norm(c_out), act(), conv3x3(c_out, c_out))


class RevNetBlock(AdditiveCoupling):
    """RevNet block: `AdditiveCoupling` with unconstrained residual functions F, G on C/2 channels."""

    def __init__(self, channels: int, act: Act = nn.ReLU, norm: Norm = nn.BatchNorm2d):
        _check_even(channels, "RevNetBlock")
        super().__init__(residual_function(channels // 2, channels // 2, act, norm),
                         residual_function(channels // 2, channels // 2, act, norm))

    @classmethod
    def entry(cls, c_in: int, c_out: int, **kw) -> nn.Module:
        return RevNetEntry(c_in, c_out, **kw)


class RevNetEntry(nn.Module):
    """RevNet's widening block (Gomez et al. 2017): Y' = pad(Y) + F(Z), Z' = pad(Z) + G(Y'),
    with F mapping C_in/2 -> C_out/2 channels. Not invertible; a unit keeps its activations."""

    def __init__(self, c_in: int, c_out: int, act: Act = nn.ReLU, norm: Norm = nn.BatchNorm2d):
        super().__init__()
        _check_even(c_in, "RevNetEntry")
        _check_even(c_out, "RevNetEntry")
        self.c_out = c_out
        self.f = residual_function(c_in // 2, c_out // 2, act, norm)
        self.g = residual_function(c_out // 2, c_out // 2, act, norm)

    def forward(self, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        y = pad_channels(y, self.c_out // 2) + self.f(z)
        z = pad_channels(z, self.c_out // 2) + self.g(y)
        return y, z


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): s(x' + N(conv(s(N(conv(x)))))), Eq. (1).

    With stride 2 the first convolution halves the resolution and maps C_in -> C_out channels, and
    the shortcut x' is average pooling plus zero padding (the parameter-free shortcut 'A').
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, act: Act = nn.ReLU,
                 norm: Norm = nn.BatchNorm2d):
        super().__init__()
        norm = norm or (lambda c: nn.Identity())
        self.c_out, self.stride = c_out, stride
        self.conv1, self.norm1 = conv3x3(c_in, c_out, stride), norm(c_out)
        self.conv2, self.norm2 = conv3x3(c_out, c_out), norm(c_out)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = pad_channels(F.avg_pool2d(x, self.stride) if self.stride > 1 else x, self.c_out)
        out = self.act(self.norm1(self.conv1(x)))
        return self.act(shortcut + self.norm2(self.conv2(out)))
