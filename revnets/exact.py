"""Exact reversal in fixed point (Maclaurin et al. 2015; Sander et al. 2021, momentum ResNets).

The chain's state (a, b) is kept as int64 integers q with value q * 2^-f (f = `frac_bits`). Each
coupling (a, b) -> (b, s a + u(b)) becomes

    q_c = s q_a + round(u(q_b * 2^-f) * 2^f),

the increment computed in floating point from the integer state alone. Its inverse
q_a = s (q_c - round(u(q_b * 2^-f) * 2^f)) recomputes the identical integer, so the chain's input is
rebuilt bit for bit at any depth: no drift, no stored segments, memory O(1) in depth (the output's
two int64 tensors).

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
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocks import ReversibleBlock
from .engine import (_autocast_state, _check_deterministic, _coupling_backward, _frozen_running_stats,
                     _parameters, _steps)

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
    _check_frac_bits(frac_bits)
    peak = dequantize(qa, torch.float32, frac_bits).abs().amax()
    for block in blocks:
        for coupling in block.couplings():
            b = dequantize(qb, dtype, frac_bits)
            u = coupling.update(b)
            peak = torch.maximum(peak, torch.maximum(b.abs(), u.abs()).amax())  # NaN and inf propagate
            qa, qb = qb, (qa if coupling.sign > 0 else -qa) + quantize(u, frac_bits)
    _check_range(torch.maximum(peak, dequantize(qb, torch.float32, frac_bits).abs().amax()), frac_bits)
    return qa, qb


def invert_int(blocks: Sequence[ReversibleBlock], qa: Tensor, qb: Tensor, dtype: torch.dtype,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """Rebuild the integer input of `forward_int` from its output, bit for bit."""
    for block in reversed(blocks):
        for coupling in reversed(block.couplings()):
            inc = quantize(coupling.update(dequantize(qa, dtype, frac_bits)), frac_bits)
            qa, qb = (qb - inc if coupling.sign > 0 else inc - qb), qa
    return qa, qb


def reversible(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """The fixed-point chain on the float state (a, b), back-propagated by exact integer reversal.

    Returns the output state in a's dtype; keeps only the output's integers for the backward.
    """
    params, layout = _parameters(blocks)
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or params)):
        qx, qy = forward_int(blocks, quantize(a, frac_bits), quantize(b, frac_bits), a.dtype, frac_bits)
        return dequantize(qx, a.dtype, frac_bits), dequantize(qy, a.dtype, frac_bits)
    _check_deterministic(blocks)
    return _ExactReversible.apply(tuple(blocks), layout, frac_bits, a, b, *params)


class _ExactReversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, layout, frac_bits, a, b, *params):
        ctx.blocks, ctx.layout, ctx.params, ctx.frac_bits, ctx.dtype = blocks, layout, params, frac_bits, a.dtype
        ctx.autocast = _autocast_state(a.device.type)
        qx, qy = forward_int(blocks, quantize(a, frac_bits), quantize(b, frac_bits), a.dtype, frac_bits)
        ctx.save_for_backward(qx, qy)
        return dequantize(qx, a.dtype, frac_bits), dequantize(qy, a.dtype, frac_bits)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x, grad_y):
        qp, qq = ctx.saved_tensors
        grads = [None] * len(ctx.params)
        with torch.autocast(**ctx.autocast), _frozen_running_stats(ctx.blocks):
            for coupling, ix in reversed(_steps(ctx.blocks, ctx.layout)):
                b = dequantize(qp, ctx.dtype, ctx.frac_bits).requires_grad_()
                u, grad_x, grad_y = _coupling_backward(coupling, b, ctx.params, ix, grads, grad_x, grad_y)
                inc = quantize(u, ctx.frac_bits)
                qp, qq = (qq - inc if coupling.sign > 0 else inc - qq), qp
        return None, None, None, grad_x, grad_y, *grads


def sequential(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               frac_bits: int = FRAC_BITS) -> tuple[Tensor, Tensor]:
    """Plain autograd on the same fixed-point forward: values bit-identical to `reversible`'s,
    every rounding straight-through. Keeps every activation (the reference for tests)."""
    _check_frac_bits(frac_bits)
    qa, qb = quantize(a, frac_bits), quantize(b, frac_bits)
    a, b = _straight_through(a, qa, frac_bits), _straight_through(b, qb, frac_bits)
    for block in blocks:
        for coupling in block.couplings():
            u = coupling.update(b)
            qa, qb = qb, (qa if coupling.sign > 0 else -qa) + quantize(u.detach(), frac_bits)
            a, b = b, _straight_through((a + u if coupling.sign > 0 else u - a), qb, frac_bits)
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
