import pytest
import torch
from torch import nn

from revnets import HamiltonianBlock, build_model, exact, reversal_error, reversible, sequential

from helpers import chain_grads, unstable_chain


def test_10000_block_hamiltonian_unit_rebuilds_its_input_bit_for_bit_and_gets_plain_autograd_gradients():
    torch.manual_seed(0)
    block = HamiltonianBlock(4, h=0.1).double()
    blocks = [block] * 10_000  # one set of weights, so the test stays fast
    a, b = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    (x, y), g = chain_grads(exact.reversible, blocks, a, b)
    (x_ref, y_ref), g_ref = chain_grads(exact.sequential, blocks, a, b)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert ((g - g_ref).norm() / g_ref.norm()) < 1e-10
    rebuilt = exact.invert_int(blocks, exact.quantize(x), exact.quantize(y), torch.float64)
    assert torch.equal(rebuilt[0], exact.quantize(a)) and torch.equal(rebuilt[1], exact.quantize(b))


def test_exact_reversal_keeps_the_gradients_of_an_unstable_float32_chain():
    blocks, a, b = unstable_chain(64)
    (x, y), g = chain_grads(exact.reversible, blocks, a, b)
    (x_ref, y_ref), g_ref = chain_grads(exact.sequential, blocks, a, b)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert ((g - g_ref).norm() / g_ref.norm()) < 1e-5
    _, g_float = chain_grads(reversible, blocks, a, b)
    _, g_plain = chain_grads(sequential, blocks, a, b)
    assert not ((g_float - g_plain).norm() / g_plain.norm()) < 0.1  # float reversal fails here (or NaN)


def test_exact_networks_match_their_plain_autograd_twin_and_report_zero_drift():
    torch.manual_seed(0)
    kw = dict(units=(5, 5), channels=(8, 16), exact=True)
    model = build_model("leapfrog-26", **kw)
    plain = build_model("leapfrog-26", memory_efficient=False, **kw)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    outs, grads = [], []
    for m in (model, plain):
        out = m(x)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5
    float_model = build_model("leapfrog-26", units=(5, 5), channels=(8, 16))
    float_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert ((float_model(x) - outs[0]).norm() / outs[0].norm()) < 1e-5
    assert reversal_error(model, x) == {"unit0": 0.0, "unit1": 0.0}


def test_bf16_autocast_recomputation_stays_exact():
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(8, h=0.2) for _ in range(30))
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x, y), g = chain_grads(exact.reversible, blocks, a, b)
        (x_ref, y_ref), g_ref = chain_grads(exact.sequential, blocks, a, b)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert ((g - g_ref).norm() / g_ref.norm()) < 1e-5


def test_state_outside_the_fixed_point_range_is_refused():
    block = HamiltonianBlock(4, h=0.1)
    a = torch.full((1, 2, 4, 4), 2.0 ** 31)
    with pytest.raises(ValueError, match="fixed-point range"):
        exact.reversible([block], a, torch.zeros_like(a))
    with pytest.raises(ValueError, match="frac_bits"):
        exact.reversible([block], a, a, frac_bits=62)
    with pytest.raises(ValueError, match="exact reversal stores no segments"):
        build_model("hamiltonian-74", units=(3, 3), channels=(8, 16), exact=True, segment=2)


@pytest.mark.parametrize("depth", [1, 2])
def test_short_exact_stacks_get_plain_autograd_gradients(depth):
    """A one-block stack leaves the fixed-point chain empty."""
    from revnets import ReversibleStack
    torch.manual_seed(0)
    plain = ReversibleStack("hamiltonian", 4, depth, memory_efficient=False).double()
    model = ReversibleStack("hamiltonian", 4, depth, exact=True).double()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    grads = [torch.autograd.grad(m(x).pow(2).sum(), list(m.parameters())) for m in (plain, model)]
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)
