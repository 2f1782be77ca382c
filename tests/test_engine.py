import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import revnets
from revnets import AdditiveCoupling, HamiltonianBlock, invert, reversible, sequential

from helpers import bf16_grads, chain_grads, ddp_worker, relative_error


def _assert_same(run_a, run_b, blocks, a, b, rtol):
    (x1, y1), g1 = chain_grads(run_a, blocks, a, b)
    (x2, y2), g2 = chain_grads(run_b, blocks, a, b)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert relative_error(g1, g2) < rtol


def test_engine_makes_any_pair_of_residual_functions_reversible():
    torch.manual_seed(0)
    blocks = nn.ModuleList(AdditiveCoupling(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()),
                                            nn.Sequential(nn.Linear(5, 5), nn.Softplus())) for _ in range(20)).double()
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    _assert_same(reversible, sequential, blocks, a, b, rtol=1e-10)


def test_time_invariant_weights_accumulate_over_repeats():
    torch.manual_seed(0)
    block = HamiltonianBlock(8, h=0.2).double()
    blocks = [block] * 30  # one set of weights used 30 times
    a, b = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    _assert_same(reversible, sequential, blocks, a, b, rtol=1e-10)


def test_forward_keeps_only_input_and_output():
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(8) for _ in range(50))
    a, b = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, 5, 5)
    saved, params = [], {p.data_ptr() for p in blocks.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reversible(blocks, a, b)
    assert len([t for t in saved if t.data_ptr() not in params]) == 4  # the parameters are saved by reference


def test_invert_rebuilds_input():
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(8, h=0.2) for _ in range(10)).double()
    a, b = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    a2, b2 = invert(blocks, *sequential(blocks, a, b))
    torch.testing.assert_close((a2, b2), (a, b), rtol=0, atol=1e-12)


def test_first_coupling_uses_the_exact_input_at_the_relu_kink():
    # Z0 = 0 and zero biases put K1 Z0 + b1 exactly at ReLU's kink. A rebuilt Z0 is off by rounding
    # and would flip relu'(0) = 0 to 1, changing the first block's K1 gradient.
    torch.manual_seed(0)
    blocks = nn.ModuleList(HamiltonianBlock(16, h=0.5) for _ in range(40))
    for blk in blocks:
        nn.init.zeros_(blk.k1.conv.bias)
        nn.init.zeros_(blk.k2.conv.bias)
    a, b = torch.randn(2, 8, 6, 6), torch.zeros(2, 8, 6, 6)
    (_, _), g1 = chain_grads(reversible, blocks, a, b)
    (_, _), g2 = chain_grads(sequential, blocks, a, b)
    k1 = slice(2 * a.numel(), 2 * a.numel() + blocks[0].k1.conv.weight.numel())  # after a and b's gradients
    assert torch.allclose(g1[k1], g2[k1], rtol=1e-4, atol=1e-6)
    rebuilt = invert(blocks, *sequential(blocks, a, b))[1]
    assert rebuilt.abs().max() > 0  # the rebuilt input really is off the kink


def test_batchnorm_running_stats_updated_once():
    torch.manual_seed(0)
    model = revnets.build_model("hamiltonian-74", units=(4, 4), channels=(8, 16), norm=nn.BatchNorm2d)
    plain = revnets.build_model("hamiltonian-74", units=(4, 4), channels=(8, 16), norm=nn.BatchNorm2d,
                                memory_efficient=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 8, 8)
    for m in (model, plain):
        m(x).sum().backward()
    for (name, u), v in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(u, v), name
    assert model.units[0].blocks[0].k1.norm.num_batches_tracked.item() == 1


def _bf16_errors(name, **kw):
    """Relative errors of bf16-autocast gradients (plain, memory-efficient) to float64, and between them."""
    torch.manual_seed(0)
    ref = revnets.build_model(name, memory_efficient=False, units=(100,), channels=(16,), **kw).double()
    x = torch.randn(8, 3, 8, 8)
    g_ref = bf16_grads(ref, x)
    g = {}
    for me in (False, True):
        model = revnets.build_model(name, memory_efficient=me, units=(100,), channels=(16,), **kw)
        model.load_state_dict(ref.state_dict())
        g[me] = bf16_grads(model, x)
    err = {me: ((g[me] - g_ref).norm() / g_ref.norm()).item() for me in g}
    return err, ((g[True] - g[False]).norm() / g[False].norm()).item()


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"])
def test_bf16_autocast_gradients_as_accurate_as_plain_autograd(name):
    err, _ = _bf16_errors(name)
    assert err[True] <= 1.5 * err[False], err


@pytest.mark.parametrize("name", ["hamiltonian-74", "revnet-38"])
def test_bf16_recomputation_replays_the_forward_autocast_state(name):
    """The backward runs outside the forward's autocast context: every convolution of the
    recomputation must still run in bf16, as in the forward (a dtype, the same on every CPU)."""
    torch.manual_seed(0)
    model = revnets.build_model(name, units=(3,), channels=(8,))
    seen = {"forward": set(), "backward": set()}
    phase = "forward"
    for m in model.units[0].blocks.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, out: seen[phase].add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8))
    phase = "backward"
    out.float().sum().backward()
    assert seen == {"forward": {torch.bfloat16}, "backward": {torch.bfloat16}}


def test_ddp_gloo_gradients_equal_single_process(tmp_path):
    torch.manual_seed(0)
    model = revnets.build_model("hamiltonian-74", units=(3, 3), channels=(8, 16))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_file = tmp_path / "grads.pt"
    mp.start_processes(ddp_worker, args=(2, tmp_path / "store", model, x, y, out_file), nprocs=2,
                       start_method="spawn")
    grads = torch.load(out_file)
    # BatchNorm normalises each shard with its own statistics, so compare with the mean of the two
    # per-shard single-process gradients (what DDP averages).
    single = []
    for shard in (slice(0, 4), slice(4, 8)):
        model.load_state_dict(state)
        model.zero_grad()
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        single.append([p.grad.clone() for p in model.parameters()])
    for g, g0, g1 in zip(grads, *single):
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-4, atol=1e-6)
