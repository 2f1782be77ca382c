"""Activation memory of memory-efficient models does not grow with depth; plain autograd's does."""
import pytest
import torch

from revnets import ReversibleStack, build_model, memory

from helpers import peak_bytes, saved_bytes


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


def test_saved_bytes_counts_what_autograd_keeps_except_parameters():
    linear, x = torch.nn.Linear(3, 5, bias=False), torch.randn(4, 3, requires_grad=True)
    saved, out = memory.saved_bytes(linear, lambda: torch.relu(linear(x)).sum())
    assert saved == x.nbytes + 4 * 5 * 4  # mm keeps x and the weight (a parameter, not counted); relu its output
    assert out.requires_grad


def test_peak_cpu_bytes_is_the_peak_not_the_total():
    def step():
        for _ in range(3):  # three 4 MiB tensors, each freed before the next
            torch.ones(2**20)
    assert 4 * 2**20 <= memory.peak_cpu_bytes(step) < 5 * 2**20
