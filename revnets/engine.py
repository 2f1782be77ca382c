"""One memory-efficient engine for every reversible scheme.

`reversible(blocks, a, b)` runs a chain of `ReversibleBlock`s without keeping any activation but
the chain's input and output. The backward walks the couplings (a, b) -> (b, s a + u(b)) in
reverse: knowing a coupling's output (b, c), it evaluates u(b) once with grad enabled, which gives
both the coupling's input a = s (c - u(b)) and the graph to back-propagate through:

    dL/da = s dL/dc,    dL/db = dL/db' + (du/db)^T dL/dc,    dL/dθ = (du/dθ)^T dL/dc.

So each residual function runs once forward and once more in the backward: the cost floor of
recomputation (about 4/3 of a plain training step).

What the engine guarantees: the gradients of the forward that ran, as plain autograd computes
them (float64 to 1e-9), or an error.
  * The recomputation replays what the forward read besides the weights: the autocast state, the
    random numbers (the default CPU generator's state, and the CUDA one's for CUDA inputs, before
    every coupling, as `torch.utils.checkpoint`'s `preserve_rng_state`: dropout, RReLU and noise
    repeat exactly), every module's training mode and each block's number-valued attributes
    (`h`, ...), all as they were at forward time. A chain that draws no random numbers keeps no
    state (two state copies per forward, memory flat in depth); one that draws them keeps about
    5 KB per coupling (the CPU generator's state), and its first forward runs twice (the first
    run finds out that it draws random numbers).
  * A parameter modified in place between forward and backward raises autograd's own error
    (version counters), as plain autograd does.
  * BatchNorm running statistics are updated by the forward only, never by the recomputation.
  * The chain's exact input is kept and used for the first coupling, so a zero-padded input
    (ReLU at its kink) gets the same derivative as plain autograd.
  * `create_graph=True` (gradient penalties, double backprop): the backward then recomputes the
    segment from its kept input with a graph and back-propagates through that, so higher-order
    gradients are plain autograd's. That backward holds one segment's activations while it runs.
  * The first backward of every chain compares the input it rebuilt with the kept one and warns
    (UserWarning, once per chain) when the relative error exceeds the square root of the compute
    precision's machine epsilon (3.5e-4 in float32, 0.088 under bf16 autocast): such a chain's
    gradients are unreliable (a large h, an unstable scheme); the remedies are a smaller h,
    `segment=k` or exact reversal. Later steps cost nothing; `revnets train --drift-every K`
    (`DriftMonitor`) keeps measuring.
  * Parameter gradients are returned through the autograd.Function (computed with
    `torch.autograd.grad`), so DistributedDataParallel sees each parameter ready exactly once.
  * Blocks sharded by FSDP2 (`fully_shard` on each, as FSDP is used) hold only a shard of their
    parameters between calls, and FSDP gathers them in hooks on a block's own calls. A chain of
    such blocks runs block by block through those calls (`_Sharded`): forward, `inverse` (registered
    with `register_fsdp_forward_method`) and, in the backward, the block's forward recomputed whole
    from its rebuilt input, its parameters' gradients accumulated for FSDP to reduce-scatter; each
    block is gathered while it runs and resharded after, as FSDP does for a plain model. It costs one
    more forward of each block than the unsharded backward; `create_graph=True` is refused there.

Under `torch.compile` the engine is where the compiled model's graph breaks, and it compiles the
residual functions itself. Dynamo cannot trace the engine (its forward reads and sets the
random-number state, its backward calls `torch.autograd.grad`), and a whole-chain graph would leave
the backward to AOTAutograd, which stores activations instead of rebuilding them. So `reversible`
is traced only as far as the question "is there anything to back-propagate?" (no: `sequential`,
compiled with the rest of the model, e.g. evaluation under `no_grad`); the memory-efficient path
runs outside the graph (`torch.compiler.disable`), coupling by coupling as in eager mode, with each
coupling's residual function u run through `torch.compile` with its default backend (inductor, or
what `torch.compiler.set_default_backend` chose; the arguments of the model's own `torch.compile`
do not reach past the graph break): u's inference graph in the forward, its training graph
(forward and backward kernels) in the backward's recomputation. A block's method is compiled
through its function, so the blocks of a class share one compiled graph, their parameters its
inputs, and a chain compiles once per class and grad mode whatever its depth (`compiled_steps`).
The couplings' own additions and the Python between the graphs stay eager. Every guarantee above
holds as in eager mode (what the replay restores is what the compiled graphs are guarded on),
except that `create_graph=True` recomputes with the eager residual functions (AOTAutograd's graphs
have no double backward). Under `torch.compile(..., fullgraph=True)` the graph break is an error.

Segment storage bounds the drift of floating-point reversal. With `segment=k` the engine keeps
the exact state every k blocks and reverses only inside a segment, so the rounding of at most k
blocks is carried back: memory ceil(N / k) + 1 states instead of 2 (k = 1: every block's input,
no rebuilt state is ever used). `choose_segment` picks the largest k whose measured reversal
error on the current batch stays under a tolerance, and `AutoSegment` does it periodically
during training (a unit's `segment="auto"`).
"""
import functools
import inspect
import itertools
import math
import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .blocks import Coupling, ReversibleBlock

try:  # FSDP2, public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
except ImportError:  # no sharded block can reach the engine
    FSDPModule, register_fsdp_forward_method = (), None

_NORMS = (nn.modules.batchnorm._BatchNorm,)
Steps = list[tuple[Coupling, tuple[int, ...]]]


def sequential(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Plain autograd through the chain: keeps every activation."""
    for block in blocks:
        a, b = block(a, b)
    return a, b


def invert(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Rebuild the chain's input from its output with the blocks' exact inverses (deterministic
    blocks; `segment_error` also replays random numbers)."""
    for block in reversed(blocks):
        a, b = block.inverse(a, b)
    return a, b


def _inverse(steps: Steps, a: Tensor, b: Tensor, before: Callable[[int], None]) -> tuple[Tensor, Tensor]:
    """Invert the couplings of `steps` from the last, calling `before(k)` ahead of coupling k."""
    for k in reversed(range(len(steps))):
        before(k)
        a, b = steps[k][0].invert(a, b)
    return a, b


def reversible(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor,
               segment: int | float | None = None, name: str = "reversible chain") -> tuple[Tensor, Tensor]:
    """Run `blocks` on the state (a, b), back-propagating by exact inversion.

    `segment`: None or math.inf reverses the whole chain (memory O(1) in depth); an integer k >= 1
    keeps the state every k blocks and reverses only within those segments (memory O(N / k)).
    `segment` may also be an `AutoSegment`, asked for k at every call with grad enabled. Gives the
    same values and gradients as `sequential` up to reversal drift (module docstring: what is
    replayed, what raises). `name` names the chain in the drift warning. Under `torch.compile` the
    chain compiles its residual functions (module docstring).
    """
    if not torch.is_grad_enabled():
        return sequential(blocks, a, b)
    return _memory_efficient(blocks, a, b, segment, name, torch.compiler.is_compiling())


@torch.compiler.disable
def _memory_efficient(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor, segment, name: str,
                      compiled: bool) -> tuple[Tensor, Tensor]:
    k = segment_length(segment(blocks, a, b) if isinstance(segment, AutoSegment) else segment, len(blocks))
    for start in range(0, len(blocks), k):
        chunk = blocks[start:start + k]
        a, b = _reversible_segment(chunk, a, b, f"{name} (blocks {start}-{start + len(chunk) - 1})", compiled)
    return a, b


def _reversible_segment(blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor, name: str,
                        compiled: bool) -> tuple[Tensor, Tensor]:
    params, layout = chain_parameters(blocks)
    if not blocks or not (a.requires_grad or b.requires_grad or params):
        return sequential(blocks, a, b)
    if any(isinstance(block, FSDPModule) for block in blocks):
        return _Sharded.apply(tuple(blocks), name, a, b, *params)
    return _Reversible.apply(tuple(blocks), layout, name, compiled, a, b, *params)


def segment_length(segment: int | float | None, n: int) -> int:
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
    segment)` on the state (a, b). NaN counts as infinity. Random numbers are replayed as in the
    backward; BatchNorm running statistics and the caller's random-number stream are untouched."""
    k = segment_length(segment, len(blocks))
    worst = 0.0
    with frozen_running_stats(blocks), torch.random.fork_rng(cuda_devices(a.device)):
        for start in range(0, len(blocks), k):
            steps = chain_steps(blocks[start:start + k], None)
            replay = Replay(blocks[start:start + k], a.device)
            out = replay.forward(steps, a, b)
            error = relative_error(_inverse(steps, *out, replay.seed), (a, b))
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

    def state_dict(self) -> dict:
        """What a resumed run needs to measure at the same calls and reuse the same choice."""
        return dict(calls=self.calls, choice=tuple(self.choice) if self.choice else None)

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.choice = state["calls"], state["choice"] and SegmentChoice(*state["choice"])

    def __call__(self, blocks: Sequence[ReversibleBlock], a: Tensor, b: Tensor) -> int | None:
        if torch.is_grad_enabled():
            if self.calls % self.every == 0:
                self.choice = choose_segment(blocks, a, b, self.tol)
            self.calls += 1
        return self.choice.k if self.choice else None


class Replay:
    """What a chain's recomputation must repeat of its forward: the autocast state, the training
    mode of every module, each block's number-valued attributes (h, ...) and the random-number
    state before every coupling (kept only when the forward drew random numbers).

    In the forward, `record(loop)`; in the backward, `with replay():` restores the forward's
    settings (and afterwards the caller's, random-number stream included), and `seed(k)` sets the
    generators as they were before coupling k.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device):
        self.device, self.autocast, self.first = device, _autocast_state(device.type), blocks[0]
        distinct = dict.fromkeys(blocks)
        modules = [m for block in distinct for m in block.modules()]
        self.settings = _settings(distinct, modules)
        self.norms = _tracking_norms(modules)  # the modes are replayed, so these are the backward's too
        self.rng: list | None = None

    def record(self, loop: Callable[[Callable[[int], None]], tuple]) -> tuple:
        """Run the forward `loop(before)` (it calls `before(k)` ahead of coupling k), keeping the
        random-number state before every coupling if the chain draws random numbers. A chain not
        known to draw any keeps no states (memory flat in depth); if it did draw some, the forward
        runs once more from the same state, recording (BatchNorm statistics updated once)."""
        start = _rng_state(self.device)
        if self.first not in _RANDOM:
            out = loop(_ignore)
            if _same_state(start, _rng_state(self.device)):
                return out
            _RANDOM.add(self.first)
            _set_rng_state(start, self.device)
            with _frozen(self.norms):
                return self.record(loop)
        self.rng = []
        out = loop(lambda k: self.rng.append(_rng_state(self.device)))
        if _same_state(start, _rng_state(self.device)):  # it has stopped drawing random numbers
            self.rng = None
            _RANDOM.discard(self.first)
        return out

    def seed(self, k: int) -> None:
        if self.rng is not None:
            _set_rng_state(self.rng[k], self.device)

    def forward(self, steps: Steps, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The float couplings on (a, b), recorded."""
        return self.record(lambda before: _run(steps, a, b, before))

    def rerun(self, steps: Steps, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The float couplings on (a, b) with the recorded random numbers."""
        return _run(steps, a, b, self.seed)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.autocast(**self.autocast), _replayed(self.settings), _frozen(self.norms), \
                torch.random.fork_rng(cuda_devices(self.device), enabled=self.rng is not None):
            yield


# The first block of every chain whose last forward drew random numbers.
_RANDOM: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _ignore(k: int) -> None:
    pass


def _run(steps: Steps, a: Tensor, b: Tensor, before: Callable[[int], None]) -> tuple[Tensor, Tensor]:
    """The couplings of `steps` on (a, b) in float, calling `before(k)` ahead of coupling k."""
    for k, (coupling, _) in enumerate(steps):
        before(k)
        a, b = coupling(a, b)
    return a, b


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, layout, name, compiled, a, b, *params):
        ctx.steps, ctx.params, ctx.name = chain_steps(blocks, layout), params, name
        ctx.run = compiled_steps(ctx.steps) if compiled else ctx.steps  # what forward and reversal run
        ctx.replay = Replay(blocks, a.device)
        x, y = ctx.replay.forward(ctx.run, a.detach(), b.detach())
        ctx.save_for_backward(a, b, x, y, *params)  # unpacking checks the version counters
        return x, y

    @staticmethod
    def backward(ctx, grad_x, grad_y):
        a, b, x, y, *_ = ctx.saved_tensors  # raises if a parameter was modified in place since
        with ctx.replay():
            if torch.is_grad_enabled():  # create_graph=True: eager residual functions, differentiable twice
                grads = recompute_backward(ctx.replay.rerun, ctx.steps, a, b, ctx.params, grad_x, grad_y)
            else:
                grads = _reverse_backward(ctx, a, b, x, y, grad_x, grad_y)
        return None, None, None, None, *grads


class _Sharded(torch.autograd.Function):
    """The engine on blocks sharded by FSDP2: each block runs through its own calls, where FSDP
    gathers its parameters (module docstring); the parameters' gradients go to FSDP, not through
    this Function's outputs."""

    @staticmethod
    def forward(ctx, blocks, name, a, b, *params):
        for block in dict.fromkeys(blocks):
            if isinstance(block, FSDPModule) and "inverse" not in vars(block):
                register_fsdp_forward_method(block, "inverse")
        ctx.blocks, ctx.name, ctx.n_params = blocks, name, len(params)
        ctx.starts = [0, *itertools.accumulate(len(blk.couplings()) for blk in blocks[:-1])]  # first couplings
        ctx.replay = Replay(blocks, a.device)
        x, y = ctx.replay.record(lambda before: _run_blocks(blocks, ctx.starts, a, b, before))
        ctx.save_for_backward(a, b, x, y)
        return x, y

    @staticmethod
    def backward(ctx, grad_x, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{ctx.name}: create_graph=True through blocks sharded by FSDP is not supported; "
                               "compute higher-order gradients without fully_shard on the blocks")
        a0, b0, x, y = ctx.saved_tensors
        with ctx.replay(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*returned a view tensor")  # no in-place use of outputs here
            for j in reversed(range(len(ctx.blocks))):
                block, k0 = ctx.blocks[j], ctx.starts[j]
                seed = (lambda i, k0=k0: ctx.replay.seed(k0 + i))
                if j > 0 or ctx.replay.first not in _CHECKED:
                    with torch.no_grad():
                        rebuilt = block.inverse(x, y, before=seed)
                a, b = (t.detach().requires_grad_() for t in ((a0, b0) if j == 0 else rebuilt))
                with torch.enable_grad():
                    out = block(a, b, before=seed)
                    wrt = [a, b, *(p for p in block.parameters() if p.requires_grad)]
                    torch.autograd.backward(out, (grad_x, grad_y), inputs=wrt)  # FSDP reduce-scatters the weights'
                grad_x, grad_y = (t.grad if t.grad is not None else torch.zeros_like(t) for t in (a, b))
                x, y = a.detach(), b.detach()
            if ctx.replay.first not in _CHECKED:
                _CHECKED.add(ctx.replay.first)
                _warn_on_drift(ctx.name, rebuilt, (a0, b0), ctx.replay.autocast)
        return None, None, grad_x, grad_y, *([None] * ctx.n_params)


def _run_blocks(blocks, starts: list[int], a: Tensor, b: Tensor, before: Callable[[int], None]):
    """The blocks on (a, b) through their own calls, calling `before(k)` ahead of coupling k."""
    for block, k0 in zip(blocks, starts):
        a, b = block(a, b, before=lambda i, k0=k0: before(k0 + i))
    return a, b


def _reverse_backward(ctx, a0: Tensor, b0: Tensor, p: Tensor, q: Tensor, grad_x: Tensor, grad_y: Tensor) -> list:
    """The memory-efficient backward: rebuild each coupling's input from its output while
    back-propagating through it; the first coupling runs at the kept input b0."""
    grads = [None] * len(ctx.params)
    for k in reversed(range(len(ctx.run))):
        coupling, ix = ctx.run[k]
        b = (b0 if k == 0 else p).detach().requires_grad_()
        ctx.replay.seed(k)
        u, grad_x, grad_y = coupling_backward(coupling, b, ctx.params, ix, grads, grad_x, grad_y)
        if k > 0:
            p, q = coupling.unstep(q, u), b.detach()
    if ctx.replay.first not in _CHECKED:  # (unstep(q, u), p) is the rebuilt input
        _CHECKED.add(ctx.replay.first)
        _warn_on_drift(ctx.name, (coupling.unstep(q, u), p), (a0, b0), ctx.replay.autocast)
    return [grad_x, grad_y, *grads]


def recompute_backward(run: Callable, steps: Steps, a: Tensor, b: Tensor, params, grad_x: Tensor,
                       grad_y: Tensor) -> list:
    """Back-propagate (dL/dx, dL/dy) through a differentiable recomputation `run(steps, a, b)` of the
    chain from its kept input, so that the gradients have a graph (`create_graph=True`). Returns
    the gradients for (a, b, *params), None where one needs none."""
    a, b = (t.view_as(t) if t.requires_grad else t for t in (a, b))  # one node per input, even if a is b
    x, y = run(steps, a, b)
    inputs = (a, b, *params)
    wrt = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad((x, y), wrt, (grad_x, grad_y), create_graph=True, allow_unused=True))
    return [next(found) if t.requires_grad else None for t in inputs]


# The first block of every chain whose first backward has compared its rebuilt input.
_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _warn_on_drift(name: str, rebuilt: tuple[Tensor, Tensor], kept: tuple[Tensor, Tensor], autocast: dict) -> None:
    dtype = autocast["dtype"] if autocast["enabled"] else kept[0].dtype
    tol = torch.finfo(dtype).eps ** 0.5
    error = relative_error(rebuilt, kept)
    if not error <= tol:  # NaN too
        warnings.warn(f"{name}: the backward rebuilt its input with relative error {error:.3g} (above "
                      f"{tol:.2g}, the square root of {dtype}'s epsilon), so its gradients are unreliable; "
                      "use a smaller h, segment=k (store the state every k blocks) or exact=True "
                      "(bit-exact fixed-point reversal)", UserWarning, stacklevel=2)


def chain_steps(blocks: Sequence[ReversibleBlock], layout: tuple[tuple[int, ...], ...] | None) -> Steps:
    """The chain's couplings in order, each with the parameter indices of its block."""
    layout = layout if layout is not None else [()] * len(blocks)
    return [(c, ix) for block, ix in zip(blocks, layout) for c in block.couplings()]


def compiled_steps(steps: Steps) -> Steps:
    """`steps` with each coupling's residual function run through `torch.compile`.

    A method is compiled through its function and a module through its class's `forward` (its
    hooks do not run), so the blocks of one class share one compiled graph and recompile only where
    their guards differ (grad mode, training mode, shapes, h). Other callables, such as a closure
    made afresh at every call (`revnets.hf`'s layers), run as they are.
    """
    return [(Coupling(c.sign, _compiled(c.update)), ix) for c, ix in steps]


# (a method's function or a module's forward, torch.compile's default backend) -> it compiled
_COMPILED: dict[tuple[Callable, object], Callable] = {}


def _compiled(update: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if inspect.ismethod(update):
        fn, owner = update.__func__, update.__self__
    elif isinstance(update, nn.Module):
        fn, owner = type(update).forward, update
    else:
        return update
    key = fn, _default_backend()
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=key[1])
    return functools.partial(_COMPILED[key], owner)


def _default_backend() -> str | Callable:
    """torch.compile's default backend: settable since torch 2.1x, inductor before."""
    get = getattr(torch.compiler, "get_default_backend", None)
    return get() if get else "inductor"


def coupling_backward(coupling: Coupling, b: Tensor, params, ix, grads: list, grad_x: Tensor, grad_y: Tensor):
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


def chain_parameters(blocks: Sequence[nn.Module]) -> tuple[list[nn.Parameter], tuple[tuple[int, ...], ...]]:
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


def cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The default CPU generator's state, and the CUDA generator's of `device` when it is a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _same_state(s: tuple, t: tuple) -> bool:
    return all(u is None or torch.equal(u, v) for u, v in zip(s, t))


def _settings(blocks, modules: list[nn.Module]) -> list[tuple[nn.Module, str, object]]:
    """(module, attribute, value) of what a recomputation reads besides tensors: the training mode
    of every module (`modules`: all of the blocks' submodules) and each block's own number-valued
    attributes (h, ...)."""
    modes = [(m, "training", m.training) for m in modules]
    numbers = [(block, k, v) for block in blocks for k, v in vars(block).items()
               if k != "training" and isinstance(v, (int, float))]
    return modes + numbers


@contextmanager
def _replayed(settings: list[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Set the recorded attributes back to their forward-time values, and restore them after."""
    changed = [(m, k, v, getattr(m, k)) for m, k, v in settings if getattr(m, k) is not v]
    for m, k, v, _ in changed:
        setattr(m, k, v)
    try:
        yield
    finally:
        for m, k, _, now in changed:
            setattr(m, k, now)


def frozen_running_stats(blocks: Sequence[nn.Module]) -> ContextManager[None]:
    """Normalise recomputations with batch statistics without updating the running ones."""
    return _frozen(_tracking_norms([m for block in dict.fromkeys(blocks) for m in block.modules()]))


def _tracking_norms(modules: list[nn.Module]) -> list[nn.Module]:
    return [m for m in modules if isinstance(m, _NORMS) and m.training and m.track_running_stats]


@contextmanager
def _frozen(norms: list[nn.Module]) -> Iterator[None]:
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
