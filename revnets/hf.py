"""Hugging Face causal language models made reversible: a pretrained model's decoder layers run as one
of the paper's schemes through the engine, with the same weights.

    model = AutoModelForCausalLM.from_pretrained(path)         # residual: x += A(x); x += M(x)
    model = revnets.hf.reversible(model, "midpoint")           # Y_{j+1} = Y_{j-1} + 2h F_j(Y_j), Eq. (15)
    model(input_ids, attention_mask=mask, labels=input_ids).loss.backward()  # activations rebuilt
    model.generate(input_ids, max_new_tokens=20)               # with the key-value cache
    model.save_pretrained(out); revnets.hf.from_pretrained(out)  # the scheme, h and init kept

A decoder layer is pre-norm: A(y) = attention(norm1(y)), M(z) = mlp(norm2(z)), and its increment
F(y) = u + M(y + u), u = A(y), is computed from these sub-modules (never as layer(y) - y, whose
subtraction loses the increment's precision). `reversible` replaces the decoder's list of layers
by a `ReversibleChain` of the scheme's layer class (`revnets.layers`; every registered scheme with
a transformer layer can be chosen) holding each layer's sub-modules under their own names, so that
state dicts, `save_pretrained` and `from_pretrained` keep the model's keys, and gives the decoder a
forward that runs the chain: through the engine (memory flat in depth, the gradients of plain
autograd, dropout and autocast replayed), or through plain autograd after
``model.memory_efficient = False``. With the key-value cache (generation, no gradients) each
layer's attention reads and extends the cache as in the original model; a forward that builds a
graph runs without the cache, as Hugging Face's gradient checkpointing does.

Conversion changes the function. The residual network steps x' = F(x) by forward Euler with step
1; MidPoint (h = 1) steps the same equation to second order from the same first step; Leapfrog
reads F as a force, Y'' = -F(Y); the Hamiltonian and RevNet schemes split each layer into A and M
acting on a pair of states. Fine-tuning (`revnets train --dataset text --init-from DIR --convert
SCHEME [--distill]`) recovers the model; `init` chooses where a two-step scheme starts.

`FAMILIES` maps a config's model_type to an adapter (`Llama`, `GPT2`): where the decoder and its
layers are, how the decoder embeds and masks, and a layer's two branches. Llama (SmolLM2 and
TinyLlama are Llama models), Mistral and Qwen2 share the layer shape and differ in their masks;
another family of that shape is a subclass that says which masks its layers read.
"""
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPastAndCrossAttentions

from .blocks import Coupling, check_step
from .networks import MemoryEfficient, ReversibleChain
from .schemes import Scheme, reversible_layer_scheme


def _positions(x: Tensor, position_ids: Tensor | None, cache) -> Tensor:
    """(1, T) positions of x's tokens after the ones the cache holds."""
    if position_ids is not None:
        return position_ids
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(x.shape[1], device=x.device) + past)[None]


class Llama:
    """LlamaForCausalLM (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention): the decoder
    is `model.model`, its layers `layers`, each with input_layernorm, self_attn,
    post_attention_layernorm and mlp; the final norm `norm`."""

    decoder, layers, final, output = "model", "layers", "norm", BaseModelOutputWithPast

    def begin(self, decoder: nn.Module, input_ids, inputs_embeds, position_ids, attention_mask, cache):
        """(x, context): the embedded tokens (N, T, width) and what every layer's attention reads."""
        x = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = _positions(x, position_ids, cache)
        masks = self.masks(dict(config=decoder.config, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                position_ids=position_ids))
        return x, dict(masks=masks, position_ids=position_ids, cache=cache,
                       position_embeddings=decoder.rotary_emb(x, position_ids=position_ids))

    def masks(self, kw: dict) -> dict:
        """The attention masks by layer type."""
        return {"full_attention": create_causal_mask(**kw)}

    def mask_type(self, layer: nn.Module) -> str:
        return "full_attention"

    def attention(self, layer: nn.Module, y: Tensor, context: dict) -> Tensor:
        return layer.self_attn(hidden_states=layer.input_layernorm(y), attention_mask=context["masks"][
            self.mask_type(layer)], position_ids=context["position_ids"], cache=context["cache"],
            position_embeddings=context["position_embeddings"])[0]

    def feedforward(self, layer: nn.Module, z: Tensor) -> Tensor:
        return layer.mlp(layer.post_attention_layernorm(z))


class Mistral(Llama):
    """MistralForCausalLM: Llama's layers; every layer sliding-window attention when the config has a window."""

    def masks(self, kw: dict) -> dict:
        sliding = kw["config"].sliding_window is not None
        return {"full_attention": (create_sliding_window_causal_mask if sliding else create_causal_mask)(**kw)}


class Qwen2(Llama):
    """Qwen2ForCausalLM: Llama's layers; each layer full or sliding-window attention (`config.layer_types`)."""

    def masks(self, kw: dict) -> dict:
        return {"full_attention": create_causal_mask(**kw),
                "sliding_attention": create_sliding_window_causal_mask(**kw)}

    def mask_type(self, layer: nn.Module) -> str:
        return layer.self_attn.layer_type or "full_attention"


class GPT2:
    """GPT2LMHeadModel (LayerNorm, learned positions, GELU MLP): the decoder is `model.transformer`,
    its layers `h`, each with ln_1, attn, ln_2 and mlp; the final norm `ln_f`."""

    decoder, layers, final, output = "transformer", "h", "ln_f", BaseModelOutputWithPastAndCrossAttentions

    def begin(self, decoder: nn.Module, input_ids, inputs_embeds, position_ids, attention_mask, cache):
        x = decoder.wte(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = _positions(x, position_ids, cache)
        mask = create_causal_mask(config=decoder.config, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        x = decoder.drop(x + decoder.wpe(position_ids))
        return x, dict(attention_mask=mask, position_ids=position_ids, cache=cache)

    def attention(self, layer: nn.Module, y: Tensor, context: dict) -> Tensor:
        return layer.attn(layer.ln_1(y), **context)[0]

    def feedforward(self, layer: nn.Module, z: Tensor) -> Tensor:
        return layer.mlp(layer.ln_2(z))


FAMILIES = {"llama": Llama(), "mistral": Mistral(), "qwen2": Qwen2(), "gpt2": GPT2()}


class Adopted(nn.Module):
    """A Hugging Face decoder layer's sub-modules, under their own names, as a layer of one scheme: the
    scheme's step (its layer class, which this class precedes) on the family's branches A and M.

    The branches read `context` (masks, positions, cache), which the decoder sets before each forward;
    every coupling keeps the context of the forward that made it, so a backward recomputes with it
    even after later forwards.
    """

    def __init__(self, layer: nn.Module, family, **step):
        nn.Module.__init__(self)
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.family, self.context = family, None
        if "h" in step:
            self.h = check_step(step["h"])

    def attention(self, y: Tensor, scale: float = 1.0) -> Tensor:
        u = self.family.attention(self, y, self.context)
        return u if scale == 1 else scale * u

    def feedforward(self, z: Tensor, scale: float = 1.0) -> Tensor:
        m = self.family.feedforward(self, z)
        return m if scale == 1 else scale * m

    def couplings(self) -> tuple[Coupling, ...]:
        context = self.context

        def bound(update):
            def with_context(b: Tensor) -> Tensor:
                self.context = context
                return update(b)
            return with_context
        return tuple(Coupling(c.sign, bound(c.update)) for c in super().couplings())


class ReversibleDecoder:
    """The forward of a converted decoder (mixed in before the decoder's own class): embed, run the
    chain of layers, apply the final norm. `family` and `scheme` are set on the mixed class."""

    family: object
    scheme: Scheme

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if torch.is_grad_enabled():  # the engine rebuilds what a graph needs: no cache to extend twice
            cache, use_cache = None, False
        elif (self.config.use_cache if use_cache is None else use_cache) and cache is None:
            cache = DynamicCache(config=self.config)
        x, context = self.family.begin(self, input_ids, inputs_embeds, position_ids, attention_mask, cache)
        chain = getattr(self, self.family.layers)
        for layer in chain:
            layer.context = context
        x = self.scheme.layer.merge(*chain(*self.scheme.layer.split(x)))
        return self.family.output(last_hidden_state=getattr(self, self.family.final)(x), cache=cache)


_CLASSES: dict[tuple, type] = {}


def _mixed(mixin: type, base: type, **attributes) -> type:
    """`base` with `mixin`'s methods first, under base's own name (save_pretrained records it)."""
    key = (mixin, base, *((k, id(v)) for k, v in attributes.items()))
    if key not in _CLASSES:
        _CLASSES[key] = type(base.__name__, (mixin, base), dict(attributes, __module__=base.__module__))
    return _CLASSES[key]


def reversible(model: PreTrainedModel, scheme: str = "midpoint", h: float | None = None, init: str | None = None,
               memory_efficient: bool = True) -> PreTrainedModel:
    """`model`, a Hugging Face causal LM of a family in `FAMILIES`, with its decoder layers run as
    `scheme` (a registered reversible scheme with a transformer layer: midpoint, leapfrog,
    hamiltonian, revnet), converted in place (as PEFT's get_peft_model) and returned.

    `h`: the step of a scheme that has one (default 1: MidPoint then steps the residual network's own
    equation). `init`: where a two-step scheme starts, "fixed-point" (Gal et al.'s retrofit, the
    default) or "rest" (`revnets.layers.Layer`); other schemes start at rest. The weights are the
    model's; `model.config.revnets` records the conversion, which `save_pretrained` writes and
    `from_pretrained` reads. `memory_efficient`: the engine (True) or plain autograd (False;
    settable later as `model.memory_efficient`).
    """
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is None or not isinstance(model, PreTrainedModel) or not hasattr(model, family.decoder):
        raise ValueError(f"revnets.hf converts causal language models of the families {', '.join(FAMILIES)}; got "
                         f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})")
    if getattr(model.config, "revnets", None):
        raise ValueError(f"{type(model).__name__} is already reversible ({model.config.revnets})")
    record = reversible_layer_scheme(scheme)
    step = record.layer_step(h)
    if init is None:
        init = "fixed-point" if record.layer.two_step else "rest"
    decoder = getattr(model, family.decoder)
    layer_class = _mixed(Adopted, record.layer)
    layers = record.layer.chain([layer_class(layer, family, **step) for layer in getattr(decoder, family.layers)], init)
    setattr(decoder, family.layers, ReversibleChain(layers, memory_efficient, name="decoder layers"))
    decoder.__class__ = _mixed(ReversibleDecoder, type(decoder), family=family, scheme=record)
    model.__class__ = _mixed(MemoryEfficient, type(model))
    model.config.revnets = dict(scheme=record.name, h=step.get("h"), init=init)
    return model


def from_pretrained(path, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, converted again as it was saved (its
    config's `revnets` entry) if it was."""
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return _converted_as_saved(model)


def config_of(config: dict) -> PretrainedConfig:
    """The transformers config of `config`, a config's `to_dict()`."""
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def from_config(config: dict) -> PreTrainedModel:
    """A model of `config` (a config's `to_dict()`), randomly initialised and converted as its
    `revnets` entry says: the network of a checkpoint's model record, before its weights."""
    return _converted_as_saved(AutoModelForCausalLM.from_config(config_of(config)))


def _converted_as_saved(model: PreTrainedModel) -> PreTrainedModel:
    settings = getattr(model.config, "revnets", None)
    if not settings:
        return model
    model.config.revnets = None
    return reversible(model, **settings)


__all__ = ["FAMILIES", "GPT2", "Llama", "Mistral", "Qwen2", "config_of", "from_config", "from_pretrained",
           "reversible"]
