"""Reliability (issue 7): every bad input gets a one-line error naming it, good inputs around it
are captioned exactly as alone, broken models say what to do, the CLI maps errors to exit codes,
and nothing on the load path unpickles.

Uses the ``tiny_model_dir`` fixture (tests/conftest.py). Test images are made here from the
bundled example photos (edgecap/assets/examples) and with Pillow; never dataset photos.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import BackendError, Caption, Captioner, InputError, ModelError
from edgecap import images
from edgecap.cli import main as cli_main
from edgecap.manifest import load_manifest
from helpers import rgb_array

PACKAGE = Path(edgecap.__file__).parent
EXAMPLES = PACKAGE / "assets" / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=6)


def _chelsea(size=(96, 64)) -> Image.Image:
    with Image.open(EXAMPLES / "chelsea.png") as im:
        return im.convert("RGB").resize(size)


# -- a folder of every kind of input ------------------------------------------------------------
def _png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow cannot write itself."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    h, w, _ = rgb16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0,
                                                               0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))


GOOD = ("photo.png", "alpha.png", "gray.png", "gray_alpha.png", "palette.png",
        "palette_transparent.png", "cmyk.jpg", "gray16.png", "rgb48.png", "exif_rotated.jpg",
        "animated.gif", "photo.webp", "dot.png", "sliver.png", "photo.bmp", "photo.tif")
BAD = {"empty.jpg": "0 bytes", "truncated.jpg": "truncated", "notes.jpg": "not an image",
       "bomb.png": images.MAX_PIXELS_ENV}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """One file of each kind on the issue's list (GOOD captioned, BAD refused)."""
    root = tmp_path_factory.mktemp("zoo")
    photo = _chelsea()
    photo.save(root / "photo.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(root / "alpha.png")
    photo.convert("L").save(root / "gray.png")
    photo.convert("LA").save(root / "gray_alpha.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette_transparent.png",
                                                            transparency=0)
    photo.convert("CMYK").save(root / "cmyk.jpg")
    gray16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    (root / "rgb48.png").write_bytes(_png_16bit_rgb(np.asarray(photo, np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(root / "exif_rotated.jpg", exif=exif)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    photo.save(root / "photo.webp")
    Image.new("RGB", (1, 1), (120, 80, 40)).save(root / "dot.png")
    photo.resize((2000, 3)).save(root / "sliver.png")
    photo.save(root / "photo.bmp")
    photo.save(root / "photo.tif")
    (root / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("shopping list: eggs, milk\n")
    (root / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    assert sorted(p.name for p in root.iterdir()) == sorted([*GOOD, *BAD])
    return root


def test_every_good_file_is_captioned(captioner, zoo):
    for name in GOOD:
        caption = captioner.caption(str(zoo / name))
        assert isinstance(caption, Caption) and caption.text, name


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_file_is_a_one_line_input_error(captioner, zoo, name):
    path = str(zoo / name)
    with pytest.raises(InputError) as info:
        captioner.caption(path)
    assert info.value.source == path and str(info.value).startswith(f"{path}: ")
    assert BAD[name] in info.value.problem and "\n" not in str(info.value)


def test_missing_path_and_directory(captioner, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        captioner.caption(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="directory"):
        captioner.caption(tmp_path)


def test_16bit_files_are_scaled(zoo):
    photo = np.asarray(_chelsea())
    assert np.array_equal(rgb_array(zoo / "rgb48.png"), photo)
    gray = np.asarray(_chelsea().convert("L"))
    assert np.array_equal(rgb_array(zoo / "gray16.png")[..., 0], gray)


@pytest.mark.parametrize("orientation, stored_as", [
    (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE),
    (6, Image.Transpose.ROTATE_90), (7, Image.Transpose.TRANSVERSE),
    (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_gives_the_upright_pixels(tmp_path, orientation, stored_as):
    upright = _chelsea((90, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "stored.png"  # lossless, so pixels can be compared exactly
    upright.transpose(stored_as).save(path, exif=exif)
    assert np.array_equal(rgb_array(path), np.asarray(upright))


def test_exif_rotated_file_is_captioned_like_the_upright_pixels(captioner, tmp_path):
    upright = _chelsea((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    rotated_caption = captioner.caption(path)
    assert rotated_caption == captioner.caption(np.asarray(upright))
    # ... and the orientation matters to the model: the stored pixels caption differently.
    stored = captioner.caption(np.asarray(upright.transpose(Image.Transpose.ROTATE_90)))
    assert stored.score != rotated_caption.score


# -- odd Pillow failures become InputErrors ----------------------------------------------------
@pytest.mark.parametrize("exc", [NotImplementedError("unknown pixel format"),
                                 struct.error("unpack requires a buffer"), IndexError(),
                                 MemoryError()])
def test_any_decoder_failure_is_an_input_error(monkeypatch, tmp_path, exc):
    path = tmp_path / "odd.png"
    _chelsea().save(path)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(Image.Image, "load", fail)
    with pytest.raises(InputError, match="odd.png") as info:
        images.load_rgb(path)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(InputError, match="corrupt image header"):
        images.load_rgb(path.read_bytes())


def test_lazily_opened_truncated_pil_image(captioner, zoo):
    with Image.open(zoo / "truncated.jpg") as im:  # opens (header only); pixels are missing
        with pytest.raises(InputError, match="truncated"):
            captioner.caption(im)


def test_pil_mode_that_cannot_become_rgb():
    im = Image.new("La", (4, 4))
    with pytest.raises(InputError, match="La"):
        images.load_rgb(im)


def test_multiline_problems_are_one_line():
    err = InputError("x.tif", "TIFFReadDirectory: bad\nTIFFFetch: worse\r\n")
    assert str(err) == "x.tif: TIFFReadDirectory: bad TIFFFetch: worse"


# -- arrays through the public API --------------------------------------------------------------
@pytest.mark.parametrize("array, words", [
    (np.zeros((8, 8, 3), np.int32), "dtype int32"),
    (np.zeros((8, 8, 3), np.complex64), "dtype complex64"),
    (np.zeros((8, 8, 3), object), "dtype object"),
    (np.zeros((8, 8, 5), np.uint8), "got 5"),
    (np.zeros((3, 16, 16), np.float32), "channels-first"),
    (np.zeros((1, 8, 8, 3), np.uint8), "4 dimensions"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), np.inf, np.float64), "infinite"),
    (np.full((8, 8), -0.5, np.float16), "[0, 1]"),
])
def test_bad_arrays_through_the_api(captioner, array, words):
    with pytest.raises(InputError, match=r"<array .*>") as info:
        captioner.caption(array)
    assert words in info.value.problem


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, on purpose
def test_unusual_but_valid_arrays(captioner):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    reference = captioner.caption(rgb)
    assert captioner.caption(np.asfortranarray(rgb)) == reference
    assert captioner.caption(rgb[::-1].copy()[::-1]) == reference        # negative strides
    big_endian = (rgb.astype(np.uint16) * 257).astype(">u2")
    assert captioner.caption(big_endian) == reference
    assert captioner.caption(np.zeros((1, 1, 3), np.uint8)).text
    assert rgb_array(np.matrix(rgb[..., 0])).shape == (40, 30, 3)


# -- decompression bombs -------------------------------------------------------------------------
def test_bomb_limit_is_clear_and_can_be_raised(captioner, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _chelsea((400, 300)).save(path)  # 120,000 pixels
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "100000")
    with pytest.raises(InputError, match="120,000 pixels.*over the limit of 100,000") as info:
        captioner.caption(path)
    assert "set_max_pixels" in info.value.problem and images.MAX_PIXELS_ENV in info.value.problem
    images.set_max_pixels(200_000)  # the documented way to raise it, in code
    assert captioner.caption(path).text


def test_malformed_limit_fails_at_construction(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "a lot")
    with pytest.raises(ValueError, match=images.MAX_PIXELS_ENV):
        Captioner(tiny_model_dir)


# -- models ---------------------------------------------------------------------------------------
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(model: Path, edit) -> None:
    path = model / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(keys, value):
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, words", [
    (_set(["format"], "edgecap-model/9"), "unknown manifest format 'edgecap-model/9'.*Upgrade"),
    (_set(["format"], "edgecap-model/1"), "unknown manifest format 'edgecap-model/1'.*re-export"),
    (_set(["format"], None), "unknown manifest format None"),
    (lambda d: d["dims"].pop("top_k"), "dims.top_k must be a positive integer.*re-export"),
    (_set(["dims", "regions"], "49"), "dims.regions must be a positive integer"),
    (_set(["preprocessing", "size"], [224]), r"preprocessing.size must be \[height, width\]"),
    (_set(["preprocessing", "std"], [0, 1, 1]), "std > 0"),
    (_set(["preprocessing", "resample"], "smooth"), "resample must name a Pillow filter"),
    (lambda d: d.pop("tokens"), "incomplete manifest.*re-export"),
    (_set(["files", "encoder"], "../encoder.onnx"), "not a file name inside the model directory"),
    (_set(["files", "encoder"], "/etc/hostname"), "not a file name inside the model directory"),
])
def test_bad_manifest_says_what_to_do(tiny_model_dir, tmp_path, edit, words):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    _edit_manifest(model, edit)
    with pytest.raises(ModelError, match=words):
        Captioner(model, backend="onnxruntime")


def test_missing_model_file(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "decoder_step.onnx").unlink()
    with pytest.raises(ModelError, match="decoder_step.onnx: missing.*copy the whole directory"):
        Captioner(model)


def test_model_file_that_is_a_directory(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "encoder.onnx").unlink()
    (model / "encoder.onnx").mkdir()
    with pytest.raises(ModelError, match="encoder.onnx.*re-copy the model directory"):
        Captioner(model, backend="onnxruntime")


def test_unreadable_manifest(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "manifest.json").unlink()
    (model / "manifest.json").mkdir()
    with pytest.raises(ModelError, match="manifest.json: cannot read it"):
        Captioner(model)


def test_vocabulary_of_the_right_size_from_another_model(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    words = json.loads((model / "vocab.json").read_text())["words"]
    shuffled = words[:4] + words[4:][::-1]
    (model / "vocab.json").write_text(json.dumps({"words": shuffled}))
    with pytest.raises(ModelError, match="vocab.json: checksum mismatch.*re-export"):
        Captioner(model)


@pytest.mark.parametrize("text", ["{not json", '{"words": 3}', '["<pad>"]', ""])
def test_unreadable_vocabulary(tiny_model_dir, tmp_path, text):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "vocab.json").write_text(text)
    with pytest.raises(ModelError, match="vocab.json: unreadable vocabulary.*re-export"):
        Captioner(model)


def test_truncated_model_with_the_torch_backend(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    encoder = model / "encoder.onnx"
    encoder.write_bytes(encoder.read_bytes()[:5000])
    with pytest.raises(ModelError, match="encoder.onnx: checksum mismatch.*re-copy"):
        Captioner(model, backend="torch")


def test_engine_from_another_tensorrt_or_gpu_is_rebuilt(monkeypatch, tmp_path, tiny_model_dir):
    """FAKE TensorRT (tests/test_tensorrt_fake.py): an engine file that another TensorRT
    version / GPU wrote under this cache name does not deserialize, so it is rebuilt, once."""
    pytest.importorskip("onnx")
    from test_tensorrt_fake import FakeDevice, install

    from edgecap.contract import Limits
    from edgecap.build.engines import EngineCache, Target

    device, log, limits = FakeDevice(), io.StringIO(), Limits(2, 3)
    manifest = load_manifest(tiny_model_dir)
    old_trt = install(monkeypatch, "8.6.2.3", device)
    old = EngineCache(old_trt, Target("Xavier", (7, 2), old_trt.__version__), tmp_path / "old", log)
    old_engine = old.build(manifest, "encoder", "fp32", limits)

    trt = install(monkeypatch, "10.3.0.30", device)
    cache = EngineCache(trt, Target(device.name, device.compute_capability, trt.__version__),
                        tmp_path / "new", log)
    path = cache.path(manifest, "encoder", "fp32", limits)
    path.parent.mkdir()
    shutil.copy(old_engine, path)  # e.g. a cache folder copied from another device
    assert cache.load(manifest, "encoder", "fp32", limits) is not None
    assert "does not load with this TensorRT/GPU; rebuilding it" in log.getvalue()
    assert len(trt.stats["builds"]) == 1
    cache.load(manifest, "encoder", "fp32", limits)  # the rebuilt engine is reused
    assert len(trt.stats["builds"]) == 1


def test_unwritable_engine_cache_fails_before_building(monkeypatch, tmp_path, tiny_model_dir):
    """FAKE TensorRT, as above."""
    pytest.importorskip("onnx")
    from test_tensorrt_fake import FakeDevice, install

    from edgecap.contract import Limits
    from edgecap.build.engines import EngineCache, Target

    device = FakeDevice()
    trt = install(monkeypatch, "10.3.0.30", device)
    (tmp_path / "a-file").write_text("")
    cache = EngineCache(trt, Target(device.name, device.compute_capability, trt.__version__),
                        tmp_path / "a-file" / "engines", io.StringIO())
    with pytest.raises(BackendError, match="cannot save TensorRT engines.*EDGECAP_CACHE"):
        cache.load(load_manifest(tiny_model_dir), "encoder", "fp32", Limits(2, 3))
    assert trt.stats["builds"] == []


# -- the CLI: messages and exit codes -------------------------------------------------------------
def _run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli_main(["caption", "--help"])
    text = capsys.readouterr().out
    for line in ("exit status:", "0  every input was captioned", "1  some inputs",
                 "2  usage, model or backend error", images.MAX_PIXELS_ENV):
        assert line in text


def test_exit_codes(capsys, tiny_model_dir, tmp_path, monkeypatch):
    photo = EXAMPLES / "chelsea.png"
    model = ["--model", tiny_model_dir, "--max-length", "4"]
    assert _run_cli(capsys, photo, *model)[0] == 0

    code, out, err = _run_cli(capsys, photo, tmp_path / "missing.jpg", *model)
    assert code == 1 and out.startswith(f"{photo}\t")
    assert err == f"edgecap: {tmp_path / 'missing.jpg'}: no such file\n"

    bad_model = _copy_model(tiny_model_dir, tmp_path / "m")
    _edit_manifest(bad_model, _set(["format"], "edgecap-model/9"))
    code, out, err = _run_cli(capsys, photo, "--model", bad_model)
    assert (code, out) == (2, "") and err.startswith("edgecap caption: error: ")
    assert "unknown manifest format" in err and err.count("\n") == 1

    code, _, err = _run_cli(capsys, photo, *model, "--batch-size", "0")
    assert code == 2 and "batch_size" in err

    monkeypatch.setenv(images.MAX_PIXELS_ENV, "-3")
    code, _, err = _run_cli(capsys, photo, *model)
    assert code == 2 and images.MAX_PIXELS_ENV in err
    monkeypatch.delenv(images.MAX_PIXELS_ENV)

    def no_runtime(*args, **kwargs):
        raise BackendError("the tensorrt backend needs tensorrt, which is not installed")

    monkeypatch.setattr("edgecap.api.Captioner", no_runtime)
    code, out, err = _run_cli(capsys, photo, *model)
    assert (code, out) == (2, "")
    assert err == ("edgecap caption: error: the tensorrt backend needs tensorrt, which is not "
                   "installed\n")


def test_cli_on_the_zoo(tiny_model_dir, zoo, tmp_path):
    """The whole zoo, a missing path and an image-less folder in one run: no traceback, exit 1,
    every good file captioned, every bad one named once on stderr; nothing written anywhere."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    missing = tmp_path / "missing.jpg"
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    before = {p: p.stat().st_mtime_ns for p in zoo.iterdir()}
    env = {**ENV, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "EDGECAP_CACHE": str(home / "edgecap")}
    out = subprocess.run([sys.executable, "-m", "edgecap", "caption", str(zoo), str(missing),
                          str(empty), "--json", "--model", str(tiny_model_dir), "--max-length",
                          "4", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr
    records = {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}
    for name in GOOD:
        record = records[str(zoo / name)]
        assert isinstance(record["caption"], str) and record["caption"], record
    failed = {**{str(zoo / n): w for n, w in BAD.items()}, str(missing): "no such file",
              str(empty): "no image files"}
    assert len(records) == len(GOOD) + len(failed)
    errors = out.stderr.splitlines()
    assert len(errors) == len(failed), out.stderr
    for path, words in failed.items():
        assert records[path]["caption"] is None and words in records[path]["error"]
        [line] = [e for e in errors if e.startswith(f"edgecap: {path}: ")]
        assert words in line
    # the CLI writes only to stdout / stderr: no cache, no temp files, inputs untouched
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in zoo.iterdir()} == before


# -- a bad file in a batch of 100 ---------------------------------------------------------------
def make_variants(n: int, out_dir: Path, seed: int = 0) -> list[Path]:
    """``n`` small JPEG/PNG images: random crops, flips and sizes of the bundled example photos."""
    rng = np.random.default_rng(seed)
    sources = []
    for p in sorted(EXAMPLES.iterdir()):
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as im:
                sources.append(im.convert("RGB").resize((160, 160)))
    paths = []
    for i in range(n):
        im = sources[i % len(sources)]
        x0, y0 = rng.integers(0, 60, 2)
        side = int(rng.integers(80, 160 - max(x0, y0) + 1))
        im = im.crop((int(x0), int(y0), int(x0) + side, int(y0) + side))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((int(rng.integers(48, 128)), int(rng.integers(48, 128))))
        path = out_dir / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        im.save(path)
        paths.append(path)
    return paths


def test_bad_file_in_a_batch_of_100_changes_nothing_else(captioner, tmp_path, capsys):
    paths = make_variants(100, tmp_path)
    bad = paths[37]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    alone = {p: captioner.caption(p) for p in paths if p != bad}

    batch = captioner.caption_batch(paths, on_error="return")
    assert isinstance(batch[37], InputError) and batch[37].source == str(bad)
    for path, result in zip(paths, batch):
        if path != bad:
            assert result.text == alone[path].text, path
            assert result.score == pytest.approx(alone[path].score, abs=1e-4), path

    code, out, err = _run_cli(capsys, tmp_path, "--model", captioner.manifest.directory,
                              "--max-length", "6")
    assert code == 1
    assert err.startswith(f"edgecap: {bad}: ") and err.count("\n") == 1
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    assert lines == {str(p): alone[p].text for p in paths if p != bad}


# -- no pickle on the load path -----------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}


def _calls(tree: ast.AST, module: str, function: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == function and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module):
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_nothing_in_the_package_unpickles():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                problems.append(f"{where}:{node.lineno} imports {names}")
            if isinstance(node, ast.Name) and node.id in UNSAFE_MODULES:
                problems.append(f"{where}:{node.lineno} uses {node.id}")
        for call in _calls(tree, "torch", "load"):
            if _keyword(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
        for call in _calls(tree, "np", "load"):
            if _keyword(call, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{call.lineno} np.load with allow_pickle")
        text = path.read_text()
        if "torch.load(" in text and "weights_only=True" not in text:
            problems.append(f"{where}: torch.load( without weights_only=True")
    assert problems == []
