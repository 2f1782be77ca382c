"""revnets: stable reversible residual networks (Chang et al., AAAI 2018) in PyTorch."""
__version__ = "0.1.0"

from .blocks import (AdditiveCoupling, BasicBlock, Coupling, HamiltonianBlock, LeapfrogBlock, MidPointBlock,
                     ReversibleBlock, RevNetBlock)
from .schemes import SCHEMES, Scheme, get_scheme, register_scheme
from .networks import Network, ReversibleChain, ReversibleStack, smoothness_penalty
from .transformer import ReversibleTransformer
from .models import MODELS, build_lm, build_model, list_models, register_model
from .engine import invert, reversible, sequential
from .analysis import DriftMonitor, reversal_error
from .multilevel import grow
from .inference import Classifier, LanguageModel, load
from . import analysis, blocks, exact

__all__ = ["AdditiveCoupling", "BasicBlock", "Coupling", "HamiltonianBlock", "LeapfrogBlock", "MidPointBlock",
           "ReversibleBlock", "RevNetBlock", "SCHEMES", "Scheme", "get_scheme", "register_scheme", "MODELS",
           "Network", "ReversibleChain", "ReversibleStack", "ReversibleTransformer", "build_model", "build_lm",
           "list_models", "register_model", "smoothness_penalty", "invert", "reversible", "sequential",
           "DriftMonitor", "reversal_error", "grow", "analysis", "blocks", "exact", "Classifier", "LanguageModel",
           "load"]
