"""``edgecap caption`` end to end, in a subprocess (``python -m edgecap caption ...``).

Needs the ``tiny_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import BackendError, InputError, images
from edgecap.cli import main as cli_main
from edgecap.commands.output import EXIT_PIPE_CLOSED
from helpers import BAD, GOOD, copy_model, edit_manifest, png_header_only, run_edgecap, set_field

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
# The subprocess imports the edgecap under test, installed or not.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}


def edgecap_caption(*args, model=None) -> subprocess.CompletedProcess:
    model_args = ["--model", str(model)] if model is not None else []
    return subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", *map(str, args), *model_args, "--max-length", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """photos/a.png, photos/nested/b.jpg, photos/notes.txt (ignored), photos/broken.jpg."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copy(EXAMPLES / "chelsea.png", root / "a.png")
    (root / "nested").mkdir()
    Image.open(EXAMPLES / "coffee.png").convert("RGB").save(root / "nested" / "b.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _plain_lines(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines())


def test_one_file(tiny_model_dir):
    path = EXAMPLES / "chelsea.png"
    out = edgecap_caption(path, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    lines = _plain_lines(out.stdout)
    assert list(lines) == [str(path)] and lines[str(path)].strip()


def test_directory_recursive_sorted(tiny_model_dir, photo_dir):
    out = edgecap_caption(photo_dir, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert list(_plain_lines(out.stdout)) == [str(photo_dir / "a.png"), str(photo_dir / "nested" / "b.jpg")]


def test_glob(tiny_model_dir, photo_dir):
    out = edgecap_caption(f"{photo_dir}/**/*.jpg", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert list(_plain_lines(out.stdout)) == [str(photo_dir / "nested" / "b.jpg")]


def test_json_and_failures(tiny_model_dir, photo_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    missing = tmp_path / "missing.png"
    out = edgecap_caption(broken, photo_dir / "a.png", missing, "--json", model=tiny_model_dir)
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(broken), str(photo_dir / "a.png"), str(missing)]
    assert records[0]["caption"] is None and records[0]["error"]
    assert isinstance(records[1]["caption"], str) and isinstance(records[1]["score"], float)
    assert "error" not in records[1]
    assert records[2]["caption"] is None and "no such file" in records[2]["error"]
    # a failed input's line has every key of a caption's, null, so a reader can index them all
    assert set(records[0]) == set(records[2]) == set(records[1]) | {"error"}
    assert all(records[0][key] is None for key in records[1] if key != "path")
    errors = out.stderr.splitlines()
    assert errors[0].startswith(f"edgecap: {broken}: ")
    assert errors[1] == f"edgecap: {missing}: no such file"
    assert "Traceback" not in out.stderr


def test_empty_directory_and_unmatched_glob(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = edgecap_caption(empty, f"{tmp_path}/*.webp", EXAMPLES / "chelsea.png", model=tiny_model_dir)
    assert out.returncode == 1
    assert "no image files" in out.stderr and str(empty) in out.stderr
    assert f"{tmp_path}/*.webp" in out.stderr
    assert list(_plain_lines(out.stdout)) == [str(EXAMPLES / "chelsea.png")]


def test_a_photo_over_the_pixel_limit_is_one_line_without_pillows_warning(tiny_model_dir, tmp_path, capfd):
    """10,000 x 10,000 = 100,000,000 pixels: over edgecap's limit (89,478,485) but under twice
    Pillow's, where Pillow warns (DecompressionBombWarning) instead of refusing. The command
    names the photo once, in its own words, and captions the others."""
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(10_000, 10_000))
    photo = EXAMPLES / "chelsea.png"
    out = run_edgecap(capfd, "caption", big, photo, "--model", tiny_model_dir, "--max-length", "4")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"edgecap: {big}: ") and images.MAX_PIXELS_ENV in lines[0]
    assert list(_plain_lines(out.stdout)) == [str(photo)]


def test_bad_model_dir_is_a_clean_error(tmp_path, capfd):
    out = edgecap_caption(EXAMPLES / "chelsea.png", model=tmp_path / "nowhere")
    assert out.returncode == 2
    assert "model directory not found" in out.stderr and "Traceback" not in out.stderr
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)
    out = run_edgecap(capfd, "caption", photo, "--model", photo)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{photo}: not a folder; a model directory is one" in out.stderr


def test_bad_option_is_a_clean_error(tiny_model_dir):
    out = edgecap_caption(EXAMPLES / "chelsea.png", "--beam-size", "0", model=tiny_model_dir)
    assert out.returncode == 2
    assert "--beam-size must be" in out.stderr and "Traceback" not in out.stderr


# -- messages and exit codes ----------------------------------------------------------------


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli_main(["caption", "--help"])
    text = capsys.readouterr().out
    for line in (
        "exit status:",
        "0  every input was captioned",
        "1  some inputs",
        "2  usage, model or backend error",
        "130  interrupted (Ctrl-C)",
        f"{EXIT_PIPE_CLOSED}  the reader of the output went away",
        images.MAX_PIXELS_ENV,
        # the limits it states are the ones the reader applies
        f"Images over {images.DEFAULT_MAX_PIXELS:,} pixels",
        f"files over {images.DEFAULT_MAX_FILE_BYTES // 2**20} MiB",
    ):
        assert line in text


def test_edgecap_alone_asks_for_a_command_and_version_says_the_installed_one(capsys):
    """``edgecap`` with no command is a usage error (exit 2) naming what is missing, not a
    traceback; ``edgecap --version`` prints the installed distribution's version, exit 0."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as bare:
        cli_main([])
    err = capsys.readouterr().err.splitlines()
    assert bare.value.code == 2 and err[-1] == "edgecap: error: the following arguments are required: COMMAND"
    assert err[0].startswith("usage: edgecap ")
    with pytest.raises(SystemExit) as asked:
        cli_main(["--version"])
    assert asked.value.code == 0 and capsys.readouterr().out == f"edgecap {version('edgecap')}\n"


def test_paths_may_come_before_between_and_after_the_options(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """``edgecap caption a.png --json b.png``, as most tools take it: every PATH captioned, in
    the order given (argparse alone had refused the ones after an option, exit 2, with
    edgecap's usage); after ``--`` a name that begins with "-" is a PATH; an unknown option is
    still a usage error, with the caption command's usage."""
    a, b = EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png"
    monkeypatch.chdir(tmp_path)
    shutil.copy(b, tmp_path / "-x.png")
    model = ["--model", tiny_model_dir]
    code, out, err = _run_cli(capsys, a, *model, b, "--max-length", "4", a.name, "--", "-x.png")
    assert (code, err) == (1, f"edgecap: {a.name}: no such file\n")  # a.name: relative to tmp_path
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(a), str(b), "-x.png"]
    code, out, _ = _run_cli(capsys, "--json", a, "--model", tiny_model_dir, "--max-length", "4", b)
    assert code == 0 and [json.loads(line)["path"] for line in out.splitlines()] == [str(a), str(b)]
    with pytest.raises(SystemExit) as exit_:
        _run_cli(capsys, a, "--bogus", b, "--model", tiny_model_dir)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: edgecap caption ")
    assert err.endswith("edgecap caption: error: unrecognized arguments: --bogus\n")


def test_exit_codes(capsys, tiny_model_dir, tmp_path, monkeypatch):
    photo = EXAMPLES / "chelsea.png"
    model = ["--model", tiny_model_dir, "--max-length", "4"]
    assert _run_cli(capsys, photo, *model)[0] == 0

    code, out, err = _run_cli(capsys, photo, tmp_path / "missing.jpg", *model)
    assert code == 1 and out.startswith(f"{photo}\t")
    assert err == f"edgecap: {tmp_path / 'missing.jpg'}: no such file\n"

    bad_model = copy_model(tiny_model_dir, tmp_path / "m")
    edit_manifest(bad_model, set_field(["format"], "edgecap-model/9"))
    code, out, err = _run_cli(capsys, photo, "--model", bad_model)
    assert (code, out) == (2, "") and err.startswith("edgecap caption: error: ")
    assert "unknown manifest format" in err and err.count("\n") == 1

    code, _, err = _run_cli(capsys, photo, *model, "--batch-size", "0")
    assert code == 2 and "--batch-size must be" in err

    monkeypatch.setenv(images.MAX_PIXELS_ENV, "-3")
    code, _, err = _run_cli(capsys, photo, *model)
    assert code == 2 and images.MAX_PIXELS_ENV in err
    monkeypatch.delenv(images.MAX_PIXELS_ENV)

    def no_runtime(*args, **kwargs):
        raise BackendError("the tensorrt backend needs tensorrt, which is not installed")

    monkeypatch.setattr("edgecap.api.Captioner", no_runtime)
    code, out, err = _run_cli(capsys, photo, *model)
    assert (code, out) == (2, "")
    assert err == ("edgecap caption: error: the tensorrt backend needs tensorrt, which is not installed\n")


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
    env = {
        **ENV,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "EDGECAP_CACHE": str(home / "edgecap"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecap",
            "caption",
            str(zoo),
            str(missing),
            str(empty),
            "--json",
            "--model",
            str(tiny_model_dir),
            "--max-length",
            "4",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr
    records = {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}
    for name in GOOD:
        record = records[str(zoo / name)]
        assert isinstance(record["caption"], str) and record["caption"], record
    failed = {
        **{str(zoo / n): w for n, w in BAD.items()},
        str(missing): "no such file",
        str(empty): "no image files",
    }
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


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    from edgecap import Captioner

    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=6)


# -- a bad file in a run of 24 (3 batches of 8, the bad file in the middle one) -----------------


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


def test_bad_file_in_a_run_of_24_changes_nothing_else(captioner, tmp_path, capsys):
    paths = make_variants(24, tmp_path)
    assert captioner.options.batch_size == 8  # batches before, around and after the bad file
    bad = paths[13]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    alone = {p: captioner.caption(p) for p in paths if p != bad}

    batch = captioner.caption_batch(paths, on_error="return")
    assert isinstance(batch[13], InputError) and batch[13].source == str(bad)
    for path, result in zip(paths, batch):
        if path != bad:
            assert result.text == alone[path].text, path
            assert result.score == pytest.approx(alone[path].score, abs=1e-4), path

    code, out, err = _run_cli(capsys, tmp_path, "--model", captioner.manifest.directory, "--max-length", "6")
    assert code == 1
    assert err.startswith(f"edgecap: {bad}: ") and err.count("\n") == 1
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    assert lines == {str(p): alone[p].text for p in paths if p != bad}


def test_caption_leaves_no_decoding_worker_running(tiny_model_dir, capsys):
    """The command closes its Captioner when it is done: the decoding workers it started are
    stopped (and a TensorRT backend's device buffers freed) before the process goes on."""
    import threading

    def workers() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("edgecap-decode")}

    before = workers()
    code, out, err = _run_cli(capsys, EXAMPLES, "--model", tiny_model_dir, "--decode-workers", "2")
    assert code == 0, err
    assert str(EXAMPLES / "chelsea.png") in out and str(EXAMPLES / "rocket.jpg") in out
    assert workers() <= before


def test_help_shows_each_default_once_and_no_flags_false(capsys):
    """Every command's --help: a flag's default (off) is not shown as '(default: False)', and
    an option whose help already states its default (--no-repeat-ngram: 'default: 3; 0: off')
    does not get a second '(default: 3)' after it."""
    for command in ("caption", "eval", "train", "export", "convert", "build", "serve"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: False)" not in text and "(default: True)" not in text, command
        if command in ("caption", "eval", "serve"):
            assert "(default: 3; 0: off; at most 10)" in text
            assert "(default: 3; 0: off; at most 10) (default" not in text, command


def test_out_of_memory_at_batch_size_1_does_not_ask_for_a_smaller_batch(tiny_model_dir, monkeypatch, capsys):
    """Out of memory while captioning with --batch-size 1 (the smallest there is) says to allow
    more memory, not to use 'a smaller --batch-size', which cannot be; at 2 it says both."""
    pytest.importorskip("onnxruntime")
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    def encode(self, images):
        raise MemoryError

    monkeypatch.setattr(OnnxRuntimeBackend, "encode", encode)
    said = (
        "edgecap caption: error: out of memory (MemoryError): allow it more memory (ulimit -v, the "
        "container's limit)"
    )
    photo = str(EXAMPLES / "chelsea.png")
    for size, hint in (("1", ""), ("2", ", or a smaller --batch-size")):
        args = ["caption", photo, "--model", str(tiny_model_dir), "--backend", "onnxruntime", "--no-progress"]
        assert cli_main([*args, "--batch-size", size]) == 2
        assert capsys.readouterr().err.splitlines() == [said + hint]


def test_a_gpu_out_of_memory_of_torchs_is_one_line(tiny_model_dir, monkeypatch, capsys):
    """torch's CUDA allocator running out of the GPU's memory (torch.OutOfMemoryError, its
    message as torch 2 words it) while captioning with the torch backend: one line saying out
    of memory with torch's own words, exit 2, not a traceback."""
    torch = pytest.importorskip("torch")
    from edgecap.backends.torch import TorchBackend

    cuda = (
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.44 GiB of "
        "which 3.06 MiB is free. Including non-PyTorch memory, this process has 7.43 GiB memory in use."
    )

    def encode(self, images):
        raise torch.OutOfMemoryError(cuda)

    monkeypatch.setattr(TorchBackend, "encode", encode)
    photo = str(EXAMPLES / "chelsea.png")
    args = ["caption", photo, "--model", str(tiny_model_dir), "--backend", "torch", "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"edgecap caption: error: out of memory (torch: {cuda}): free the GPU's memory (other "
        "processes on it: nvidia-smi), or a smaller --batch-size"  # not ulimit -v: no process limit
    ]


@pytest.mark.parametrize(
    "message, lack",
    [
        (  # as onnxruntime's CUDA provider words it in public reports (onnxruntime#16307)
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
            "Conv node. Name:'Conv_0' Status Message: CUDA failure 2: out of memory ; GPU=0 ; "
            "hostname=robot ; expr=cudaMalloc((void**)&p, size);",
            "CUDA failure 2: out of memory",
        ),
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA error cudaErrorMemoryAllocation:out of memory",
            "cudaErrorMemoryAllocation:out of memory",
        ),
        (
            "[ONNXRuntimeError] : 1 : FAIL : CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED",
            "CUBLAS_STATUS_ALLOC_FAILED",
        ),
    ],
)
def test_a_gpu_out_of_memory_of_onnxruntimes_is_one_line(tiny_model_dir, monkeypatch, capsys, message, lack):
    """onnxruntime's CUDA provider out of the GPU's memory (its error types live in
    onnxruntime.capi.onnxruntime_pybind11_state; its wording from public reports: no GPU here) is
    one line saying so, with what to free, exit 2; a traceback before. Another onnxruntime
    failure still raises, and the host's memory (bad_alloc) still names ulimit -v."""
    pytest.importorskip("onnxruntime")
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    Fail = type("Fail", (RuntimeError,), {"__module__": "onnxruntime.capi.onnxruntime_pybind11_state"})
    raised: list = [Fail(message)]

    def encode(self, images):
        raise raised[0]

    monkeypatch.setattr(OnnxRuntimeBackend, "encode", encode)
    args = ["caption", str(EXAMPLES / "chelsea.png"), "--model", str(tiny_model_dir), "--no-progress"]
    assert cli_main([*args, "--backend", "onnxruntime", "--batch-size", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"edgecap caption: error: out of memory (onnxruntime: {lack}): free the GPU's memory (other "
        "processes on it: nvidia-smi)"
    ]
    raised[0] = Fail("[ONNXRuntimeError] : 1 : FAIL : std::bad_alloc")
    assert cli_main([*args, "--backend", "onnxruntime", "--batch-size", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "edgecap caption: error: out of memory (onnxruntime could not allocate memory (bad_alloc)): allow "
        "it more memory (ulimit -v, the container's limit)"
    ]
    raised[0] = Fail(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: an illegal memory access"
    )
    with pytest.raises(Fail):
        cli_main([*args, "--backend", "onnxruntime", "--batch-size", "1"])


def _twelve_bit_png(folder: Path) -> tuple[Path, np.ndarray]:
    """coffee.png in gray, 12-bit values in a 16-bit PNG (the 12-bit hint's case)."""
    gray = np.asarray(Image.open(EXAMPLES / "coffee.png").convert("L"), np.uint16) << 4
    Image.fromarray(gray).save(folder / "twelve.png")
    return folder / "twelve.png", gray


def _caption_with_stderr_broken(model, *paths) -> subprocess.CompletedProcess:
    """``edgecap caption --json`` of ``paths`` in a process whose stderr is a pipe without a
    reader (every write to it: EPIPE); stdout captured."""
    command = [sys.executable, "-m", "edgecap", "caption", "--json", "--model", str(model)]
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [*command, "--max-length", "6", *map(str, paths)],
            stdout=subprocess.PIPE,
            stderr=write,
            text=True,
            timeout=600,
            env=ENV,
        )
    finally:
        os.close(write)


def test_a_warning_of_edgecap_s_own_is_one_line_on_the_command_line(tiny_model_dir, tmp_path):
    """A 12-bit grayscale PNG (values below 4096 in a 16-bit file) is read as a dark frame, and
    edgecap warns of it: on the command line that is one line, ``edgecap: warning: ...``, not
    Python's form with the module's path, a line number and a line of edgecap's source."""
    twelve, gray = _twelve_bit_png(tmp_path)
    done = edgecap_caption(twelve, model=tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"edgecap: warning: {tmp_path / 'twelve.png'}: 16-bit pixel values all below 4096 (the highest "
        f"is {int(gray.max())}) are read as 0-65535, a dark frame; pass 8-bit data as uint8, and scale 10- "
        "or 12-bit sensor data to 16 bits first (array << 6 for 10-bit, array << 4 for 12-bit); said once"
    ]


def test_a_warning_naming_a_file_is_escaped_as_the_error_lines_are(tiny_model_dir, tmp_path):
    """The warning's file name is escaped as an error line's is (docs/cli.md: one line): a name
    with a newline that spells another message cannot forge a second line on stderr, and a byte
    that is not UTF-8 is \\xff, not the surrogate Python holds it as (which stderr wrote as
    \\udcff). Before, the warning printed the name as it was: two lines."""
    twelve, _ = _twelve_bit_png(tmp_path)
    hostile = os.fsencode(tmp_path) + b"/dark\nedgecap: other.png: fake error\xff.png"
    os.rename(twelve, hostile)
    done = subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", os.fsdecode(hostile), "--model", str(tiny_model_dir)],
        capture_output=True,
        timeout=600,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode("utf-8").splitlines()
    name = f"{tmp_path}/dark\\nedgecap: other.png: fake error\\xff.png"
    assert len(lines) == 1 and lines[0].startswith(f"edgecap: warning: {name}: 16-bit pixel values"), lines


def test_a_warning_that_cannot_be_written_loses_no_caption(tiny_model_dir, tmp_path):
    """With stderr a broken pipe (the ``| tee`` or supervisor reading the log gone), edgecap's
    one-line warning is dropped, as Python's own ``showwarning`` drops one it cannot write: its
    BrokenPipeError had been raised inside the image's decoding, so ``edgecap caption`` printed
    nothing for any image and exited 1, and ``edgecap serve`` answered that image 400 (``cannot
    load this input ([Errno 32] Broken pipe)``)."""
    twelve, _ = _twelve_bit_png(tmp_path)
    done = _caption_with_stderr_broken(tiny_model_dir, twelve, EXAMPLES / "rocket.jpg")
    assert done.returncode == 0
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["twelve.png", "rocket.jpg"]
    assert all("caption" in r for r in records)


def test_a_broken_stderr_loses_no_record_of_the_inputs_after_an_error(tiny_model_dir, tmp_path):
    """stderr a broken pipe (the ``| tee`` or supervisor reading it gone): the first input's
    error line cannot be written, and that must not end the run; it had raised there
    (BrokenPipeError traceback, exit 1), the photo after it never captioned. Both records on
    stdout, exit 1 for the bad input."""
    (tmp_path / "notes.png").write_bytes(b"hello")
    done = _caption_with_stderr_broken(tiny_model_dir, tmp_path / "notes.png", EXAMPLES / "rocket.jpg")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert [(Path(r["path"]).name, r["caption"] is None) for r in records] == [
        ("notes.png", True),
        ("rocket.jpg", False),
    ]


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM and SIGHUP")
@pytest.mark.parametrize("world", ["1", "2", "x"])
def test_a_torchrun_rank_keeps_the_default_sigterm(world, monkeypatch):
    """The command line turns SIGTERM and SIGHUP into a Ctrl-C (docs/cli.md) but not in a
    torchrun rank (WORLD_SIZE above 1): torchrun stops the other ranks with SIGTERM when one
    fails, and a rank waiting in a collective would run no handler before torchrun's SIGKILL."""
    import signal

    from edgecap import cli

    monkeypatch.setenv("WORLD_SIZE", world)
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        previous = cli._quiet_interrupts()
        handled = {sig for sig in kept if signal.getsignal(sig) is not kept[sig]}
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
    # (one ignored when the tests started, as under nohup, stays ignored)
    terminating = {sig for sig in (signal.SIGTERM, signal.SIGHUP) if kept[sig] is not signal.SIG_IGN}
    expected = {signal.SIGINT} | (set() if world == "2" else terminating)
    assert handled == expected and set(previous) == expected


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM and SIGHUP")
def test_a_handler_not_set_from_python_is_left_alone(monkeypatch, capsys):
    """A program that embeds Python and set SIGTERM's handler itself (in C): Python sees it as
    None, which ``signal.signal`` does not take back. ``main`` had replaced that handler with its
    own and then, restoring None, raised a TypeError over the command's result."""
    import signal

    get, set_handler = signal.getsignal, signal.signal
    replaced = []

    def fake_set(sig, handler):
        if sig != signal.SIGTERM:
            return set_handler(sig, handler)
        if handler is None:
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
        replaced.append(handler)
        return None

    monkeypatch.setattr(signal, "getsignal", lambda sig: None if sig == signal.SIGTERM else get(sig))
    monkeypatch.setattr(signal, "signal", fake_set)
    assert cli_main(["caption"]) == 2  # no PATH: a usage error
    assert replaced == []
    assert "give image PATHs" in capsys.readouterr().err


def test_records_keep_the_order_of_the_inputs_failed_ones_included(capsys, tiny_model_dir, tmp_path):
    """One record per PATH, in the order given on the command line: a PATH that fails before
    the captioner sees it (an empty folder, a missing file) keeps its place before the photo
    after it, on stdout (--json) and on stderr; it had no reason to move to the end."""
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.png"
    cat, cup = EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png"
    args = [empty, cat, missing, cup, "--json", "--model", tiny_model_dir, "--max-length", "4"]
    code, out, err = _run_cli(capsys, *args)
    assert code == 1
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert paths == [str(empty), str(cat), str(missing), str(cup)]
    assert [line.split(": ")[1] for line in err.splitlines()] == [str(empty), str(missing)]


@pytest.mark.skipif(os.name != "posix", reason="a newline in a folder's name")
def test_an_error_naming_an_already_escaped_name_escapes_it_once(capsys, tmp_path):
    """An error line ``edgecap COMMAND: error: ...`` whose message names a folder escaped as
    caption escapes names (export's checkpoint: a newline written \\n) shows it as caption
    would, once: not \\\\n, which would name a folder with a backslash in it."""
    folder = tmp_path / "ck\npt"
    folder.mkdir()
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/ck\\npt: not a checkpoint directory" in err
