"""Reversible causal transformers: the paper's schemes around attention and MLP, memory flat in depth.

A language model maps tokens (N, T) to logits (N, T, vocab): token and position embedding, a chain
of `depth` layers on states of shape (N, T, width), a final LayerNorm and a head tied to the token
embedding. Each layer has one causal self-attention A (pre-norm, `F.scaled_dot_product_attention`
with is_causal=True) and one MLP M (pre-norm), and steps as its scheme says (`revnets.layers`:
resnet, the pre-norm transformer of GPT-2; revnet, Eq. 19; hamiltonian, Eq. 10; midpoint, Eq. 15;
leapfrog, Eq. 17). The reversible schemes' layers are a `ReversibleChain`: they run through the
one engine, so gradients equal plain autograd's and activations are rebuilt instead of stored,
and `segment`, `exact`, `revnets.grow`, `reversal_error` and `analysis` work on them as on images.

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
  * The two-step schemes start at rest by default (`init="rest"`), (Y_{-1}, Y_0) = (x, x), or with
    `init="fixed-point"` from Y_{-1} = x - h F_0(x), the point before x on the first layer's
    trajectory (`revnets.layers.Layer`); MidPoint's first block is a forward Euler step
    Y_1 = Y_0 + h F(Y_0) (Eq. 12) from either start, as in `revnets.blocks.MidPointBlock`. RevNet and
    Hamiltonian start from (x, x) as Reformer does. The head reads Y_N, or (Y + Z) / 2 for the
    pair schemes, so that it stays `width` wide and can be tied.
  * h = 1 (the default of every scheme with a step): the step multiplies a learned function whose
    output projection starts small (GPT-2's 0.02 / sqrt(2 depth)), so training chooses the size of
    each step; h < 1 scales every step down.
  * Dropout is `nn.Dropout` on each branch's output (and the embedding), never attention
    dropout inside the SDPA kernel, so that the engine sees every random op it must replay.
"""
import math

import torch
from torch import Tensor, nn

from .blocks import check_positive
from .networks import MemoryEfficient, ReversibleChain
from .schemes import SCHEMES, Scheme, get_scheme


def layer_settings(record: Scheme) -> list[str]:
    """The keyword settings a language model of this scheme takes besides its sizes (`scheme`: the
    same sizes as another scheme)."""
    return ["scheme"] + (["h"] if record.has_step else []) + ["mlp", "dropout", "tied"] + (
        ["segment", "exact", "init"] if record.reversible else [])


class ReversibleTransformer(MemoryEfficient, nn.Module):
    """Causal language model on a chain of `depth` layers of one scheme (module docstring).

    tokens (N, T) int64 with T <= context and ids in [0, vocab_size) -> logits (N, T, vocab_size).
    `scheme`: a registered scheme with a transformer layer (`revnets.schemes`). `memory_efficient`,
    `segment` and `exact`: how its `ReversibleChain` runs (`revnets.networks`; `memory_efficient=False`
    trains the same module, same state_dict, with plain autograd; the resnet scheme always does).
    `h`: the step of the schemes that have one (default 1). `mlp`: every layer's MLP, "standard" or
    Eq. (7)'s "symmetric" (module docstring). `tied`: the head is the token embedding's weight.
    `init`: how the chain starts, "rest" or, for a two-step scheme, "fixed-point" (`revnets.layers.Layer`).
    """

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, context: int,
                 scheme: str = "leapfrog", memory_efficient: bool = True, dropout: float = 0.0,
                 h: float | None = None, mlp: str = "standard", tied: bool = True,
                 segment: int | str | None = None, exact: bool = False, init: str = "rest"):
        super().__init__()
        record = get_scheme(scheme)
        _check_sizes(vocab_size, width, depth, heads, context, record, dropout)
        self.scheme, self.context, self.vocab_size, self.init = record.name, context, vocab_size, init
        self.layer = record.layer
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        step = record.layer_step(h)
        layers = record.layer.stack(depth, width, heads, init, dropout=dropout, mlp=mlp, **step)
        self.blocks = ReversibleChain(layers, memory_efficient, segment, exact, name="blocks") \
            if record.reversible else nn.ModuleList(layers)
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
                or tokens.dtype == torch.bool or not 1 <= tokens.shape[1] <= self.context:
            raise ValueError(f"ReversibleTransformer expects (N, T) integer tokens with 1 <= T <= context="
                             f"{self.context}; got {tuple(tokens.shape)} {tokens.dtype}")
        if not torch.compiler.is_compiling() and tokens.numel():
            low, high = tokens.min().item(), tokens.max().item()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}); got ids in "
                                 f"[{low}, {high}]")

    def chain_input(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The state (a, b) the layers start from, each (N, T, width) (the resnet scheme reads b)."""
        self.check_input(tokens)
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        return self.layer.split(x)

    def forward(self, tokens: Tensor) -> Tensor:
        a, b = self.chain_input(tokens)
        if isinstance(self.blocks, ReversibleChain):
            x = self.layer.merge(*self.blocks(a, b))
        else:
            x = b
            for layer in self.blocks:
                x = layer(x)
        return self.head(self.norm(x))


def _check_sizes(vocab_size, width, depth, heads, context, record: Scheme, dropout) -> None:
    check_positive(vocab_size=vocab_size, width=width, depth=depth, heads=heads, context=context)
    if record.layer is None:
        raise ValueError(f"scheme {record.name!r} has no transformer layer; expected one of "
                         f"{', '.join(s for s in SCHEMES if SCHEMES[s].layer is not None)}")
    if width % heads:
        raise ValueError(f"heads must divide width (each head gets width / heads channels); got width={width}, "
                         f"heads={heads}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout}")


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Append `tokens` sampled tokens to `prompt` (N, T0): (N, T0 + tokens).

    `model`: tokens (N, T) -> logits (N, T, vocab), reading at most `model.context` tokens. Each
    step reads the last `context` tokens, divides the last logits by `temperature` and samples
    from the softmax over the `top_k` most likely tokens (all when None); temperature 0 is greedy.
    `generator` makes the samples reproducible. The model is used as it is (call `.eval()` first).
    """
    if tokens < 0 or not temperature >= 0 or math.isinf(temperature) or (top_k is not None and top_k < 1):
        raise ValueError(f"expected tokens >= 0, a finite temperature >= 0 and top_k >= 1 or None; got "
                         f"tokens={tokens}, temperature={temperature}, top_k={top_k}")
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
