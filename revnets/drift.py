"""Reversal drift: how far a unit's input rebuilt by exact inversion is from the one that went in.

A reversible unit's backward rebuilds every state from the chain's output with the blocks'
inverses. In exact arithmetic that is the identity; in floating point each step's rounding is
carried back through every later block, so a deep or unstable chain can rebuild a different input
and receive meaningless gradients with no error raised. `reversal_error` measures it directly:

    e = ||(a~, b~) - (a, b)|| / ||(a, b)||,   (a~, b~) = invert(blocks, sequential(blocks, a, b)),

where (a, b) is the chain's input (after the unit's entry block); for a unit with exact=True,
the fixed-point integers that its backward rebuilds (so e = 0). `DriftMonitor` does it every
few training steps and warns above a threshold.
"""
import warnings

import torch
from torch import Tensor, nn

from . import exact as fixed_point
from .engine import _cuda_devices, _frozen_running_stats, relative_error, segment_error, sequential
from .networks import Network, ReversibleUnit


@torch.no_grad()
def reversal_error(model: Network, x: Tensor) -> dict[str, float]:
    """Relative error of rebuilding each reversible unit's chain input after one forward on `x`.

    `x`: the network's input (N, C, H, W). Returns {"unit0": e0, ...}, keyed by the unit's index in
    `model.units` (non-reversible units, as in ResNet, have no key); `engine.segment_error` of each
    chain, so random numbers are replayed as in the backward. Runs the model in its current mode
    (train mode normalises with batch statistics) without updating BatchNorm running statistics,
    without building a graph and without moving the caller's random-number stream.
    """
    model.check_input(x)
    errors = {}
    with _frozen_running_stats([model]), torch.random.fork_rng(_cuda_devices(x.device)):
        x = model.stem(x).to(model.head.weight.dtype)
        for i, unit in enumerate(model.units):
            if not isinstance(unit, ReversibleUnit):
                x = unit(x)
                continue
            a, b = unit.chain_input(x)
            if unit.exact:  # the backward rebuilds the fixed-point state
                q = fixed_point.quantize(a), fixed_point.quantize(b)
                q_out = fixed_point.forward_int(unit.blocks, *q, a.dtype)
                errors[f"unit{i}"] = relative_error(fixed_point.invert_int(unit.blocks, *q_out, a.dtype), q)
                out = [fixed_point.dequantize(t, a.dtype) for t in q_out]
            else:
                errors[f"unit{i}"] = segment_error(unit.blocks, a, b)
                out = sequential(unit.blocks, a, b)
            x = unit.block.merge(*out)
    return errors


class DriftMonitor:
    """Measure `reversal_error` every `every` training steps (steps 0, every, 2 every, ...) and warn
    (`warnings.warn`, RuntimeWarning) when a unit's error exceeds `threshold`.

    Usage: ``errors = monitor.step(model, x, step)`` in the training loop; `errors` is the dict of
    `reversal_error` on the steps it measures and None otherwise.
    """

    def __init__(self, every: int, threshold: float):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"DriftMonitor needs every >= 1 (an integer number of steps); got {every!r}")
        if not threshold > 0:
            raise ValueError(f"DriftMonitor needs a positive threshold; got {threshold!r}")
        self.every, self.threshold = every, threshold

    def step(self, model: nn.Module, x: Tensor, step: int) -> dict[str, float] | None:
        if step % self.every:
            return None
        errors = reversal_error(model, x)
        bad = {k: e for k, e in errors.items() if not e <= self.threshold}  # NaN counts as bad
        if bad:
            worst = ", ".join(f"{k}={e:.3g}" for k, e in bad.items())
            warnings.warn(f"step {step}: reversal error above {self.threshold:g} ({worst}); gradients of "
                          "these units are unreliable: store segments (segment=k) or use exact reversal",
                          RuntimeWarning, stacklevel=2)
        return errors
