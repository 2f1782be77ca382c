"""Text dataset: UTF-8 files or directories, character and byte vocabularies, split, bits per character."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from revnets.inference import Vocabulary
from revnets.training.text import batch, bits_per_char, load_text, read_text

TINY = Path(__file__).parent / "data" / "tiny.txt"


@pytest.mark.parametrize("level", ["char", "byte"])
def test_vocabulary_round_trip_and_split_keeps_every_character(level):
    text = TINY.read_text(encoding="utf-8")
    data = load_text(TINY, level, val_fraction=0.25)
    assert data.vocab.decode(data.train) + data.vocab.decode(data.val) == text
    assert data.val_chars == len(text) - round(len(text) * 0.75)
    assert len(data.vocab) == (len(set(text)) if level == "char" else 256)
    assert (data.tokens_per_char > 1) == (level == "byte")  # the file holds multi-byte characters
    rebuilt = Vocabulary(**data.vocab.state())
    assert torch.equal(rebuilt.encode(text[:50]), data.vocab.encode(text[:50]))


def test_unknown_character_named():
    with pytest.raises(ValueError, match=r"not in the vocabulary of 3: 'z'"):
        Vocabulary.of("abc").encode("abz")


def test_directory_read_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("world", encoding="utf-8")
    (tmp_path / "1.txt").write_text("hello ", encoding="utf-8")
    assert read_text(tmp_path) == "hello world"


@pytest.mark.parametrize("content, match", [(b"", "is empty"),
                                            (b"ok \xff bad", r"is not UTF-8 text: byte 0xff at offset 3")])
def test_empty_or_non_utf8_file_named(tmp_path, content, match):
    (tmp_path / "good.txt").write_text("fine text", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    for path in (bad, tmp_path):  # the file itself, or a directory that holds it
        with pytest.raises(ValueError, match=f"bad.txt {match}"):
            read_text(path)


def test_missing_path_empty_directory_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="holds no file"):
        read_text(tmp_path)
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
        load_text(TINY, val_fraction=1.0)
    (tmp_path / "short.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match="too few"):
        load_text(tmp_path / "short.txt")
    with pytest.raises(ValueError, match="unknown text level"):
        load_text(TINY, "word")


def test_batch_targets_are_the_next_tokens_and_seeded():
    tokens = torch.arange(100)
    x, y = batch(tokens, 8, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and torch.equal(y, x + 1)
    assert torch.equal(x, batch(tokens, 8, 5, torch.Generator().manual_seed(0))[0])
    assert batch(tokens[:4], 8, 2, torch.Generator())[0].shape == (2, 3)  # shorter than the context


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.graphs = getattr(self, "graphs", 0) + torch.is_grad_enabled()
        return self.w + torch.zeros(*x.shape, self.vocab)


@pytest.mark.parametrize("level", ["char", "byte"])
def test_bits_per_char_of_a_uniform_model(level):
    """A uniform prediction over V tokens costs log2(V) bits per token, tokens_per_char per character."""
    data = load_text(TINY, level)
    v = len(data.vocab)
    model = Uniform(v)
    bpc = bits_per_char(model, data.val, data.tokens_per_char, context=16, batch_size=3)
    assert bpc == pytest.approx(math.log2(v) * data.tokens_per_char, rel=1e-6)
    assert model.graphs == 0  # evaluated without building autograd graphs
