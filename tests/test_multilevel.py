import pytest
import torch
import torch.nn.functional as F

from revnets import build_model, reversal_error
from revnets.multilevel import grow

KW = dict(units=(4, 3), channels=(8, 16))


def _output_gap(name, h):
    torch.manual_seed(0)
    model = build_model(name, h=h, **KW).double().eval()  # BatchNorm as a fixed function
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = model(x), grow(model)(x)
    return ((y2 - y).norm() / y.norm()).item()


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26"])
def test_grown_network_doubles_blocks_halves_h_and_keeps_the_function_up_to_O_h(name):
    torch.manual_seed(0)
    model = build_model(name, **KW)
    big = grow(model)
    for unit, grown in zip(model.units, big.units):
        assert len(grown.blocks) == 2 * len(unit.blocks)
        assert all(g.h == unit.blocks[0].h / 2 for g in grown.blocks)
        for j, block in enumerate(unit.blocks):  # weights copied, not shared
            for p, q, r in zip(block.parameters(), grown.blocks[2 * j].parameters(),
                               grown.blocks[2 * j + 1].parameters()):
                assert torch.equal(p, q) and torch.equal(p, r) and p is not q
    assert big.units_spec == (7, 5) and model.units_spec == (4, 3)
    gaps = [_output_gap(name, h) for h in (0.2, 0.1, 0.05)]
    assert gaps[0] < 0.1
    assert gaps[1] < 0.6 * gaps[0] and gaps[2] < 0.6 * gaps[1], gaps


def test_growing_twice_respaces_two_step_states_by_a_quarter():
    torch.manual_seed(0)
    model = build_model("leapfrog-26", h=0.05, **KW).double().eval()
    twice = grow(grow(model))
    assert twice.units[0].entry.ratio == 0.25 and len(twice.units[0].blocks) == 12
    assert [type(b).__name__ for b in twice.units[0]][:2] == ["LeapfrogBlock", "LeapfrogBlock"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        assert ((twice(x) - y).norm() / y.norm()) < 0.05
    assert max(reversal_error(twice, x).values()) < 1e-12  # the re-spaced entry feeds an invertible chain


def test_grown_network_trains_on():
    torch.manual_seed(0)
    model = grow(build_model("hamiltonian-74", **KW))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = F.cross_entropy(model(x), y)
    before.backward()
    opt.step()
    assert F.cross_entropy(model(x), y) < before.item()


@pytest.mark.parametrize("name", ["revnet-38", "resnet-32"])
def test_grow_refuses_schemes_without_a_step_size(name):
    with pytest.raises(ValueError, match="step size h"):
        grow(build_model(name, **KW))


def test_grown_auto_segment_network_measures_its_new_chain():
    torch.manual_seed(0)
    model = build_model("hamiltonian-74", segment="auto", **KW)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    big = grow(model)
    assert big.units[0].blocks.segment.choice is None and model.units[0].blocks.segment.choice is not None
    big(torch.randn(2, 3, 8, 8)).sum().backward()
    grown, first = big.units[0].blocks.segment.choice, model.units[0].blocks.segment.choice
    assert grown.k is first.k is None and grown.stored_bytes == first.stored_bytes  # the same two states kept
