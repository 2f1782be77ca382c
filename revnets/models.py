"""Named models, one registry for images and text: the paper's Table 1 and the language-model sizes.

`MODELS[name]` holds a model's settings: its `kind` ("image": a `Network` of `units` and
`channels`, Section 4; "text": a `ReversibleTransformer` of `width`, `depth`, `heads` and
`context`), its `scheme` and what it overrides of the scheme's defaults. `register_model` adds a
model, `list_models` finds them by pattern and `build_model` builds one by name.
"""
import fnmatch

from torch import nn

from .blocks import check_positive
from .networks import Network, check_overrides, check_units, scheme_settings
from .schemes import Scheme, get_scheme
from .transformer import ReversibleTransformer, layer_settings

SIZES = {"image": ("units", "channels"), "text": ("width", "depth", "heads", "context")}

MODELS: dict[str, dict] = {}


def register_model(name: str, scheme: str, **spec) -> None:
    """Register a named model: ``build_model(name, ...)`` builds `scheme` with `spec`.

    An image model takes ``units=(n1, n2, ...)`` and ``channels=(c1, c2, ...)``; a language model
    ``width``, ``depth``, ``heads`` and ``context`` (its scheme must name a transformer layer). The
    rest of `spec` overrides the scheme's settings (`settings`: h, act, norm, mlp, ..., segment,
    exact). A name can be registered once; the settings are checked now.
    """
    if not (isinstance(name, str) and name):
        raise ValueError(f"a model name must be a non-empty string; got {name!r}")
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    record = get_scheme(scheme)
    kind = next((k for k, keys in SIZES.items() if keys[0] in spec), None)
    missing = [k for k in SIZES.get(kind, ()) if k not in spec]
    if kind is None or missing:
        raise ValueError(f"{name} needs units and channels (an image model) or width, depth, heads and context "
                         f"(a language model); got {', '.join(spec) or 'neither'}")
    sizes = {k: spec.pop(k) for k in SIZES[kind]}
    if kind == "image":
        check_units(sizes["units"], sizes["channels"])
        sizes = {k: tuple(v) for k, v in sizes.items()}
    elif record.layer is None:
        raise ValueError(f"{name}: scheme {record.name!r} has no transformer layer for a language model")
    else:
        check_positive(**sizes)
    check_overrides(name, spec, settings(record, kind))
    MODELS[name] = dict(kind=kind, scheme=record.name, **sizes, **spec)


def settings(record: Scheme, kind: str) -> list[str]:
    """The settings (besides the sizes) that a model of this scheme and kind takes as overrides."""
    return scheme_settings(record) if kind == "image" else layer_settings(record)


def spec(name: str) -> dict:
    """The registered settings of `name`; ValueError listing the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)} (a module that registers "
                         "more is imported with revnets --import MODULE)")
    return MODELS[name]


def model_scheme(name: str) -> Scheme:
    """The scheme record of a registered model; ValueError listing the valid names."""
    return get_scheme(spec(name)["scheme"])


def list_models(pattern: str | None = None) -> list[str]:
    """The registered model names (Table 1's first, then the language models) that `build_model`
    accepts, optionally only those matching the shell-style `pattern` (``list_models("*-lm-*")``)."""
    return [n for n in MODELS if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                vocab_size: int | None = None, memory_efficient: bool = True, **overrides) -> nn.Module:
    """Build a registered model by name: ``build_model("hamiltonian-74")`` (a `Network`, 10 classes,
    3 input channels unless given) or ``build_model("leapfrog-lm-small", vocab_size=96)`` (a
    `ReversibleTransformer`).

    Overrides: the sizes (``units=(n1, n2, n3[, n4])``, ``channels=(...)``; ``width``, ``depth``,
    ``heads``, ``context``) and the scheme's settings: h, act and norm of an image block; h, mlp,
    dropout, tied and init of a transformer layer, and ``scheme`` (a language model's sizes in
    another scheme); reversible schemes also take ``segment`` (None, an integer k or "auto": blocks
    per state the engine stores, see `revnets.engine`) and ``exact=True`` (fixed-point state,
    bit-exact reversal, see `revnets.exact`).
    ``memory_efficient=False`` gives the same module (same parameter names) trained with plain autograd.
    """
    found = dict(spec(name))
    kind = found.pop("kind")
    record = get_scheme(overrides.get("scheme", found["scheme"]) if kind == "text" else found["scheme"])
    check_overrides(name, overrides, [*SIZES[kind], *settings(record, kind)])
    if kind == "image":
        if vocab_size is not None:
            raise ValueError(f"{name} is an image model: it takes num_classes and in_channels, not vocab_size")
        return Network(num_classes=10 if num_classes is None else num_classes,
                       in_channels=3 if in_channels is None else in_channels, memory_efficient=memory_efficient,
                       **{**record.defaults, **found, **overrides})
    if num_classes is not None or in_channels is not None or vocab_size is None:
        raise ValueError(f"{name} is a language model: it takes vocab_size (and not num_classes or in_channels)")
    return ReversibleTransformer(vocab_size, memory_efficient=memory_efficient, **{**found, **overrides})


def build_lm(name: str, vocab_size: int, **overrides) -> ReversibleTransformer:
    """`build_model` of a language model: ``build_lm("leapfrog-lm-small", 96)``."""
    return build_model(name, vocab_size=vocab_size, **overrides)


# Table 1. ResNet-1202's row prints channels 32-64-128, but its 19.4M parameters are 16-32-64
# (He et al.'s ResNet-1202), as registered here.
register_model("resnet-32", scheme="resnet", units=(5, 5, 5), channels=(16, 32, 64))
register_model("resnet-110", scheme="resnet", units=(18, 18, 18), channels=(16, 32, 64))
register_model("resnet-1202", scheme="resnet", units=(200, 200, 200), channels=(16, 32, 64))
register_model("revnet-38", scheme="revnet", units=(3, 3, 3), channels=(32, 64, 112))
register_model("revnet-110", scheme="revnet", units=(9, 9, 9), channels=(32, 64, 128))
register_model("hamiltonian-74", scheme="hamiltonian", units=(6, 6, 6), channels=(32, 64, 112))
register_model("hamiltonian-218", scheme="hamiltonian", units=(18, 18, 18), channels=(32, 64, 128))
register_model("hamiltonian-1202", scheme="hamiltonian", units=(100, 100, 100), channels=(32, 64, 128))
register_model("midpoint-26", scheme="midpoint", units=(4, 4, 4), channels=(32, 64, 112))
register_model("midpoint-62", scheme="midpoint", units=(10, 10, 10), channels=(32, 64, 128))
register_model("leapfrog-26", scheme="leapfrog", units=(4, 4, 4), channels=(32, 64, 112))
register_model("leapfrog-62", scheme="leapfrog", units=(10, 10, 10), channels=(32, 64, 128))

# Table 1's parameter counts in millions: (CIFAR-10, CIFAR-100). A model without an entry has no paper count.
PAPER_PARAMS: dict[str, tuple[float, float | None]] = {
    "resnet-32": (0.46, 0.47), "resnet-110": (1.73, 1.73), "resnet-1202": (19.4, None),
    "revnet-38": (0.46, 0.48), "revnet-110": (1.73, 1.74),
    "hamiltonian-74": (0.43, 0.44), "hamiltonian-218": (1.68, 1.69), "hamiltonian-1202": (9.70, None),
    "midpoint-26": (0.50, 0.51), "midpoint-62": (1.78, 1.79),
    "leapfrog-26": (0.50, 0.51), "leapfrog-62": (1.78, 1.79),
}

# Language models: one size is one model for every scheme (equal parameters). "small" fits a CPU
# (about 1.2M parameters with a 90-character vocabulary). The resnet scheme's are named residual-lm-*,
# as transformers call it.
for _size, _dims in {"tiny": dict(width=36, depth=4, heads=2, context=64),
                     "small": dict(width=128, depth=6, heads=4, context=128),
                     "base": dict(width=384, depth=12, heads=6, context=256)}.items():
    for _scheme in ("hamiltonian", "midpoint", "leapfrog", "revnet", "resnet"):
        register_model(f"{'residual' if _scheme == 'resnet' else _scheme}-lm-{_size}", _scheme, **_dims)
