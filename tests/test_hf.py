"""revnets.hf: tiny Hugging Face causal LMs (built here, nothing downloaded) converted into every
reversible scheme: gradients equal plain autograd's, activations flat in depth, generation with the
cache, the padding mask, save and load, the step against a formula, bad models refused."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the hf extra (in the test extra)

import revnets  # noqa: E402
from revnets import hf  # noqa: E402

from helpers import bf16_grads, model_grads, relative_error, saved_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = [name for name, record in revnets.SCHEMES.items() if record.reversible and record.layer is not None]
VOCAB = 40


def llama(layers=3, **kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, **kw))


def gpt2(layers=3, **kw):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **kw))


FAMILIES = {"llama": llama, "gpt2": gpt2}


def converted(family, scheme, layers=3, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return hf.reversible(FAMILIES[family](layers).to(dtype), scheme, **kw)


def tokens(n=2, t=8, seed=1):
    return torch.randint(1, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


class Logits(torch.nn.Module):
    """The model as a function of tokens to logits, for the shared gradient helpers."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_plain_autograd_in_float64_with_dropout_replayed(family, scheme):
    """GPT-2's dropout (0.1 in attention, residual and embedding) draws the same masks in the
    recomputation; both models are the same module switched with memory_efficient."""
    model = converted(family, scheme).train()
    x = tokens()
    (y1, g1) = model_grads(Logits(model), x, x.roll(-1, 1), seed=3)
    model.memory_efficient = False
    (y0, g0) = model_grads(Logits(model), x, x.roll(-1, 1), seed=3)
    assert relative_error(y1, y0) < 1e-12 and relative_error(g1, g0) < 1e-9
    assert model.memory_efficient is False and len(g0) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_activations_flat_in_depth(family, scheme):
    x = tokens()
    shallow, deep = (saved_bytes(Logits(converted(family, scheme, n, torch.float32)), x) for n in (4, 16))
    plain = converted(family, scheme, 16, torch.float32, memory_efficient=False)
    assert deep == shallow and saved_bytes(Logits(plain), x) > 3 * deep


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_the_cache_equals_step_by_step_forwards(family, scheme):
    model = converted(family, scheme, dtype=torch.float32).eval()
    prompt = tokens(1, 4)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
        sequence = prompt
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_leaves_the_real_tokens_as_they_are(family):
    model = converted(family, "leapfrog").eval()
    x, other = tokens(1, 5), tokens(1, 8, seed=2)
    padded = torch.cat([torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1), other])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[0, :5], model(x).logits[0],
                                   rtol=1e-12, atol=1e-12)
        assert (model(padded).logits[0, 5:] - model(padded, attention_mask=mask).logits[0, 5:]).abs().max() > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_keep_the_weights_the_scheme_and_h(scheme, tmp_path):
    torch.manual_seed(0)
    original = llama()
    names = list(original.state_dict())
    kw = dict(h=0.5) if revnets.SCHEMES[scheme].has_step else {}
    model = hf.reversible(original, scheme, **kw).eval()
    assert list(model.state_dict()) == names  # the model's own keys: its checkpoints stay Hugging Face's
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert loaded.config.revnets == model.config.revnets and loaded.config.revnets["scheme"] == scheme
    assert {getattr(b, "h", None) for b in loaded.model.layers} == {kw.get("h")}
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    residual = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # the plain loader: the residual network
    assert not isinstance(residual.model.layers, revnets.ReversibleChain)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_steps_its_scheme_from_the_layers_own_submodules(family):
    """Midpoint with h = 0.7 from the fixed point, written out by hand from the original model's
    attention and MLP: Y_1 = x + h F_0(x), Y_{j+1} = Y_{j-1} + 2h F_j(Y_j)."""
    torch.manual_seed(0)
    original = FAMILIES[family]().double().eval()
    layers = list(original.model.layers if family == "llama" else original.transformer.h)
    model = hf.reversible(FAMILIES[family]().double().eval(), "midpoint", h=0.7)
    model.load_state_dict(original.state_dict())
    x = tokens(1)
    with torch.no_grad():
        full = original(x, output_hidden_states=True)
        embedded = full.hidden_states[0]

        def increment(layer, y):  # A and M of the original layer, with the model's own mask and positions
            if family == "llama":
                pos = original.model.rotary_emb(y, torch.arange(y.shape[1])[None])
                u = layer.self_attn(layer.input_layernorm(y), position_embeddings=pos, attention_mask=None)[0]
                return u + layer.mlp(layer.post_attention_layernorm(y + u))
            u = layer.attn(layer.ln_1(y), attention_mask=None)[0]
            return u + layer.mlp(layer.ln_2(y + u))
        prev, cur = embedded, embedded + 0.7 * increment(layers[0], embedded)
        for layer in layers[1:]:
            prev, cur = cur, prev + 1.4 * increment(layer, cur)
        norm = original.model.norm if family == "llama" else original.transformer.ln_f
        torch.testing.assert_close(model(x).logits, original.lm_head(norm(cur)), rtol=1e-10, atol=1e-10)


def test_bf16_autocast_gradients_as_accurate_as_plain_autograd():
    ref = converted("llama", "leapfrog", layers=8)
    x = tokens()
    g_ref, err = bf16_grads(Logits(ref), x), {}
    for me in (False, True):
        model = converted("llama", "leapfrog", layers=8, dtype=torch.float32, memory_efficient=me)
        model.load_state_dict(ref.state_dict())
        err[me] = relative_error(bf16_grads(Logits(model), x), g_ref)
    assert err[True] <= 1.5 * err[False], err


def test_unsupported_models_and_settings_are_refused():
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="converts causal language models of the families llama, mistral, qwen2, "
                                         "gpt2; got BertForMaskedLM"):
        hf.reversible(bert)
    with pytest.raises(ValueError, match="needs a reversible scheme with a transformer layer"):
        hf.reversible(llama(), "resnet")
    with pytest.raises(ValueError, match="the revnet scheme has no step size h"):
        hf.reversible(llama(), "revnet", h=0.5)
    with pytest.raises(ValueError, match="init must be one of rest for"):
        hf.reversible(llama(), "hamiltonian", init="fixed-point")
    with pytest.raises(ValueError, match="already reversible"):
        hf.reversible(hf.reversible(llama()))


@pytest.mark.parametrize("make", [
    lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, sliding_window=4)),
    lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)),
], ids=["mistral", "qwen2"])
def test_families_of_llamas_layer_shape_convert_with_their_own_masks(make):
    """The midpoint model of the residual network's own first step (h = 1) equals it in one layer; in
    three, the sliding windows the model reads show in the converted model as in the original."""
    torch.manual_seed(0)
    original = make().double().eval()
    model = make().double().eval()
    model.load_state_dict(original.state_dict())
    model = hf.reversible(model, "midpoint")
    x = tokens(1, 10)
    with torch.no_grad():
        generated = model.generate(x[:, :4], max_new_tokens=6, do_sample=False)
        sequence = x[:, :4]
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, sequence)
    changed = x.clone()
    changed[0, 0] = (x[0, 0] + 1) % VOCAB  # outside every sliding window of the last position
    with torch.no_grad():
        moved = (model(changed).logits[0, -1] - model(x).logits[0, -1]).abs().max()
        moved_original = (original(changed).logits[0, -1] - original(x).logits[0, -1]).abs().max()
    assert (moved > 1e-12) == (moved_original > 1e-12)


def test_import_revnets_does_not_import_transformers():
    code = "import sys, revnets; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "False"
