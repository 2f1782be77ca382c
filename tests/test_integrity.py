"""The engine gives plain autograd's gradients in every use, or raises: higher-order gradients,
random numbers, changes between forward and backward, unstable chains (revnets.engine)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revnets
from revnets import AdditiveCoupling, HamiltonianBlock, exact, reversible, sequential

SCHEMES = ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"]
SMALL = dict(units=(3, 3), channels=(8, 16))


def _pair(name, **kw):
    """The same float64 weights as a memory-efficient and a plain-autograd network."""
    torch.manual_seed(0)
    me = revnets.build_model(name, **SMALL, **kw).double()
    plain = revnets.build_model(name, memory_efficient=False, **SMALL, **kw).double()
    plain.load_state_dict(me.state_dict())
    return me, plain


def _rel(u, v):
    return ((u - v).norm() / v.norm()).item()


def _flat(model, x):
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


def _double_backward(model, x):
    """Gradient penalty: d/dθ of ||dL/dx||^2 (and d/dx), through create_graph=True."""
    x = x.clone().requires_grad_()
    model.zero_grad()
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % 10)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + g.pow(2).sum()).backward()
    return _flat(model, x)


@pytest.mark.parametrize("kw", [{}, dict(segment=2), dict(exact=True)], ids=["reversal", "segment", "exact"])
@pytest.mark.parametrize("name", SCHEMES)
def test_higher_order_gradients_equal_plain_autograd(name, kw):
    if name == "revnet-38" and kw.get("exact"):
        kw = dict(kw, norm=None)  # fixed point needs no BatchNorm here; keeps the check fast
    me, plain = _pair(name, **kw)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert _rel(_double_backward(me, x), _double_backward(plain, x)) < 1e-8


class Noisy(nn.Module):
    """A residual function that draws random numbers: dropout, RReLU, F.dropout and torch.randn."""

    def __init__(self, c):
        super().__init__()
        self.lin, self.drop, self.rrelu = nn.Linear(c, c), nn.Dropout(0.3), nn.RReLU()

    def forward(self, u):
        u = self.rrelu(self.drop(self.lin(u)))
        return F.dropout(u, 0.2, self.training) + 0.1 * torch.randn_like(u)


def _noisy_chain(n=6, c=8):
    torch.manual_seed(0)
    return nn.ModuleList(AdditiveCoupling(Noisy(c), Noisy(c)) for _ in range(n)).double()


def _run(engine, blocks, a, b, seed=1):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    blocks.zero_grad()
    torch.manual_seed(seed)
    x, y = engine(blocks, a, b)
    (x.pow(2).sum() + y.sin().sum()).backward()
    after = torch.get_rng_state()
    grads = [a.grad.flatten(), b.grad.flatten()] + [p.grad.flatten() for p in blocks.parameters()]
    return (x, y), torch.cat(grads), after


@pytest.mark.parametrize("engine", [reversible, exact.reversible], ids=["float", "exact"])
def test_random_numbers_are_replayed(engine):
    blocks = _noisy_chain()
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    reference = exact.sequential if engine is exact.reversible else sequential
    out, g, rng = _run(engine, blocks, a, b)
    out_ref, g_ref, rng_ref = _run(reference, blocks, a, b)
    assert torch.equal(out[0], out_ref[0]) and torch.equal(out[1], out_ref[1])
    assert _rel(g, g_ref) < 1e-9
    assert torch.equal(rng, rng_ref)  # the caller's random-number stream goes on as with plain autograd
    assert _rel(_run(engine, blocks, a, b, seed=2)[1], g_ref) > 1e-3  # the noise matters


def test_random_numbers_are_replayed_in_higher_order_gradients():
    blocks = _noisy_chain()
    a = torch.randn(5, 8, dtype=torch.float64)

    def penalty(engine):
        x = a.clone().requires_grad_()
        blocks.zero_grad()
        torch.manual_seed(3)
        (g,) = torch.autograd.grad(engine(blocks, x, x * 2)[1].sin().sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in blocks.parameters()])
    assert _rel(penalty(reversible), penalty(sequential)) < 1e-9


@pytest.mark.parametrize("engine", [reversible, exact.reversible], ids=["float", "exact"])
def test_a_parameter_modified_in_place_after_the_forward_raises(engine):
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(4) for _ in range(3))
    x, y = engine(blocks, torch.randn(2, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 4, 4))
    with torch.no_grad():
        blocks[1].k1.conv.weight.mul_(2)  # an optimiser step before the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (x.sum() + y.sum()).backward()


def _grads_after(model, x, change):
    model.train()
    model.zero_grad()
    out = model(x)
    change(model)
    out.pow(2).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _eval(model):
    model.eval()


def _double_h(model):
    for block in model.modules():
        if hasattr(block, "h"):
            block.h *= 2


@pytest.mark.parametrize("change", [_eval, _double_h], ids=["eval", "h"])
@pytest.mark.parametrize("kw", [{}, dict(exact=True)], ids=["float", "exact"])
def test_the_backward_is_that_of_the_forward_that_ran(change, kw):
    me, plain = _pair("hamiltonian-74", **kw)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert _rel(_grads_after(me, x, change), _grads_after(plain, x, change)) < 1e-9
    if change is _double_h:  # the user's change stays in place after the backward
        assert me.units[0].blocks[0].h == pytest.approx(0.2)
    else:
        assert not me.training


def test_an_unstable_chain_warns_at_the_first_backward_naming_the_unit():
    torch.manual_seed(0)
    model = revnets.build_model("hamiltonian-74", units=(12, 12), channels=(8, 16), h=10.0, norm=None)
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"units\[0\].*relative error .*smaller h.*segment=k.*exact=True"):
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # measured once per chain


@pytest.mark.parametrize("name", SCHEMES)
def test_stable_chains_do_not_warn(name):
    torch.manual_seed(0)
    model = revnets.build_model(name, units=(12, 12), channels=(8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(4, 3, 8, 8))
        out.float().sum().backward()


def test_the_reversal_error_of_a_random_chain_replays_its_noise():
    blocks = _noisy_chain()
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    before = torch.get_rng_state()
    assert revnets.engine.segment_error(blocks, a, b) < 1e-12
    assert torch.equal(torch.get_rng_state(), before)  # a measurement leaves the stream alone


class Switch(nn.Module):
    """BatchNorm, then noise once `noisy` is set: a chain that starts drawing random numbers."""

    def __init__(self, c):
        super().__init__()
        self.lin, self.norm, self.noisy = nn.Linear(c, c), nn.BatchNorm1d(c), False

    def forward(self, u):
        u = self.norm(self.lin(u))
        return u + torch.randn_like(u) if self.noisy else u


def test_a_chain_that_starts_drawing_random_numbers_is_replayed_and_normalised_once():
    torch.manual_seed(0)
    blocks = nn.ModuleList(AdditiveCoupling(Switch(8), Switch(8)) for _ in range(4)).double()
    plain = nn.ModuleList(AdditiveCoupling(Switch(8), Switch(8)) for _ in range(4)).double()
    plain.load_state_dict(blocks.state_dict())
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    _run(reversible, blocks, a, b)  # draws nothing: the engine keeps no random-number states
    _run(sequential, plain, a, b)
    for chain in (blocks, plain):
        for m in chain.modules():
            if isinstance(m, Switch):
                m.noisy = True
    out, g, rng = _run(reversible, blocks, a, b)
    out_ref, g_ref, rng_ref = _run(sequential, plain, a, b)
    assert torch.equal(out[1], out_ref[1]) and _rel(g, g_ref) < 1e-9 and torch.equal(rng, rng_ref)
    for (name, u), v in zip(blocks.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(u, v), name  # running statistics: two forwards, two updates
