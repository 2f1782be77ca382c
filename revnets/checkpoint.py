"""Checkpoints that survive a kill and cannot run code.

A checkpoint is a dict of tensors and plain Python values:

    {"model": state_dict, "config": the run's settings, "epoch": completed epochs,
     "record": the model record (`revnets.inference`: what rebuilds the model and what using it needs),
     "row": the epoch's metrics row (its line of metrics.csv), "wall_s": seconds of training and
     evaluation up to this epoch, and, to resume: "optimizer", "scheduler", "rng", "best_<metric>"
     and "best_epoch" (the best epoch's validation score; "scaler" with fp16)}

`save` writes through `files.atomic_write`, so a kill leaves either the old or the new checkpoint,
never half of one. `load` unpickles with
``torch.load(weights_only=True)``: only tensors and containers of plain values are rebuilt, so a
checkpoint from elsewhere cannot execute code.
"""
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write

KEYS = ("model", "config", "epoch")


def save(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`; ValueError naming the file if it is corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} refused: not a file of tensors and plain values that loads without "
                         f"running code ({_reason(e, 'WeightsUnpickler error:')})") from None
    except Exception as e:  # RuntimeError, EOFError, ... depending on the damage
        raise ValueError(f"{path} is not a readable checkpoint ({_reason(e)})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a revnets checkpoint: it holds a {type(ckpt).__name__}, expected a dict")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a revnets checkpoint: missing {', '.join(missing)} "
                         f"(expected keys {', '.join(KEYS)})")
    return ckpt


def _reason(e: Exception, marker: str = "") -> str:
    """The informative sentence of torch.load's long error messages."""
    text = str(e)
    text = text[text.index(marker) + len(marker):] if marker and marker in text else text
    return text.strip().split(". ")[0].split("\n")[0].strip() or type(e).__name__


def count_nonfinite(state: dict) -> int:
    """How many entries of a state_dict's floating-point tensors are NaN or infinite."""
    return sum(int((~torch.isfinite(t)).sum()) for t in state.values() if torch.is_floating_point(t))


def load_state(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """`model.load_state_dict(state)`, with a ValueError naming the file and the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        details = " ".join(line.strip() for line in str(e).splitlines()[1:])[:500]
        raise ValueError(f"{path} does not match the model: {details}") from None


def check_finite(state: dict, path: str | os.PathLike) -> None:
    """ValueError naming `path` if the state_dict `state` holds NaN or infinite weights."""
    bad = count_nonfinite(state)
    if bad:
        raise ValueError(f"{path} holds {bad:,} non-finite weights (NaN or infinite): not a usable model")
