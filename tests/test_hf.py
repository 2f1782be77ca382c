"""revnets.hf: tiny Hugging Face causal LMs (built here, nothing downloaded) converted into every
reversible scheme: gradients equal plain autograd's, activations flat in depth, generation with the
cache, the padding mask, save and load, the step against a formula, bad models refused."""
import json
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
    sizes = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=32)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers, **{**sizes, **kw}))


def gpt2(layers=3, **kw):
    sizes = dict(vocab_size=VOCAB, n_embd=16, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, **{**sizes, **kw}))


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


@pytest.mark.parametrize("family", FAMILIES)
def test_a_backward_after_another_forward_recomputes_with_its_own_mask_and_positions(family):
    """Each coupling keeps the context (mask, positions) of the forward that made it: a second
    forward of another length in between does not change the first one's gradients."""
    model, plain = converted(family, "leapfrog").eval(), converted(family, "leapfrog").eval()  # no dropout
    plain.memory_efficient = False
    x, mask = tokens(2, 8), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    model(x, attention_mask=mask).logits.square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = model(x, attention_mask=mask).logits.square().sum()
    model(tokens(1, 5, seed=3)).logits.sum()  # another forward, its graph dropped
    loss.backward()
    plain(x, attention_mask=mask).logits.square().sum().backward()
    for p, e, r in zip(model.parameters(), expected, plain.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-12)


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
    with pytest.raises(ValueError, match="expected a reversible scheme with a transformer layer"):
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


# ---- revnets train --init-from DIR --convert SCHEME [--distill] ------------------------------------

TEXT = str(ROOT / "tests" / "data" / "tiny.txt")
RUN = ["train", "--dataset", "text", "--data-dir", TEXT, "--batch-size", "4", "--steps-per-epoch", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A residual Llama saved as users save theirs (save_pretrained), and the library's own residual
    language model trained one epoch: (HF directory, revnets checkpoint)."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    llama(2, vocab_size=64, hidden_size=32, intermediate_size=48).save_pretrained(root / "llama")
    from revnets.cli import main
    assert main([*RUN, "--model", "residual-lm-tiny", "--context", "16", "--epochs", "1",
                 "--out", str(root / "own")]) == 0
    return root / "llama", root / "own" / "best.pt"


def _weights(path):
    return revnets.checkpoint.load(path)["model"]


@pytest.mark.parametrize("source", ["hf", "own"])
def test_a_converted_distilled_run_resumes_bitwise_and_its_model_generates(saved, source, tmp_path, capsys):
    from revnets.cli import main
    path = saved[0] if source == "hf" else saved[1]
    flags = [*RUN, "--init-from", str(path), "--convert", "leapfrog", "--distill", "--epochs", "3"]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    from revnets.training import run as run_module

    def killed(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt
    config = revnets.cli.train.parse_config([*flags[1:], "--out", str(tmp_path / "cut")])
    with pytest.raises(KeyboardInterrupt):
        run_module.train(config, on_epoch=killed)
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    whole, cut = _weights(tmp_path / "whole" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    model = revnets.load(tmp_path / "whole" / "best.pt")
    chain = model.net.model.layers if source == "hf" else model.net.blocks
    assert isinstance(chain, revnets.ReversibleChain) and type(chain[0]).__name__ == "LeapfrogLayer"
    assert chain[0].start == "fixed-point"  # the reference's start, the default with --convert
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "whole" / "best.pt"), "--prompt", "And", "--tokens",
                 "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == model.generate("And", 12, temperature=0) + "\n"


def test_distillation_steps_on_the_kl_from_the_teacher_and_keeps_none_of_its_activations():
    from revnets.training import train_step
    torch.manual_seed(0)
    teacher = llama(2).double().eval().requires_grad_(False)
    student = hf.reversible(llama(2).double(), "midpoint")
    student.load_state_dict(teacher.state_dict())
    x = tokens()
    y = x.roll(-1, 1)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    before = [p.detach().clone() for p in student.parameters()]
    train_step(student, opt, x, y, teacher=teacher)
    ref = hf.reversible(llama(2).double(), "midpoint", memory_efficient=False)
    ref.load_state_dict(teacher.state_dict())
    p_teacher = teacher(x).logits.flatten(0, 1).softmax(-1)
    log_student = ref(x).logits.flatten(0, 1).log_softmax(-1)
    (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean().backward()  # KL(teacher || student) per token
    for b, p, r in zip(before, student.parameters(), ref.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, rtol=1e-8, atol=1e-12)  # SGD, lr 1: the step is the gradient
    from revnets import memory
    bare = memory.saved_bytes(student, lambda: student(x).logits.sum())[0]
    with_teacher = memory.saved_bytes(student, lambda: (student(x).logits.sum(), teacher(x)))[0]
    assert with_teacher == bare  # the teacher runs without a graph


def test_a_runs_teacher_is_frozen_and_steps_without_a_graph(saved):
    """--distill's teacher (`sources.teacher`): eval mode, no parameter to train, and `train_step`
    runs it with grad mode off (a frozen model under grad mode would still record its graph when
    its input required grad; no_grad keeps even that out)."""
    from revnets.training import sources, train_step
    teacher = sources.teacher(str(saved[0]), torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    modes = []
    teacher.register_forward_hook(lambda module, args, out: modes.append(torch.is_grad_enabled()))
    student = hf.reversible(transformers.AutoModelForCausalLM.from_pretrained(saved[0]), "midpoint")
    x = tokens(2, 8)
    train_step(student, torch.optim.SGD(student.parameters(), lr=0.1), x, x.roll(-1, 1), teacher=teacher)
    assert modes == [False]


@pytest.mark.parametrize("flags, message", [
    (["--convert", "leapfrog"], "--convert works on the model of --init-from"),
    (["--distill"], "--distill works on the model of --init-from"),
    (["--init-from", "{llama}", "--convert", "resnet"],
     "--convert: expected a reversible scheme with a transformer layer"),
    (["--init-from", "{llama}", "--dropout", "0.1"], "--dropout: not a setting of a Hugging Face model"),
    (["--init-from", "{llama}", "--convert", "midpoint", "--mlp", "symmetric"], "--mlp: not a setting of a Hugging"),
    (["--init-from", "{llama}", "--init", "rest"], "--init: not a setting of a Hugging Face model that is not"),
    (["--init-from", "{llama}", "--model", "leapfrog-lm-tiny"], "holds a Hugging Face model; leave --model out"),
    (["--init-from", "{llama}", "--context", "9999"], "--context 9999 is longer than the model's 32 positions"),
    (["--init-from", "/nonexistent"], "--init-from /nonexistent: no such checkpoint file or Hugging Face model"),
    (["--init-from", "{llama}", "--convert", "revnet", "--h", "0.5"], "the revnet scheme has no step size h"),
])
def test_bad_conversions_exit_2_with_one_line_and_write_nothing(saved, tmp_path, capsys, flags, message):
    from revnets.cli import main
    flags = [f.format(llama=saved[0]) for f in flags]
    assert main([*RUN, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_image_run_refuses_text_conversion(tmp_path, capsys):
    from revnets.cli import main
    assert main(["train", "--convert", "leapfrog", "--out", str(tmp_path / "run")]) == 2
    assert "--convert: not a setting of image runs" in capsys.readouterr().err


def test_a_hugging_face_run_trains_on_a_shorter_window_than_its_positions(saved, tmp_path):
    from revnets.cli import main
    assert main([*RUN, "--init-from", str(saved[0]), "--context", "4", "--epochs", "1",
                 "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["context"] == 4
    assert revnets.load(tmp_path / "r" / "best.pt").net.config.max_position_embeddings == 32  # the model is unchanged


def test_a_conversion_starts_from_the_target_schemes_defaults_not_the_sources(saved, tmp_path):
    """A Leapfrog run started from the fixed point, converted again into the Hamiltonian (no init)."""
    from revnets.cli import main
    first = [*RUN, "--init-from", str(saved[1]), "--convert", "leapfrog", "--h", "0.5", "--epochs", "1"]
    assert main([*first, "--out", str(tmp_path / "leapfrog")]) == 0
    again = [*RUN, "--init-from", str(tmp_path / "leapfrog" / "best.pt"), "--convert", "hamiltonian", "--epochs", "1"]
    assert main([*again, "--out", str(tmp_path / "hamiltonian")]) == 0
    net = revnets.load(tmp_path / "hamiltonian" / "best.pt").net
    default = revnets.build_model("hamiltonian-lm-tiny", vocab_size=10).blocks[0].h
    assert type(net.blocks[0]).__name__ == "HamiltonianLayer" and net.blocks[0].h == default != 0.5


def test_without_transformers_a_hugging_face_model_is_refused_in_one_line(saved, tmp_path, monkeypatch, capsys):
    from revnets.cli import main
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "revnets.hf")
    monkeypatch.delattr(revnets, "hf")
    assert main([*RUN, "--init-from", str(saved[0]), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[hf]"' in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
