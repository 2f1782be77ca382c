"""revnets: stable reversible residual networks (Chang et al., AAAI 2018) in PyTorch."""
__version__ = "0.1.0"  # before the imports: config (imported by inference) records it

from .blocks import (AdditiveCoupling, BasicBlock, Coupling, HamiltonianBlock, LeapfrogBlock, MidPointBlock,
                     ReversibleBlock, RevNetBlock)
from .schemes import SCHEMES, Scheme, get_scheme, register_scheme
from .networks import MODELS, Network, ReversibleStack, build_model, list_models, register_model
from .regularization import smoothness_penalty
from .engine import invert, reversible, sequential
from .drift import DriftMonitor, reversal_error
from .multilevel import grow
from .inference import Classifier, load
from .transformer import LM_MODELS, ReversibleTransformer, build_lm
from . import analysis, blocks, exact

__all__ = ["AdditiveCoupling", "BasicBlock", "Coupling", "HamiltonianBlock", "LeapfrogBlock", "MidPointBlock",
           "ReversibleBlock", "RevNetBlock", "SCHEMES", "Scheme", "get_scheme", "register_scheme", "MODELS",
           "Network", "ReversibleStack", "build_model", "list_models", "register_model", "smoothness_penalty",
           "invert", "reversible", "sequential", "DriftMonitor", "reversal_error", "grow", "analysis", "blocks", "exact",
           "Classifier", "load", "LM_MODELS", "ReversibleTransformer", "build_lm"]
