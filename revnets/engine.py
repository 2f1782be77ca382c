"""One memory-efficient engine for every reversible scheme.

`reversible(blocks, a, b)` runs a chain of `ReversibleBlock`s without keeping any activation but
the chain's input and output. The backward walks the couplings (a, b) -> (b, s a + u(b)) in
reverse: knowing a coupling's output (b, c), it evaluates u(b) once with grad enabled, which gives
both the coupling's input a = s (c - u(b)) and the graph to back-propagate through:

    dL/da = s dL/dc,    dL/db = dL/db' + (du/db)^T dL/dc,    dL/dθ = (du/dθ)^T dL/dc.

So each residual function runs once forward and once more in the backward: the cost floor of
recomputation (about 4/3 of a plain training step).

Correctness details other libraries miss:
  * the backward replays the forward's autocast state, so bf16/fp16 recomputation is identical;
  * BatchNorm running statistics are updated by the forward only, never by the recomputation;
  * the chain's exact input is kept and used for the first coupling, so a zero-padded input
    (ReLU at its kink) gets the same derivative as plain autograd;
  * parameter gradients are returned through the autograd.Function (computed with
    `torch.autograd.grad`), so DistributedDataParallel sees each parameter ready exactly once.

Segment storage bounds the drift of floating-point reversal. With `segment=k` the engine keeps
the exact state every k blocks and reverses only inside a segment, so the rounding of at most k
blocks is carried back: memory ceil(N / k) + 1 states instead of 2 (k = 1: every block's input,
no rebuilt state is ever used). `choose_segment` picks the largest k whose measured reversal
error on the current batch stays under a tolerance, and `AutoSegment` does it periodically
during training (a unit's `segment="auto"`).
"""
import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .blocks import ReversibleBlock

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def sequential(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Plain autograd through the chain: keeps every activation."""
    for block in blocks:
        a, b = block(a, b)
    return a, b


def invert(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Rebuild the chain's input from its output with the blocks' exact inverses."""
    for block in reversed(blocks):
        a, b = block.inverse(a, b)
    return a, b


def reversible(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               segment: int | float | None = None) -> tuple[Tensor, Tensor]:
    """Run `blocks` on the state (a, b), back-propagating by exact inversion.

    `segment`: None or math.inf reverses the whole chain (memory O(1) in depth); an integer k >= 1
    keeps the state every k blocks and reverses only within those segments (memory O(N / k)).
    Gives the same values and gradients as `sequential` up to reversal drift; every block must
    be deterministic.
    """
    k = _segment_length(segment, len(blocks))
    for start in range(0, len(blocks), k):
        a, b = _reversible_segment(blocks[start:start + k], a, b)
    return a, b


def _reversible_segment(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    params, layout = _parameters(blocks)
    if not blocks or not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or params)):
        return sequential(blocks, a, b)
    _check_deterministic(blocks)
    return _Reversible.apply(tuple(blocks), layout, a, b, *params)


def _segment_length(segment: int | float | None, n: int) -> int:
    if segment is None or segment == math.inf:
        return max(n, 1)
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be None, math.inf or an integer >= 1 (blocks per stored state); "
                         f"got {segment!r}")
    return segment


@torch.no_grad()
def segment_error(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
                  segment: int | float | None = None) -> float:
    """The worst relative error ||rebuilt - stored|| / ||stored|| of a segment's input state, rebuilt
    by inverting the segment from its stored output, over the segments of `reversible(...,
    segment)` on the state (a, b). NaN counts as infinity. BatchNorm running statistics untouched."""
    k = _segment_length(segment, len(blocks))
    worst = 0.0
    with _frozen_running_stats(blocks):
        for start in range(0, len(blocks), k):
            chunk = blocks[start:start + k]
            out = sequential(chunk, a, b)
            error = relative_error(invert(chunk, *out), (a, b))
            worst = max(worst, math.inf if math.isnan(error) else error)
            a, b = out
    return worst


class SegmentChoice(NamedTuple):
    """k: blocks per stored state (None: pure reversal); error: its `segment_error`;
    stored_bytes: memory of the states kept for the backward, ceil(N / k) + 1 of them."""

    k: int | None
    error: float
    stored_bytes: int


def choose_segment(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor, tol: float = 1e-5) -> SegmentChoice:
    """The largest segment length whose reversal error on the state (a, b) stays <= `tol`.

    Tries pure reversal, then powers of two below N from the largest down (each one forward and one
    inversion of the chain); falls back to k = 1, whose backward uses no rebuilt state (error 0).

    The reversal error is a proxy for the gradient error, which it bounds only up to a
    model-dependent factor (benchmarks/drift.py, float32, one unit of 400 blocks: RevNet's
    gradient error was 4.7e-2 at a drift of 1.9e-4 but 5.4e-6 at 8.7e-6, near float32 plain
    autograd's 3.5e-6); hence the small default tolerance, 1e-5.
    """
    n, state_bytes = len(blocks), a.nbytes + b.nbytes
    for k in (None, *(2 ** i for i in reversed(range(1, max(n - 1, 1).bit_length())))):
        error = segment_error(blocks, a, b, k)
        if error <= tol:
            return SegmentChoice(k, error, (math.ceil(n / (k or max(n, 1))) + 1) * state_bytes)
    return SegmentChoice(1, 0.0, (n + 1) * state_bytes)


class AutoSegment:
    """Segment length chosen from the measured drift: `choose_segment` on the current batch at the
    first call and every `every` calls made with grad enabled; the last `choice` is reused between.

    Costs one forward and one inversion of the chain per measurement (more for unstable chains).
    """

    def __init__(self, tol: float = 1e-5, every: int = 50):
        self.tol, self.every, self.calls, self.choice = tol, every, 0, None

    def __call__(self, blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> int | None:
        if torch.is_grad_enabled():
            if self.calls % self.every == 0:
                self.choice = choose_segment(blocks, a, b, self.tol)
            self.calls += 1
        return self.choice.k if self.choice else None


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, layout, a, b, *params):
        ctx.blocks, ctx.layout, ctx.params = blocks, layout, params
        ctx.autocast = _autocast_state(a.device.type)
        x, y = sequential(blocks, a, b)
        ctx.save_for_backward(a, b, x, y)
        return x, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x, grad_y):
        a0, b0, p, q = ctx.saved_tensors
        grads = [None] * len(ctx.params)
        steps = _steps(ctx.blocks, ctx.layout)
        with torch.autocast(**ctx.autocast), _frozen_running_stats(ctx.blocks):
            for k in reversed(range(len(steps))):
                coupling, ix = steps[k]
                b = (b0 if k == 0 else p).detach().requires_grad_()  # the first input is kept exactly
                u, grad_x, grad_y = _coupling_backward(coupling, b, ctx.params, ix, grads, grad_x, grad_y)
                if k > 0:
                    p, q = (q - u if coupling.sign > 0 else u - q), b.detach()
        return None, None, grad_x, grad_y, *grads


def _steps(blocks: Sequence[ReversibleBlock], layout: tuple[tuple[int, ...], ...]) -> list:
    """The chain's couplings in order, each with the parameter indices of its block."""
    return [(c, ix) for block, ix in zip(blocks, layout) for c in block.couplings()]


def _coupling_backward(coupling, b: Tensor, params, ix, grads: list, grad_x: Tensor, grad_y: Tensor):
    """Back-propagate through one coupling (a, b) -> (x, y) = (b, s a + u(b)) at its input b (a leaf
    that requires grad): returns u(b) and (dL/da, dL/db) from (dL/dx, dL/dy) and adds
    dL/dθ = (du/dθ)^T dL/dy into `grads`."""
    with torch.enable_grad():
        u = coupling.update(b)
    grad_b, *grad_w = torch.autograd.grad(u, (b, *(params[i] for i in ix)), grad_y, allow_unused=True)
    for i, g in zip(ix, grad_w):
        if g is not None:
            grads[i] = g if grads[i] is None else grads[i] + g
    return u.detach(), (grad_y if coupling.sign > 0 else -grad_y), _add(grad_x, grad_b)


def _parameters(blocks: Sequence[nn.Module]) -> tuple[list[nn.Parameter], tuple[tuple[int, ...], ...]]:
    """The chain's distinct trainable parameters, and for each block the indices of its own."""
    index: dict[int, int] = {}
    params, layout = [], []
    for block in blocks:
        ix = []
        for w in block.parameters():
            if w.requires_grad:
                if id(w) not in index:
                    index[id(w)] = len(params)
                    params.append(w)
                ix.append(index[id(w)])
        layout.append(tuple(ix))
    return params, tuple(layout)


def relative_error(rebuilt: tuple[Tensor, Tensor], stored: tuple[Tensor, Tensor]) -> float:
    """||rebuilt - stored|| / ||stored|| over both states, computed in float64."""
    diff = sum((r.double() - s.double()).pow(2).sum() for r, s in zip(rebuilt, stored))
    norm = sum(s.double().pow(2).sum() for s in stored)
    return (diff.sqrt() / norm.sqrt()).item() if norm > 0 else diff.sqrt().item()


def _add(x: Tensor, y: Tensor | None) -> Tensor:
    return x if y is None else x + y


def _autocast_state(device_type: str) -> dict:
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


def _check_deterministic(blocks: Sequence[nn.Module]) -> None:
    for block in dict.fromkeys(blocks):  # each distinct block once
        for m in block.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(f"reversible blocks must be deterministic: {type(m).__name__} in "
                                 f"{type(block).__name__} would draw new noise when it is recomputed")


@contextmanager
def _frozen_running_stats(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Normalise recomputations with batch statistics without updating the running ones."""
    norms = [m for block in dict.fromkeys(blocks) for m in block.modules()
             if isinstance(m, _NORMS) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
