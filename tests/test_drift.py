import warnings

import pytest
import torch
from torch import nn

from revnets import build_model, invert, sequential
from revnets.drift import DriftMonitor, reversal_error

SMALL = dict(units=(3, 3), channels=(8, 16))


def _direct(model, x):
    """The reversal error measured by hand, unit by unit."""
    errors = {}
    with torch.no_grad():
        x = model.stem(x)
        for i, unit in enumerate(model.units):
            a, b = unit.chain_input(x)
            out = sequential(unit.blocks, a, b)
            a2, b2 = invert(unit.blocks, *out)
            errors[f"unit{i}"] = (torch.cat([a2 - a, b2 - b]).norm() / torch.cat([a, b]).norm()).item()
            x = unit.block.merge(*out)
    return errors


@pytest.mark.parametrize("name", ["hamiltonian-74", "midpoint-26", "leapfrog-26", "revnet-38"])
def test_monitor_reports_the_directly_measured_error(name):
    torch.manual_seed(0)
    model = build_model(name, units=(30, 30), channels=(8, 16), **({} if name == "revnet-38" else dict(h=0.5)))
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    direct = _direct(model, x)
    errors = DriftMonitor(every=1, threshold=1e9).step(model, x, step=0)
    assert errors.keys() == {"unit0", "unit1"}
    for k in direct:
        assert errors[k] == pytest.approx(direct[k], rel=1e-3), k
        assert errors[k] > 0


def test_reversal_error_leaves_batchnorm_statistics_and_gradients_alone():
    torch.manual_seed(0)
    model = build_model("revnet-38", **SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reversal_error(model, torch.randn(4, 3, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_float64_reversal_is_exact_to_rounding_and_resnet_has_no_reversible_units():
    torch.manual_seed(0)
    errors = reversal_error(build_model("hamiltonian-74", **SMALL).double(), torch.randn(2, 3, 8, 8).double())
    assert max(errors.values()) < 1e-13
    assert reversal_error(build_model("resnet-32", **SMALL), torch.randn(2, 3, 8, 8)) == {}


def test_monitor_measures_every_k_steps_and_warns_above_threshold():
    torch.manual_seed(0)
    model = build_model("hamiltonian-74", **SMALL)
    x = torch.randn(2, 3, 8, 8)
    monitor = DriftMonitor(every=3, threshold=1e-30)
    with pytest.warns(RuntimeWarning, match="reversal error above"):
        assert monitor.step(model, x, step=3) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.step(model, x, step=4) is None
        assert DriftMonitor(every=3, threshold=1.0).step(model, x, step=6) is not None


@pytest.mark.parametrize("every, threshold", [(0, 1.0), (1.5, 1.0), (1, 0.0)])
def test_monitor_rejects_bad_settings(every, threshold):
    with pytest.raises(ValueError, match="DriftMonitor"):
        DriftMonitor(every, threshold)
