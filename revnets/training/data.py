"""Datasets from their standard formats, class-stratified subsets, and a GPU-resident loader.

Every reader returns uint8 images (N, C, H, W) and int64 labels (N,) on the CPU; train and test
images must share their size and channels. `Loader` moves a split to the device once and augments
there as in the paper (Section 4): zero padding (4 pixels, 12 for STL-10), random crop, random
horizontal flip, per-channel standardisation.

An image folder is decoded once (PNG and JPEG through Pillow, `read_image`: 16-bit images scaled
to 8 bits, not clipped, 32-bit ones by their values; a file that does not decode is refused,
naming it) into a cache in `cache_dir()`, keyed by the folder's path, file names, sizes and
modification times.
"""
import hashlib
import io
import os
import sys
import pickle
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import atomic_write
from .progress import bar

DATASETS = ("cifar10", "cifar100", "stl10", "folder", "digits")
CIFAR = {  # name: (archive, extracted dir, train members, test member, meta member, label key, names key, MD5)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "labels", "label_names", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta",
                 "fine_labels", "fine_label_names", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
WIDE_MODES = ("I;16", "I;16B", "I;16L")  # 16 bits per pixel (Pillow reads 16-bit PNGs as these)


@dataclass
class Dataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64 of both splits; `padding` is the crop padding.
    `val_x`, `val_y`: the validation images held out of the training split by `subsample`, if any."""
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    padding: int
    val_x: Tensor | None = None
    val_y: Tensor | None = None


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False,
                 train: bool = True) -> Dataset:
    """Read `name` (one of DATASETS) from `data_dir` (default ./data); `download` fetches CIFAR archives.

    train=False reads the test split only (the training split is then empty): what evaluating a
    model that stores its standardisation needs.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits(train)
    if name == "folder" and data_dir is None:
        raise ValueError("the folder dataset needs a data directory (ROOT/train/<class>/*.png|jpg, ROOT/test/...)")
    root = Path("data" if data_dir is None else data_dir).expanduser()
    if name == "folder":
        return _folder(root, train)
    if name == "stl10":
        return _stl10(root, train)
    return _cifar(name, root, download, train)


def _dataset(name, train, test, classes, padding) -> Dataset:
    """A Dataset of (x, y) numpy pairs; train=None gives an empty training split (test's image shape)."""
    (test_x, test_y) = test
    train_x, train_y = train if train is not None else (test_x[:0], test_y[:0])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"{name}: training images are {_shape(train_x)} but test images {_shape(test_x)}; "
                         "both splits must share size and channels")
    return Dataset(name, torch.from_numpy(np.ascontiguousarray(train_x)), torch.as_tensor(train_y, dtype=torch.int64),
                   torch.from_numpy(np.ascontiguousarray(test_x)), torch.as_tensor(test_y, dtype=torch.int64),
                   list(classes), padding)


# ---- CIFAR-10/100: the python pickle archive, packed or extracted ----

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists and numpy arrays only, so a tampered archive cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}  # bytes, pickled by Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"refusing to unpickle {module}.{name}: not a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(raw: bytes) -> dict:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar(name: str, root: Path, download: bool, train: bool = True) -> Dataset:
    archive, folder, train_members, test_member, meta_member, label_key, names_key, md5 = CIFAR[name]
    train_members = train_members if train else []
    members = [*train_members, test_member, meta_member]
    if (root / folder).is_dir():
        raw = {m: (root / folder / m).read_bytes() for m in members}
    else:
        if not (root / archive).is_file():
            if not download:
                raise FileNotFoundError(f"{root / archive} not found: put {archive} (from {CIFAR_URL}) in {root}, "
                                        f"or its extracted {folder}/, or pass --download")
            _download(CIFAR_URL + archive, root / archive, md5)
        try:
            with tarfile.open(root / archive, "r:gz") as tar:  # one sequential pass over the gzip stream
                raw = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.name in
                       {f"{folder}/{member}" for member in members}}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{root / archive} is not a readable tar.gz archive ({e}); delete it and fetch it again")
        if missing := [f"{folder}/{m}" for m in members if m not in raw]:
            raise ValueError(f"{root / archive} lacks {', '.join(missing)}: not the {name} archive")
    batches = {m: _unpickle(raw[m]) for m in members}

    def split(names):
        x = np.concatenate([batches[m]["data"] for m in names]).reshape(-1, 3, 32, 32)
        return x, np.concatenate([batches[m][label_key] for m in names])
    classes = [c.decode() if isinstance(c, bytes) else c for c in batches[meta_member][names_key]]
    return _dataset(name, split(train_members) if train else None, split([test_member]), classes, padding=4)


def _shape(x: np.ndarray) -> str:
    return f"{x.shape[3]}x{x.shape[2]} with {x.shape[1]} channel{'s' if x.shape[1] > 1 else ''}"


def _download(url: str, path: Path, md5: str) -> None:
    """Fetch `url` to `path` atomically; ValueError if its MD5 is not `md5`."""
    digest = hashlib.md5()

    def fetch(f):
        with urllib.request.urlopen(url) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"download of {url} is corrupt: MD5 {digest.hexdigest()}, expected {md5}; try again")
    try:
        atomic_write(path, fetch)
    except urllib.error.URLError as e:
        raise FileNotFoundError(f"cannot download {url} ({e.reason}); put {path.name} in {path.parent} by hand") from e


# ---- STL-10: stl10_binary ----

def _stl10(root: Path, train: bool = True) -> Dataset:
    folder = root / "stl10_binary"
    missing = [f for f in STL10_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]} not found: extract stl10_binary.tar.gz (from "
                                f"https://ai.stanford.edu/~acoates/stl10/) into {root}")

    def split(prefix):  # images are stored column-major: (N, C, W, H)
        x = np.fromfile(folder / f"{prefix}_X.bin", np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        return x, np.fromfile(folder / f"{prefix}_y.bin", np.uint8).astype(np.int64) - 1  # labels 1..10
    classes = (folder / "class_names.txt").read_text().split()
    return _dataset("stl10", split("train") if train else None, split("test"), classes, padding=12)


# ---- image folders: ROOT/{train,test}/<class>/*.png|jpg, decoded once into a cached .npz ----

def cache_dir() -> Path:
    """Where decoded image folders are cached: $REVNETS_CACHE, else $XDG_CACHE_HOME/revnets, else
    ~/.cache/revnets."""
    if os.environ.get("REVNETS_CACHE"):
        return Path(os.environ["REVNETS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "revnets"


def _folder(root: Path, train: bool = True) -> Dataset:
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'} not found: expected ROOT/train/<class>/*.png|jpg and "
                                f"ROOT/test/<class>/... with ROOT = {root}")
    classes = _class_dirs(root / "train")
    files = {split: _image_files(root, split, classes) for split in ("train", "test")}
    key = hashlib.sha1(repr((str(root.resolve()), classes, files)).encode()).hexdigest()  # path, names, mtimes, sizes
    cache = cache_dir() / f"folder-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.npz"
    arrays = _read_cache(cache, key, ("train", "test") if train else ("test",))
    if arrays is None:
        arrays = _decode(root, files)
        print(f"caching the decoded images of {root} in {cache} (set REVNETS_CACHE to move it)",
              file=sys.stderr, flush=True)
        try:
            atomic_write(cache, lambda f: np.savez(f, key=np.array(key), **arrays))
        except OSError as e:  # an unwritable cache costs only the decoding next time
            print(f"warning: cannot cache the decoded images in {cache} ({e.strerror}); set REVNETS_CACHE",
                  file=sys.stderr, flush=True)
    return _dataset("folder", (arrays["train_x"], arrays["train_y"]) if train else None,
                    (arrays["test_x"], arrays["test_y"]), classes, padding=4)


def _read_cache(path: Path, key: str, splits=("train", "test")) -> dict[str, np.ndarray] | None:
    """The arrays of `splits` cached at `path` if they were decoded from the files that `key` describes."""
    try:
        with np.load(path) as z:
            return {f"{s}_{a}": z[f"{s}_{a}"] for s in splits for a in "xy"} if str(z["key"]) == key else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, or not written by this version
        return None


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the class folders (hidden ones such as .ipynb_checkpoints are not classes)."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(root: Path, split: str, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """(path relative to root, label, mtime_ns, size) of each image in root/split/<class>/, sorted."""
    if not (root / split).is_dir():
        raise FileNotFoundError(f"{root / split} not found: expected {root / split}/<class>/*.png|jpg")
    unknown = sorted(set(_class_dirs(root / split)) - set(classes))
    if unknown:
        raise ValueError(f"{root / split} has classes {unknown} that {root / 'train'} lacks")
    files = []
    for label, c in enumerate(classes):
        if (root / split / c).is_dir():
            with os.scandir(root / split / c) as entries:  # os.scandir: 60,000 files listed in well under 1 s
                images = sorted((e for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
            if split == "train" and not images:
                raise ValueError(f"{root / split / c} holds no .png/.jpg images: a class needs training images")
            files += [(f"{split}/{c}/{e.name}", label, e.stat().st_mtime_ns, e.stat().st_size) for e in images]
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images in {root / split}/<class>/")
    return files


def _decode(root: Path, files: dict[str, list[tuple[str, int, int, int]]]) -> dict[str, np.ndarray]:
    """Decode every image; grey (1 channel) if all images are grey, else RGB (grey ones replicated)."""
    pixels = {}
    for split, items in files.items():
        pixels[split] = [read_image(root / name) for name, *_ in
                         bar(items, f"decoding the {split} images of {root}")]
        for (name, *_), a in zip(items, pixels[split]):
            (h, w), (h0, w0) = a.shape[:2], pixels[split][0].shape[:2]
            if (h, w) != (h0, w0):
                raise ValueError(f"{root / name} is {w}x{h} but {root / items[0][0]} is {w0}x{h0}: every image "
                                 f"of a split must have the same size")
    grey = all(a.ndim == 2 for split in pixels.values() for a in split)
    arrays = {}
    for split, items in files.items():
        x = np.stack([a if grey or a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in pixels[split]])
        arrays[f"{split}_x"] = x[:, None] if grey else x.transpose(0, 3, 1, 2).copy()
        arrays[f"{split}_y"] = np.array([label for _, label, *_ in items], dtype=np.int64)
    return arrays


def read_image(path: str | Path) -> np.ndarray:
    """Pixels of one PNG or JPEG file, uint8 (H, W) grey or (H, W, 3) RGB; ValueError naming a file
    that does not decode (or would decode to more pixels than Pillow's decompression-bomb limit).
    16-bit images are scaled to 8 bits. A 32-bit one (Pillow's mode "I") declares no range, so its
    values decide: 0..255 are kept as 8-bit values, up to 65535 scaled as 16 bits, others refused.
    Image folders and `revnets predict` decode with it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in WIDE_MODES or im.mode == "I":
                return _eight_bits(np.asarray(im), wide=im.mode in WIDE_MODES)
            mode = "L" if im.mode in GREY_MODES else "RGB"
            return np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, ...
        raise ValueError(f"{path} is not a readable image ({e}); delete or replace it") from None


def _eight_bits(pixels: np.ndarray, wide: bool) -> np.ndarray:
    """uint8 grey pixels of a 16-bit image (`wide`: 0..65535 scaled to 0..255) or of a 32-bit one
    (its values decide, `read_image`); ValueError for 32-bit values outside 0..65535."""
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"its 32-bit pixels span {low}..{high}, outside 0..255 (8-bit) and 0..65535 (16-bit)")
    top = 65535 if wide or high > 255 else 255
    return np.round(pixels.astype(np.float64) * (255 / top)).astype(np.uint8)


# ---- scikit-learn's 8x8 digits ----

def _digits(train: bool = True) -> Dataset:
    """1,797 grey 8x8 digits scaled to 0..255, with a fixed stratified 1,437/360 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(x, digits.target, test_size=360, stratify=digits.target,
                                                        random_state=0)
    return _dataset("digits", (train_x, train_y) if train else None, (test_x, test_y), [str(d) for d in range(10)],
                    padding=1)


# ---- subsets, statistics, loader ----

def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded random subset of round(fraction * N) samples (at least 1), (K,) int64.

    Each class keeps its share: class c gets floor(fraction * N_c) samples, and the remaining ones go
    to the classes with the largest remainders (ties broken by the seed).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * fraction
    take = quota.floor().long()
    shuffled = torch.randperm(len(classes), generator=g)
    by_remainder = shuffled[(quota - take)[shuffled].sort(descending=True, stable=True).indices]
    take[by_remainder[:max(1, round(fraction * len(labels))) - int(take.sum())]] += 1
    picks = [(labels == c).nonzero().squeeze(1)[torch.randperm(int(n), generator=g)[:k]]
             for c, n, k in zip(classes, counts, take)]
    return torch.cat(picks).sort().values


def subsample(ds: Dataset, fraction: float, seed: int, val_fraction: float = 0.0) -> Dataset:
    """The splits a run uses: `val_fraction` of the training split held out as validation
    (`stratified_subset` with `seed`; none at 0), then `stratified_subset(fraction, seed)` of the rest
    kept for training (all of it at 1). ValueError when either would be empty."""
    if val_fraction:
        held = torch.zeros(len(ds.train_y), dtype=torch.bool)
        held[stratified_subset(ds.train_y, val_fraction, seed)] = True
        if held.all():
            raise ValueError(f"{ds.name}: {len(ds.train_y)} training images are too few to hold out a validation "
                             "split; pass --val-fraction 0")
        ds = replace(ds, train_x=ds.train_x[~held], train_y=ds.train_y[~held], val_x=ds.train_x[held],
                     val_y=ds.train_y[held])
    if fraction == 1:
        return ds
    idx = stratified_subset(ds.train_y, fraction, seed)
    return replace(ds, train_x=ds.train_x[idx], train_y=ds.train_y[idx])


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), each (C,) float32 in [0, 1]."""
    values = torch.arange(256, dtype=torch.float64, device=x.device) / 255
    counts = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])]).double()
    mean = counts @ values / counts.sum(1)
    std = (counts @ values.square() / counts.sum(1) - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float()


class Loader:
    """Batches of one split from `device` memory: yields x (b, C, H, W) float32 standardised, y (b,) int64.

    `batch_size` is the global batch. With `world_size` > 1, rank r yields the r-th contiguous share of
    every batch, so the ranks' shares concatenated in rank order are the single-process batch, bit for
    bit (shares are equal whenever world_size divides the batch). train=True draws the order, crop offsets
    in [0, 2 * padding] and flips from (seed, epoch) alone (call `set_epoch` every epoch), so a resumed
    run sees the same batches; the last incomplete batch is dropped unless the split is smaller than
    one batch. train=False yields every sample once, in order.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, mean, std, device, train: bool,
                 padding: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
        if x.dtype != torch.uint8 or x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"expected uint8 images (N, C, H, W) and N labels, got {x.dtype} {tuple(x.shape)} "
                             f"and {len(y)} labels")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size})")
        self.x, self.y = x.to(device), y.to(device)
        std = torch.as_tensor(std, dtype=torch.float32, device=self.x.device).view(-1, 1, 1)
        self.scale = 1 / (255 * std)  # (x / 255 - mean) / std = x * scale + shift
        self.shift = -torch.as_tensor(mean, dtype=torch.float32, device=self.x.device).view(-1, 1, 1) / std
        self.batch_size, self.train, self.padding = batch_size, train, padding
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return max(1, n // self.batch_size) if self.train and n else -(-n // self.batch_size)

    def __iter__(self):
        n, device = len(self.x), self.x.device
        order = None  # the split in order: batches are slices, not gathers
        if self.train:
            state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
            g = torch.Generator().manual_seed(int(state))
            order = torch.randperm(n, generator=g).to(device)
            offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g).to(device)
            flips = (torch.rand(n, generator=g) < 0.5).to(device)
        for i in range(len(self)):
            start, size = i * self.batch_size, min(self.batch_size, n - i * self.batch_size)
            lo, hi = start + size * self.rank // self.world_size, start + size * (self.rank + 1) // self.world_size
            index = slice(lo, hi) if order is None else order[lo:hi]
            x = self.x[index]
            if self.train:
                x = crop_flip(x, offsets[:, lo:hi], flips[lo:hi], self.padding)
            yield x.float() * self.scale + self.shift, self.y[index]


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Zero-pad (b, C, H, W) by `padding`, crop H x W at (offsets[0], offsets[1]), mirror where `flips`."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (b, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[1, :, None]  # (b, W)
    batch, channel = torch.arange(b, device=x.device), torch.arange(c, device=x.device)
    return padded[batch[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None],
                  cols[:, None, None, :]]
