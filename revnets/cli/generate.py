"""`revnets generate`: sample text from a language model's checkpoint (`revnets train --dataset text`).

    revnets generate --checkpoint runs/lm/best.pt --prompt "In the beginning" --tokens 200

Prints the prompt followed by the sampled continuation. Sampling divides the logits by
--temperature (0: greedy) and keeps the --top-k most likely tokens; --seed makes it reproducible.
"""
import argparse
import math

import torch

from .. import checkpoint, inference
from ..training.settings import check_device
from . import positive_int


def sample(path: str, prompt: str, tokens: int, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, device: str = "cpu") -> str:
    """The prompt and `tokens` sampled tokens of the language model saved at `path`, as text."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy); got {temperature}")
    device = check_device(device)
    ckpt = checkpoint.load(path)
    rec = inference.record_of(ckpt, path)
    if rec is None or rec.get("kind") != "text":
        raise ValueError(f"{path} holds an image classifier, not a language model: classify images with "
                         "revnets predict")
    model = inference.from_checkpoint(ckpt, path, rec).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    return model.generate(prompt, tokens, temperature, top_k, generator)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a language model's checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a text run")
    p.add_argument("--prompt", required=True, help="the text to continue (its characters must be in the vocabulary)")
    p.add_argument("--tokens", type=positive_int, default=200, help="tokens to sample (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default: 1)")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--device", default="cpu", help="where to run the model (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(sample(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.device))
    return 0
