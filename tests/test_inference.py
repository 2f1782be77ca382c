"""Trained models you can use: checkpoints that carry their preprocessing, `revnets.load`,
`revnets predict`, `revnets eval` without dataset flags, torch.export and ONNX."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pathlib import Path

import revnets
from revnets import checkpoint
from revnets.cli import main
from revnets.training import Config, data, train

DATA = Path(__file__).parent / "data"

CLASSES = ["blue", "green", "red"]


def _write_folder(root):
    """An RGB image folder, 8x8 PNGs, 3 classes told apart by their dominant colour channel."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8)
                pixels[..., 2 - c] += 160
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run of a tiny Hamiltonian network on the folder: (run directory, data root, summary)."""
    root = tmp_path_factory.mktemp("inference")
    _write_folder(root / "images")
    summary = train(Config(dataset="folder", data_dir=str(root / "images"), model="hamiltonian-74", units=(1, 1, 1),
                           channels=(8, 8, 8), epochs=1, batch_size=8, schedule="onecycle", device="cpu",
                           out=str(root / "run")))
    return root / "run", root / "images", summary


def _pixels(files):
    """The files' pixels as floats in [0, 1], (N, 3, 8, 8) float64: the reference decoding."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(0, 3, 1, 2).double() / 255


def _training_stats(images):
    """Float64 mean and std, (3,), of the images the run trained on: the folder's training split
    without the validation images it held out (`data.subsample`, the run's default 10 %)."""
    ds = data.subsample(data.load_dataset("folder", images), 1.0, 0, Config().val_fraction)
    assert len(ds.train_y) < 24  # validation was held out
    pixels = ds.train_x.double() / 255
    return pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3), correction=0)


def _reference(run_dir, x):
    """Logits of the checkpoint's bare network on x (N, 3, H, W) in [0, 1], standardised by hand in
    float64 with the training images' statistics."""
    mean, std = _training_stats(run_dir.parent / "images")
    net = revnets.load(run_dir / "best.pt").net
    with torch.no_grad():
        return net.double()(((x.double() - mean[:, None, None]) / std[:, None, None]))


def test_checkpoint_holds_one_record_of_the_model_and_its_interface(run):
    run_dir, images, _ = run
    ckpt = checkpoint.load(run_dir / "best.pt")
    rec = ckpt["record"]
    mean, std = _training_stats(images)
    assert rec["kind"] == "image" and rec["classes"] == CLASSES and rec["in_channels"] == 3
    assert tuple(rec["image_size"]) == (8, 8) and "meta" not in ckpt
    torch.testing.assert_close(rec["mean"].double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(rec["std"].double(), std, rtol=0, atol=1e-6)
    assert rec["model"] == "hamiltonian-74" and rec["overrides"] == dict(units=(1, 1, 1), channels=(8, 8, 8))
    assert rec["grown"] == 0 and rec["memory_efficient"]


def test_load_gives_an_eval_model_of_unit_range_images(run):
    run_dir, images, _ = run
    model = revnets.load(run_dir / "best.pt")
    files = sorted((images / "test").rglob("*.png"))
    x = _pixels(files).float()
    assert not model.training and model.classes == CLASSES and model.image_size == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(run_dir, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="float images in \\[0, 1\\]"):
        model((x * 255).to(torch.uint8))


def test_predict_prints_path_class_probability_as_load_computes(run, capsys):
    run_dir, images, _ = run
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), str(images / "test")]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted((images / "test").rglob("*.png"))
    with torch.no_grad():
        probs = revnets.load(run_dir / "best.pt")(_pixels(files).float()).softmax(1)
    assert [line.split("\t")[0] for line in lines] == [str(f) for f in files]
    for line, p in zip(lines, probs):
        path, name, prob = line.split("\t")
        assert name == CLASSES[p.argmax()] and float(prob) == pytest.approx(p.max().item(), abs=1e-4)


def test_predict_topk_json(run, capsys):
    run_dir, images, _ = run
    file = images / "test" / "red" / "0.png"
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--topk", "3", "--json", str(file)]) == 0
    [result] = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        probs = revnets.load(run_dir / "best.pt")(_pixels([file]).float()).softmax(1)[0]
    assert result["path"] == str(file)
    assert [p["class"] for p in result["predictions"]] == [CLASSES[i] for i in probs.argsort(descending=True)]
    assert [p["probability"] for p in result["predictions"]] == pytest.approx(
        probs.sort(descending=True).values.tolist())


def test_predict_converts_grey_and_resizes_other_sizes_with_a_note(run, tmp_path, capsys):
    run_dir, images, _ = run
    grey = np.full((16, 16), 200, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), str(tmp_path / "grey.png")]) == 0
    out, err = capsys.readouterr()
    with torch.no_grad():
        p = revnets.load(run_dir / "best.pt")(torch.full((1, 3, 8, 8), 200 / 255)).softmax(1)[0]
    assert out.split("\t")[1] == CLASSES[p.argmax()]
    assert float(out.split("\t")[2]) == pytest.approx(p.max().item(), abs=1e-4)
    assert "grey.png resized to the training size 8x8" in err


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"not an image"])
def test_predict_bad_file_is_one_line_naming_it_and_exit_2(run, tmp_path, capsys, content):
    run_dir, images, _ = run
    (tmp_path / "bad.png").write_bytes(content)
    good = images / "test" / "red" / "0.png"
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), str(good), str(tmp_path / "bad.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "\n" not in err.strip() and "bad.png" in err


@pytest.mark.parametrize("argv, expected", [(["--topk", "4", "{good}"], "exceeds the model's 3 classes"),
                                            (["{tmp}/missing.png"], "missing.png does not exist"),
                                            (["{tmp}"], "holds no .png/.jpg/.jpeg images")])
def test_predict_bad_arguments_exit_2_with_one_line(run, tmp_path, capsys, argv, expected):
    run_dir, images, _ = run
    argv = [a.format(good=images / "test" / "red" / "0.png", tmp=tmp_path) for a in argv]
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "\n" not in err.strip() and expected in err


def test_predict_names_what_a_path_is_when_it_is_not_an_image_file(run, tmp_path, capsys):
    """A link to /dev/zero and a FIFO are named for what they are (not "does not exist"), and never
    opened (a FIFO would block); an empty argument is refused instead of standing for ".";"""
    run_dir, images, _ = run
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.png")
    for arg, expected in ((tmp_path / "zero.png", "zero.png (a link to /dev/zero) is a character device, not an image"),
                          (tmp_path / "fifo.png", "fifo.png is a named pipe (FIFO), not an image file"),
                          ("", "an empty FILE_OR_DIR argument names no image")):
        assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), str(arg) if arg else arg]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and expected in err


def test_predict_names_a_decompression_bomb(run, tmp_path, capsys, monkeypatch):
    """An image past Pillow's pixel limit (here lowered to 16: an 8x8 PNG is 4 times it) is refused
    with one line naming the file, as any unreadable file is."""
    run_dir, images, _ = run
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), str(images / "test" / "red" / "0.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "0.png is not a readable image" in err and "bomb" in err


def test_predict_reads_a_32_bit_image_of_8_bit_values_as_those_values(run, tmp_path, capsys):
    run_dir, _, _ = run
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "wide.tif")  # Pillow's mode "I"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "grey.png")
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--json", "--topk", "3",
                 str(tmp_path / "wide.tif"), str(tmp_path / "grey.png")]) == 0
    wide, grey = json.loads(capsys.readouterr().out)
    assert wide["predictions"] == grey["predictions"]


def test_predict_escapes_tabs_newlines_and_backslashes_in_names(run, tmp_path, capsys):
    """One line per image and one value per field, whatever the file and class names hold: a
    backslash, tab, newline or carriage return is written as \\\\, \\t, \\n or \\r."""
    run_dir, images, _ = run
    ckpt = checkpoint.load(run_dir / "best.pt")
    ckpt["record"]["classes"] = ["blue", "gr\teen", "re\\d\r"]
    checkpoint.save(tmp_path / "named.pt", ckpt)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a\tb\nc\\d.png").write_bytes((images / "test" / "red" / "0.png").read_bytes())
    assert main(["predict", "--checkpoint", str(tmp_path / "named.pt"), "--topk", "3", str(tmp_path / "in")]) == 0
    [line] = capsys.readouterr().out.splitlines()
    fields = line.split("\t")
    assert fields[0] == f"{tmp_path}/in/a\\tb\\nc\\\\d.png" and len(fields) == 7
    assert sorted(fields[1::2]) == ["blue", "gr\\teen", "re\\\\d\\r"]


def test_an_image_checkpoint_given_to_generate_says_to_use_predict(run, capsys):
    run_dir, _, _ = run
    assert main(["generate", "--checkpoint", str(run_dir / "best.pt"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt holds an image classifier" in err and "revnets predict" in err


def _refused_by_every_command(path, capsys, image, commands=("eval", "predict", "generate")):
    """`revnets.load(path)` raises a ValueError naming the file, and each command exits 2 with one
    line naming it and prints nothing else; returns load's message."""
    with pytest.raises(ValueError, match=str(path.name)) as refused:
        revnets.load(path)
    argv = {"eval": ["eval", "--checkpoint", str(path)], "predict": ["predict", "--checkpoint", str(path), str(image)],
            "generate": ["generate", "--checkpoint", str(path), "--prompt", "a"]}
    for command in commands:
        assert main(argv[command]) == 2, command
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and path.name in err, (command, err)
    return str(refused.value)


OLD_IMAGE = DATA / "digits-2026-12-01.pt"  # a checkpoint of 3d4780f: the record as "meta", "network"


@pytest.mark.parametrize("old, damage, expected", [
    (False, lambda c: c["record"]["overrides"].update(h=float("nan")), r"h \(the step size\) must be .*; got nan"),
    (False, lambda c: c["record"]["overrides"].update(h=-1.0), r"h \(the step size\) must be .*; got -1.0"),
    (True, lambda c: c["meta"]["network"].update(h=float("nan")), r"h \(the step size\) must be .*; got nan"),
    (False, lambda c: c["record"].update(std=torch.tensor([0.2, 0.0, 0.2])), "finite positive standard deviation"),
    (True, lambda c: c["meta"].update(std=torch.zeros(1)), "finite positive standard deviation"),
    (False, lambda c: c["record"]["overrides"].update(units=(100_000,) * 3), "asks for 300000 blocks"),
    (False, lambda c: c["record"].update(grown=60), "grown=60 is not a number of growths"),
    (False, lambda c: c["record"]["overrides"].update(channels=(10**7,) * 3), "does not match the model"),
    (False, lambda c: c["record"]["overrides"].update(h=1e30), r"must be below 1.84e\+19, where h\^2 overflows"),
    (False, lambda c: c["record"]["overrides"].update(h=1e15), "its model's outputs are not finite"),
    (False, lambda c: c["record"].update(image_size=(100_000, 100_000)), "at most 89,478,485 pixels"),
])
def test_a_checkpoint_whose_settings_are_bad_is_refused_before_it_is_built(run, tmp_path, capsys, old, damage,
                                                                           expected):
    """Settings read from a checkpoint go through the checks of the API's (h, the standardisation);
    its sizes are compared with its weights before anything is allocated (a width of 10^7 channels
    would need petabytes)."""
    run_dir, images, _ = run
    ckpt = checkpoint.load(OLD_IMAGE if old else run_dir / "best.pt")
    damage(ckpt)
    checkpoint.save(tmp_path / "bad.pt", ckpt)
    message = _refused_by_every_command(tmp_path / "bad.pt", capsys, images / "test" / "red" / "0.png",
                                        ("eval", "predict"))
    assert re.search(expected, message), message


@pytest.mark.parametrize("source, damage", [
    (OLD_IMAGE, lambda c: c["meta"].pop("network")),
    (OLD_IMAGE, lambda c: c.update(meta="a string")),
    (OLD_IMAGE, lambda c: c["meta"].update(network="a string")),
    ("best.pt", lambda c: c.update(record="a string")),
    ("best.pt", lambda c: c["record"].pop("kind")),
    ("best.pt", lambda c: c["record"].update(image_size="x")),
    ("best.pt", lambda c: c["record"].update(classes="abc")),
    ("best.pt", lambda c: c.update(model="weights")),
    ("best.pt", lambda c: c.update(model={k: 1 for k in c["model"]})),
    (DATA / "text-2026-12-01.pt", lambda c: c.update(vocab="a string")),
    (DATA / "text-2026-12-01.pt", lambda c: c.update(model=[1, 2])),
])
def test_crafted_metadata_is_one_line_naming_the_file_for_every_command(run, tmp_path, capsys, source, damage):
    run_dir, images, _ = run
    ckpt = checkpoint.load(run_dir / source)  # an absolute source stays itself
    damage(ckpt)
    checkpoint.save(tmp_path / "crafted.pt", ckpt)
    _refused_by_every_command(tmp_path / "crafted.pt", capsys, images / "test" / "red" / "0.png")


def test_eval_needs_no_dataset_flags_and_reads_no_training_split(run, capsys, monkeypatch):
    run_dir, _, summary = run
    monkeypatch.setattr(data, "channel_stats", None)  # statistics come from the checkpoint
    read = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *a, **kw: read(*a, **kw) if kw.get("train") is False else None)
    assert main(["eval", "--checkpoint", str(run_dir / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "on folder test (9 images)" in out
    accuracy = float(out.split("accuracy ")[1].rstrip("%\n"))
    assert accuracy == pytest.approx(100 * summary["final_acc"], abs=0.005)  # printed to 2 decimals


def test_checkpoint_without_standardisation_is_recomputed_by_eval_and_predict(run, tmp_path, capsys):
    """Checkpoints saved before 2026-12-01 stored no standardisation: `revnets eval` and `revnets
    predict` recompute it from the run's training split, with a note; `revnets.load` says so."""
    run_dir, images, summary = run
    old = checkpoint.load(run_dir / "last.pt")
    del old["record"]
    checkpoint.save(tmp_path / "old.pt", old)
    with pytest.raises(ValueError, match="old.pt stores no standardisation .* `revnets eval`"):
        revnets.load(tmp_path / "old.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "old.pt")]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "old.pt" in notes[0] and "recomputed" in notes[0]
    accuracy = float(out.split("accuracy ")[1].rstrip("%\n"))
    assert accuracy == pytest.approx(100 * summary["final_acc"], abs=0.005)  # printed to 2 decimals
    file = images / "test" / "red" / "0.png"
    assert main(["predict", "--checkpoint", str(tmp_path / "old.pt"), str(file)]) == 0
    with torch.no_grad():
        p = revnets.load(run_dir / "last.pt")(_pixels([file]).float()).softmax(1)[0]
    assert float(capsys.readouterr().out.split("\t")[2]) == pytest.approx(p.max().item(), abs=1e-4)


def test_checkpoints_written_by_the_previous_version_load_and_compute_what_it_computed():
    """tests/data holds best.pt files written by revnets at 3d4780f (2026-12-01): an image run
    (``meta``) and a text run (``vocab``, its optimiser state removed to keep the file small), and
    the outputs that version computed with them."""
    want = torch.load(DATA / "outputs-2026-12-01.pt", weights_only=True)
    image = revnets.load(DATA / "digits-2026-12-01.pt")
    assert isinstance(image, revnets.Classifier) and image.classes == [str(d) for d in range(10)]
    assert {b.h for unit in image.net.units for b in unit} == {0.05}  # the run's --h
    text = revnets.load(DATA / "text-2026-12-01.pt")
    assert isinstance(text, revnets.LanguageModel) and text.vocab.decode(want["tokens"][0]) == "In the beginning"
    with torch.no_grad():
        torch.testing.assert_close(image(want["images"]), want["image_logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(text(want["tokens"]), want["token_logits"], rtol=0, atol=1e-6)


def test_torch_export_of_a_loaded_model_includes_the_standardisation(run):
    run_dir, images, _ = run
    model = revnets.load(run_dir / "best.pt")
    x = _pixels(sorted((images / "test").rglob("*.png"))).float()
    exported = torch.export.export(model, (x,))
    names = [n.target.__name__ for n in exported.graph.nodes if n.op == "call_function"]
    assert names[:2] == ["sub.Tensor", "div.Tensor"]  # (x - mean) / std before the stem
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x).double(), _reference(run_dir, x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.onnx's own use of a deprecated pytree API
def test_onnx_export_of_a_loaded_model_matches_it(run):
    pytest.importorskip("onnxscript")  # the test extra installs it
    from onnx.reference import ReferenceEvaluator
    run_dir, images, _ = run
    model = revnets.load(run_dir / "best.pt")
    x = _pixels(sorted((images / "test").rglob("*.png"))).float()
    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    [out] = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out).double(), _reference(run_dir, x), rtol=1e-4, atol=1e-4)


def test_read_image_names_a_file_it_cannot_decode(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match="x.jpg is not a readable image"):
        data.read_image(tmp_path / "x.jpg")
