"""Activation memory of memory-efficient models does not grow with depth; plain autograd's does."""
import subprocess
import sys

import pytest
import torch

from revnets import build_model


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


PEAK = """
import resource, sys, torch
from revnets import build_model
torch.manual_seed(0)
model = build_model("hamiltonian-74", units=(int(sys.argv[1]),) * 3, channels=(16, 32, 64),
                    memory_efficient=sys.argv[2] == "1")
x = torch.randn(64, 3, 32, 32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(x).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def peak_kib(blocks, memory_efficient):
    out = subprocess.run([sys.executable, "-c", PEAK, str(blocks), str(int(memory_efficient))],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_peak_process_memory_flat_in_depth_for_memory_efficient_models():
    me_6, me_100 = peak_kib(6, True), peak_kib(100, True)
    plain_6, plain_100 = peak_kib(6, False), peak_kib(100, False)
    assert me_100 <= 1.5 * me_6, (me_6, me_100)
    assert plain_100 > 5 * plain_6, (plain_6, plain_100)
