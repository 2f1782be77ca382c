"""Activation memory of memory-efficient models does not grow with depth; plain autograd's does."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from revnets import ReversibleStack, build_model


def saved_bytes(model, x):
    """Bytes of non-parameter tensors autograd keeps for the backward of one forward pass."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"])
def test_saved_activations_independent_of_depth(name):
    x = torch.randn(4, 3, 16, 16)
    kw = dict(channels=(8, 16, 32))
    shallow = saved_bytes(build_model(name, units=(6, 6, 6), **kw), x)
    deep = saved_bytes(build_model(name, units=(100, 100, 100), **kw), x)
    assert deep <= 1.5 * shallow
    plain_shallow = saved_bytes(build_model(name, units=(6, 6, 6), memory_efficient=False, **kw), x)
    plain_deep = saved_bytes(build_model(name, units=(100, 100, 100), memory_efficient=False, **kw), x)
    assert plain_deep > 10 * plain_shallow  # grows about linearly: 99 / 5 reversible blocks per unit


def peak_bytes(model, x):
    """Peak bytes held by the CPU allocator during one forward and backward, above what it held
    before and not counting the parameters' gradients (which grow with depth in every mode): the
    running sum of the profiler's allocation and free events, not the process RSS."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).sum().backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak - sum(p.numel() * p.element_size() for p in model.parameters())


def test_peak_allocator_memory_flat_in_depth_for_memory_efficient_models():
    x = torch.randn(16, 3, 16, 16)
    peak = {}
    for me in (True, False):
        for n in (6, 60):
            torch.manual_seed(0)
            peak[me, n] = peak_bytes(build_model("hamiltonian-74", units=(n,) * 3, channels=(16, 32, 64),
                                                 memory_efficient=me), x)
    assert peak[True, 60] <= 1.2 * peak[True, 6], peak
    assert peak[False, 60] > 5 * peak[False, 6], peak


def test_first_step_allocator_memory_flat_in_depth():
    """Nothing the engine keeps per coupling (such as random-number states) on its first step."""
    x = torch.randn(4, 8, 64)
    peak = {n: peak_bytes(ReversibleStack("hamiltonian", 8, n, dim=1), x) for n in (10, 1000)}
    assert peak[1000] <= 1.2 * peak[10], peak
