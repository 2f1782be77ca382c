"""ReversibleTransformer: causal, engine gradients equal plain autograd, memory flat in depth, clear errors."""
import pytest
import torch
import torch.nn.functional as F

import revnets
from revnets import MODELS, analysis, build_lm, list_models
from revnets.layers import MLP, SymmetricMLP
from revnets.transformer import ReversibleTransformer, generate

from helpers import bf16_grads, ddp_worker, model_grads, relative_error, saved_bytes

SCHEMES = [name for name, record in revnets.SCHEMES.items() if record.layer is not None]
REVERSIBLE = [s for s in SCHEMES if revnets.SCHEMES[s].reversible]
STEPPED = [s for s in SCHEMES if revnets.SCHEMES[s].has_step]
TINY = dict(vocab_size=11, width=16, depth=3, heads=2, context=8)


def tiny(scheme, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return ReversibleTransformer(**{**TINY, **kw}, scheme=scheme).to(dtype)


def tokens(n=2, t=8, seed=1):
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_shape_and_every_parameter_gets_a_gradient(scheme):
    model = tiny(scheme, torch.float32)
    assert isinstance(model, revnets.ReversibleTransformer)
    logits = model(tokens())
    assert logits.shape == (2, 8, TINY["vocab_size"]) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("mlp", ["standard", "symmetric"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_block_steps_its_equation(scheme, mlp):
    """The blocks fold h into their output weights; the step is still the module docstring's formula,
    here composed from the unscaled attention A and MLP M (h = 0.7, the second block: not MidPoint's
    Euler start)."""
    block = tiny(scheme, mlp=mlp, **dict(h=0.7) if scheme in STEPPED else {}).blocks[1]
    assert isinstance(block.mlp, SymmetricMLP if mlp == "symmetric" else MLP)
    A, M = block.attn, block.mlp
    for name, p in block.named_parameters():  # biases start at zero: give them values to scale
        if name.endswith("bias"):
            torch.nn.init.normal_(p.data)
    y, z = torch.randn(2, 2, 8, 16, dtype=torch.float64)

    def inc(x):  # one transformer layer's increment F(x) = u + M(x + u), u = A(x)
        return A(x) + M(x + A(x))
    with torch.no_grad():
        if scheme == "resnet":
            got, want = block(y), y + inc(y)
        else:
            y1 = y + 0.7 * A(z)
            want = {"revnet": (y + A(z), z + M(y + A(z))), "hamiltonian": (y1, z - 0.7 * M(y1)),
                    "midpoint": (z, y + 1.4 * inc(z)), "leapfrog": (z, 2 * z - y - 0.49 * inc(z))}[scheme]
            got = block(y, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_causal_changing_token_t_never_changes_earlier_logits(scheme):
    model = tiny(scheme).eval()
    x = tokens(1)
    for t in (0, 3, 7):
        y = x.clone()
        y[0, t] = (x[0, t] + 1) % TINY["vocab_size"]
        before, after = model(x), model(y)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
        assert (after[:, t] - before[:, t]).abs().max() > 1e-6


def _grads(model, x):
    return model_grads(model, x, x.roll(-1, 1), seed=0)  # the same dropout masks in both models


@pytest.mark.parametrize("scheme", REVERSIBLE)
def test_engine_gradients_equal_plain_autograd_in_float64(scheme):
    _check_engine_gradients(scheme)


@pytest.mark.parametrize("scheme", ["hamiltonian", "leapfrog"])
def test_engine_gradients_equal_plain_autograd_with_the_symmetric_mlp(scheme):
    _check_engine_gradients(scheme, mlp="symmetric")


def test_symmetric_mlp_jacobian_has_real_nonnegative_eigenvalues():
    """M~'s Jacobian K^T D K P is similar to a symmetric positive semi-definite matrix (module
    docstring); the standard MLP's is not (the check can fail)."""
    torch.manual_seed(0)
    y = torch.randn(1, 1, 16, dtype=torch.float64)
    for mlp, holds in ((SymmetricMLP(16), True), (MLP(16), False)):
        torch.nn.init.normal_(mlp.k.bias if holds else mlp.fc.bias)  # s' = 0 and 1 both occur
        jac = torch.autograd.functional.jacobian(mlp.double(), y).reshape(16, 16)
        eig = torch.linalg.eigvals(jac)
        real_nonnegative = eig.imag.abs().max() < 1e-10 and eig.real.min() > -1e-10
        assert bool(real_nonnegative) == holds, eig


def _check_engine_gradients(scheme, **kw):
    plain = tiny(scheme, memory_efficient=False, **kw)
    efficient = tiny(scheme, **kw)
    efficient.load_state_dict(plain.state_dict())
    (y0, g0), (y1, g1) = _grads(plain, tokens()), _grads(efficient, tokens())
    assert relative_error(y1, y0) < 1e-12
    assert relative_error(g1, g0) < 1e-9


@pytest.mark.parametrize("scheme", REVERSIBLE)
def test_engine_replays_dropout(scheme):
    """Needs the engine's RNG-state replay: the recomputed blocks must draw the forward's masks."""
    plain = tiny(scheme, memory_efficient=False, dropout=0.2).train()
    efficient = tiny(scheme, dropout=0.2).train()
    efficient.load_state_dict(plain.state_dict())
    (y0, g0), (y1, g1) = _grads(plain, tokens()), _grads(efficient, tokens())
    assert relative_error(y1, y0) < 1e-12
    assert relative_error(g1, g0) < 1e-9


@pytest.mark.parametrize("scheme", ["leapfrog", "revnet"])
def test_bf16_autocast_gradients_as_accurate_as_plain_autograd(scheme):
    ref = tiny(scheme, memory_efficient=False, depth=12)
    g_ref, err = bf16_grads(ref, tokens()), {}
    for me in (False, True):
        model = tiny(scheme, torch.float32, memory_efficient=me, depth=12)
        model.load_state_dict(ref.state_dict())
        err[me] = relative_error(bf16_grads(model, tokens()), g_ref)
    assert err[True] <= 1.5 * err[False], err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_saved_activations_flat_in_depth(scheme):
    shallow = saved_bytes(tiny(scheme, torch.float32, depth=4), tokens())
    deep = saved_bytes(tiny(scheme, torch.float32, depth=32), tokens())
    if scheme == "resnet":
        assert deep > 4 * shallow
    else:
        assert deep <= 1.1 * shallow
        plain = saved_bytes(tiny(scheme, torch.float32, depth=32, memory_efficient=False), tokens())
        assert plain > 4 * deep


@pytest.mark.parametrize("scheme", REVERSIBLE)
def test_analysis_growth_and_drift_run_on_the_chain(scheme):
    model = tiny(scheme).eval()
    a, b = model.chain_input(tokens())
    growth = analysis.growth(model.blocks, a, b, depths=[1, 3])
    assert len(growth) == 2 and all(abs(g) < 50 for g in growth)
    drift = analysis.reversal_drift(model.blocks, a, b, depths=[3], dtype=torch.float64)
    assert drift[0] < 1e-12


@pytest.mark.parametrize("kw, match", [
    (dict(heads=3), "heads must divide width"),
    (dict(scheme="euler"), "unknown scheme"),
    (dict(scheme="user-tanh"), "scheme 'user-tanh' has no transformer layer"),
    (dict(scheme="revnet", h=0.5), "the revnet scheme has no step size h"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(h=0.0), r"h \(the step size\) must be a finite number > 0; got 0.0"),
    (dict(h=float("inf")), r"h \(the step size\) must be a finite number > 0; got inf"),
    (dict(h=float("nan")), r"h \(the step size\) must be a finite number > 0; got nan"),
    (dict(h=-1.0), r"h \(the step size\) must be a finite number > 0; got -1.0"),
    (dict(mlp="gated"), "unknown mlp 'gated'; expected one of standard, symmetric"),
])
def test_bad_sizes_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        ReversibleTransformer(**{**TINY, "scheme": "leapfrog", **kw})


@pytest.mark.parametrize("x, match", [
    (torch.full((1, 4), 11), r"vocab_size=11\); got ids in \[11, 11\]"),
    (torch.full((1, 4), -1), r"got ids in \[-1, -1\]"),
    (torch.zeros(1, 9, dtype=torch.long), "T <= context=8"),
    (torch.zeros(1, 4), "integer tokens"),
    (torch.zeros(1, 4, dtype=torch.bool), "integer tokens.* torch.bool"),
    (torch.zeros(4, dtype=torch.long), r"\(N, T\) integer"),
])
def test_bad_tokens_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        tiny("leapfrog")(x)


def test_registry_sizes_have_equal_parameter_counts_across_schemes():
    for size in ("tiny", "small", "base"):
        with torch.device("meta"):
            models = {MODELS[name]["scheme"]: build_lm(name, 90) for name in list_models(f"*-lm-{size}")}
            symmetric = build_lm(f"leapfrog-lm-{size}", 90, mlp="symmetric")
        assert models.keys() == set(SCHEMES)
        counts = {sum(p.numel() for p in m.parameters()) for m in models.values()}
        assert len(counts) == 1, counts
        width = MODELS[f"leapfrog-lm-{size}"]["width"]  # M~ has the standard MLP's hidden width 4 width
        assert symmetric.blocks[0].mlp.k.weight.shape == (4 * width, width)
        assert sum(p.numel() for p in symmetric.blocks.parameters()) < sum(
            p.numel() for p in models["leapfrog"].blocks.parameters())  # each of K's weights is used twice
    with pytest.raises(ValueError, match="valid names"):
        build_lm("leapfrog-lm-huge", 90)


def test_generate_deterministic_under_a_seed_and_greedy_at_top_k_1():
    model = tiny("leapfrog", torch.float32).eval()
    prompt = tokens(1, 3)

    def sample(seed, **kw):
        return generate(model, prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(0), sample(0)) and not torch.equal(sample(0), sample(1))
    out = sample(0, top_k=1)
    assert out.shape == (1, 15) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, generate(model, prompt, 12, temperature=0))  # top-1 sampling is greedy
    for i in range(3, 15):  # the context window slides: longer than context=8 still works
        assert out[0, i] == model(out[:, max(0, i - 8):i])[0, -1].argmax()


def test_generate_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_k >= 1"):
        generate(tiny("leapfrog"), tokens(1, 2), 3, top_k=0)


def test_ddp_gloo_gradients_equal_single_process(tmp_path):
    import torch.multiprocessing as mp
    model, x = tiny("leapfrog", torch.float32), tokens(4)
    mp.start_processes(ddp_worker, args=(2, tmp_path / "store", model, x, x.roll(-1, 1), tmp_path / "g.pt"),
                       nprocs=2, start_method="spawn")  # fork from a process whose tests started threads can hang
    F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    for p, g in zip(model.parameters(), torch.load(tmp_path / "g.pt")):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


# ---- the chain is a ReversibleChain: what works on image networks works on language models --------

@pytest.mark.parametrize("kw", [dict(segment=2), dict(segment="auto"), dict(exact=True)],
                         ids=["segment", "auto", "exact"])
@pytest.mark.parametrize("scheme", REVERSIBLE)
def test_segments_and_exact_reversal_give_plain_autograd_gradients(scheme, kw):
    plain = tiny(scheme, memory_efficient=False, depth=5, **kw)
    model = tiny(scheme, depth=5, **kw)
    model.load_state_dict(plain.state_dict())
    (y0, g0), (y1, g1) = _grads(plain, tokens()), _grads(model, tokens())
    assert torch.equal(y0, y1) if "exact" in kw else relative_error(y1, y0) < 1e-12
    assert relative_error(g1, g0) < 1e-9


@pytest.mark.parametrize("scheme", STEPPED)
def test_grow_doubles_the_depth_with_half_the_step_and_converges(scheme):
    """Each layer becomes two with h / 2 (MidPoint's first, an Euler step, becomes an Euler step and a
    midpoint step): the same ODE over the same time, so the output moves by O(h) and the move
    shrinks with h."""
    moved = {}
    for h in (0.2, 0.1):
        model = tiny(scheme, h=h, depth=4).eval()
        grown = revnets.grow(model)
        assert len(grown.blocks) == 8 and {b.h for b in grown.blocks} == {h / 2}
        first = "rest" if revnets.SCHEMES[scheme].two_step else None
        assert [b.start for b in grown.blocks[:3]] == [first, None, None]
        with torch.no_grad():
            moved[h] = relative_error(grown(tokens()), model(tokens()))
    assert 0 < moved[0.1] < 0.7 * moved[0.2], moved


@pytest.mark.parametrize("scheme", ["midpoint", "leapfrog"])
def test_a_fixed_point_start_steps_from_the_point_before_x(scheme):
    """init="fixed-point": the chain steps as if the state before the first layer were (x - h F_0(x), x)
    (F_0 the first layer's increment), computed here by hand; for MidPoint that is the Euler start."""
    model = tiny(scheme, init="fixed-point", h=0.6, depth=3).eval()
    rest = tiny(scheme, h=0.6, depth=3).eval()
    rest.load_state_dict(model.state_dict())
    x = tokens()
    with torch.no_grad():
        a, b = model.chain_input(x)
        state = (a - 0.6 * model.blocks[0].increment(a), b)
        step = {"midpoint": lambda blk, p, q: (q, p + 1.2 * blk.increment(q)),
                "leapfrog": lambda blk, p, q: (q, 2 * q - p - 0.36 * blk.increment(q))}[scheme]
        for blk in model.blocks:
            state = step(blk, *state)
        want = model.head(model.norm(state[1]))
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
        assert (scheme == "midpoint") == torch.allclose(rest(x), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="init must be one of rest for HamiltonianLayer"):
        tiny("hamiltonian", init="fixed-point")


@pytest.mark.parametrize("scheme", ["revnet", "resnet"])
def test_grow_refuses_a_language_model_without_a_step(scheme):
    with pytest.raises(ValueError, match="step size h"):
        revnets.grow(tiny(scheme))


@pytest.mark.parametrize("scheme", REVERSIBLE)
def test_reversal_error_and_the_drift_monitor_see_the_chain(scheme):
    model = tiny(scheme)
    errors = revnets.reversal_error(model, tokens())
    assert errors.keys() == {"unit0"} and errors["unit0"] < 1e-12  # float64
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="unit0=inf"):
        revnets.DriftMonitor(every=1, threshold=1e-6).step(model, tokens(), step=0)
    assert revnets.reversal_error(tiny("resnet"), tokens()) == {}


@pytest.mark.parametrize("scheme", STEPPED)
def test_check_step_size_bounds_h_by_the_layers_spectral_radius(scheme):
    """h_max = bound / |lambda|max of the layer's Jacobian (`vector_field` of each layer class); a
    step past it warns."""
    model = tiny(scheme).eval()
    found = analysis.check_step_size(model, tokens(1), steps=20)
    bound = model.blocks[0].stability_bound
    assert found["h"] == 1.0 and found["h_max"] == pytest.approx(bound / found["spectral_radius"])
    big = tiny(scheme, h=2 * found["h_max"] / 1.0).eval()
    with pytest.warns(RuntimeWarning, match="past the stability bound"):
        analysis.check_step_size(big, tokens(1), steps=20)


@pytest.mark.parametrize("scheme", ["revnet", "resnet"])
def test_check_step_size_refuses_a_language_model_without_a_bound(scheme):
    with pytest.raises(ValueError, match="stability_bound"):
        analysis.check_step_size(tiny(scheme), tokens(1))


def test_language_models_are_registered_models():
    assert list_models("*-lm-*") and all(MODELS[n]["kind"] == "text" for n in list_models("*-lm-*"))
    model = revnets.build_model("leapfrog-lm-tiny", vocab_size=11, depth=2)
    assert isinstance(model, ReversibleTransformer) and len(model.blocks) == 2 and model.vocab_size == 11
    revnets.register_model("midpoint-lm-user", scheme="midpoint", width=8, depth=3, heads=2, context=8, h=0.5)
    user = revnets.build_model("midpoint-lm-user", vocab_size=5)
    assert [b.h for b in user.blocks] == [0.5] * 3 and user.context == 8
    with pytest.raises(ValueError, match="takes vocab_size"):
        revnets.build_model("leapfrog-lm-tiny")
    with pytest.raises(ValueError, match="image model: it takes num_classes"):
        revnets.build_model("hamiltonian-74", vocab_size=10)
    with pytest.raises(ValueError, match="no setting units"):
        revnets.build_model("leapfrog-lm-tiny", vocab_size=5, units=(1, 1))
    with pytest.raises(ValueError, match="scheme 'user-tanh' has no transformer layer"):
        revnets.register_model("user-lm", scheme="user-tanh", width=8, depth=3, heads=2, context=8)
    with pytest.raises(ValueError, match="units and channels .* or width, depth, heads and context"):
        revnets.register_model("half-lm", scheme="leapfrog", width=8, depth=3)
