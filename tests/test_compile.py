"""torch.compile through the engine (revnets.engine, "Under torch.compile"): the model compiles
around its reversible chains, each chain compiles its residual functions, and every guarantee of
the engine holds as in eager mode, for image networks and a language model.

Most tests use the aot_eager backend (torch.compile's graph capture and AOTAutograd without
generating kernels: seconds, and the aten operators of eager mode, so the same random numbers);
the last ones use inductor, where the property is about inductor itself: the residual functions
really run as generated code, how often it recompiles, and its own random numbers are replayed.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

import revnets
from revnets import AdditiveCoupling, Coupling, HamiltonianBlock, ReversibleChain, sequential
from revnets.engine import chain_steps, compiled_steps
from revnets.training.distributed import wrap

from helpers import model_grads, relative_error, unstable_chain

LM = dict(vocab_size=64, depth=2, context=16)


def _image(name, **kw):
    torch.manual_seed(0)
    model = revnets.build_model(name, units=(3,), channels=(8,), **kw).double()  # a chain of two blocks
    return model, torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.arange(4)


def _lm(name, **kw):
    torch.manual_seed(0)
    model = revnets.build_model(name, **{**LM, **kw}).double()
    x = torch.randint(0, LM["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    return model, x, x.roll(-1, 1)


MODELS = {  # name -> (model, input, target): BatchNorm in the images' blocks, dropout in the language model
    "hamiltonian image": lambda **kw: _image("hamiltonian-74", **kw),  # residual functions: methods
    "revnet image": lambda **kw: _image("revnet-38", **kw),  # residual functions: modules
    "leapfrog lm": lambda **kw: _lm("leapfrog-lm-tiny", **{"dropout": 0.2, **kw}),
}


@pytest.fixture
def backend():
    """torch.compile's default backend during the test (the engine compiles residual functions
    with the default): aot_eager, counting the frames it compiles; dynamo's caches empty before and
    after."""
    counter = CompileCounterWithBackend("aot_eager")
    torch.compiler.reset()
    torch.compiler.set_default_backend(counter)
    yield counter
    torch.compiler.set_default_backend(None)
    torch.compiler.reset()


def _pair(name, **kw):
    """A model as built, an eager plain-autograd copy with the same weights, an input, a target."""
    model, x, y = MODELS[name](**kw)
    plain = MODELS[name](memory_efficient=False, **kw)[0]
    plain.load_state_dict(model.state_dict())
    return model, plain, x, y


def _chain_and_state(model, x):
    """The model's first reversible chain and the state (a, b) it starts from on input x."""
    with torch.no_grad():
        if isinstance(model, revnets.Network):
            return model.units[0].blocks, *model.units[0].chain_input(model.stem(x))
        return model.blocks, *model.chain_input(x)


def _compiled_regions(model, x, y) -> dict[str, int]:
    """Per engine pass (the autograd.Function's forward and backward), the compiled regions that
    run directly inside it during one training step."""
    with profile() as prof:
        F.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
    count = {"_Reversible": 0, "_ReversibleBackward": 0}
    for event in prof.events():
        if event.name in count:
            count[event.name] += sum(c.name.startswith("Torch-Compiled Region") for c in event.cpu_children)
    return count


def _couplings(model, x) -> int:
    chain = _chain_and_state(model, x)[0]
    return sum(len(block.couplings()) for block in chain)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_gradients_and_batchnorm_statistics_equal_eager_plain_autograd(name, backend):
    """The same dropout masks (replayed in the backward) and BatchNorm statistics updated once."""
    model, plain, x, y = _pair(name)
    want = model_grads(plain, x, y, seed=3)
    got = model_grads(torch.compile(model), x, y, seed=3)
    assert relative_error(got[0], want[0]) < 1e-12 and relative_error(got[1], want[1]) < 1e-10
    for (key, u), v in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(u, v), key


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_compiles_as_one_graph(name, backend):
    """Under no_grad there is nothing to back-propagate: no engine, so no graph break."""
    model, x, _ = MODELS[name]()
    model.eval()
    with torch.no_grad():
        assert relative_error(torch.compile(model, fullgraph=True)(x), model(x)) < 1e-12


@pytest.mark.parametrize("kw", [dict(segment=2), dict(segment="auto"), dict(exact=True)],
                         ids=["segment", "auto", "exact"])
def test_stored_segments_and_exact_reversal_under_compile(kw, backend):
    model, plain, x, y = _pair("leapfrog lm", depth=4, **kw)
    want = model_grads(plain, x, y, seed=3)
    got = model_grads(torch.compile(model), x, y, seed=3)
    assert torch.equal(got[0], want[0]) if "exact" in kw else relative_error(got[0], want[0]) < 1e-12
    assert relative_error(got[1], want[1]) < 1e-10


class _Dtypes(TorchDispatchMode):
    """The dtypes of the outputs of every convolution and matrix product while it is active."""

    OPS = (torch.ops.aten.convolution.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS:
            self.seen.add(out.dtype)
        return out


@pytest.mark.parametrize("name", MODELS)
def test_bf16_recomputation_replays_the_forward_autocast_state(name, backend):
    """The backward runs outside the forward's autocast context; every convolution and matrix
    product of the compiled recomputation and of its backward must still run in bf16."""
    model, x, y = MODELS[name]()
    model, x = model.float(), x.float() if x.is_floating_point() else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(torch.compile(model)(x).flatten(0, -2), y.flatten())
    with _Dtypes() as dtypes:
        loss.backward()
    assert dtypes.seen == {torch.bfloat16}


@pytest.mark.parametrize("name", ["hamiltonian image", "revnet image"])
def test_higher_order_gradients_through_a_compiled_chain_equal_plain_autograd(name, backend):
    """create_graph=True recomputes with the eager residual functions (the chain is compiled on its
    own: AOTAutograd's graphs around it in a compiled model have no double backward; nor, on the
    CPU, has attention's fused kernel, so only the image networks)."""
    model, x, _ = MODELS[name]()
    chain, a, b = _chain_and_state(model, x)

    def penalty(run):
        chain.zero_grad()
        u = a.clone().requires_grad_()
        torch.manual_seed(3)
        y, z = run(u, b)
        (g,) = torch.autograd.grad(y.pow(2).sum() + z.sin().sum(), u, create_graph=True)
        g.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in chain.parameters()])
    want = penalty(lambda u, v: sequential(chain, u, v))
    assert relative_error(penalty(torch.compile(chain)), want) < 1e-9


def test_an_unstable_compiled_chain_warns_at_the_first_backward(backend):
    blocks, a, b = unstable_chain(12, scale=6.0)
    chain = torch.compile(ReversibleChain(blocks, name="the unstable chain"))
    a.requires_grad_()
    with pytest.warns(UserWarning, match="the unstable chain.*relative error"):
        sum(t.sum() for t in chain(a, b)).backward()


def test_compiled_steps_compile_each_function_once_for_every_block(backend):
    """Six Hamiltonian blocks compile one graph per coupling method, six RevNet-style blocks one per
    residual function class; a closure is left as it is."""
    torch.manual_seed(0)
    state = torch.randn(2, 4, 5, 5)
    for blocks, functions in [
            ([HamiltonianBlock(8) for _ in range(6)], {HamiltonianBlock._dy, HamiltonianBlock._dz}),
            ([AdditiveCoupling(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)) for _ in range(6)],
             {nn.Conv2d.forward})]:
        torch.compiler.reset()
        backend.frame_count = 0
        steps = chain_steps(blocks, None)
        with torch.no_grad():
            for (coupling, _), (compiled, _) in zip(steps, compiled_steps(steps)):
                assert torch.equal(compiled.update(state), coupling.update(state))
        assert backend.frame_count == len(functions)

    def closure(b):
        return 2 * b
    assert compiled_steps([(Coupling(+1, closure), ())])[0][0].update is closure


@pytest.mark.parametrize("name", ["hamiltonian image", "leapfrog lm"])
def test_train_compile_runs_the_residual_functions_compiled(name, backend):
    """`revnets train --compile` wraps the model with `distributed.wrap`: in its steps every coupling
    runs as a compiled region in the engine's forward and again in its backward."""
    model, x, y = MODELS[name]()
    compiled = wrap(model, torch.device("cpu"), 1, compile=True)
    F.cross_entropy(compiled(x).flatten(0, -2), y.flatten()).backward()
    n = _couplings(model, x)
    assert _compiled_regions(compiled, x, y) == {"_Reversible": n, "_ReversibleBackward": n}


# ---- inductor: the generated code, its recompiles and its random numbers -------------------------

INDUCTOR = ["hamiltonian image", "leapfrog lm"]


@pytest.fixture(scope="module")
def inductor_runs():
    """Per model (float64, dropout in the language model): the frames compiled after each of five
    training steps of the inductor-compiled model, the compiled regions in the engine at the sixth,
    and the model with its compiled form, input and target."""
    counter = CompileCounterWithBackend("inductor")
    torch.compiler.reset()
    torch.compiler.set_default_backend(counter)
    runs = {}
    for name in INDUCTOR:
        model, x, y = MODELS[name]()
        compiled = torch.compile(model)
        frames = []
        for _ in range(5):
            F.cross_entropy(compiled(x).flatten(0, -2), y.flatten()).backward()
            frames.append(counter.frame_count)
        runs[name] = dict(frames=frames, regions=_compiled_regions(compiled, x, y), model=model,
                          compiled=compiled, x=x, y=y)
    yield runs
    torch.compiler.set_default_backend(None)
    torch.compiler.reset()


@pytest.mark.parametrize("name", INDUCTOR)
def test_inductor_recompiles_at_most_once_after_the_first_step(name, inductor_runs):
    frames = inductor_runs[name]["frames"]
    assert frames[0] > 0 and frames[-1] - frames[0] <= 1 and frames[-1] == frames[-2]


@pytest.mark.parametrize("name", INDUCTOR)
def test_inductor_runs_every_residual_function_compiled_forward_and_backward(name, inductor_runs):
    run = inductor_runs[name]
    n = _couplings(run["model"], run["x"])
    assert run["regions"] == {"_Reversible": n, "_ReversibleBackward": n}


@pytest.mark.parametrize("name", INDUCTOR)
def test_inductor_gradients_are_those_of_the_forward_that_ran(name, inductor_runs):
    """Inductor draws its own random numbers (not eager mode's), so the reference is the forward
    itself: the gradient along a random direction v equals the central difference of the loss
    along v under the same seed (float64). Unreplayed dropout masks would miss it by O(1)."""
    run = inductor_runs[name]
    model, compiled, x, y = run["model"], run["compiled"], run["x"], run["y"]
    params = list(model.parameters())
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    grads = model_grads(compiled, x, y, seed=3)[1][-sum(p.numel() for p in params):]

    def loss(t):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(t * d)
        torch.manual_seed(3)
        out = F.cross_entropy(compiled(x).flatten(0, -2), y.flatten()).item()
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(t * d)
        return out
    eps = 1e-6
    along = (grads * torch.cat([d.flatten() for d in v])).sum().item()
    assert abs((loss(eps) - loss(-eps)) / (2 * eps) - along) < 1e-6 * abs(along)
