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
"""
from contextlib import contextmanager
from typing import Iterator, Sequence

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


def reversible(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Run `blocks` on the state (a, b), back-propagating by exact inversion (memory O(1) in depth).

    Gives the same values and gradients as `sequential`; every block must be deterministic.
    """
    params, layout = _parameters(blocks)
    if not blocks or not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or params)):
        return sequential(blocks, a, b)
    _check_deterministic(blocks)
    return _Reversible.apply(tuple(blocks), layout, a, b, *params)


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
        steps = [(c, ix) for block, ix in zip(ctx.blocks, ctx.layout) for c in block.couplings()]
        with torch.autocast(**ctx.autocast), _frozen_running_stats(ctx.blocks):
            for k in reversed(range(len(steps))):
                coupling, ix = steps[k]
                b = (b0 if k == 0 else p).detach().requires_grad_()  # the first input is kept exactly
                with torch.enable_grad():
                    u = coupling.update(b)
                grad_b, *grad_w = torch.autograd.grad(u, (b, *(ctx.params[i] for i in ix)), grad_y,
                                                      allow_unused=True)
                for i, g in zip(ix, grad_w):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
                with torch.no_grad():
                    if k > 0:
                        p, q = (q - u if coupling.sign > 0 else u - q), b.detach()
                    grad_x, grad_y = (grad_y if coupling.sign > 0 else -grad_y), _add(grad_x, grad_b)
        return None, None, grad_x, grad_y, *grads


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


def _add(x: Tensor, y: Tensor | None) -> Tensor:
    return x if y is None else x + y


def _autocast_state(device_type: str) -> dict:
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


def _check_deterministic(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(f"reversible blocks must be deterministic: {type(m).__name__} in "
                                 f"{type(block).__name__} would draw new noise when it is recomputed")


@contextmanager
def _frozen_running_stats(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Normalise recomputations with batch statistics without updating the running ones."""
    norms = [m for block in blocks for m in block.modules()
             if isinstance(m, _NORMS) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
