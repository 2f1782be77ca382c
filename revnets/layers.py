"""The schemes' transformer layers: causal self-attention A and an MLP M inside each scheme's step.

A layer acts on states of shape (N, T, width). With F(y) = u + M(y + u), u = A(y), the increment of
one pre-norm transformer layer:

    resnet       x += A(x); x += M(x)                       the pre-norm transformer (GPT-2), baseline
    revnet       Y += A(Z); Z += M(Y)                        RevNet's coupling, Eq. (19) (Reformer's)
    hamiltonian  Y += h A(Z); Z -= h M(Y)                    Verlet step, Eq. (10), state (Y, Z)
    midpoint     Y_{j+1} = Y_{j-1} + 2h F(Y_j)                Eq. (15), state (Y_{j-1}, Y_j)
    leapfrog     Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 F(Y_j)       Eq. (17), state (Y_{j-1}, Y_j)

The reversible layers are `ReversibleBlock`s made of additive couplings, so the one engine runs
them; each scheme's record (`revnets.schemes`) names its layer. Every layer class builds a chain
(`stack`), starts it from the embedding (`start`: at rest, (x, x), or for the two-step schemes from
the previous point of the first layer's trajectory, see `Layer`) and reads its output (`merge`):
Y_N, or (Y + Z) / 2 for the pair schemes. Why these choices: `revnets.transformer`.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .blocks import Coupling, Field, ReversibleBlock, check_step

MLPS = ("standard", "symmetric")  # the layers' MLP: M or Eq. (7)'s M~ (revnets.transformer)
INITS = ("rest", "fixed-point")  # how a two-step scheme's chain starts (`Layer`)


class Attention(nn.Module):
    """Causal multi-head self-attention of n(x), n a LayerNorm: (N, T, width) -> (N, T, width).

    `forward(x, scale)` returns scale * A(x) with the scale on the output projection's weights: one
    pass over (width, width) numbers instead of one over the (N, T, width) output (and its gradient).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        try:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel, no (T, T) mask tensor
        except NotImplementedError:  # forward-mode AD (analysis.growth): the fused CPU kernel has no JVP
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.drop(F.linear(y.transpose(1, 2).reshape(n, t, d), scale * self.proj.weight, scale * self.proj.bias))


class MLP(nn.Module):
    """W2 GELU(W1 n(x) + b1) + b2, hidden width 4 * width: (N, T, width) -> (N, T, width); `forward(x,
    scale)` is scale times that, the scale on W2 and b2 (as in `Attention`)."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.drop(F.linear(F.gelu(self.fc(self.norm(x))), scale * self.proj.weight, scale * self.proj.bias))


class SymmetricMLP(nn.Module):
    """K^T ReLU(K n(x) + b), Eq. (7) on tokens, K: width -> 4 * width, n a LayerNorm without affine
    weights: a Jacobian with real eigenvalues >= 0 (`revnets.transformer`). (N, T, width) -> same;
    `forward(x, scale)` is scale times that, the scale on K^T (as in `Attention`)."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.k = nn.Linear(width, 4 * width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.drop(F.relu(self.k(self.norm(x))) @ (scale * self.k.weight))


class Layer(nn.Module):
    """Attention A and MLP M of one layer, and the branches every scheme's step is written in:
    `attention(y, scale) = scale * A(y)`, `feedforward(z, scale) = scale * M(z)` and the increment
    of one transformer layer, `increment(y, scale) = scale * (u + M(y + u))`, u = A(y) (the scale on
    M's output weights and on u's addition, so that the scaled increment costs no pass of its own).
    `revnets.hf` gives a Hugging Face decoder layer the same three branches.

    How a chain starts (`chain`, `split`): from the state (x, x). A two-step scheme's state is a
    pair of trajectory points (Y_{j-1}, Y_j), so its first layer says which point came before x:
    `init="rest"`, x itself (Y'(0) = 0), or `init="fixed-point"`, Y_{-1} = x - h F_0(x), the point
    before x on the trajectory of the first layer's increment (one fixed-point step of
    p_{-1} = p_0 - h F_0(p_{-1}) from p_0, as Gal et al. retrofit a pretrained residual network).
    The first layer steps from that point without computing it: MidPoint's first step is forward
    Euler, Y_1 = x + h F_0(x) (Eq. 12), from either start (x - h F_0(x) + 2h F_0(x) = x + h F_0(x));
    Leapfrog's is Y_1 = x - h^2 F_0(x) at rest and x + (h - h^2) F_0(x) from the fixed point.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp: str = "standard"):
        super().__init__()
        if mlp not in MLPS:
            raise ValueError(f"unknown mlp {mlp!r}; expected one of {', '.join(MLPS)}")
        self.attn = Attention(width, heads, dropout)
        self.mlp = (SymmetricMLP if mlp == "symmetric" else MLP)(width, dropout)

    def attention(self, y: Tensor, scale: float = 1.0) -> Tensor:
        return self.attn(y, scale)

    def feedforward(self, z: Tensor, scale: float = 1.0) -> Tensor:
        return self.mlp(z, scale)

    def increment(self, y: Tensor, scale: float = 1.0) -> Tensor:
        u = self.attention(y)
        return torch.add(self.feedforward(y + u, scale), u, alpha=scale)

    two_step = False  # the state is two trajectory points (as `ReversibleBlock.two_step`)
    start: str | None = None  # a two-step scheme's first layer: the `init` its chain starts from

    @classmethod
    def stack(cls, depth: int, width: int, heads: int, init: str = "rest", **kw) -> list[nn.Module]:
        """The `depth` layers of a chain that starts as `init` says."""
        return cls.chain([cls(width, heads, **kw) for _ in range(depth)], init)

    @classmethod
    def chain(cls, layers: list[nn.Module], init: str = "rest") -> list[nn.Module]:
        """`layers` as a chain that starts as `init` says (the first layer of a two-step scheme knows it)."""
        valid = INITS if cls.two_step else INITS[:1]
        if init not in valid:
            raise ValueError(f"init must be one of {', '.join(valid)} for {cls.__name__} (fixed-point starts a "
                             f"two-step scheme); got {init!r}")
        if cls.two_step:
            layers[0].start = init
        return layers

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        """The state the chain starts from, each (N, T, width): (x, x)."""
        return x, x

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        """What the head reads: Y_N (two-step schemes), or (Y + Z) / 2 (pair schemes, overridden)."""
        return b


class ResidualLayer(Layer):
    """Pre-norm transformer layer x + F(x) (GPT-2): not reversible, its activations are stored."""

    def forward(self, x: Tensor) -> Tensor:
        return x + self.increment(x)


class _PairLayer(Layer, ReversibleBlock):
    """A layer on the state (Y, Z), each (N, T, width); the head reads their mean."""

    @staticmethod
    def merge(a: Tensor, b: Tensor) -> Tensor:
        return (a + b) / 2


class RevNetLayer(_PairLayer):
    """Y += A(Z), then Z += M(Y): RevNet's coupling, Eq. (19), state (Y, Z) each (N, T, width)."""

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self.attention), Coupling(+1, self.feedforward)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (19), x = (Y, Z) along the last axis: F = (A(Z), M(Y))."""
        def field(x: Tensor) -> Tensor:
            y, z = x.chunk(2, dim=-1)
            return torch.cat((self.attention(z), self.feedforward(y)), dim=-1)
        return field, torch.cat((a, b), dim=-1)


class HamiltonianLayer(_PairLayer):
    """Verlet step, Eq. (10): Y += h A(Z), then Z -= h M(Y). State (Y, Z) each (N, T, width)."""

    stability_bound = 2.0

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard"):
        super().__init__(width, heads, dropout, mlp)
        self.h = check_step(h)

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self._dy), Coupling(+1, self._dz)

    def _dy(self, z: Tensor) -> Tensor:
        return self.attention(z, self.h)

    def _dz(self, y: Tensor) -> Tensor:
        return self.feedforward(y, -self.h)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (8) with A and M for the two layers, x = (Y, Z) along the last axis: F = (A(Z), -M(Y))."""
        def field(x: Tensor) -> Tensor:
            y, z = x.chunk(2, dim=-1)
            return torch.cat((self.attention(z), self.feedforward(y, -1.0)), dim=-1)
        return field, torch.cat((a, b), dim=-1)


class MidPointLayer(Layer, ReversibleBlock):
    """Midpoint step, Eq. (15): Y_{j+1} = Y_{j-1} + 2h F(Y_j), F a transformer layer's increment.

    State (Y_{j-1}, Y_j) each (N, T, width). The first layer of a chain (`start` set) is the forward
    Euler step Y_1 = Y_0 + h F(Y_0) on the state (Y_0, Y_0) (Eq. 12; `Layer`).
    """

    stability_bound = 1.0
    two_step = True

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard"):
        super().__init__(width, heads, dropout, mlp)
        self.h = check_step(h)

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(+1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        return self.increment(y, self.h if self.start else 2 * self.h)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (13) with F the layer's increment, x = Y_j: F(Y)."""
        return self.increment, b


class LeapfrogLayer(Layer, ReversibleBlock):
    """Leapfrog step of Y'' = -F(Y), Eq. (17): Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 F(Y_j), F a transformer
    layer's increment.

    State (Y_{j-1}, Y_j) each (N, T, width); the inverse is Eq. (18). The first layer of a chain
    started from the fixed point (`start == "fixed-point"`) steps from Y_{-1} = Y_0 - h F(Y_0) on the
    state (Y_0, Y_0): Y_1 = Y_0 + (h - h^2) F(Y_0) (`Layer`).
    """

    stability_bound = 2.0
    two_step = True

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard"):
        super().__init__(width, heads, dropout, mlp)
        self.h = check_step(h)

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(-1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        scale = self.h - self.h**2 if self.start == "fixed-point" else -self.h**2
        return torch.add(self.increment(y, scale), y, alpha=2)

    def vector_field(self, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
        """Eq. (16) as a first-order system, x = (Y, V = Y') along the last axis: F = (V, -F(Y)), the
        velocity the discrete one, (Y_j - Y_{j-1}) / h."""
        def field(x: Tensor) -> Tensor:
            y, v = x.chunk(2, dim=-1)
            return torch.cat((v, self.increment(y, -1.0)), dim=-1)
        return field, torch.cat((b, (b - a) / self.h), dim=-1)
