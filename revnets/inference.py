"""Trained models you can use: the model record a checkpoint holds, the one function that rebuilds a
model from it, and `load`.

Every checkpoint of `revnets train` holds, next to the weights, one record of the model:

    {"model": registered name, "overrides": build_model's keyword settings, "grown": growths so far,
     "memory_efficient": bool, "kind": "image" or "text",
     image: "classes": [name, ...], "in_channels": C, "image_size": (H, W),
            "mean": (C,) float32, "std": (C,) float32     # the training split's channel statistics
     text:  "vocab": {"level": "char" or "byte", "chars": str}}

`build(record)` rebuilds its model, without weights: a `Classifier` (the network behind its
standardisation, so that it takes images as they are decoded, floats in [0, 1], and `torch.export`
/ ONNX exports include the preprocessing) or a `LanguageModel` (the network with its vocabulary).
`load(path)` also loads the weights. Checkpoints written before records existed (2026-12-01: a
``meta`` entry for images, ``vocab`` for text) are read into the same record (`record_of`).
"""
import json
import os
import warnings

import torch
from torch import Tensor, nn

from . import checkpoint
from .models import build_model, spec
from .multilevel import grow
from .transformer import generate

KINDS = ("image", "text")
LEVELS = ("char", "byte")
HF = "hf"  # a record's model name for a Hugging Face model (its config in the record's "hf_config")
# The run settings (`revnets train` flags, as config.json saves them) that are settings of the model.
MODEL_FLAGS = ("units", "channels", "h", "norm", "segment", "exact", "context", "mlp", "dropout", "init")


class Vocabulary:
    """Token ids of characters (`chars`, level "char") or of UTF-8 bytes (level "byte", 256 ids)."""

    def __init__(self, level: str = "char", chars: str = ""):
        if level not in LEVELS:
            raise ValueError(f"unknown text level {level!r}; expected one of {', '.join(LEVELS)}")
        if level == "char" and not (isinstance(chars, str) and chars):
            raise ValueError("a character vocabulary needs at least one character")
        self.level, self.chars = level, chars if level == "char" else ""
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def of(cls, text: str, level: str = "char") -> "Vocabulary":
        """The vocabulary of `text`: its distinct characters, sorted, or the bytes."""
        return cls(level, "".join(sorted(set(text))) if level == "char" else "")

    def __len__(self) -> int:
        return len(self.chars) if self.level == "char" else 256

    def encode(self, text: str) -> Tensor:
        """(len,) int64 token ids; ValueError naming a character outside the vocabulary."""
        if self.level == "byte":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"characters not in the vocabulary of {len(self)}: {''.join(sorted(unknown))!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        """Text of (len,) token ids (byte level: invalid UTF-8, as from a cut sequence, becomes U+FFFD)."""
        ids = ids.tolist()
        if self.level == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        """Plain values for a checkpoint; `Vocabulary(**state)` rebuilds it."""
        return {"level": self.level, "chars": self.chars}


MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS)


class Classifier(nn.Module):
    """A trained network behind its input standardisation: images in [0, 1] -> logits.

    (N, C, H, W) float in [0, 1] -> (N, len(classes)): x' = (x - mean) / std per channel, then
    `net`. `classes` names the outputs; `image_size` is the training images' (H, W).
    """

    def __init__(self, net: nn.Module, mean: Tensor, std: Tensor, classes: list[str], image_size: tuple[int, int]):
        super().__init__()
        mean, std = (torch.as_tensor(t, dtype=torch.float32).view(-1, 1, 1) for t in (mean, std))
        if not (len(mean) == len(std) == net.in_channels and torch.isfinite(mean).all() and torch.isfinite(std).all()
                and (std > 0).all()):
            raise ValueError(f"a standardisation needs a finite mean and a finite positive standard deviation per "
                             f"input channel ({net.in_channels}); got mean {mean.flatten().tolist()}, "
                             f"std {std.flatten().tolist()}")
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"classes must be a list of class names (strings); got {classes!r}")
        if len(image_size) != 2 or not all(isinstance(n, int) and n > 0 for n in image_size) or \
                image_size[0] * image_size[1] > MAX_PIXELS:
            raise ValueError(f"image_size must be (H, W), two positive integers, at most {MAX_PIXELS:,} pixels; got "
                             f"{image_size!r}")
        self.net, self.classes, self.image_size = net, list(classes), tuple(image_size)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1] (divide uint8 pixels by 255); got {x.dtype}")
        return self.net((x - self.mean) / self.std)


class LanguageModel(nn.Module):
    """A trained language model with its vocabulary: tokens (N, T) int64 -> logits (N, T, len(vocab)),
    T <= `context` (a network that reads more tokens than the vocabulary has, as a Hugging Face model
    trained on characters, has its logits of the others left out); `generate` continues a text."""

    def __init__(self, net: nn.Module, vocab: Vocabulary):
        super().__init__()
        self.net, self.vocab = net, vocab

    @property
    def context(self) -> int:
        return text_sizes(self.net)[0]

    def forward(self, tokens: Tensor) -> Tensor:
        return logits(self.net(tokens))[..., :len(self.vocab)]

    def generate(self, prompt: str, tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> str:
        """The prompt and `tokens` sampled tokens as text (`revnets.transformer.generate`)."""
        if not prompt:
            raise ValueError("the prompt must hold at least one character")
        device = next(self.parameters()).device
        ids = self.vocab.encode(prompt)[None].to(device)
        return self.vocab.decode(generate(self, ids, tokens, temperature, top_k, generator)[0].cpu())


def logits(output) -> Tensor:
    """A language model's logits: its output, or the output's `.logits` (Hugging Face models)."""
    return getattr(output, "logits", output)


def text_sizes(net: nn.Module) -> tuple[int, int]:
    """(context, vocabulary size) of a language model: the library's own or a Hugging Face one."""
    if hasattr(net, "config"):
        return net.config.max_position_embeddings, net.config.vocab_size
    return net.context, net.vocab_size


def model_overrides(settings: dict) -> dict:
    """`build_model`'s keyword settings from a run's settings (config.json's or a checkpoint's):
    the `MODEL_FLAGS` that were given, as the model takes them (norm "none" is None, segment "3" is 3)."""
    found = {}
    for key in MODEL_FLAGS:
        value = settings.get(key)
        if value is None or value is False:
            continue
        if key in ("units", "channels"):
            value = tuple(value)
        elif key == "norm":
            value = None if value == "none" else value
        elif key == "segment":
            value = value if value == "auto" else int(value)
        found[key] = value
    return found


def record(model: str, overrides: dict, kind: str, memory_efficient: bool = True, grown: int = 0, **interface) -> dict:
    """A model record (module docstring); `interface`: classes, in_channels, image_size, mean, std
    for an image model, vocab (`Vocabulary.state()`) for a language model."""
    return dict(model=model, overrides=dict(overrides), kind=kind, memory_efficient=memory_efficient, grown=grown,
                **interface)


def build_network(rec: dict) -> nn.Module:
    """The network of a model record, grown as often as it was, without its weights; ValueError
    naming what in the record cannot be built."""
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS or not isinstance(rec.get("overrides"), dict):
        raise ValueError(f"not a model record (expected a dict with kind in {KINDS} and overrides)")
    if rec["model"] == HF:
        return _hf_network(rec)
    if spec(rec["model"])["kind"] != rec["kind"]:
        raise ValueError(f"model {rec['model']!r} is not {'an image' if rec['kind'] == 'image' else 'a text'} model")
    try:
        if rec["kind"] == "image":
            net = build_model(rec["model"], num_classes=len(rec["classes"]), in_channels=rec["in_channels"],
                              memory_efficient=rec["memory_efficient"], **rec["overrides"])
        else:
            net = build_model(rec["model"], vocab_size=len(Vocabulary(**rec["vocab"])),
                              memory_efficient=rec["memory_efficient"], **rec["overrides"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"an incomplete model record ({type(e).__name__}: {e})") from None
    for _ in range(rec["grown"]):
        net = grow(net)
    return net


def hugging_face():
    """`revnets.hf`, or a ValueError saying how to install Hugging Face transformers, which it needs."""
    try:
        from . import hf
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "transformers":
            raise
        raise ValueError('a Hugging Face model needs the transformers package: pip install -e ".[hf]"') from None
    return hf


def _hf_network(rec: dict) -> nn.Module:
    """The Hugging Face model of a record (its config), converted as its overrides say (`revnets.hf`)."""
    hf = hugging_face()
    model = hf.from_config(json.loads(rec["hf_config"]))
    return hf.reversible(model, **rec["overrides"], memory_efficient=rec["memory_efficient"]) if rec["overrides"] \
        else model


def _hf_layers(rec: dict) -> int:
    return hugging_face().config_of(json.loads(rec["hf_config"])).num_hidden_layers


def build(rec: dict) -> nn.Module:
    """The usable model of a record, without its weights: a `Classifier` or a `LanguageModel`."""
    net = build_network(rec)
    if rec["kind"] == "image":
        return Classifier(net, rec["mean"], rec["std"], rec["classes"], rec["image_size"])
    return LanguageModel(net, Vocabulary(**rec["vocab"]))


def record_of(ckpt: dict, path: str | os.PathLike) -> dict | None:
    """The model record of a checkpoint (`checkpoint.load`'s dict, read from `path`), read from the
    formats of earlier versions too; None for an image checkpoint saved before checkpoints stored
    their standardisation; ValueError naming the file when the record is damaged."""
    try:
        return _record_of(ckpt)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} holds a damaged model record ({type(e).__name__}: {e})") from None


def _record_of(ckpt: dict) -> dict | None:
    if "record" in ckpt:
        if not isinstance(ckpt["record"], dict):
            raise TypeError(f"the record is a {type(ckpt['record']).__name__}, not a dict")
        return ckpt["record"]
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    if "meta" in ckpt:  # image checkpoints of 2026-12-01
        meta = ckpt["meta"]
        network = meta["network"]
        return record(network["model"], model_overrides(network), "image", not network.get("plain"),
                      network["grown"], classes=meta["classes"], in_channels=meta["in_channels"],
                      image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    if "vocab" in ckpt and config.get("dataset") == "text":  # text checkpoints of 2026-12-01
        return record(config["model"], model_overrides(config), "text", not config.get("plain"), 0,
                      vocab=ckpt["vocab"])
    return None


def from_checkpoint(ckpt: dict, path: str | os.PathLike, rec: dict | None = None) -> nn.Module:
    """The model of `ckpt` (`checkpoint.load`'s dict, read from `path`) with its weights, in eval
    mode: `build` of its record (or of `rec`), the weights checked to be finite and to fit."""
    rec = rec if rec is not None else record_of(ckpt, path)
    if rec is None:
        raise ValueError(f"{path} stores no standardisation (saved before checkpoints did): `revnets eval` and "
                         "`revnets predict` recompute it from its run's training split")
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no weights (its model is a {type(state).__name__})")
    _check_size(rec, state, path)
    try:
        model = build(rec)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: its model record cannot be built ({e})") from None
    checkpoint.load_state(model.net, state, path)
    checkpoint.check_finite(state, path)
    _check_outputs(model.eval(), path)
    return model


def _check_outputs(model: nn.Module, path) -> None:
    """ValueError unless the model's outputs on a plain input (grey pixels, or one token) are finite:
    weights and settings (a huge h, say) that give none are no usable model."""
    x = torch.full((1, model.in_channels, *model.image_size), 0.5) if isinstance(model, Classifier) else \
        torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        if not torch.isfinite(model(x)).all():
            raise ValueError(f"{path}: its model's outputs are not finite (its settings or weights make no usable "
                             "model)")


def _check_size(rec: dict, state: dict, path) -> None:
    """ValueError unless the record's network fits the weights, checked before any of it is allocated:
    first its number of blocks (each holds one tensor at least; cheap, so that a crafted record of a
    million blocks is refused before it is built), then every tensor's shape, on the network built
    on the meta device (no memory), so that a crafted width is refused too."""
    try:
        found = spec(rec["model"]) if rec["model"] != HF else dict(kind="hf")
        sizes = {**found, **rec["overrides"]}
        blocks = sum(sizes["units"]) if found["kind"] == "image" else sizes["depth"] if found["kind"] == "text" \
            else _hf_layers(rec)
        grown = rec["grown"]
        if isinstance(grown, bool) or not isinstance(grown, int) or not 0 <= grown < len(state).bit_length():
            raise ValueError(f"grown={grown!r} is not a number of growths that {len(state)} tensors can hold")
        blocks *= 2 ** grown
        if not (isinstance(blocks, int) and 0 < blocks <= len(state)):
            raise ValueError(f"it asks for {blocks} blocks, but the weights hold {len(state)} tensors")
        with torch.device("meta"):
            net = build_network(rec)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model record cannot be built ({e})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that loading into meta tensors copies nothing
        checkpoint.load_state(net, state, path)


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """The trained model of a checkpoint, in eval mode on `device` (default: cpu): a `Classifier`
    (``model = revnets.load("runs/h74/best.pt"); probs = model(images).softmax(1)`` with images
    (N, C, H, W) float in [0, 1]; ``model.classes`` names the outputs) or a `LanguageModel`
    (``revnets.load("runs/lm/best.pt").generate("In the beginning", 100)``)."""
    return from_checkpoint(checkpoint.load(path), path).to(device or "cpu")
