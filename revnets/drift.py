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
from .engine import _cuda_devices, _frozen_running_stats, relative_error, segment_error
from .networks import ReversibleUnit


@torch.no_grad()
def reversal_error(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Relative error of rebuilding each reversible unit's chain input after one forward on `x`.

    `model`: a `Network`, a `ReversibleStack` or any module holding `ReversibleUnit`s; `x` its
    input. Returns {"unit0": e0, ...}, keyed by the unit's place among the model's reversible units
    (`model.modules()` order: for a `Network`, its index in `model.units`; non-reversible units, as
    in ResNet, have no key); `engine.segment_error` of each chain, so random numbers are replayed as
    in the backward. Runs the model in its current mode (train mode normalises with batch
    statistics) without updating BatchNorm running statistics, without building a graph and
    without moving the caller's random-number stream.
    """
    units = [m for m in model.modules() if isinstance(m, ReversibleUnit)]
    errors = {}

    def measure(unit: ReversibleUnit, args: tuple) -> None:
        errors[f"unit{units.index(unit)}"] = _unit_error(unit, args[0])
    hooks = [unit.register_forward_pre_hook(measure) for unit in units]
    try:
        with _frozen_running_stats([model]), torch.random.fork_rng(_cuda_devices(x.device)):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return errors


def _unit_error(unit: ReversibleUnit, x: Tensor) -> float:
    """The reversal error of one unit on its input x."""
    a, b = unit.chain_input(x)
    if unit.exact:  # the backward rebuilds the fixed-point state
        q = fixed_point.quantize(a), fixed_point.quantize(b)
        q_out = fixed_point.forward_int(unit.blocks, *q, a.dtype)
        return relative_error(fixed_point.invert_int(unit.blocks, *q_out, a.dtype), q)
    return segment_error(unit.blocks, a, b)


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
