import pytest
import torch

import revnets
from revnets import (MODELS, DriftMonitor, ReversibleStack, build_model, invert, list_models, reversal_error,
                     sequential, smoothness_penalty)
from revnets.models import PAPER_PARAMS
from revnets.networks import ReversibleUnit
from revnets.schemes import SCHEMES

SMALL = dict(units=(2, 2, 2), channels=(8, 16, 32))
IMAGE_MODELS = [name for name in list_models() if MODELS[name]["kind"] == "image"]


def _count(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_parameter_counts_within_10_percent_of_table_1(name):
    c10, c100 = PAPER_PARAMS[name]
    assert abs(_count(build_model(name)) / c10 - 1) < 0.10
    if c100 is not None:
        assert abs(_count(build_model(name, num_classes=100)) / c100 - 1) < 0.10


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_image_model_runs_and_trains_every_parameter(name):
    model = build_model(name, **SMALL)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38", "resnet-32"])
@pytest.mark.parametrize("units", [(1, 1, 1), (3, 5, 2), (50, 50, 50)])
def test_memory_efficient_gradients_equal_plain_autograd_in_float64(name, units):
    torch.manual_seed(0)
    kw = dict(units=units, channels=(4, 8, 8))
    fast = build_model(name, **kw).double()
    plain = build_model(name, memory_efficient=False, **kw).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = []
    for model in (fast, plain):
        xi = x.clone().requires_grad_()
        out = model(xi)
        (out.pow(2).sum() + out.sum()).backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for g_fast, g_plain in zip(*grads):
        assert ((g_fast - g_plain).norm() / g_plain.norm()) < 1e-9


def _grads_and_saved(model, x):
    """(gradients of x and every parameter, number of tensors autograd saved) of one backward."""
    saved = []
    xi = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(xi)
    (out.pow(2).sum() + out.sum()).backward()
    grads = [xi.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, len(saved)


@pytest.mark.parametrize("name", ["hamiltonian-74", "revnet-38"])
def test_memory_efficient_setter_switches_the_engine_and_keeps_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, units=(4, 4, 4), channels=(4, 8, 8)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fast, fast_saved = _grads_and_saved(model, x)
    model.memory_efficient = False
    assert model.memory_efficient is False
    plain, plain_saved = _grads_and_saved(model, x)
    model.memory_efficient = True
    again, again_saved = _grads_and_saved(model, x)
    assert plain_saved > fast_saved == again_saved  # plain autograd stores the blocks' activations
    for g_fast, g_plain, g_again in zip(fast, plain, again):
        assert (g_fast - g_plain).norm() <= 1e-9 * g_plain.norm() and torch.equal(g_fast, g_again)


def test_resnet_has_no_memory_efficient_mode_to_switch_on():
    model = build_model("resnet-32", **SMALL)
    model.memory_efficient = False
    assert model.memory_efficient is False
    with pytest.raises(ValueError, match="no reversible chain"):
        model.memory_efficient = True


def test_same_state_dict_in_both_modes():
    assert build_model("hamiltonian-74").state_dict().keys() == \
        build_model("hamiltonian-74", memory_efficient=False).state_dict().keys()


def test_grey_inputs_other_resolutions_and_four_units():
    model = build_model("hamiltonian-74", in_channels=1, num_classes=3, units=(4, 4, 4, 4),
                        channels=(16, 64, 128, 256))
    assert model(torch.randn(2, 1, 24, 40)).shape == (2, 3)
    assert build_model("resnet-32", **SMALL)(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_hamiltonian_units_rebuild_their_inputs_in_float32_at_100_blocks():
    torch.manual_seed(0)
    model = build_model("hamiltonian-218", units=(100, 100, 100), channels=(16, 32, 64)).eval()
    x = model.stem(torch.randn(4, 3, 16, 16))
    with torch.no_grad():
        for unit in model.units:
            a, b = unit.entry(*unit.block.split(torch.nn.functional.avg_pool2d(x, 2) if unit.pool else x))
            out = sequential(unit.blocks, a, b)
            a2, b2 = invert(unit.blocks, *out)
            err = torch.cat([a2 - a, b2 - b]).norm() / torch.cat([a, b]).norm()
            assert err < 1e-5
            x = unit.block.merge(*out)


@pytest.mark.parametrize("shape, match", [((3, 32, 32), r"\(N, 3, H, W\)"), ((2, 1, 32, 32), r"\(N, 3, H, W\)"),
                                          ((2, 3, 30, 32), "multiples of 4"), ((2, 3, 2, 2), "multiples of 4")])
def test_bad_input_shape_names_the_expected_shape(shape, match):
    with pytest.raises(ValueError, match=match):
        build_model("hamiltonian-74", **SMALL)(torch.randn(*shape))


@pytest.mark.parametrize("make, value", [
    (lambda: build_model("hamiltonian-74", h=float("nan")), "nan"),
    (lambda: build_model("hamiltonian-74", h=-1.0), "-1.0"),
    (lambda: build_model("leapfrog-26", h=0.0), "0.0"),  # h = 0: every block the identity
    (lambda: ReversibleStack("hamiltonian", 8, depth=2, h=float("inf")), "inf"),
    (lambda: ReversibleStack("midpoint", 8, depth=2, h=-0.1), "-0.1"),
])
def test_the_api_refuses_the_step_sizes_the_command_line_refuses(make, value):
    with pytest.raises(ValueError, match=rf"h \(the step size\) must be a finite number > 0; got {value}"):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: build_model("hamiltonian-74", num_classes=0), "num_classes must be a positive integer; got 0"),
    (lambda: build_model("resnet-32", in_channels=0), "in_channels must be a positive integer; got 0"),
    (lambda: build_model("hamiltonian-74", channels=(0, 0, 0)),
     r"one positive integer each per unit; got .*channels=\(0, 0, 0\)"),
    (lambda: build_model("hamiltonian-74", channels=(8, 16, 32.0)), r"positive integer each per unit; got .*32\.0"),
    (lambda: build_model("hamiltonian-74", units=(2, 2.5, 2)), r"positive integer each per unit; got units=\(2, 2\.5"),
    (lambda: revnets.register_model("bad", scheme="revnet", units=3, channels=(8,)), "got units=3"),
    (lambda: revnets.register_model("bad", scheme="revnet", units=(1, 1), channels=(16, 8)), "must not decrease"),
    (lambda: revnets.register_model("bad", scheme="leapfrog", width=-1, depth=2, heads=2, context=8),
     "width must be a positive integer; got -1"),
    (lambda: ReversibleStack("hamiltonian", 0, depth=2), "channels must be a positive integer; got 0"),
    (lambda: ReversibleStack("revnet", -2, depth=2), "channels must be a positive integer; got -2"),
])
def test_empty_sizes_are_refused_naming_the_setting(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, shape", [(lambda: ReversibleStack("hamiltonian", 8, depth=2), (2, 8, 4, 4)),
                                         (lambda: ReversibleStack("leapfrog", 8, depth=2, dim=0), (2, 8)),
                                         (lambda: build_model("hamiltonian-74", **SMALL), (2, 3, 8, 8))])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_input_is_refused_naming_the_expected_dtype(make, shape, dtype):
    model = make()
    with pytest.raises(ValueError, match=f"expects floating-point input .*; got {dtype}"):
        model(torch.zeros(shape, dtype=dtype))
    assert model(torch.zeros(shape)).dtype == torch.float32  # the same shape in floating point runs


def test_stable_schemes_are_the_ones_with_a_step_size():
    assert {"hamiltonian", "midpoint", "leapfrog"} <= {s for s, r in SCHEMES.items() if r.has_step}
    assert not SCHEMES["revnet"].has_step and not SCHEMES["resnet"].has_step
    for name in ("hamiltonian-74", "midpoint-26", "leapfrog-26"):
        build_model(name, units=(1, 1, 1), channels=(4, 4, 4), h=0.05)
    with pytest.raises(ValueError, match="no setting h"):
        build_model("revnet-38", h=0.05)


def test_unknown_model_and_setting_list_the_valid_ones():
    with pytest.raises(ValueError, match="hamiltonian-74.*leapfrog-62"):
        build_model("hamiltonian-75")
    with pytest.raises(ValueError, match="valid overrides: units, channels, act, norm"):
        build_model("resnet-32", h=0.1)
    with pytest.raises(ValueError, match="odd channels"):
        build_model("hamiltonian-74", channels=(32, 64, 113))


def test_smoothness_penalty_is_eq_22():
    model = build_model("hamiltonian-74", units=(3, 2), channels=(8, 16), h=0.25)
    expected = 0.0
    for unit in model.units:
        blocks = list(unit)
        for j in range(len(blocks) - 1):
            for k in ("k1", "k2"):
                w0, w1 = getattr(blocks[j], k).conv.weight, getattr(blocks[j + 1], k).conv.weight
                if w0.shape == w1.shape:
                    expected += 0.25 * ((w0 - w1) / 0.25).pow(2).sum()
    assert len(list(model.units[1])) == 2 and expected > 0
    torch.testing.assert_close(smoothness_penalty(model), expected)


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"])
def test_smoothness_penalty_vanishes_for_constant_kernels(name):
    model = build_model(name, units=(3, 3), channels=(8, 8))
    assert smoothness_penalty(model) > 0
    with torch.no_grad():
        for unit in model.units:
            blocks = list(unit)
            for block in blocks[1:]:
                for (n, p), q in zip(block.named_parameters(), blocks[0].parameters()):
                    p.copy_(q)
    assert smoothness_penalty(model) == 0


# ---- ReversibleStack: one unit of any scheme on dense features or 1-, 2-, 3-D signals -----------

@pytest.mark.parametrize("dim, shape", [(0, (3, 6)), (1, (3, 6, 9)), (2, (3, 6, 5, 4)), (3, (3, 6, 3, 4, 2))])
def test_reversible_stack_keeps_the_shape_and_the_engine_options(dim, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    plain = ReversibleStack("hamiltonian", 6, 5, dim=dim, memory_efficient=False).double()
    reference = plain(x.clone().requires_grad_())
    reference.sum().backward()
    for kw in (dict(segment=2), dict(exact=True), dict(segment="auto")):
        stack = ReversibleStack("hamiltonian", 6, 5, dim=dim, **kw).double()
        stack.load_state_dict(plain.state_dict())
        xi = x.clone().requires_grad_()
        out = stack(xi)
        assert out.shape == x.shape and stack.depth == 5
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-8)
        out.sum().backward()
        for p, q in zip(stack.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    assert reversal_error(ReversibleStack("leapfrog", 6, 5, dim=dim, exact=True).double(), x) == {"unit0": 0.0}
    errors = DriftMonitor(every=1, threshold=1e-6).step(plain, x, step=0)
    assert errors.keys() == {"unit0"} and errors["unit0"] < 1e-12


def test_reversible_stack_takes_the_scheme_settings():
    stack = ReversibleStack("midpoint", 4, 3, dim=1, h=0.3, norm=None, act=torch.nn.Tanh)
    assert all(b.h == 0.3 for b in stack) and stack.entry.block.euler and not stack.blocks[0].euler
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in stack.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in ReversibleStack("revnet", 4, 2, dim=3).modules())


@pytest.mark.parametrize("make, match", [
    (lambda: ReversibleStack("hamiltonian", 5, 3, dim=1), "odd channels=5"),
    (lambda: ReversibleStack("revnet", 7, 3, dim=0), "odd channels=7"),
    (lambda: ReversibleStack("hamiltonian", 4, 3, dim=4), r"dim must be 0 \(dense\), 1, 2 or 3"),
    (lambda: ReversibleStack("hamiltonian", 4, 3, dim=-1), r"dim must be 0 \(dense\), 1, 2 or 3"),
    (lambda: ReversibleStack("verlet", 4, 3), "unknown scheme 'verlet'; expected one of hamiltonian"),
    (lambda: ReversibleStack("resnet", 4, 3), "needs a reversible scheme"),
    (lambda: ReversibleStack("hamiltonian", 4, 0), "depth must be a positive integer; got 0"),
    (lambda: ReversibleStack("revnet", 4, 3, h=0.1), "no setting h; valid overrides: act, norm, segment, exact"),
])
def test_reversible_stack_rejects_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("dim, shape, expected", [(0, (2, 4, 3), r"\(N, 4\)"), (1, (2, 4), r"\(N, 4, L\)"),
                                                  (3, (2, 4, 3, 3), r"\(N, 4, D, H, W\)"),
                                                  (2, (2, 5, 3, 3), r"\(N, 4, H, W\)")])
def test_reversible_stack_names_the_expected_input_shape(dim, shape, expected):
    stack = ReversibleStack("hamiltonian", 4, 2, dim=dim)
    with pytest.raises(ValueError, match=expected):
        stack(torch.randn(*shape))
    with pytest.raises(ValueError, match=expected):
        reversal_error(stack, torch.randn(*shape))


def test_network_units_are_the_same_blocks_with_dim_2():
    model = build_model("hamiltonian-74", **SMALL)
    stack = ReversibleStack("hamiltonian", 8, 2)
    assert type(model.units[0]).__mro__[0] is ReversibleUnit and isinstance(stack, ReversibleUnit)
    assert [(k, v.shape) for k, v in model.units[0].state_dict().items()] == \
        [(k, v.shape) for k, v in stack.state_dict().items()]
    assert model.units_spec == (2, 2, 2) and build_model("resnet-32", **SMALL).units_spec == (2, 2, 2)


def test_reversible_unit_rejects_other_blocks_and_pooling_outside_2d():
    from revnets.blocks import BasicBlock, HamiltonianBlock
    with pytest.raises(ValueError, match="needs a ReversibleBlock class; got <class 'revnets.blocks.BasicBlock'>"):
        ReversibleUnit(BasicBlock, 4, 4, 2, pool=False)
    with pytest.raises(ValueError, match="pools 2-D feature maps only; got pool=True with dim=3"):
        ReversibleUnit(HamiltonianBlock, 4, 4, 2, pool=True, dim=3)
    unit = ReversibleUnit(HamiltonianBlock, 4, 8, 2, pool=True, norm=None)  # the paper's widening unit
    assert unit(torch.randn(2, 4, 8, 8)).shape == (2, 8, 4, 4)
