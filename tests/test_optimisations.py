"""The speed options a user can switch on give the same gradients as the default path.

channels-last memory format is what `revnets train --channels-last` applies on a GPU; here it is
checked on the CPU, in float64, against the default NCHW step. `--compile` (torch.compile) has its
own tests: tests/test_compile.py.
"""
import pytest
import torch

import revnets

from helpers import model_grads

SCHEMES = ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"]


def _grads(model, x, y):
    return model_grads(model, x, y)[1]


def _model_and_batch(name):
    torch.manual_seed(0)
    model = revnets.build_model(name, units=(2, 2, 2), channels=(8, 16, 32)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    return model, x, torch.tensor([0, 1, 2, 3])


def _assert_close(got, want, rtol):
    assert (got - want).norm() <= rtol * want.norm()


@pytest.mark.parametrize("name", SCHEMES)
def test_channels_last_gives_the_same_gradients(name):
    model, x, y = _model_and_batch(name)
    want = _grads(model, x, y)
    model = model.to(memory_format=torch.channels_last)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    _assert_close(_grads(model, x.to(memory_format=torch.channels_last), y), want, rtol=1e-12)
