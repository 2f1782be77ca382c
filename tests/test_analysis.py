"""Stability toolkit: spectra with known answers (Appendix), Eq. (21), growth and reversal drift."""
import json
import math
import warnings

import pytest
import torch
from torch import nn

from revnets import ReversibleStack, analysis, build_model
from revnets.blocks import HamiltonianBlock, LeapfrogBlock, MidPointBlock, RevNetBlock
from revnets.cli import main


SPATIAL = {0: (), 1: (9,), 2: (4, 4), 3: (3, 3, 3)}  # dense features, 1-D signals, images, volumes


def _block(kind: str, channels: int = 4, act=nn.Tanh, h: float = 0.1, dim: int = 2):
    """A tiny block and a random input state of batch one (dense: batch 4), 4x4 pixels for dim 2."""
    torch.manual_seed(0)
    block = {"hamiltonian": lambda: HamiltonianBlock(channels, h=h, act=act, dim=dim),
             "leapfrog": lambda: LeapfrogBlock(channels, h=h, act=act, dim=dim),
             "midpoint": lambda: MidPointBlock(channels, h=h, act=act, dim=dim),
             "revnet": lambda: RevNetBlock(channels, act=act, norm=None, dim=dim)}[kind]()
    width = channels if kind in ("leapfrog", "midpoint") else channels // 2
    shape = (4 if dim == 0 else 1, width, *SPATIAL[dim])
    return block, torch.randn(shape), torch.randn(shape)


# With ReLU, J has Jordan blocks at 0 and rounding moves those eigenvalues by ~sqrt(1e-16) = 1e-8;
# smooth activations show the Appendix's result to ~1e-16. "Any linear operator" (Section 3): the
# spectrum is imaginary for K a dense matrix and a 1-, 2- or 3-D convolution alike.
@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("act,tol", [(nn.Tanh, 1e-8), (nn.ReLU, 1e-6)])
@pytest.mark.parametrize("kind", ["hamiltonian", "leapfrog", "midpoint"])
def test_stable_schemes_have_imaginary_spectra(kind, act, tol, dim):
    values = analysis.eigenvalues(*_block(kind, act=act, dim=dim))
    assert values.abs().max() > 0.1
    assert values.real.abs().max() < tol


@pytest.mark.parametrize("dim", [0, 1, 3])
def test_revnet_coupling_has_real_eigenvalues_in_every_dim(dim):
    assert analysis.eigenvalues(*_block("revnet", act=nn.Tanh, dim=dim)).real.max() > 1e-3


@pytest.mark.parametrize("dim", [0, 1, 3])
@pytest.mark.parametrize("scheme", ["hamiltonian", "midpoint"])
def test_stack_spectra_growth_and_step_size_for_every_operator(scheme, dim):
    torch.manual_seed(0)
    stack = ReversibleStack(scheme, 4, 6, dim=dim, act=nn.Tanh).eval()
    x = torch.randn(4 if dim == 0 else 1, 4, *SPATIAL[dim])
    (block, a, b), = [(blk, a, b) for blk, a, b in analysis.block_inputs(stack, x) if blk is stack.blocks[0]]
    dense = analysis.eigenvalues(block, a, b)
    assert dense.real.abs().max() < 1e-8 and dense.abs().max() > 0.1  # Eq. (9), Eq. (14)
    ritz = analysis.spectral_estimate(*analysis.ritz_values(block, a, b, steps=40))
    assert ritz["radius"] == pytest.approx(dense.abs().max().item(), rel=1e-3)
    assert abs(analysis.growth([block] * 50, a, b, [50])[0]) < 2  # imaginary spectrum: no exponential growth
    step = analysis.check_step_size(stack, x, steps=20)
    assert step["h_max"] == pytest.approx(block.stability_bound / step["spectral_radius"])


def test_revnet_coupling_has_positive_real_parts():
    assert analysis.eigenvalues(*_block("revnet")).real.max() > 1e-3


def test_vector_field_rejects_other_blocks():
    with pytest.raises(ValueError, match="HamiltonianBlock"):
        analysis.vector_field(nn.Identity(), torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("kind", ["hamiltonian", "leapfrog", "midpoint", "revnet"])
def test_arnoldi_matches_dense_spectrum(kind):
    block, a, b = _block(kind)
    dense = analysis.spectral_estimate(analysis.eigenvalues(block, a, b))
    ritz = analysis.spectral_estimate(*analysis.ritz_values(block, a, b, steps=40))
    assert ritz["radius"] == pytest.approx(dense["radius"], rel=1e-3)
    full = analysis.spectral_estimate(*analysis.ritz_values(block, a, b, steps=a.numel() * 4))
    assert full["max_real"] == pytest.approx(dense["max_real"], abs=1e-6)


def test_arnoldi_on_a_known_matrix():
    torch.manual_seed(0)
    m = torch.randn(50, 50, dtype=torch.float64)
    values, residuals = analysis.arnoldi(lambda v: m @ v, torch.randn(50, dtype=torch.float64), 50)
    exact = torch.linalg.eigvals(m)
    assert values.abs().max() == pytest.approx(exact.abs().max().item(), rel=1e-10)
    assert residuals.max() < 1e-8


def test_arnoldi_residuals_bound_the_distance_to_the_spectrum():
    """A normal matrix (Bauer-Fike): every Ritz value lies within its residual of an eigenvalue, and
    the isolated extreme eigenvalue converges in 30 of 200 steps with a tiny residual."""
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))[0]
    spectrum = torch.cat((torch.linspace(0, 1, 198, dtype=torch.float64),
                          torch.tensor([5.0, 10.0], dtype=torch.float64)))
    m = q @ torch.diag(spectrum) @ q.T
    values, residuals = analysis.arnoldi(lambda v: m @ v, torch.randn(200, dtype=torch.float64), 30)
    distance = (values[:, None] - spectrum.to(values.dtype)).abs().min(dim=1).values
    assert (distance <= residuals * (1 + 1e-9) + 1e-12).all()
    top = values.abs().argmax()
    assert values[top].real == pytest.approx(10.0, abs=1e-10) and residuals[top] < 1e-10


@pytest.mark.parametrize("ab", [-4.0, -2.5, -1.0, -0.01, 0.0])
def test_eq21_roots_on_the_unit_circle_when_stable(ab):
    for xi in analysis.eq21_roots(1.0, ab):
        assert abs(xi) == pytest.approx(1.0, abs=1e-7)
        assert abs(xi * xi - (2 + ab) * xi + 1) < 1e-12


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (-0.3, 20.0), (0.1, -50.0)])
def test_eq21_roots_grow_outside_the_band(alpha, beta):
    assert max(abs(xi) for xi in analysis.eq21_roots(alpha, beta)) > 1.0


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.3), (-0.5, 10.0), (1.0, 1.0)])
def test_linear_revnet_grows_like_its_root(alpha, beta):
    block = analysis.linear_revnet(alpha, beta)
    y, z = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    log_g = analysis.growth([block] * 400, y, z, [200, 400])  # |xi|^400 < 1e300: no overflow
    rate = math.log(max(abs(xi) for xi in analysis.eq21_roots(alpha, beta)))
    assert (log_g[1] - log_g[0]) / 200 == pytest.approx(rate, rel=1e-6)


def test_linear_revnet_stays_bounded_when_stable():
    block = analysis.linear_revnet(0.5, -1.0)  # alpha beta = -0.5: |xi| = 1
    log_g = analysis.growth([block] * 500, torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), [10, 100, 500])
    assert max(abs(g) for g in log_g) < math.log(10)


def test_growth_time_invariant_and_random_chains():
    block, a, b = _block("revnet", act=nn.ReLU)
    log_g = analysis.growth([block] * 200, a, b, [0, 200])
    assert log_g[0] == 0.0 and log_g[1] > 1.0  # exponential growth of the unconstrained coupling
    torch.manual_seed(1)
    chain = [HamiltonianBlock(4) for _ in range(200)]
    assert abs(analysis.growth(chain, a, b, [200])[0]) < math.log(10)
    with pytest.raises(ValueError, match="depths"):
        analysis.growth(chain, a, b, [201])


def test_growth_reports_nan_once_the_state_overflows():
    block = analysis.linear_revnet(10.0, 10.0)
    log_g = analysis.growth([block] * 400, torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), [1, 400])
    assert math.isfinite(log_g[0]) and math.isnan(log_g[1])


def test_reversal_drift_float64_below_1e10_at_1000_blocks():
    block, a, b = _block("hamiltonian", act=nn.ReLU)
    errors = analysis.reversal_drift([block] * 1000, a, b, [10, 1000], torch.float64)
    assert errors[1] < 1e-10
    assert analysis.reversal_drift([block] * 10, a, b, [10], torch.float32)[0] > errors[0]
    unstable = [analysis.linear_revnet(1.0, 1.0)] * 40  # |xi| = 2.6: rounding is amplified 2.6^40 on the way back
    assert analysis.reversal_drift(unstable, a[:, :2], b[:, :2], [40], torch.float64)[0] > 1.0


def test_reversal_error_per_unit_is_reexported():
    model = build_model("hamiltonian-74", units=(2, 2, 2), channels=(8, 8, 8))
    errors = analysis.reversal_error(model, torch.randn(2, 3, 8, 8))
    assert set(errors) == {"unit0", "unit1", "unit2"} and max(errors.values()) < 1e-5


def test_block_inputs_finds_every_reversible_block():
    model = build_model("leapfrog-26", units=(2, 3, 1), channels=(8, 8, 8))
    found = analysis.block_inputs(model, torch.randn(1, 3, 8, 8))
    assert len(found) == 6 and all(a.shape == b.shape for _, a, b in found)


def test_check_step_size_warns_past_the_bound_only():
    torch.manual_seed(0)
    model = build_model("hamiltonian-74", units=(2, 1, 1), channels=(8, 8, 8), h=0.1)
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = analysis.check_step_size(model, x)
    assert result["h"] == 0.1 < result["h_max"] == pytest.approx(2 / result["spectral_radius"])
    for blk in model.modules():
        if isinstance(blk, HamiltonianBlock):
            blk.h = 2 * result["h_max"]
    with pytest.warns(RuntimeWarning, match="past the stability bound"):
        result = analysis.check_step_size(model, x)
    assert result["h"] >= result["h_max"]


def test_check_step_size_rejects_revnet():
    model = build_model("revnet-38", units=(2, 1, 1), channels=(8, 8, 8))
    with pytest.raises(ValueError, match="Hamiltonian"):
        analysis.check_step_size(model, torch.randn(1, 3, 8, 8))


def test_analyze_writes_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["analyze", "--model", "hamiltonian-74", "revnet-38", "--out", str(out), "--depths", "1", "20",
            "--channels", "4", "4", "4", "--units", "2", "1", "1", "--size", "4", "--h-values", "0.1", "100",
            "--h-depth", "5"]
    assert main(args) == 0
    report = json.loads((out / "stability.json").read_text())
    ham, rev = report["architectures"]["hamiltonian-74"], report["architectures"]["revnet-38"]
    assert ham["spectrum"]["method"] == "dense" and abs(ham["spectrum"]["max_real"]) < 1e-7
    assert rev["spectrum"]["max_real"] > 1e-3 and rev["step_size"] is None
    assert [r["depth"] for r in ham["per_depth"]] == [1, 20]
    assert set(ham["per_depth"][1]["reversal_error"]) == {"float64", "float32", "bfloat16"}
    assert ham["per_depth"][1]["reversal_error"]["float64"] < 1e-12
    assert ham["step_size"]["h"] == 0.1 < ham["step_size"]["h_max"] < 100
    stable, unstable = ham["growth_vs_h"]["growth"]  # h = 0.1 and 100, past h_max: growth explodes in 5 blocks
    assert stable < 2 and unstable > 1e3
    for name in ("eigenvalues", "growth", "reversal", "growth-vs-h"):
        assert (out / f"stability-{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "analysing models (2)" in capsys.readouterr().err  # progress: a bar on a terminal, else one line


def test_analyze_rejects_a_unit_without_reversible_blocks(tmp_path, capsys):
    args = ["analyze", "--model", "hamiltonian-74", "--out", str(tmp_path), "--units", "1", "1", "1"]
    assert main(args) == 2
    assert "at least 2 blocks" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [(["--size", "-8"], "argument --size: expected a positive integer"),
                                             (["--size", "0"], "argument --size: expected a positive integer"),
                                             (["--size", "6"], "H and W positive multiples of 4; got (1, 3, 6, 6)"),
                                             (["--depths", "0"], "--depths must be positive")])
def test_analyze_refuses_bad_sizes_before_it_writes_anything(tmp_path, capsys, flags, expected):
    """One line, exit code 2 and no --out directory (at 3d4780f --size -8 was a traceback that left
    an empty directory behind)."""
    try:
        code = main(["analyze", "--model", "hamiltonian-74", "--out", str(tmp_path / "report"), *flags])
    except SystemExit as usage_error:
        code = usage_error.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "report").exists()
