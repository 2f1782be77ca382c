"""Dataset readers on small files written in the real formats, subsets, statistics and the Loader."""
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revnets.training import data

SHARED_CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.xz"


# ---- CIFAR ----

def _cifar_members(name: str, rng) -> tuple[dict[str, bytes], dict]:
    """Members of a small CIFAR archive as the original (Python 2) pickles: bytes keys and names."""
    _, folder, train_members, test_member, meta_member, label_key, names_key, _ = data.CIFAR[name]
    n_classes = 10 if name == "cifar10" else 100
    members, expected = {}, {"train_x": [], "train_y": []}
    for member, n in [*((m, 3) for m in train_members), (test_member, 4)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, n_classes, n)]
        batch = {b"data": x, label_key.encode(): y, b"batch_label": b"whatever"}
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * n
        members[f"{folder}/{member}"] = pickle.dumps(batch, protocol=2)
        split = "test" if member == test_member else "train"
        expected.setdefault(f"{split}_x", []).append(x.reshape(n, 3, 32, 32))
        expected.setdefault(f"{split}_y", []).extend(y)
    names = [f"class{i}".encode() for i in range(n_classes)]
    members[f"{folder}/{meta_member}"] = pickle.dumps({names_key.encode(): names}, protocol=2)
    return members, {"train_x": np.concatenate(expected["train_x"]), "train_y": expected["train_y"],
                     "test_x": np.concatenate(expected["test_x"]), "test_y": expected["test_y"],
                     "classes": [n.decode() for n in names]}


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, raw in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("packed", [True, False])
def test_cifar_reads_archive_and_extracted_folder(tmp_path, name, packed):
    members, expected = _cifar_members(name, np.random.default_rng(0))
    if packed:
        (tmp_path / data.CIFAR[name][0]).write_bytes(_tar_gz(members))
    else:
        for member, raw in members.items():
            (tmp_path / member).parent.mkdir(exist_ok=True)
            (tmp_path / member).write_bytes(raw)
    d = data.load_dataset(name, tmp_path)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64 and d.padding == 4
    assert d.train_x.shape == (3 * len(data.CIFAR[name][2]), 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(d.train_x.numpy(), expected["train_x"])
    np.testing.assert_array_equal(d.test_x.numpy(), expected["test_x"])
    assert d.train_y.tolist() == expected["train_y"] and d.test_y.tolist() == expected["test_y"]
    assert d.classes == expected["classes"]


@pytest.mark.parametrize("packed", [True, False])
def test_cifar_test_split_alone_needs_no_training_batches(tmp_path, packed):
    members, expected = _cifar_members("cifar10", np.random.default_rng(0))
    members = {m: raw for m, raw in members.items() if "data_batch" not in m}  # the training split is absent
    if packed:
        (tmp_path / data.CIFAR["cifar10"][0]).write_bytes(_tar_gz(members))
    else:
        for member, raw in members.items():
            (tmp_path / member).parent.mkdir(exist_ok=True)
            (tmp_path / member).write_bytes(raw)
    d = data.load_dataset("cifar10", tmp_path, train=False)
    assert d.train_x.shape == (0, 3, 32, 32) and d.train_y.shape == (0,)
    np.testing.assert_array_equal(d.test_x.numpy(), expected["test_x"])
    assert d.test_y.tolist() == expected["test_y"] and d.classes == expected["classes"]
    with pytest.raises((ValueError, FileNotFoundError)):
        data.load_dataset("cifar10", tmp_path)


def test_cifar_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz.*--download") as e:
        data.load_dataset("cifar100", tmp_path)
    assert str(tmp_path) in str(e.value)


def test_cifar_refuses_pickled_code(tmp_path):
    members, _ = _cifar_members("cifar10", np.random.default_rng(0))
    members["cifar-10-batches-py/test_batch"] = b"cos\nsystem\n(S'echo owned'\ntR."
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_tar_gz(members))
    with pytest.raises(ValueError, match="refusing to unpickle os.system"):
        data.load_dataset("cifar10", tmp_path)


def test_cifar_refuses_a_broken_or_foreign_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz is not a readable tar.gz archive"):
        data.load_dataset("cifar10", tmp_path)
    members, _ = _cifar_members("cifar10", np.random.default_rng(0))
    del members["cifar-10-batches-py/data_batch_3"]
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_tar_gz(members))
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/data_batch_3: not the cifar10 archive"):
        data.load_dataset("cifar10", tmp_path)


def _fake_download(monkeypatch, payload: bytes) -> list[str]:
    urls = []

    def urlopen(url):
        urls.append(url)
        return io.BytesIO(payload)
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    return urls


def test_cifar_download_verifies_md5(tmp_path, monkeypatch):
    members, expected = _cifar_members("cifar10", np.random.default_rng(0))
    archive = _tar_gz(members)
    urls = _fake_download(monkeypatch, archive)
    with pytest.raises(ValueError, match="corrupt: MD5 .*expected c58f30108f718f92721af3b95e74349a"):
        data.load_dataset("cifar10", tmp_path, download=True)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert list(tmp_path.iterdir()) == []  # neither the archive nor a temporary file is left

    spec = list(data.CIFAR["cifar10"])
    spec[-1] = hashlib.md5(archive).hexdigest()
    monkeypatch.setitem(data.CIFAR, "cifar10", tuple(spec))
    d = data.load_dataset("cifar10", tmp_path / "new", download=True)
    assert (tmp_path / "new" / "cifar-10-python.tar.gz").read_bytes() == archive
    np.testing.assert_array_equal(d.test_x.numpy(), expected["test_x"])


def test_cifar_download_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def urlopen(url):
        raise data.urllib.error.URLError("no route to host")
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(FileNotFoundError, match="cannot download .*no route to host.*cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", tmp_path, download=True)


# ---- STL-10 ----

def test_stl10_binary(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = {}
    for split, n in [("train", 3), ("test", 2)]:
        images[split] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # (N, C, row, column)
        (folder / f"{split}_X.bin").write_bytes(images[split].transpose(0, 1, 3, 2).tobytes())  # column-major
        (folder / f"{split}_y.bin").write_bytes(np.array([1, 10, 5][:n], np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    d = data.load_dataset("stl10", tmp_path)
    np.testing.assert_array_equal(d.train_x.numpy(), images["train"])
    np.testing.assert_array_equal(d.test_x.numpy(), images["test"])
    assert d.train_y.tolist() == [0, 9, 4] and d.test_y.tolist() == [0, 9]
    assert d.classes == [f"c{i}" for i in range(10)] and d.padding == 12

    (folder / "test_y.bin").unlink()
    with pytest.raises(FileNotFoundError, match="test_y.bin not found: extract stl10_binary.tar.gz"):
        data.load_dataset("stl10", tmp_path)


# ---- image folders ----

def _image(root: Path, name: str, pixels: np.ndarray) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / name, quality=95)


def test_folder_png_and_jpg(tmp_path):
    rng = np.random.default_rng(0)
    png = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    _image(tmp_path, "train/dog/b.png", png)
    _image(tmp_path, "train/dog/a.JPG", np.full((6, 5, 3), 200, np.uint8))
    _image(tmp_path, "train/cat/x.jpeg", np.full((6, 5, 3), 50, np.uint8))
    (tmp_path / "train/cat/notes.txt").write_text("ignored")
    (tmp_path / "train/.ipynb_checkpoints").mkdir()
    _image(tmp_path, "test/dog/c.png", png[::-1].copy())
    d = data.load_dataset("folder", tmp_path)
    assert d.classes == ["cat", "dog"] and d.padding == 4
    assert d.train_x.shape == (3, 3, 6, 5) and d.test_x.shape == (1, 3, 6, 5)
    assert d.train_y.tolist() == [0, 1, 1] and d.test_y.tolist() == [1]
    np.testing.assert_array_equal(d.train_x[2].numpy(), png.transpose(2, 0, 1))  # PNG is lossless
    assert abs(d.train_x[1].float().mean().item() - 200) < 3  # JPEG nearly so


def test_folder_grey_and_mixed(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _image(tmp_path, "train/a/0.png", grey)
    _image(tmp_path, "test/a/0.png", grey)
    d = data.load_dataset("folder", tmp_path)
    assert d.train_x.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(d.train_x[0, 0].numpy(), grey)

    _image(tmp_path, "test/a/1.png", np.zeros((3, 4, 3), np.uint8))  # one colour image: everything is RGB
    d = data.load_dataset("folder", tmp_path)
    assert d.train_x.shape == (1, 3, 3, 4) and d.test_x.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(d.train_x[0].numpy(), np.stack([grey] * 3))


def test_folder_images_of_a_split_share_a_size(tmp_path):
    _image(tmp_path, "train/a/0.png", np.zeros((4, 4), np.uint8))
    _image(tmp_path, "train/b/odd.png", np.zeros((4, 5), np.uint8))
    _image(tmp_path, "test/a/0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"odd.png is 5x4 but .*0.png is 4x4"):
        data.load_dataset("folder", tmp_path)


def test_folder_cache_skips_decoding_until_files_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REVNETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for i in range(3):
        _image(root, f"train/a/{i}.png", np.full((4, 4), i, np.uint8))
    _image(root, "test/a/0.png", np.zeros((4, 4), np.uint8))
    first = data.load_dataset("folder", root)
    (cache,) = (tmp_path / "cache").iterdir()  # in the cache directory, not in the data folder
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    err = capsys.readouterr().err
    assert f"decoding the train images of {root} (3)" in err and f"in {cache}" in err  # announced once

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")
    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        cached = data.load_dataset("folder", root)
        assert torch.equal(cached.train_x, first.train_x) and torch.equal(cached.test_y, first.test_y)
        assert capsys.readouterr().err == ""

        os.utime(root / "train/a/1.png", ns=(0, 0))  # a changed file invalidates the cache
        with pytest.raises(AssertionError, match="decoded although cached"):
            data.load_dataset("folder", root)
    _image(root, "train/a/3.png", np.full((4, 4), 3, np.uint8))  # and so does a new one
    assert len(data.load_dataset("folder", root).train_x) == 4
    cache.write_bytes(b"garbage")  # an unreadable cache is decoded again
    assert len(data.load_dataset("folder", root).train_x) == 4
    assert np.load(cache)["train_x"].shape == (4, 1, 4, 4)


def test_folder_test_split_alone_reads_only_the_tests_cached_arrays(tmp_path, monkeypatch):
    monkeypatch.setenv("REVNETS_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for i in range(2):
            _image(tmp_path, f"{split}/a/{i}.png", np.full((4, 4), 10 * i + (split == "test"), np.uint8))
    full = data.load_dataset("folder", tmp_path)
    [cache] = (tmp_path / "cache").glob("*.npz")
    with np.load(cache) as z:  # the same cache without its training arrays: only train=False can use it
        kept = {k: z[k] for k in ("key", "test_x", "test_y")}
    np.savez(cache, **kept)
    d = data.load_dataset("folder", tmp_path, train=False)
    assert d.train_x.shape == (0, 1, 4, 4) and torch.equal(d.test_x, full.test_x) and torch.equal(d.test_y, full.test_y)
    assert "train_x" not in np.load(cache)  # nothing decoded again
    assert torch.equal(data.load_dataset("folder", tmp_path).train_x, full.train_x)  # train=True decodes anew


def test_cache_dir_follows_revnets_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("REVNETS_CACHE", str(tmp_path / "r"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "r"
    monkeypatch.delenv("REVNETS_CACHE")
    assert data.cache_dir() == tmp_path / "x" / "revnets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path("~/.cache/revnets").expanduser()


def test_folder_loads_when_the_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    monkeypatch.setenv("REVNETS_CACHE", str(tmp_path / "cache"))
    _image(tmp_path, "train/a/0.png", np.zeros((4, 4), np.uint8))
    _image(tmp_path, "test/a/0.png", np.zeros((4, 4), np.uint8))
    assert data.load_dataset("folder", tmp_path).train_x.shape == (1, 1, 4, 4)
    assert "warning: cannot cache" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_folder_refuses_an_unreadable_image_naming_it(tmp_path, damage):
    for i in range(2):
        _image(tmp_path, f"train/a/{i}.jpg", np.full((8, 8, 3), 100, np.uint8))
    _image(tmp_path, "test/a/0.jpg", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "train/a/1.jpg"
    bad.write_bytes({"empty": b"", "truncated": bad.read_bytes()[:200], "text": b"not an image"}[damage])
    with pytest.raises(ValueError, match=rf"{bad} is not a readable image"):
        data.load_dataset("folder", tmp_path)


def test_folder_scales_16_bit_images(tmp_path):
    wide = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "x.png")
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "x.png").rename(tmp_path / "train/a/0.png")
    _image(tmp_path, "test/a/0.png", np.zeros((1, 4), np.uint8))
    d = data.load_dataset("folder", tmp_path)
    assert d.train_x[0, 0, 0].tolist() == [0, 1, 128, 255]  # scaled by 255 / 65535, not clipped at 255


def test_read_image_takes_a_32_bit_image_by_its_values(tmp_path):
    """Pillow's mode "I" (32-bit) declares no range: 8-bit values are kept, 16-bit ones scaled, and
    values that fit neither are refused, naming the file."""
    for values, want in (([0, 1, 200, 255], [0, 1, 200, 255]), ([0, 257, 32768, 65535], [0, 1, 128, 255])):
        Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / "x.tif")
        assert Image.open(tmp_path / "x.tif").mode == "I"
        pixels = data.read_image(tmp_path / "x.tif")
        assert pixels.dtype == np.uint8 and pixels[0].tolist() == want
    for values in ([-1, 0, 0, 0], [0, 0, 0, 65536]):
        Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / "x.tif")
        with pytest.raises(ValueError, match=r"x.tif is not a readable image \(its 32-bit pixels span"):
            data.read_image(tmp_path / "x.tif")


def test_read_image_names_a_decompression_bomb(tmp_path, monkeypatch):
    _image(tmp_path, "big.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 64 pixels: past twice the limit, Pillow's error
    with pytest.raises(ValueError, match="big.png is not a readable image .*decompression bomb"):
        data.read_image(tmp_path / "big.png")


def test_folder_refuses_empty_classes_and_size_mismatch_between_splits(tmp_path):
    _image(tmp_path, "train/a/0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "train/b").mkdir()
    _image(tmp_path, "test/a/0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"train/b holds no .png/.jpg images"):
        data.load_dataset("folder", tmp_path)
    (tmp_path / "train/b").rmdir()
    _image(tmp_path, "test/a/0.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(ValueError, match=r"training images are 4x4 with 1 channel but test images 6x6"):
        data.load_dataset("folder", tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="folder dataset needs a data directory"):
        data.load_dataset("folder")
    with pytest.raises(FileNotFoundError, match=r"train not found: expected ROOT/train/<class>"):
        data.load_dataset("folder", tmp_path / "missing")
    _image(tmp_path, "train/a/0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"test not found"):
        data.load_dataset("folder", tmp_path)
    _image(tmp_path, "test/b/0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"has classes \['b'\] that .*train lacks"):
        data.load_dataset("folder", tmp_path)


def test_shared_cifar10_jpeg_archive(tmp_path, monkeypatch):
    """The shared CIFAR-10 JPEG copy: reuse /tmp/cifar10 when extracted there (with its cache in the
    user's cache directory, as `revnets train` keeps it), else extract."""
    root = Path("/tmp/cifar10")
    if (root / "train").is_dir() and (root / "test").is_dir():
        monkeypatch.delenv("REVNETS_CACHE")
    else:
        if not SHARED_CIFAR10.is_file():
            pytest.skip(f"{SHARED_CIFAR10} absent and /tmp/cifar10 not extracted")
        with tarfile.open(SHARED_CIFAR10) as tar:
            tar.extractall(tmp_path, filter="data")
        root = tmp_path
    d = data.load_dataset("folder", root)
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.test_x.shape == (10_000, 3, 32, 32)
    assert d.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert d.train_y.bincount().tolist() == [5000] * 10 and d.test_y.bincount().tolist() == [1000] * 10
    mean, _ = data.channel_stats(d.train_x)
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3, rtol=0)


# ---- digits and names ----

def test_digits():
    d = data.load_dataset("digits")
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8) and d.padding == 1
    assert d.train_x.dtype == torch.uint8 and int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    assert d.classes == [str(i) for i in range(10)]
    assert d.test_y.bincount().min() >= 35 and d.test_y.bincount().max() <= 37  # stratified
    assert torch.equal(data.load_dataset("digits").test_x, d.test_x)  # a fixed split


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; expected one of cifar10, cifar100, stl10, folder"):
        data.load_dataset("mnist")


# ---- subsets and statistics ----

def test_stratified_subset():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    idx = data.stratified_subset(labels, 0.1, seed=3)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.unique())  # sorted, no repeats
    assert labels[idx].bincount().tolist() == [50, 30, 20]
    assert torch.equal(idx, data.stratified_subset(labels, 0.1, seed=3))
    assert not torch.equal(idx, data.stratified_subset(labels, 0.1, seed=4))
    assert torch.equal(data.stratified_subset(labels, 1.0, seed=0), torch.arange(1000))
    assert labels[data.stratified_subset(labels, 0.007, seed=0)].bincount().tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4
    assert len(data.stratified_subset(labels, 1e-6, seed=0)) == 1
    for fraction in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            data.stratified_subset(labels, fraction, seed=0)


def test_subsample_holds_out_a_stratified_validation_split_then_subsets_the_rest():
    d = data.load_dataset("digits")
    s = data.subsample(d, 0.5, 1, val_fraction=0.1)
    assert len(s.val_y) == round(0.1 * 1437) and len(s.train_y) == round(0.5 * (1437 - 144))
    assert torch.equal(s.test_x, d.test_x)
    counts = d.train_y.bincount().double()
    assert ((s.val_y.bincount() - 0.1 * counts).abs() < 1).all()  # every class keeps its share
    rows = lambda x: {bytes(r.numpy()) for r in x}  # noqa: E731
    assert not rows(s.val_x) & rows(s.train_x)  # disjoint (digits has no duplicate images across them)
    assert torch.equal(data.subsample(d, 0.5, 1, 0.1).val_x, s.val_x)  # seeded
    tiny = replace(d, train_x=d.train_x[:1], train_y=d.train_y[:1])
    with pytest.raises(ValueError, match="too few to hold out a validation split; pass --val-fraction 0"):
        data.subsample(tiny, 1.0, 0, 0.1)


def test_subsample_keeps_the_stratified_subset_of_the_training_split_only():
    ds = data.load_dataset("digits")
    sub = data.subsample(ds, 0.1, seed=2)
    idx = data.stratified_subset(ds.train_y, 0.1, seed=2)
    assert torch.equal(sub.train_x, ds.train_x[idx]) and torch.equal(sub.train_y, ds.train_y[idx])
    assert sub.test_x is ds.test_x and sub.classes == ds.classes and data.subsample(ds, 1.0, seed=2) is ds


def test_channel_stats():
    x = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = data.channel_stats(x)
    reference = x.double().div(255).transpose(0, 1).flatten(1)
    assert mean.shape == (3,) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, reference.mean(1).float())
    torch.testing.assert_close(std, reference.std(1, correction=0).float())


# ---- Loader ----

def _loader(x, y, batch_size, **kw):
    kw = {"mean": [0.5] * x.shape[1], "std": [0.25] * x.shape[1], "device": "cpu", "train": True, **kw}
    return data.Loader(x, y, batch_size, **kw)


def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_eval_loader_standardises_in_order():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = _loader(x, torch.arange(10), 4, train=False, mean=[0.1, 0.2, 0.3], std=[0.2, 0.3, 0.4])
    batches = _batches(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected)
    assert batches[0][0].dtype == torch.float32


def test_crop_flip():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    out = data.crop_flip(x, torch.tensor([[0, 2], [1, 2]]), torch.tensor([False, True]), padding=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:3, 1:4]) and torch.equal(out[1], padded[1, :, 2:5, 2:5].flip(-1))
    assert torch.equal(data.crop_flip(x, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.bool), 0), x)


def test_train_loader_crops_and_flips_vary_and_repeat():
    n, p = 64, 2
    image = torch.arange(1, 2 * 6 * 6 + 1, dtype=torch.uint8).view(1, 2, 6, 6)  # distinct nonzero pixels
    loader = _loader(image.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), 16, padding=p, seed=7)
    epoch0 = _batches(loader, 0)
    assert len(loader) == 4 and all(x.shape == (16, 2, 6, 6) and y.shape == (16,) for x, y in epoch0)

    padded = torch.nn.functional.pad(image[0], (p, p, p, p))
    candidates = {(i, j, f): ((c.flip(-1) if f else c).float() / 255 - 0.5) / 0.25
                  for i in range(2 * p + 1) for j in range(2 * p + 1) for f in (False, True)
                  for c in [padded[:, i:i + 6, j:j + 6]]}
    seen = [next(k for k, c in candidates.items() if torch.allclose(c, s, atol=1e-5)) for x, _ in epoch0 for s in x]
    assert len({(i, j) for i, j, _ in seen}) >= 15 and {f for *_, f in seen} == {False, True}

    again = _batches(_loader(image.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), 16, padding=p, seed=7), 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))  # the same (seed, epoch): the same batches
    assert not torch.equal(torch.cat([x for x, _ in epoch0]), torch.cat([x for x, _ in _batches(loader, 1)]))


def test_train_loader_shuffles_by_seed_and_epoch_and_drops_the_last_partial_batch():
    y = torch.arange(10)
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    order = lambda seed, epoch: torch.cat([b for _, b in _batches(_loader(x, y, 4, seed=seed), epoch)])
    assert len(order(0, 0)) == 8 and len(order(0, 0).unique()) == 8
    assert torch.equal(order(0, 1), order(0, 1)) and not torch.equal(order(0, 0), order(0, 1))
    assert not torch.equal(order(0, 0), order(1, 0))
    small = _loader(x[:3], y[:3], 4)  # a split smaller than one batch is one batch
    assert len(small) == 1 and sorted(torch.cat([b for _, b in small]).tolist()) == [0, 1, 2]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shares_concatenate_to_the_single_process_batch(train, world_size):
    x = torch.randint(0, 256, (30, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(30)
    single = _batches(_loader(x, y, 8, train=train, padding=2, seed=5), epoch=3)
    shards = [_batches(_loader(x, y, 8, train=train, padding=2, seed=5, rank=r, world_size=world_size), epoch=3)
              for r in range(world_size)]
    assert all(len(s) == len(single) for s in shards)
    for i, (bx, by) in enumerate(single):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), bx)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), by)
        if len(by) == 8:
            assert all(len(s[i][1]) == 8 // world_size for s in shards)


def test_loader_bad_inputs():
    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        _loader(x, y, 6, world_size=4)
    with pytest.raises(ValueError, match=r"rank 2 must be in \[0, 2\)"):
        _loader(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="expected uint8 images"):
        _loader(x.float(), y, 4)
    with pytest.raises(ValueError, match="expected uint8 images"):
        _loader(x, y[:3], 4)
