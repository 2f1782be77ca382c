"""Where a run's first weights come from (--init-from): a revnets checkpoint, or for a text run a
Hugging Face model directory (written by `save_pretrained`; read offline, nothing downloaded).

A text run can train the source's model in another scheme (--convert SCHEME: the same weights, the
layers run as SCHEME; a Hugging Face model through `revnets.hf`, a revnets language model by its
sizes in that scheme) and fit the source's own outputs (--distill: the KL divergence from the
source model's next-token distribution, which the run computes without keeping its activations).
"""
import json
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, inference


def is_hf(path: str | None) -> bool:
    """Whether `path` is a Hugging Face model directory (one with a config.json)."""
    return path is not None and (Path(path) / "config.json").is_file()


def model_name(path: str) -> str:
    """The model a source holds: "hf" for a Hugging Face directory, else its checkpoint record's name."""
    if is_hf(path):
        return inference.HF
    if not Path(path).is_file():
        raise ValueError(f"--init-from {path}: no such checkpoint file or Hugging Face model directory")
    rec = inference.record_of(checkpoint.load(path), path)
    if rec is None:
        raise ValueError(f"--init-from {path}: a checkpoint without a model record (saved before 2026-12-01)")
    return rec["model"]


def record(path: str) -> dict:
    """The model record of a source: a checkpoint's, or a Hugging Face model's config and, if it was
    saved converted, its conversion (`revnets.hf`) as overrides."""
    if is_hf(path):
        inference.hugging_face()  # a ValueError without transformers
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path).to_dict()
        return inference.record(inference.HF, config.pop("revnets", None) or {}, "text", hf_config=json.dumps(config))
    return inference.record_of(checkpoint.load(path), path)


def weights(path: str) -> dict:
    """The state dict of a source's model (a Hugging Face model's as it loads, on the CPU)."""
    if is_hf(path):
        inference.hugging_face()
        from transformers import AutoModelForCausalLM
        state = AutoModelForCausalLM.from_pretrained(path).state_dict()
    else:
        state = checkpoint.load(path)["model"]
    checkpoint.check_finite(state, f"--init-from {path}")
    return state


def teacher(path: str, device: torch.device) -> nn.Module:
    """The source's model as it is, in eval mode, frozen: what --distill fits (tokens -> logits)."""
    if not (is_hf(path) or Path(path).is_file()):
        raise ValueError(f"--distill fits the model of --init-from {path}, which is not there any more")
    if is_hf(path):
        model = inference.hugging_face().from_pretrained(path)
    else:
        model = inference.from_checkpoint(checkpoint.load(path), path).net
    return model.to(device).eval().requires_grad_(False)
