"""Stability of reversible blocks (Section 3): Jacobian spectra, growth through depth, reversal drift.

A block is one step of size h of an ODE  x' = F(x)  (Eq. 3). The continuous system of each scheme:

    Hamiltonian, Eq. (7)-(8), x = (Y, Z):   F = ( K1^T s(K1 Z + b1), -K2^T s(K2 Y + b2) )
    Leapfrog, Eq. (16) as a first-order system, x = (Y, V = Y'):   F = ( V, -K^T s(K Y + b) )
    MidPoint, Eq. (13), x = Y:              F = s((K - K^T) Y + b)
    RevNet coupling, Eq. (19), x = (Y, Z):  F = ( F(Z), G(Y) )   (h = 1 folded into F and G)

Its Jacobian J = dF/dx at the block's input (Eq. 9, Eq. 14) decides stability: perturbations grow
like exp(lambda t) (Eq. 4), with lambda bounded by max Re(eig J) (Eq. 5). The paper proves the
eigenvalues purely imaginary for the three stable schemes (Appendix); an unconstrained coupling
has eigenvalues +-sqrt(eig(F' G')), real and positive in general. Each block class declares its
system (`ReversibleBlock.vector_field`) and bound; everything here works for an operator K of any
`dim` (dense, 1-, 2- or 3-D), on a `Network`, a `ReversibleStack` or any module of reversible units.

Blocks are measured as fixed functions: on private copies in evaluation mode, so BatchNorm inside a
residual function is the affine map of its running statistics (K^T D K keeps the structure of Eq. 10
while its scale gamma >= 0). Measurements here, all in float64 unless a dtype is asked for:
  * `eigenvalues`: the exact spectrum from the dense Jacobian (small states);
    `ritz_values`: Arnoldi iteration with Jacobian-vector products only (large states);
  * `growth`: ||dx_N|| / ||dx_0|| through N blocks by forward-mode differentiation (Eq. 4);
  * `eq21_roots`, `linear_revnet`: the linear analysis of Eq. (21);
  * `reversal_drift`: relative error of rebuilding a chain's input by exact inversion, per dtype;
  * `check_step_size`: the largest stable h of a model on given data, with a warning past it;
  * `first_block`: the block these measure in a network, with its input; `random_chain`: copies of
    a block with independent random weights, against `[block] * N`'s time-invariant ones.

Reversal drift of a trained model: a reversible chain's backward rebuilds every state from the
chain's output with the blocks' inverses. In exact arithmetic that is the identity; in floating
point each step's rounding is carried back through every later block, so a deep or unstable chain
can rebuild a different input and receive meaningless gradients with no error raised.
`reversal_error` measures it directly,

    e = ||(a~, b~) - (a, b)|| / ||(a, b)||,   (a~, b~) = invert(blocks, sequential(blocks, a, b)),

where (a, b) is the chain's input (after a unit's entry block); for a chain with exact=True, the
fixed-point integers that its backward rebuilds (so e = 0). `DriftMonitor` does it every few
training steps and warns above a threshold.
"""
import cmath
import copy
import math
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp

from . import exact as fixed_point
from .blocks import AdditiveCoupling, Field, ReversibleBlock
from .engine import cuda_devices, frozen_running_stats, relative_error, segment_error
from .networks import Network, ReversibleChain, ReversibleUnit, chains

__all__ = ["vector_field", "jacobian", "eigenvalues", "arnoldi", "ritz_values", "spectral_estimate", "growth",
           "eq21_roots", "linear_revnet", "reversal_drift", "reversal_error", "DriftMonitor", "block_inputs",
           "first_block", "random_chain", "check_step_size"]


def vector_field(block: ReversibleBlock, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
    """The right-hand side F of the block's ODE and the point x where the block's input (a, b) sits.

    (a, b): the block's state pair, each (N, C, *spatial) (dense: (N, C)). x: (N, C', *spatial)
    with C' = 2C for the Hamiltonian, Leapfrog and RevNet systems, C' = C for MidPoint; F maps x's
    shape to itself. Each scheme declares its own (`ReversibleBlock.vector_field`).
    """
    if not isinstance(block, ReversibleBlock):
        raise ValueError(f"expected a ReversibleBlock that declares a vector field (HamiltonianBlock, "
                         f"LeapfrogBlock, MidPointBlock, AdditiveCoupling, ...); got {type(block).__name__}")
    return block.vector_field(a, b)


def _float64_field(block: ReversibleBlock, a: Tensor, b: Tensor) -> tuple[Field, Tensor]:
    """`vector_field` of a float64 copy of the block in evaluation mode, at (a, b) in float64."""
    return vector_field(_cast([block], torch.float64)[0], a.double(), b.double())


def jacobian(field: Field, x: Tensor) -> Tensor:
    """Dense Jacobian dF/dx at x, (n, n) with n = x.numel() (the batch's samples form diagonal blocks)."""
    return jacrev(lambda v: field(v.view_as(x)).flatten())(x.flatten())


def eigenvalues(block: ReversibleBlock, a: Tensor, b: Tensor) -> Tensor:
    """Exact eigenvalues of J (Eq. 9, Eq. 14) at the block's input, (n,) complex128.

    Computed in float64 on a copy of the block from the dense Jacobian: use for n up to a few
    thousand (a batch of one image). With ReLU, J has Jordan blocks at 0, so rounding can move the
    zero eigenvalues off the axis by ~1e-8; smooth activations give ~1e-15.
    """
    field, x = _float64_field(block, a, b)
    with torch.no_grad():
        return torch.linalg.eigvals(jacobian(field, x))


def arnoldi(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Ritz values of `steps` Arnoldi iterations and their residual norms ||A q - theta q|| (||q|| = 1).

    `matvec` maps an (n,) vector to A times it; v0: (n,) start vector. Gram-Schmidt runs twice per
    step. Stops early on an invariant subspace (then the Ritz values are exact eigenvalues).
    Returns (values (m,) complex, residuals (m,) real), m <= steps.
    """
    n = v0.numel()
    steps = min(steps, n)
    q = v0.new_zeros(steps + 1, n)
    hess = v0.new_zeros(steps + 1, steps)
    q[0] = v0 / v0.norm()
    m = steps
    for k in range(steps):
        w = matvec(q[k])
        for _ in range(2):
            c = q[: k + 1] @ w
            w = w - q[: k + 1].T @ c
            hess[: k + 1, k] += c
        hess[k + 1, k] = w.norm()
        if hess[k + 1, k] <= 1e-12 * hess[: k + 2, k].norm():
            m = k + 1
            break
        q[k + 1] = w / hess[k + 1, k]
    values, vectors = torch.linalg.eig(hess[:m, :m])
    return values, hess[m, m - 1].abs() * vectors[-1].abs()


def ritz_values(block: ReversibleBlock, a: Tensor, b: Tensor, steps: int = 60,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Arnoldi on J at the block's input using only Jacobian-vector products (`torch.func.jvp`), float64.

    Returns (values, residuals) as `arnoldi`. The extreme eigenvalues (largest |lambda|) converge
    first; a Ritz value is trustworthy when its residual is small against |lambda|.
    """
    field, x = _float64_field(block, a, b)
    v0 = torch.randn(x.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def matvec(v: Tensor) -> Tensor:
        return jvp(field, (x,), (v.view_as(x),))[1].flatten()

    with torch.no_grad():
        return arnoldi(matvec, v0, steps)


def spectral_estimate(values: Tensor, residuals: Tensor | None = None, tol: float = 1e-6) -> dict[str, float]:
    """Summary of a spectrum: spectral radius max|lambda| and max Re(lambda) (Eq. 5).

    With `residuals` (Ritz values), max Re is taken over the converged values only (residual
    <= tol * radius; NaN if none has); the radius over all of them (the extreme values converge first).
    """
    radius = values.abs().max().item()
    if residuals is not None:
        values = values[residuals <= tol * radius]
    if not values.numel():
        return {"radius": radius, "max_real": math.nan, "max_abs_real": math.nan}
    return {"radius": radius, "max_real": values.real.max().item(), "max_abs_real": values.real.abs().max().item()}


def _cast(blocks: Sequence[nn.Module], dtype: torch.dtype) -> list[nn.Module]:
    """A copy of the chain in `dtype`, in evaluation mode; a block repeated in the chain stays one shared copy."""
    blocks = copy.deepcopy(list(blocks))
    for block in {id(b): b for b in blocks}.values():
        block.to(dtype).eval()
    return blocks


def _check_depths(depths: Sequence[int], length: int) -> list[int]:
    depths = sorted(depths)
    if not depths or depths[0] < 0 or depths[-1] > length:
        raise ValueError(f"depths must lie in [0, {length}] (the chain's length); got {list(depths)}")
    return depths


def growth(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor, depths: Sequence[int],
           seed: int = 0) -> list[float]:
    """log(||dx_N|| / ||dx_0||) after N blocks, for each N in `depths` (Eq. 4), float64.

    dx_0 is a random direction in the state (a, b), carried through `blocks[:N]` by Jacobian-vector
    products (the exact linearisation, no finite differences); it is renormalised every block, so
    the growth itself may exceed the float range. `[block] * N` gives time-invariant weights.
    The per-block Lyapunov exponent is log growth / N; divide by h for Eq. (4)'s per unit time.
    Returns natural logs, in sorted depth order; NaN once the state itself is no longer finite.
    """
    depths = _check_depths(depths, len(blocks))
    blocks = _cast(blocks[: depths[-1]], torch.float64)
    a, b = a.double(), b.double()
    gen = torch.Generator().manual_seed(seed)
    da, db = torch.randn(a.shape, generator=gen, dtype=a.dtype), torch.randn(b.shape, generator=gen, dtype=b.dtype)
    norm = torch.cat((da.flatten(), db.flatten())).norm()
    da, db, log_growth, done, out = da / norm, db / norm, 0.0, 0, []
    with torch.no_grad():
        for depth in depths:
            for block in blocks[done:depth]:
                (a, b), (da, db) = jvp(block, (a, b), (da, db))
                norm = torch.cat((da.flatten(), db.flatten())).norm()
                if not (torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(norm)):
                    return out + [math.nan] * (len(depths) - len(out))
                da, db, log_growth = da / norm, db / norm, log_growth + math.log(norm.item())
            done = depth
            out.append(log_growth)
    return out


def eq21_roots(alpha: float, beta: float) -> tuple[complex, complex]:
    """Roots of xi^2 - (2 + alpha beta) xi + 1 = 0 (Eq. 21): xi = a +- sqrt(a^2 - 1), a = 1 + alpha beta / 2.

    Their product is 1, so |xi| = 1 for both exactly when -4 <= alpha beta <= 0 (|a| <= 1);
    otherwise one root has |xi| > 1 and the linear RevNet grows like |xi|^N. At the ends of the band
    (alpha beta = 0 or -4) the root is double and perturbations still grow linearly in N.
    """
    a = 1 + alpha * beta / 2
    s = cmath.sqrt(a * a - 1)
    return a + s, a - s


class _Scale(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        return self.c * x


def linear_revnet(alpha: float, beta: float) -> AdditiveCoupling:
    """The linear RevNet of Eq. (21): Y_{j+1} = Y_j + beta Z_j, Z_{j+1} = Z_j + alpha Y_{j+1}."""
    return AdditiveCoupling(_Scale(beta), _Scale(alpha))


def reversal_drift(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor, depths: Sequence[int],
                   dtype: torch.dtype = torch.float32) -> list[float]:
    """||x~ - x|| / ||x|| for each N in `depths`: x = (a, b) run through `blocks[:N]` in `dtype`, then
    rebuilt by the blocks' exact inverses (`engine.segment_error` of that chain). Sorted depth order;
    infinite where not finite.
    """
    depths = _check_depths(depths, len(blocks))
    blocks = _cast(blocks[: depths[-1]], dtype)
    return [segment_error(blocks[:n], a.to(dtype), b.to(dtype)) for n in depths]


def block_inputs(model: nn.Module, x: Tensor) -> list[tuple[ReversibleBlock, Tensor, Tensor]]:
    """(block, a, b) for every reversible block of `model`, with the state it receives on input `x`.

    `model`: a `Network`, a `ReversibleStack`, a `ReversibleTransformer` or any module holding
    reversible blocks. One forward without graph and without updating BatchNorm running statistics;
    blocks in `model.modules()` order (a unit's entry block before its chain).
    """
    found: list[tuple[ReversibleBlock, Tensor, Tensor]] = []
    blocks = [m for m in model.modules() if isinstance(m, ReversibleBlock)]
    hooks = [blk.register_forward_pre_hook(lambda m, args: found.append((m, *args))) for blk in blocks]
    try:
        with torch.no_grad(), frozen_running_stats([model]):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def first_block(model: Network, x: Tensor) -> tuple[ReversibleBlock, Tensor, Tensor]:
    """The first reversible block after the entry of the model's first reversible unit, and its input."""
    units = [u for u in model.units if isinstance(u, ReversibleUnit)]
    if not units or not len(units[0].blocks):
        raise ValueError("the stability analysis needs a reversible model whose first unit has at least "
                         f"2 blocks (got scheme {model.scheme!r}, units {model.units_spec})")
    target = units[0].blocks[0]
    return next((blk, a, b) for blk, a, b in block_inputs(model, x) if blk is target)


def random_chain(block: nn.Module, n: int, seed: int) -> list[nn.Module]:
    """n copies of `block`, each with freshly initialised parameters (independent random weights)."""
    torch.manual_seed(seed)
    chain = []
    for _ in range(n):
        fresh = copy.deepcopy(block)
        for m in fresh.modules():
            if m is not fresh and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        chain.append(fresh)
    return chain


def check_step_size(model: nn.Module, x: Tensor, steps: int = 30) -> dict:
    """The largest stable step size of `model` on input `x`, and a warning when its h exceeds it.

    For every block, the spectral radius |lambda|max of J at the block's input (Arnoldi, `steps`
    JVPs) gives h_max = bound / |lambda|max, with bound = 2 for Verlet (Hamiltonian) and leapfrog and
    1 for the midpoint rule (the block's `stability_bound`): past it the linearised step has a root |xi| > 1
    (Eq. 21). Returns {"h", "h_max", "spectral_radius", "block"} for the most limiting block
    ("block": its index among the model's reversible blocks); warns (RuntimeWarning) if h >= h_max.
    """
    inputs = [(blk, a, b) for blk, a, b in block_inputs(model, x) if blk.stability_bound is not None]
    if not inputs:
        raise ValueError(f"check_step_size needs blocks with a stability_bound (a Hamiltonian, Leapfrog or "
                         f"MidPoint network, stack or language model); "
                         f"got scheme {getattr(model, 'scheme', type(model).__name__)!r}")
    worst = None
    for i, (blk, a, b) in enumerate(inputs):
        radius = spectral_estimate(*ritz_values(blk, a, b, steps))["radius"]
        h_max = blk.stability_bound / radius if radius > 0 else math.inf
        if worst is None or h_max < worst["h_max"]:
            worst = {"h": blk.h, "h_max": h_max, "spectral_radius": radius, "block": i}
    if worst["h"] >= worst["h_max"]:
        warnings.warn(f"step size h={worst['h']:g} is past the stability bound h_max={worst['h_max']:.4g} "
                      f"(|lambda|max={worst['spectral_radius']:.4g} at block {worst['block']}): "
                      f"perturbations grow exponentially with depth; use h < {worst['h_max']:.4g}",
                      RuntimeWarning, stacklevel=2)
    return worst


@torch.no_grad()
def reversal_error(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Relative error of rebuilding each reversible chain's input after one forward on `x`.

    `model`: a `Network`, a `ReversibleStack`, a `ReversibleTransformer` or any module holding
    `ReversibleChain`s; `x` its input. Returns {"unit0": e0, ...}, keyed by the chain's place among
    the model's chains (`model.modules()` order: for a `Network`, the index of its unit among the
    reversible ones; ResNet has none; a language model has one, "unit0"): `engine.segment_error`
    of each chain, so random numbers are replayed as in the backward. Runs the model in its current
    mode (train mode normalises with batch statistics) without updating BatchNorm running
    statistics, without building a graph and without moving the caller's random-number stream.
    """
    found = chains(model)
    errors = {}

    def measure(chain: ReversibleChain, args: tuple) -> None:
        errors[f"unit{found.index(chain)}"] = _chain_error(chain, *args)
    hooks = [chain.register_forward_pre_hook(measure) for chain in found]
    try:
        with frozen_running_stats([model]), torch.random.fork_rng(cuda_devices(x.device)):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return errors


def _chain_error(chain: ReversibleChain, a: Tensor, b: Tensor) -> float:
    """The reversal error of one chain on its input state (a, b)."""
    if chain.exact:  # the backward rebuilds the fixed-point state
        q = fixed_point.quantize(a), fixed_point.quantize(b)
        q_out = fixed_point.forward_int(chain, *q, a.dtype)
        return relative_error(fixed_point.invert_int(chain, *q_out, a.dtype), q)
    return segment_error(chain, a, b)


class DriftMonitor:
    """Measure `reversal_error` every `every` training steps (steps 0, every, 2 every, ...) and warn
    (`warnings.warn`, RuntimeWarning) when a chain's error exceeds `threshold`.

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
                          "these chains are unreliable: store segments (segment=k) or use exact reversal",
                          RuntimeWarning, stacklevel=2)
        return errors
