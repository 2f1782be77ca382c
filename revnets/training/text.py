"""Plain UTF-8 text as a language-modelling dataset: vocabulary, held-out split, batches, bits per character.

`load_text(path)` reads one file or every file under a directory (sorted by path), each strictly
UTF-8 and non-empty, and keeps the last `val_fraction` of the characters as the held-out split
(as nanoGPT's character-level Shakespeare). Tokens are the text's distinct characters (level
"char", the default) or the 256 byte values of its UTF-8 encoding (level "byte", which needs no
vocabulary and takes any text). Bits per character are measured on the held-out split, so they
compare across levels: the byte level spreads one character's bits over its bytes.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inference import Vocabulary, logits


def read_text(path: str | Path) -> str:
    """The text of a file, or of every file under a directory joined in path order.

    ValueError naming the file when one is empty or not UTF-8 (with the offending byte's offset);
    FileNotFoundError when `path` does not exist or a directory holds no file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data-dir {path} does not exist (expected a UTF-8 text file or a directory of them)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no file (expected UTF-8 text files)")
    return "".join(_read_file(f) for f in files)


def _read_file(path: Path) -> str:
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"{path} is empty (expected UTF-8 text)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None


@dataclass
class TextData:
    """Token ids of the training and held-out splits; `val_chars`: characters of the held-out text."""

    vocab: Vocabulary
    train: Tensor
    val: Tensor
    val_chars: int

    @property
    def tokens_per_char(self) -> float:
        return len(self.val) / self.val_chars


def load_text(path: str | Path, level: str = "char", val_fraction: float = 0.1) -> TextData:
    """The text at `path` (`read_text`), tokenised at `level`, the last `val_fraction` held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    text = read_text(path)
    vocab = Vocabulary.of(text, level)
    cut = round(len(text) * (1 - val_fraction))
    train, val = text[:cut], text[cut:]
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"{path}: {len(text)} characters are too few for a split with val_fraction={val_fraction} "
                         "(each split needs at least 2)")
    return TextData(vocab, vocab.encode(train), vocab.encode(val), len(val))


def batch(tokens: Tensor, context: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch_size` random windows of `tokens`: inputs (B, T) and next-token targets (B, T),
    T = min(context, len(tokens) - 1); the starts are drawn from `generator`."""
    t = min(context, len(tokens) - 1)
    starts = torch.randint(0, len(tokens) - t, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(t + 1)]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def bits_per_char(model: nn.Module, tokens: Tensor, tokens_per_char: float, context: int,
                  batch_size: int = 64) -> float:
    """Bits per character of `model` on `tokens` (the held-out split): the mean next-token
    cross-entropy in bits, over consecutive windows of `context` tokens, times tokens per character.

    The model runs as it is (call `.eval()` first) on its parameters' device, without a graph; the
    sum stays on the device until the end (one host sync).
    """
    device = next(model.parameters()).device
    n = (len(tokens) - 1) // context * context
    x, y = tokens[:n].view(-1, context), tokens[1:n + 1].view(-1, context)
    rest = len(tokens) - 1 - n
    pieces = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if rest:
        pieces.append((tokens[n:n + rest][None], tokens[n + 1:][None]))
    nats = sum(F.cross_entropy(logits(model(a.to(device))).flatten(0, 1).float(), b.to(device).flatten(),
                               reduction="sum").double() for a, b in pieces)
    return nats.item() / (len(tokens) - 1) / math.log(2) * tokens_per_char
