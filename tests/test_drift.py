import warnings

import pytest
import torch
from torch import nn

import revnets.engine as engine
from revnets import DriftMonitor, HamiltonianBlock, build_model, invert, reversal_error, reversible, sequential

from helpers import chain_grads, relative_error, unstable_chain

SMALL = dict(units=(3, 3), channels=(8, 16))


def _direct(model, x):
    """The reversal error measured by hand, unit by unit."""
    errors = {}
    with torch.no_grad():
        x = model.stem(x)
        for i, unit in enumerate(model.units):
            a, b = unit.chain_input(x)
            out = sequential(unit.blocks, a, b)
            a2, b2 = invert(unit.blocks, *out)
            errors[f"unit{i}"] = (torch.cat([a2 - a, b2 - b]).norm() / torch.cat([a, b]).norm()).item()
            x = unit.block.merge(*out)
    return errors


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"])
def test_monitor_reports_the_directly_measured_error(name):
    torch.manual_seed(0)
    model = build_model(name, units=(30, 30), channels=(8, 16), **({} if name == "revnet-38" else dict(h=0.5)))
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    direct = _direct(model, x)
    errors = DriftMonitor(every=1, threshold=1e9).step(model, x, step=0)
    assert errors.keys() == {"unit0", "unit1"}
    for k in direct:
        assert errors[k] == pytest.approx(direct[k], rel=1e-3), k
        assert errors[k] > 0


def test_reversal_error_leaves_batchnorm_statistics_and_gradients_alone():
    torch.manual_seed(0)
    model = build_model("revnet-38", **SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reversal_error(model, torch.randn(4, 3, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_float64_reversal_is_exact_to_rounding_and_resnet_has_no_reversible_units():
    torch.manual_seed(0)
    errors = reversal_error(build_model("hamiltonian-74", **SMALL).double(), torch.randn(2, 3, 8, 8).double())
    assert max(errors.values()) < 1e-13
    assert reversal_error(build_model("resnet-32", **SMALL), torch.randn(2, 3, 8, 8)) == {}


def test_monitor_measures_every_k_steps_and_warns_above_threshold():
    torch.manual_seed(0)
    model = build_model("hamiltonian-74", **SMALL)
    x = torch.randn(2, 3, 8, 8)
    monitor = DriftMonitor(every=3, threshold=1e-30)
    with pytest.warns(RuntimeWarning, match="reversal error above"):
        assert monitor.step(model, x, step=3) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.step(model, x, step=4) is None
        assert DriftMonitor(every=3, threshold=1.0).step(model, x, step=6) is not None


def test_monitor_counts_a_nan_error_as_above_threshold():
    torch.manual_seed(0)
    model = build_model("hamiltonian-74", **SMALL)
    with torch.no_grad():
        next(model.units[0].blocks[0].parameters()).fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="unit0=inf"):
        DriftMonitor(every=1, threshold=1.0).step(model, torch.randn(2, 3, 8, 8), step=0)


@pytest.mark.parametrize("every, threshold", [(0, 1.0), (1.5, 1.0), (1, 0.0)])
def test_monitor_rejects_bad_settings(every, threshold):
    with pytest.raises(ValueError, match="DriftMonitor"):
        DriftMonitor(every, threshold)


# Segment storage (revnets.engine: reversible(..., segment=k), segment_error, choose_segment)

@pytest.mark.parametrize("segment", [1, 3, 7, 20, None])
def test_segment_storage_gradients_equal_plain_autograd_in_float64(segment):
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(8, h=0.3) for _ in range(20)).double()
    a, b = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    g = chain_grads(lambda *s: reversible(*s, segment=segment), blocks, a, b)[1]
    g_plain = chain_grads(sequential, blocks, a, b)[1]
    assert relative_error(g, g_plain) < 1e-10


def _stored_bytes(blocks, a, b, segment):
    """Bytes of distinct non-parameter tensors kept for the backward."""
    params = {p.data_ptr() for p in blocks.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.nbytes
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reversible(blocks, a.requires_grad_(), b, segment=segment)
    return sum(seen.values())


def test_segment_memory_grows_as_n_over_k():
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(8) for _ in range(64))
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    state = a.nbytes + b.nbytes
    for k in (None, 32, 8, 2, 1):
        stored = _stored_bytes(blocks, a.clone(), b.clone(), k)
        assert stored == (64 // (k or 64) + 1) * state, k
    assert engine.choose_segment(blocks, a, b, tol=float("inf")).stored_bytes == 2 * state


def test_segments_bound_the_drift_of_an_unstable_unit():
    blocks, a, b = unstable_chain(64)
    pure, seg = engine.segment_error(blocks, a, b), engine.segment_error(blocks, a, b, 4)
    assert pure > 0.1 and seg < 1e-4, (pure, seg)
    g_plain = chain_grads(sequential, blocks, a, b)[1]
    err = {k: relative_error(chain_grads(lambda *s: reversible(*s, segment=k), blocks, a, b)[1], g_plain)
           for k in (None, 4)}
    assert not err[None] < 0.1 and err[4] < 1e-3, err  # NaN counts as unbounded


def test_auto_picks_a_finite_segment_for_an_unstable_unit_and_pure_reversal_for_a_stable_one():
    blocks, a, b = unstable_chain(64)
    choice = engine.choose_segment(blocks, a, b, tol=1e-4)
    assert choice.k is not None and choice.k < 64 and choice.error <= 1e-4
    assert engine.segment_error(blocks, a, b, 2 * choice.k) > 1e-4  # the largest power of two that passes
    assert choice.stored_bytes == _stored_bytes(blocks, a.clone(), b.clone(), choice.k)  # what the engine keeps
    torch.manual_seed(0)
    stable = nn.ModuleList(HamiltonianBlock(8) for _ in range(64))
    choice = engine.choose_segment(stable, torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), tol=1e-4)
    assert choice.k is None and choice.error <= 1e-4


def test_auto_segment_in_a_network_measures_during_training_and_matches_plain_gradients():
    torch.manual_seed(0)
    kw = dict(units=(6, 6), channels=(8, 16), norm=nn.BatchNorm2d)
    model = build_model("hamiltonian-74", segment="auto", **kw).double()
    plain = build_model("hamiltonian-74", memory_efficient=False, **kw).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m in (model, plain):
        m(x).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-10
    for (name, u), v in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(u, v), name  # BatchNorm statistics updated once, as in plain autograd
    chain = model.units[0].blocks
    choice = chain.segment.choice
    a, b = model.units[0].chain_input(model.stem(x))
    assert choice.k is None and chain.segment.calls == 1
    assert choice.stored_bytes == _stored_bytes(chain, a.detach(), b.detach(), None)  # what the engine keeps


@pytest.mark.parametrize("segment", [0, -2, 2.5, "all", True])
def test_bad_segment_is_refused(segment):
    with pytest.raises(ValueError, match="segment must be"):
        build_model("hamiltonian-74", units=(3, 3), channels=(8, 16), segment=segment)
