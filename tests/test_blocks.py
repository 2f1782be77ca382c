import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revnets.blocks import (DIMS, AdditiveCoupling, AntisymmetricLayer, BasicBlock, Coupling, HamiltonianBlock,
                            LeapfrogBlock, MidPointBlock, RevNetBlock, RevNetEntry, SymmetricLayer, adjoint, apply,
                            make_norm, operator, transposed_weight)

torch.manual_seed(0)


def _pair(c=8, dtype=torch.float64):
    return torch.randn(3, c, 6, 6, dtype=dtype), torch.randn(3, c, 6, 6, dtype=dtype)


REVERSIBLE = {
    "hamiltonian": lambda: HamiltonianBlock(8, h=0.5),
    "hamiltonian-bn": lambda: HamiltonianBlock(8, h=0.5, norm=nn.BatchNorm2d),
    "midpoint": lambda: MidPointBlock(4, h=0.5),
    "midpoint-euler": lambda: MidPointBlock(4, h=0.5, euler=True),
    "leapfrog": lambda: LeapfrogBlock(4, h=0.5),
    "revnet": lambda: RevNetBlock(8),
    "custom": lambda: AdditiveCoupling(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()), nn.Conv2d(4, 4, 1)),
}


@pytest.mark.parametrize("name", REVERSIBLE)
def test_inverse_undoes_forward_in_float64(name):
    block = REVERSIBLE[name]().double().eval()
    a, b = _pair(4)
    x, y = block(a, b)
    assert (x - a).abs().max() > 1e-3 or (y - b).abs().max() > 1e-3  # the block does something
    a2, b2 = block.inverse(x, y)
    torch.testing.assert_close(a2, a, rtol=0, atol=1e-12)
    torch.testing.assert_close(b2, b, rtol=0, atol=1e-12)


def test_hamiltonian_block_is_eq_10():
    block = HamiltonianBlock(8, h=0.3).double()
    y, z = _pair(4)

    def ktsk(layer, u):  # K^T relu(K u + b) with K^T the transposed convolution of the same weight
        return F.conv_transpose2d(torch.relu(layer.conv(u)), layer.conv.weight, padding=1)
    y1 = y + 0.3 * ktsk(block.k1, z)
    z1 = z - 0.3 * ktsk(block.k2, y1)
    out = block(y, z)
    torch.testing.assert_close(out[0], y1)
    torch.testing.assert_close(out[1], z1)


def test_symmetric_layer_is_kt_k_with_one_weight():
    layer = SymmetricLayer(4, act=nn.Identity).double()
    nn.init.zeros_(layer.conv.bias)
    u, v = _pair(4)
    # K^T K is symmetric positive semi-definite: <f(u), v> = <u, f(v)> and <f(u), u> = |K u|^2.
    torch.testing.assert_close((layer(u) * v).sum(), (u * layer(v)).sum())
    torch.testing.assert_close((layer(u) * u).sum(), layer.conv(u).pow(2).sum())


def test_antisymmetric_layer_is_k_minus_kt():
    layer = AntisymmetricLayer(4, act=nn.Identity).double()
    u, v = _pair(4)
    w = layer.conv.weight
    expected = F.conv2d(u, w, layer.conv.bias, padding=1) - F.conv_transpose2d(u, w, padding=1)
    torch.testing.assert_close(layer(u), expected)
    nn.init.zeros_(layer.conv.bias)
    torch.testing.assert_close((layer(u) * v).sum(), -(u * layer(v)).sum())  # (K - K^T)^T = -(K - K^T)


def test_midpoint_steps_eq_15_and_euler_start():
    block, first = MidPointBlock(4, h=0.2).double(), MidPointBlock(4, h=0.2, euler=True).double()
    prev, cur = _pair(4)
    assert torch.equal(block(prev, cur)[1], prev + 2 * 0.2 * block.f(cur))
    y0 = cur
    out = first(*MidPointBlock.split(y0))
    torch.testing.assert_close(out[1], y0 + 0.2 * first.f(y0))  # forward Euler, Eq. (12)
    assert torch.equal(out[0], y0)


def test_leapfrog_steps_eq_17_including_the_first_step():
    block = LeapfrogBlock(4, h=0.4).double()
    prev, cur = _pair(4)
    torch.testing.assert_close(block(prev, cur)[1], 2 * cur - prev - 0.16 * block.f(cur))
    y0 = cur
    _, y1 = block(*LeapfrogBlock.split(y0))
    torch.testing.assert_close(y1, 2 * y0 - 0.16 * block.f(y0))


@pytest.mark.parametrize("make", [lambda: HamiltonianBlock(7), lambda: RevNetBlock(5), lambda: RevNetEntry(6, 9)])
def test_odd_channels_rejected_at_construction(make):
    with pytest.raises(ValueError, match="odd channels"):
        make()


def test_revnet_entry_and_basic_block_widen_and_halve():
    y, z = _pair(4, torch.float32)
    y2, z2 = RevNetEntry(8, 16)(F.avg_pool2d(y, 2), F.avg_pool2d(z, 2))
    assert y2.shape == z2.shape == (3, 8, 3, 3)
    out = BasicBlock(4, 8, stride=2)(y)
    assert out.shape == (3, 8, 3, 3) and (out >= 0).all()


# ---- any linear operator: dense, 1-, 2- and 3-D ------------------------------------------------

SPATIAL = {0: (), 1: (7,), 2: (5, 6), 3: (4, 3, 5)}


def _field(c, dim, seed=0):
    return torch.randn(2, c, *SPATIAL[dim], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dim", DIMS)
def test_adjoint_is_the_operators_transpose(dim):
    k = operator(3, 5, dim, bias=False).double()  # C_in != C_out: K^T maps back onto K's input
    assert isinstance(k, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim]) and k.weight.dim() == 2 + dim
    x, y = _field(3, dim), _field(5, dim, seed=1)
    kt_y = adjoint(y, k.weight, dim)
    assert kt_y.shape == x.shape
    torch.testing.assert_close((k(x) * y).sum(), (x * kt_y).sum(), rtol=1e-12, atol=0)  # <Kx, y> = <x, K^T y>
    w_t = transposed_weight(k.weight, dim)  # K^T as an operator of K's kind
    torch.testing.assert_close(apply(y, w_t, None, dim), kt_y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", DIMS)
def test_symmetric_and_antisymmetric_layers_in_every_dim(dim):
    sym = SymmetricLayer(4, act=nn.Identity, dim=dim).double()
    anti = AntisymmetricLayer(4, act=nn.Identity, dim=dim).double()
    for layer in (sym, anti):
        nn.init.zeros_(layer.conv.bias)
    u, v = _field(4, dim), _field(4, dim, seed=1)
    # K^T K: symmetric positive semi-definite; K - K^T: antisymmetric, Eq. (7) and (13)
    torch.testing.assert_close((sym(u) * v).sum(), (u * sym(v)).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close((sym(u) * u).sum(), sym.conv(u).pow(2).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close((anti(u) * v).sum(), -(u * anti(v)).sum(), rtol=1e-12, atol=1e-12)
    assert (anti(u) * u).sum().abs() < 1e-10 and anti(u).abs().max() > 1e-2


@pytest.mark.parametrize("dim", DIMS)
def test_make_norm_matches_the_operator(dim):
    norm = make_norm("batch", 6, dim)
    assert isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim])
    assert norm(_field(6, dim).float()).shape == (2, 6, *SPATIAL[dim])
    assert isinstance(make_norm(None, 6, dim), nn.Identity)
    with pytest.raises(ValueError, match="norm must be None, 'batch' or a callable"):
        make_norm("layer", 6, dim)


@pytest.mark.parametrize("sign", [+1, -1])
def test_coupling_sign_arithmetic_inverts_exactly_on_integers_and_floats(sign):
    coupling = Coupling(sign, lambda b: b)
    qa, qu = torch.tensor([3, -7, 2**40]), torch.tensor([5, 11, -(2**41)])
    assert torch.equal(coupling.step(qa, qu), sign * qa + qu)
    assert torch.equal(coupling.unstep(coupling.step(qa, qu), qu), qa)
    a, b = _pair(2)
    assert torch.equal(coupling(a, b)[1], sign * a + b)
    torch.testing.assert_close(coupling.invert(*coupling(a, b))[0], a, rtol=0, atol=1e-15)


def test_operator_rejects_a_dim_outside_0_to_3():
    with pytest.raises(ValueError, match=r"dim must be 0 \(dense\), 1, 2 or 3"):
        operator(4, 4, dim=4)
