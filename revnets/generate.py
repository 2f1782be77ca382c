"""`revnets generate`: sample text from a checkpoint of `revnets train --dataset text`.

    revnets generate --checkpoint runs/lm/best.pt --prompt "In the beginning" --tokens 200

Prints the prompt followed by the sampled continuation. Sampling divides the logits by
--temperature (0: greedy) and keeps the --top-k most likely tokens; --seed makes it reproducible.
"""
import argparse

import torch

from .cli import positive_int
from .lm import load_lm
from .transformer import generate


def sample(checkpoint: str, prompt: str, tokens: int, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, device: str = "cpu") -> str:
    """The prompt and `tokens` sampled tokens of the text model saved at `checkpoint`, as text."""
    if not prompt:
        raise ValueError("--prompt must hold at least one character")
    model, vocab = load_lm(checkpoint, device)
    ids = vocab.encode(prompt)[None].to(device)
    generator = torch.Generator(device).manual_seed(seed)
    return vocab.decode(generate(model, ids, tokens, temperature, top_k, generator)[0].cpu())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a text model's checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a text run")
    p.add_argument("--prompt", required=True, help="the text to continue (its characters must be in the vocabulary)")
    p.add_argument("--tokens", type=positive_int, default=200, help="tokens to sample (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default: 1)")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--device", default="cpu", help="where to run the model (default: cpu)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    print(sample(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.device))
    return 0
