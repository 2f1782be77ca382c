"""`revnets predict`: the classes a trained checkpoint gives to PNG and JPEG files.

Images are decoded as training decodes an image folder (`data.read_image`), then made what the
model expects: a grey image is replicated to RGB for an RGB model, an RGB image is converted to
grey (PIL's "L", ITU-R 601-2 luma) for a grey model, and an image of another size than the
training images is resized to it (bilinear), with a note on stderr. Every file is decoded before
anything is printed: a file that cannot be read ends the command with one line naming it (exit 2).
A directory stands for the PNG and JPEG files under it, recursively, in sorted order.

Output, one line per image: ``path<TAB>class<TAB>probability``, with --topk K the K most probable
classes as K class/probability pairs on the line. A backslash, tab, newline or carriage return in a
path or class name is written as \\\\, \\t, \\n or \\r, so that every line is one image and every
field one value (Python's and PostgreSQL's text escapes). --json prints one JSON list of
{"path", "predictions": [{"class", "probability"}, ...]} instead.
"""
import argparse
import json
import stat
import sys
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, inference
from ..training import data
from ..training.settings import check_device
from ..training.tasks import old_record
from . import positive_int
from .eval import classifier_record

SPECIAL = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe (FIFO)",
           stat.S_IFSOCK: "a socket"}
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def image_files(paths: list[str]) -> list[Path]:
    """The files named, with each directory replaced by the images under it (sorted); ValueError
    for an empty name or one that is not a regular file (a device, a FIFO, ...), FileNotFoundError
    for one that does not exist."""
    files = []
    for text in paths:
        path = Path(text)
        if not text:
            raise ValueError("an empty FILE_OR_DIR argument names no image (use . for the current directory)")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"{path} holds no .png/.jpg/.jpeg images")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists():
            target = f" (a link to {path.resolve()})" if path.is_symlink() else ""
            kind = SPECIAL.get(stat.S_IFMT(path.stat().st_mode), "not a regular file")
            raise ValueError(f"{path}{target} is {kind}, not an image file")
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def escaped(text: str) -> str:
    """`text` as one tab-separated field: backslash, tab, newline and carriage return written as
    \\\\, \\t, \\n and \\r (the output rule of the module docstring)."""
    return text.translate(ESCAPES)


def to_input(pixels: np.ndarray, channels: int, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """(image (channels, H, W) float in [0, 1], whether it was resized) from `data.read_image`'s
    pixels: grey or RGB as `channels` says, resized (bilinear) to `size` = (H, W) if it differs."""
    from PIL import Image
    grey = pixels.ndim == 2
    if channels == 1 and not grey:
        pixels, grey = np.asarray(Image.fromarray(pixels).convert("L")), True
    resized = pixels.shape[:2] != tuple(size)
    if resized:
        pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))
    x = torch.from_numpy(np.array(pixels))  # a writable copy
    x = x[None] if grey else x.permute(2, 0, 1)
    return x.expand(channels, -1, -1).float() / 255, resized


@torch.no_grad()
def predict(model: inference.Classifier, images: torch.Tensor, topk: int, batch_size: int = 256):
    """(probabilities (N, topk), class indices (N, topk)) of `model` on images (N, C, H, W) in [0, 1]."""
    device = model.mean.device
    probs = torch.cat([model(images[i:i + batch_size].to(device)).softmax(1).cpu()
                       for i in range(0, len(images), batch_size)])
    return probs.topk(topk, dim=1)


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = checkpoint.load(args.checkpoint)
    rec = classifier_record(ckpt, args.checkpoint) or old_record(ckpt, args.checkpoint)
    model = inference.from_checkpoint(ckpt, args.checkpoint, rec).to(device)
    if args.topk > len(model.classes):
        raise ValueError(f"--topk {args.topk} exceeds the model's {len(model.classes)} classes")
    files = image_files(args.inputs)
    images = []
    for path in files:
        x, resized = to_input(data.read_image(path), model.in_channels, model.image_size)
        if resized:
            print(f"note: {path} resized to the training size {model.image_size[1]}x{model.image_size[0]}",
                  file=sys.stderr)
        images.append(x)
    probs, idx = predict(model, torch.stack(images), args.topk)
    rows = [(str(path), [(model.classes[i], p) for i, p in zip(ix.tolist(), pr.tolist())])
            for path, pr, ix in zip(files, probs, idx)]
    if args.json:
        print(json.dumps([{"path": path, "predictions": [{"class": c, "probability": p} for c, p in top]}
                          for path, top in rows], indent=1))
    else:
        for path, top in rows:
            print("\t".join([escaped(path), *(f"{escaped(c)}\t{p:.4f}" for c, p in top)]))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify PNG/JPEG images with a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="images, or directories of images")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt file written by `revnets train`")
    p.add_argument("--topk", type=positive_int, default=1, metavar="K", help="the K most probable classes (default: 1)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of tab-separated lines")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=run)
