"""The scheme registry, and the contract every registered reversible scheme keeps in every dim
(as timm's tests run over every model): the parametrisation reads the registry, so a newly
registered scheme is tested without editing this file (conftest.py registers a user's one)."""
import math

import pytest
import torch

import revnets
from revnets import ReversibleStack, analysis, engine, grow
from revnets.blocks import DIMS, ReversibleBlock
from revnets.schemes import SCHEMES, get_scheme, register_scheme

from helpers import saved_bytes

CASES = [(name, dim) for name, s in SCHEMES.items() if s.reversible for dim in DIMS]
SPATIAL = {0: (), 1: (5,), 2: (3, 4), 3: (3, 3, 3)}


def _stack(scheme, dim, depth=4, channels=4, **kw):
    torch.manual_seed(0)
    return ReversibleStack(scheme, channels, depth, dim=dim, **kw).double()


def _x(dim, batch=3, dtype=torch.float64, channels=4):
    return torch.randn(batch, channels, *SPATIAL[dim], generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_the_contract_covers_the_paper_and_a_user_scheme():
    names = {name for name, _ in CASES}
    assert {"hamiltonian", "midpoint", "leapfrog", "revnet", "user-tanh"} <= names and "resnet" not in names


@pytest.mark.parametrize("scheme, dim", CASES)
def test_exact_inverse_in_float64(scheme, dim):
    stack = _stack(scheme, dim)
    a, b = stack.chain_input(_x(dim))
    out = engine.sequential(stack.blocks, a, b)
    assert max((o - i).abs().max() for o, i in zip(out, (a, b))) > 1e-3  # the blocks do something
    assert engine.segment_error(stack.blocks, a, b) < 1e-12
    for block in stack.blocks:
        rebuilt = block.inverse(*block(a, b))
        assert max((r - i).abs().max() for r, i in zip(rebuilt, (a, b))) < 1e-12


@pytest.mark.parametrize("scheme, dim", CASES)
def test_engine_gradients_equal_plain_autograd(scheme, dim):
    fast, plain = _stack(scheme, dim), _stack(scheme, dim, memory_efficient=False)
    plain.load_state_dict(fast.state_dict())
    grads = []
    for model in (fast, plain):
        x = _x(dim).requires_grad_()
        out = model(x)
        assert out.shape == x.shape
        (out.pow(2).sum() + out.sum()).backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    assert len(grads[0]) > 1
    for g_fast, g_plain in zip(*grads):
        assert (g_fast - g_plain).norm() / g_plain.norm() < 1e-9


@pytest.mark.parametrize("scheme, dim", CASES)
def test_saved_activations_flat_in_depth(scheme, dim):
    x = _x(dim, batch=2, dtype=torch.float32).requires_grad_()
    sizes = {(me, n): saved_bytes(ReversibleStack(scheme, 4, n, dim=dim, memory_efficient=me), x)
             for me in (True, False) for n in (10, 100)}
    assert sizes[True, 100] <= 1.05 * sizes[True, 10]
    assert sizes[False, 100] > 5 * sizes[False, 10]  # plain autograd grows: 99 against 9 blocks


@pytest.mark.parametrize("scheme, dim", CASES)
def test_grow_keeps_the_function(scheme, dim):
    if not SCHEMES[scheme].has_step:
        with pytest.raises(ValueError, match="step size h"):
            grow(_stack(scheme, dim))
        return
    x = _x(dim)
    gaps = []
    for h in (0.1, 0.05):
        stack = _stack(scheme, dim, h=h).eval()
        big = grow(stack)
        assert big.depth == 2 * stack.depth - 1 and all(blk.h == h / 2 for blk in big.blocks)
        with torch.no_grad():
            y = stack(x)
            gaps.append(((big(x) - y).norm() / y.norm()).item())
    assert gaps[0] < 0.2 and gaps[1] < 0.6 * gaps[0], gaps  # O(h) or better


@pytest.mark.parametrize("scheme, dim", CASES)
def test_analysis_runs(scheme, dim):
    channels = 8 if dim == 0 else 4  # dense halves of 2 features: ReLU often cuts all of them
    stack = _stack(scheme, dim, channels=channels).eval()
    x = _x(dim, channels=channels)
    found = analysis.block_inputs(stack, x)
    assert [blk for blk, _, _ in found] == [blk for blk in stack if isinstance(blk, ReversibleBlock)]
    block, a, b = found[1]
    assert all(math.isfinite(g) for g in analysis.growth(list(stack.blocks), a, b, [1, 3]))
    assert analysis.reversal_drift(list(stack.blocks), a, b, [3], torch.float64)[0] < 1e-12
    if type(block).vector_field is ReversibleBlock.vector_field:  # declares no ODE: no spectrum
        with pytest.raises(ValueError, match="declares no vector field"):
            analysis.eigenvalues(block, a, b)
        return
    values = torch.cat([analysis.eigenvalues(blk, a, b) for blk, a, b in found[1:]])
    assert torch.isfinite(values).all() and values.abs().max() > 1e-3
    if block.stability_bound is not None:  # Eq. (9), (14): the stable schemes' spectra are imaginary
        assert values.real.abs().max() < 1e-6
        step = analysis.check_step_size(stack, x)
        assert step["h"] == block.h < step["h_max"] == pytest.approx(block.stability_bound / step["spectral_radius"])


# ---- the registry ----------------------------------------------------------------------------

def test_record_is_read_from_the_block_class_and_the_defaults():
    ham, rev, res = get_scheme("hamiltonian"), get_scheme("revnet"), get_scheme("resnet")
    assert ham.block is revnets.HamiltonianBlock and ham.defaults["h"] == 0.1
    assert (ham.has_step, ham.bound, ham.two_step, ham.reversible) == (True, 2.0, False, True)
    assert (get_scheme("midpoint").bound, get_scheme("midpoint").two_step, get_scheme("leapfrog").two_step) == \
        (1.0, True, True)
    assert (rev.has_step, rev.bound, rev.reversible, res.reversible) == (False, None, True, False)
    assert get_scheme(ham) is ham


def test_register_scheme_and_model_reject_bad_names_and_settings():
    with pytest.raises(ValueError, match="already registered"):
        register_scheme("hamiltonian", revnets.HamiltonianBlock)
    with pytest.raises(ValueError, match="nn.Module class"):
        register_scheme("not-a-block", lambda c: None)
    with pytest.raises(ValueError, match="unknown scheme 'nope'; expected one of hamiltonian"):
        get_scheme("nope")
    with pytest.raises(ValueError, match="already registered"):
        revnets.register_model("hamiltonian-74", scheme="hamiltonian", units=(1,), channels=(8,))
    with pytest.raises(ValueError, match="no setting width; valid overrides: h, act, norm, segment, exact"):
        revnets.register_model("bad-model", scheme="hamiltonian", units=(1,), channels=(8,), width=3)
    with pytest.raises(ValueError, match="one positive integer each per unit"):
        revnets.register_model("bad-model", scheme="hamiltonian", units=(1, 2), channels=(8,))
    assert "bad-model" not in revnets.MODELS and "not-a-block" not in SCHEMES


class _Dense(ReversibleBlock):
    """Y += F(Z), Z += G(Y) with dense F, G: a block written without `dim` (the contract's error)."""

    def __init__(self, channels, width=4):
        super().__init__()
        self.f, self.g = torch.nn.Linear(channels // 2, channels // 2), torch.nn.Linear(channels // 2, channels // 2)

    def couplings(self):
        return revnets.Coupling(+1, self.f), revnets.Coupling(+1, self.g)


class _AnyDim(_Dense):
    def __init__(self, channels, **kw):  # takes dim through **kw
        super().__init__(channels)


def test_register_scheme_refuses_a_block_class_that_takes_no_dim(monkeypatch):
    """Units build blocks as block(channels, dim=dim, **kw): a class without `dim` is refused when it
    is registered, saying what to add, not later inside build_model with a TypeError."""
    with pytest.raises(ValueError, match=r"scheme 'dense': _Dense.__init__ must take dim .* add `dim: int = 2`"):
        register_scheme("dense", _Dense, width=4)
    assert "dense" not in SCHEMES
    monkeypatch.setattr(revnets.schemes, "SCHEMES", dict(SCHEMES))  # a registration for this test only
    register_scheme("any-dim", _AnyDim)
    assert ReversibleStack("any-dim", 8, depth=3, dim=0)(torch.randn(2, 8)).shape == (2, 8)


def test_list_models_filters_by_pattern():
    assert revnets.list_models("*-1202") == ["resnet-1202", "hamiltonian-1202"]
    assert revnets.list_models("hamiltonian-*")[:3] == ["hamiltonian-74", "hamiltonian-218", "hamiltonian-1202"]
    assert "user-tanh-6" in revnets.list_models() and revnets.list_models("none-*") == []


def test_a_registered_user_scheme_trains_memory_efficiently_with_plain_gradients():
    torch.manual_seed(0)
    fast = revnets.build_model("user-tanh-6").double()
    plain = revnets.build_model("user-tanh-6", memory_efficient=False).double()
    plain.load_state_dict(fast.state_dict())
    assert all(isinstance(b, ReversibleBlock) for unit in fast.units for b in unit.blocks)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for model in (fast, plain):
        model(x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for g_fast, g_plain in zip(*grads):
        assert (g_fast - g_plain).norm() / g_plain.norm() < 1e-9
    deep = revnets.build_model("user-tanh-6", units=(2, 30, 2))
    assert saved_bytes(deep, x.float()) <= 1.05 * saved_bytes(revnets.build_model("user-tanh-6"), x.float())


def test_registered_models_work_with_grow_and_analysis():
    torch.manual_seed(0)
    model = revnets.build_model("hamiltonian-tiny")
    assert model.units[0].blocks[0].h == 0.05 and grow(model).units_spec == (3, 3)
    assert analysis.check_step_size(model, torch.randn(1, 3, 8, 8))["h"] == 0.05
    with pytest.raises(ValueError, match="step size h"):
        grow(revnets.build_model("user-tanh-6"))


def test_register_scheme_refuses_defaults_its_block_class_does_not_take():
    with pytest.raises(ValueError, match=r"scheme 'frob': HamiltonianBlock.__init__ takes no frob, given as defaults"):
        register_scheme("frob", revnets.HamiltonianBlock, frob=1)  # a block that takes dim: only frob is wrong
    assert "frob" not in SCHEMES
