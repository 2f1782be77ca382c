"""Reversible causal transformers: the paper's schemes around attention and MLP, memory flat in depth.

A language model maps tokens (N, T) to logits (N, T, vocab): token and position embedding, a chain
of `depth` blocks on states of shape (N, T, width), a final LayerNorm and a head tied to the token
embedding. Each block has one causal self-attention A (pre-norm, `F.scaled_dot_product_attention`
with is_causal=True) and one MLP M (pre-norm):

    residual     x += A(x); x += M(x)                       the pre-norm transformer (GPT-2), baseline
    revnet       Y += A(Z); Z += M(Y)                        RevNet's coupling, Eq. (19) (Reformer's)
    hamiltonian  Y += h A(Z); Z -= h M(Y)                    Verlet step, Eq. (10), state (Y, Z)
    midpoint     Y_{j+1} = Y_{j-1} + 2h F(Y_j)                Eq. (15), state (Y_{j-1}, Y_j)
    leapfrog     Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 F(Y_j)       Eq. (17), state (Y_{j-1}, Y_j)

where F(y) = u + M(y + u), u = A(y), is the increment of one pre-norm transformer layer. The
reversible schemes are `ReversibleBlock`s made of additive couplings and run through the one
engine (`revnets.engine.reversible`): gradients equal plain autograd's, activations are rebuilt
instead of stored.

Choices, and why:
  * M is the standard MLP, W2 GELU(W1 n(y) + b1) + b2 with hidden width 4 width (`mlp="standard"`),
    in every scheme, as in the reference (Gal et al., "Reversing Large Language Models", arXiv
    2512.02056), which turns pretrained, unconstrained blocks into these schemes: every block then
    holds the weights and does the arithmetic of a standard transformer layer, and a named size
    is one model for every scheme. Attention is unconstrained in every scheme (no symmetric form).
  * `mlp="symmetric"`: M~(y) = K^T s(K n(y) + b), Eq. (7)'s symmetric layer, K: width -> 4 width,
    s = ReLU, n a LayerNorm without affine weights. Its Jacobian K^T D K P (D = diag(s') >= 0; P,
    LayerNorm's Jacobian, a scaled orthogonal projection) is similar to P^1/2 K^T D K P^1/2, so its
    eigenvalues are real and >= 0 even behind the pre-norm (an affine LayerNorm would break the
    similarity): the force of Leapfrog's Y'' = -M~(Y) restores instead of pushing away (Eq. 16),
    and Leapfrog's reversal drift in depth is smaller with it. The Hamiltonian's Eq. (9) argument
    needs both halves symmetric (the eigenvalues of [[0, A'], [-M', 0]] are imaginary when A'M' has
    real eigenvalues >= 0), which attention is not, so M~ gives the Hamiltonian no guarantee. The
    cost: M~ uses each weight twice, so at equal width it holds half the standard MLP's weights
    (a block: 8 width^2 against 12 width^2), and at equal parameters (width sqrt(3/2) larger) a
    block does 1.5x a standard block's matrix arithmetic. Why it is not the default, measured on
    text at equal parameters (docs/transformers.md): its steps took 1.5-1.65x `residual`'s against
    1.16-1.35x with the standard MLP, and it trained the Hamiltonian better but Leapfrog worse.
  * MidPoint's stability needs an antisymmetric Jacobian (Eq. 13-14), which no two-layer MLP with
    a wider hidden layer has, and Eq. (13)'s square (K - K^T) layer would hold an eighth of the
    MLP's weights: MidPoint, too, takes the standard MLP, as the reference does.
  * The two-step schemes start at rest, (Y_{-1}, Y_0) = (x, x); MidPoint's first block is a forward
    Euler step Y_1 = Y_0 + h F(Y_0) (Eq. 12), as in `revnets.blocks.MidPointBlock`. RevNet and
    Hamiltonian start from (x, x) as Reformer does. The head reads Y_N, or (Y + Z) / 2 for the
    pair schemes, so that it stays `width` wide and can be tied.
  * h = 1: the step multiplies a learned function whose output projection starts small (GPT-2's
    0.02 / sqrt(2 depth)), so training chooses the size of each step; h < 1 scales every step down.
  * Dropout is `nn.Dropout` on each branch's output (and the embedding), never attention
    dropout inside the SDPA kernel, so that the engine sees every random op it must replay.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import engine
from .blocks import Coupling, ReversibleBlock

SCHEMES = ("hamiltonian", "midpoint", "leapfrog", "revnet", "residual")
MLPS = ("standard", "symmetric")  # the blocks' MLP: M or Eq. (7)'s M~ (module docstring)


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
    weights: a Jacobian with real eigenvalues >= 0 (module docstring). (N, T, width) -> same;
    `forward(x, scale)` is scale times that, the scale on K^T (as in `Attention`)."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.k = nn.Linear(width, 4 * width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.drop(F.relu(self.k(self.norm(x))) @ (scale * self.k.weight))


class _Layer(nn.Module):
    """Attention and MLP of one block; `increment(y, scale) = scale * (u + M(y + u))`, u = A(y): one
    transformer layer's update of its input, scaled (the scale on M's output weights and on u's
    addition, so that the scaled increment costs no pass of its own)."""

    def __init__(self, width: int, heads: int, dropout: float, mlp: str):
        super().__init__()
        self.attn = Attention(width, heads, dropout)
        self.mlp = (SymmetricMLP if mlp == "symmetric" else MLP)(width, dropout)

    def increment(self, y: Tensor, scale: float = 1.0) -> Tensor:
        u = self.attn(y)
        return torch.add(self.mlp(y + u, scale), u, alpha=scale)


class ResidualBlock(_Layer):
    """Pre-norm transformer layer x + F(x) (GPT-2): not reversible, its activations are stored."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp: str = "standard"):
        super().__init__(width, heads, dropout, mlp)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.increment(x)


class RevNetLayer(ReversibleBlock, _Layer):
    """Y += A(Z), then Z += M(Y): RevNet's coupling, Eq. (19), state (Y, Z) each (N, T, width)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp: str = "standard"):
        _Layer.__init__(self, width, heads, dropout, mlp)

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self.attn), Coupling(+1, self.mlp)


class HamiltonianLayer(ReversibleBlock, _Layer):
    """Verlet step, Eq. (10): Y += h A(Z), then Z -= h M(Y). State (Y, Z) each (N, T, width)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard"):
        _Layer.__init__(self, width, heads, dropout, mlp)
        self.h = h

    def couplings(self) -> tuple[Coupling, ...]:
        return Coupling(+1, self._dy), Coupling(+1, self._dz)

    def _dy(self, z: Tensor) -> Tensor:
        return self.attn(z, self.h)

    def _dz(self, y: Tensor) -> Tensor:
        return self.mlp(y, -self.h)


class MidPointLayer(ReversibleBlock, _Layer):
    """Midpoint step, Eq. (15): Y_{j+1} = Y_{j-1} + 2h F(Y_j), F a transformer layer's increment.

    State (Y_{j-1}, Y_j) each (N, T, width). With `euler=True`, the first block: Y_1 = Y_0 + h F(Y_0)
    on the state (Y_0, Y_0) (Eq. 12).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard",
                 euler: bool = False):
        _Layer.__init__(self, width, heads, dropout, mlp)
        self.h, self.euler = h, euler

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(+1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        return self.increment(y, self.h if self.euler else 2 * self.h)


class LeapfrogLayer(ReversibleBlock, _Layer):
    """Leapfrog step of Y'' = -F(Y), Eq. (17): Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 F(Y_j), F a transformer
    layer's increment.

    State (Y_{j-1}, Y_j) each (N, T, width); the inverse is Eq. (18).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, h: float = 1.0, mlp: str = "standard"):
        _Layer.__init__(self, width, heads, dropout, mlp)
        self.h = h

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling(-1, self._update),)

    def _update(self, y: Tensor) -> Tensor:
        return torch.add(self.increment(y, -self.h**2), y, alpha=2)


def _blocks(scheme: str, width: int, heads: int, depth: int, dropout: float, h: float, mlp: str) -> nn.ModuleList:
    if scheme == "residual":
        return nn.ModuleList(ResidualBlock(width, heads, dropout, mlp) for _ in range(depth))
    if scheme == "revnet":
        return nn.ModuleList(RevNetLayer(width, heads, dropout, mlp) for _ in range(depth))
    if scheme == "midpoint":
        return nn.ModuleList(MidPointLayer(width, heads, dropout, h, mlp, euler=i == 0) for i in range(depth))
    layer = HamiltonianLayer if scheme == "hamiltonian" else LeapfrogLayer
    return nn.ModuleList(layer(width, heads, dropout, h, mlp) for _ in range(depth))


class ReversibleTransformer(nn.Module):
    """Causal language model on a chain of `depth` blocks of one scheme (module docstring).

    tokens (N, T) int64 with T <= context and ids in [0, vocab_size) -> logits (N, T, vocab_size).
    `memory_efficient=False` trains the same module (same state_dict) with plain autograd (the
    residual scheme always does). `mlp`: every block's MLP, "standard" or Eq. (7)'s "symmetric"
    (module docstring). `tied`: the head is the token embedding's weight.
    """

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, context: int,
                 scheme: str = "leapfrog", memory_efficient: bool = True, dropout: float = 0.0,
                 h: float = 1.0, mlp: str = "standard", tied: bool = True):
        super().__init__()
        _check_sizes(vocab_size, width, depth, heads, context, scheme, dropout, h, mlp)
        self.scheme, self.context, self.vocab_size = scheme, context, vocab_size
        self.memory_efficient = memory_efficient
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = _blocks(scheme, width, heads, depth, dropout, h, mlp)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init)
        for name, w in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 depth)
            if name.endswith("proj.weight") or name.endswith("k.weight"):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * depth))
        if tied:
            self.head.weight = self.tok.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def check_input(self, tokens: Tensor) -> None:
        """ValueError unless tokens is (N, T) integer with 1 <= T <= context and ids in [0, vocab_size)."""
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
                or not 1 <= tokens.shape[1] <= self.context:
            raise ValueError(f"ReversibleTransformer expects (N, T) integer tokens with 1 <= T <= context="
                             f"{self.context}; got {tuple(tokens.shape)} {tokens.dtype}")
        if not torch.compiler.is_compiling() and tokens.numel():
            low, high = tokens.min().item(), tokens.max().item()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}); got ids in "
                                 f"[{low}, {high}]")

    def chain_input(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The state (a, b) the block chain starts from, each (N, T, width) (for the residual scheme
        a is unused)."""
        self.check_input(tokens)
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        return x, x

    def forward(self, tokens: Tensor) -> Tensor:
        a, b = self.chain_input(tokens)
        if self.scheme == "residual":
            for block in self.blocks:
                b = block(b)
            x = b
        else:
            if self.memory_efficient:
                a, b = engine.reversible(self.blocks, a, b)
            else:
                a, b = engine.sequential(self.blocks, a, b)
            x = (a + b) / 2 if self.scheme in ("revnet", "hamiltonian") else b
        return self.head(self.norm(x))


def _check_sizes(vocab_size, width, depth, heads, context, scheme, dropout, h, mlp) -> None:
    for name, value in dict(vocab_size=vocab_size, width=width, depth=depth, heads=heads, context=context).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if mlp not in MLPS:
        raise ValueError(f"unknown mlp {mlp!r}; expected one of {', '.join(MLPS)}")
    if width % heads:
        raise ValueError(f"heads must divide width (each head gets width / heads channels); got width={width}, "
                         f"heads={heads}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
    if not h > 0:
        raise ValueError(f"h (the step size) must be positive; got {h}")


# Named sizes, one model for every scheme (equal parameters). "small" fits a CPU (about 1.2M
# parameters with a 90-character vocabulary).
_LM_SIZES = {"tiny": dict(width=36, depth=4, heads=2, context=64),
             "small": dict(width=128, depth=6, heads=4, context=128),
             "base": dict(width=384, depth=12, heads=6, context=256)}
LM_MODELS: dict[str, dict] = {f"{scheme}-lm-{size}": dict(dims, scheme=scheme)
                              for scheme in SCHEMES for size, dims in _LM_SIZES.items()}


def build_lm(name: str, vocab_size: int, **kw) -> ReversibleTransformer:
    """The named size of `LM_MODELS` for `vocab_size` tokens; keyword arguments override its entries."""
    if name not in LM_MODELS:
        raise ValueError(f"unknown language model {name!r}; valid names: {', '.join(LM_MODELS)}")
    return ReversibleTransformer(vocab_size, **{**LM_MODELS[name], **kw})


@torch.no_grad()
def generate(model: ReversibleTransformer, prompt: Tensor, tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Append `tokens` sampled tokens to `prompt` (N, T0): (N, T0 + tokens).

    Each step reads the last `context` tokens, divides the last logits by `temperature` and samples
    from the softmax over the `top_k` most likely tokens (all when None); temperature 0 is greedy.
    `generator` makes the samples reproducible. The model is used as it is (call `.eval()` first).
    """
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"expected tokens >= 0, temperature >= 0 and top_k >= 1 or None; got tokens={tokens}, "
                         f"temperature={temperature}, top_k={top_k}")
    out = prompt
    for _ in range(tokens):
        logits = model(out[:, -model.context:])[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        out = torch.cat((out, nxt.to(out.dtype)), dim=1)
    return out
