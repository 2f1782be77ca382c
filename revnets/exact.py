"""Exact reversal in fixed point (Maclaurin et al. 2015; Sander et al. 2021, momentum ResNets).

The chain's state (a, b) is kept as int64 integers q with value q * 2^-f (f = `frac_bits`). Each
coupling (a, b) -> (b, s a + u(b)) becomes

    q_c = s q_a + round(u(q_b * 2^-f) * 2^f),

the increment computed in floating point from the integer state alone. Its inverse
q_a = s (q_c - round(u(q_b * 2^-f) * 2^f)) recomputes the identical integer, so the chain's input is
rebuilt bit for bit at any depth: no drift, no stored segments, memory O(1) in depth (the output's
two int64 tensors and the input state).

Precision and range (f = 32 by default): resolution 2^-32 ~ 2.3e-10, range |x| < 2^(62 - f) = 2^30
~ 1.07e9 for every state and increment (so that q_a + increment never overflows int64); a forward
leaving that range raises ValueError. The float computation sees the state rounded to its own
dtype (a float32 network: 24 significant bits), so f = 32 changes a float32 forward by far less
than float32's own rounding. The input (a, b) is rounded to the grid once; gradients pass through
every rounding unchanged (straight-through), so they are the gradients of the fixed-point forward
with the roundings taken as identities, which `sequential` computes with plain autograd.

Use: `reversible(blocks, a, b)` like `revnets.engine.reversible`, or
`build_model(..., exact=True)` for networks whose units run this way.
"""
from typing import Callable, Sequence

import torch
from torch import Tensor

from .blocks import ReversibleBlock
from .engine import Replay, Steps, chain_parameters, chain_steps, coupling_backward, recompute_backward

FRAC_BITS = 32


def quantize(x: Tensor, frac_bits: int = FRAC_BITS) -> Tensor:
    """round(x * 2^f) as int64 (round half to even)."""
    return torch.round(x * 2.0 ** frac_bits).to(torch.int64)


def dequantize(q: Tensor, dtype: torch.dtype, frac_bits: int = FRAC_BITS) -> Tensor:
    """q * 2^-f in `dtype`."""
    return q.to(dtype) * 2.0 ** -frac_bits


def forward_int(blocks: Sequence[ReversibleBlock], qa: Tensor, qb: Tensor, dtype: torch.dtype,
                frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """Run the couplings on the integer state (qa, qb); each update is evaluated in `dtype`.

    Raises ValueError when a state or increment leaves the range |x| < 2^(62 - f).
    """
    return _forward_int(chain_steps(blocks, None), qa, qb, dtype, frac_bits, lambda k: None)


def _forward_int(steps: Steps, qa: Tensor, qb: Tensor, dtype: torch.dtype, frac_bits: int,
                 before: Callable[[int], None]) -> tuple[Tensor, Tensor]:
    _check_frac_bits(frac_bits)
    peak = dequantize(qa, torch.float32, frac_bits).abs().amax()
    for k, (coupling, _) in enumerate(steps):
        before(k)
        b = dequantize(qb, dtype, frac_bits)
        u = coupling.update(b)
        peak = torch.maximum(peak, torch.maximum(b.abs(), u.abs()).amax())  # NaN and inf propagate
        qa, qb = qb, coupling.step(qa, quantize(u, frac_bits))
    _check_range(torch.maximum(peak, dequantize(qb, torch.float32, frac_bits).abs().amax()), frac_bits)
    return qa, qb


def invert_int(blocks: Sequence[ReversibleBlock], qa: Tensor, qb: Tensor, dtype: torch.dtype,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """Rebuild the integer input of `forward_int` from its output, bit for bit."""
    for block in reversed(blocks):
        for coupling in reversed(block.couplings()):
            inc = quantize(coupling.update(dequantize(qa, dtype, frac_bits)), frac_bits)
            qa, qb = coupling.unstep(qb, inc), qa
    return qa, qb


@torch.compiler.disable
def reversible(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """The fixed-point chain on the float state (a, b), back-propagated by exact integer reversal.

    Returns the output state in a's dtype; keeps the output's integers and the input (a, b) for
    the backward. Replays what `revnets.engine` replays (random numbers, autocast, training modes,
    h); `create_graph=True` back-propagates through a differentiable recomputation (`sequential`)
    from the kept input. Under `torch.compile` the chain runs eagerly, a graph break: the bits of
    an increment must be the same in the forward and in the backward, and a compiled inference
    graph and training graph need not round alike.
    """
    params, layout = chain_parameters(blocks)
    if not blocks:
        return a, b
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or params)):
        qx, qy = forward_int(blocks, quantize(a, frac_bits), quantize(b, frac_bits), a.dtype, frac_bits)
        return dequantize(qx, a.dtype, frac_bits), dequantize(qy, a.dtype, frac_bits)
    return _ExactReversible.apply(tuple(blocks), layout, frac_bits, a, b, *params)


class _ExactReversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, layout, frac_bits, a, b, *params):
        ctx.steps, ctx.params, ctx.frac_bits, ctx.dtype = chain_steps(blocks, layout), params, frac_bits, a.dtype
        ctx.replay = Replay(blocks, a.device)
        qa, qb = quantize(a, frac_bits), quantize(b, frac_bits)
        qx, qy = ctx.replay.record(lambda before: _forward_int(ctx.steps, qa, qb, a.dtype, frac_bits, before))
        ctx.save_for_backward(a, b, qx, qy, *params)  # unpacking checks the version counters
        return dequantize(qx, a.dtype, frac_bits), dequantize(qy, a.dtype, frac_bits)

    @staticmethod
    def backward(ctx, grad_x, grad_y):
        a, b, qp, qq, *_ = ctx.saved_tensors
        with ctx.replay():
            if torch.is_grad_enabled():  # create_graph=True
                def rerun(steps, a, b):
                    return _sequential(steps, a, b, ctx.frac_bits, ctx.replay.seed)
                grads = recompute_backward(rerun, ctx.steps, a, b, ctx.params, grad_x, grad_y)
            else:
                grads = _reverse_backward(ctx, qp, qq, grad_x, grad_y)
        return None, None, None, *grads


def _reverse_backward(ctx, qp: Tensor, qq: Tensor, grad_x: Tensor, grad_y: Tensor) -> list:
    grads = [None] * len(ctx.params)
    for k in reversed(range(len(ctx.steps))):
        coupling, ix = ctx.steps[k]
        b = dequantize(qp, ctx.dtype, ctx.frac_bits).requires_grad_()
        ctx.replay.seed(k)
        u, grad_x, grad_y = coupling_backward(coupling, b, ctx.params, ix, grads, grad_x, grad_y)
        qp, qq = coupling.unstep(qq, quantize(u, ctx.frac_bits)), qp
    return [grad_x, grad_y, *grads]


def sequential(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """Plain autograd on the same fixed-point forward: values bit-identical to `reversible`'s,
    every rounding straight-through. Keeps every activation (the reference for tests)."""
    return _sequential(chain_steps(blocks, None), a, b, frac_bits, lambda k: None)


def _sequential(steps: Steps, a: Tensor, b: Tensor, frac_bits: int, before: Callable[[int], None]):
    _check_frac_bits(frac_bits)
    qa, qb = quantize(a, frac_bits), quantize(b, frac_bits)
    a, b = _straight_through(a, qa, frac_bits), _straight_through(b, qb, frac_bits)
    for k, (coupling, _) in enumerate(steps):
        before(k)
        u = coupling.update(b)
        qa, qb = qb, coupling.step(qa, quantize(u.detach(), frac_bits))
        a, b = b, _straight_through(coupling.step(a, u), qb, frac_bits)
    return a, b


def _straight_through(x: Tensor, q: Tensor, frac_bits: int) -> Tensor:
    """Value q * 2^-f exactly, gradient that of x."""
    return dequantize(q, x.dtype, frac_bits) + (x - x.detach())


def _check_frac_bits(frac_bits: int) -> None:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 61:
        raise ValueError(f"frac_bits must be an integer in [0, 61] (fraction bits of the int64 state); "
                         f"got {frac_bits!r}")


def _check_range(peak: Tensor, frac_bits: int) -> None:
    limit = 2.0 ** (62 - frac_bits)
    if not peak.item() < limit:
        raise ValueError(f"exact reversal: a state or increment reached {peak.item():.3g}, outside the "
                         f"fixed-point range |x| < 2^{62 - frac_bits} = {limit:.3g} of frac_bits={frac_bits}; "
                         "lower frac_bits")
