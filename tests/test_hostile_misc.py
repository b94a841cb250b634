"""The smaller hostile cases of issue 16 (class 7): --batch-size bound, --attention over its own
input, --device cuda without CUDA, Ctrl-C at start-up, onnxruntime telemetry from the library.
(Pillow's guard set to None before importing edgecap: tests/test_hostile_files.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap.decoding import MAX_BATCH_SIZE, CaptionOptions

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}


def cli(*args, model=None, env=ENV):
    model_args = ["--model", str(model)] if model else []
    return subprocess.run(
        [sys.executable, "-m", "edgecap", "caption", *map(str, args), *model_args, "--max-length", "4"],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(path)
    return path


def test_batch_size_has_an_upper_bound(any_model_dir, photo):
    with pytest.raises(ValueError, match=f"between 1 and {MAX_BATCH_SIZE}"):
        CaptionOptions(batch_size=MAX_BATCH_SIZE + 1).validate(top_k=5)
    CaptionOptions(batch_size=MAX_BATCH_SIZE).validate(top_k=5)
    out = cli(photo, "--batch-size", "100000", model=any_model_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"edgecap caption: error: --batch-size must be between 1 and {MAX_BATCH_SIZE}, got 100000 "
        "(each image of a batch holds its activations and beams in memory until the batch is "
        "done)"
    ]


@pytest.mark.parametrize("how", ["same", "link"])
def test_attention_never_overwrites_its_input(any_model_dir, photo, tmp_path, how):
    before = photo.read_bytes()
    out_path = photo
    if how == "link":
        out_path = tmp_path / "figure.png"
        os.link(photo, out_path)
    out = cli(photo, "--attention", out_path, model=any_model_dir)
    assert out.returncode == 2
    assert "is the input photo itself" in out.stderr and len(out.stderr.splitlines()) == 1
    assert photo.read_bytes() == before


def test_device_cuda_without_cuda_is_exit_2(any_model_dir, photo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = cli(photo, "--device", "cuda", "--backend", "onnxruntime", model=any_model_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    # in the command line's words (the API's say device='cuda')
    assert "--device cuda but this onnxruntime has no CUDA provider" in out.stderr
    assert out.stderr.rstrip().endswith("or use --device cpu")
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr


@pytest.mark.skipif(os.name != "posix", reason="SIGINT")
def test_ctrl_c_at_start_up_is_no_traceback(any_model_dir, photo):
    """Ctrl-C at several moments of ``edgecap caption``'s first second, counted from when
    ``main`` has made Ctrl-C its own (its first step): the heavy imports (numpy, Pillow,
    onnxruntime) all happen inside ``main``. (A Ctrl-C before any edgecap code, in the
    interpreter's start-up or in this test's own lines before ``main``, is Python's to report.)"""
    start = (
        "import sys\nfrom edgecap import cli\n"
        "quiet = cli._quiet_interrupts\n"
        "def quiet_then_ready():\n"
        "    previous = quiet()\n"
        "    sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "    return previous\n"
        "cli._quiet_interrupts = quiet_then_ready\n"
        f"sys.exit(cli.main(['caption', {str(photo)!r}, '--model', {str(any_model_dir)!r}]))\n"
    )
    for delay in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        proc = subprocess.Popen(
            [sys.executable, "-c", start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
        )
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # a hang fails, it does not stall the run
        # 0: it was done; -SIGINT: it was in Python's own shutdown (default handler again)
        assert proc.returncode in (130, 0, -signal.SIGINT), (delay, proc.returncode, err)
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, (delay, err)


def test_library_does_not_write_telemetry(any_model_dir, photo, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    code = (
        "import os\nfrom edgecap import Captioner\n"
        f"c = Captioner({str(any_model_dir)!r}, backend='onnxruntime', max_length=3)\n"
        f"print(c.caption({str(photo)!r}).text)\n"
        "print(os.environ['ORT_DISABLE_TELEMETRY'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "1"
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


@pytest.mark.parametrize("caller", ["command", "library"])
def test_no_telemetry_with_the_torch_backend_either(caller, tmp_path):
    """The shipped model's language-model fusion steps in onnxruntime whatever the backend: with
    --backend torch (backend="torch") onnxruntime is imported outside its backend, and still
    nothing is written under HOME (docs/reliability.md: the library writes no telemetry)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    photo = Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png"
    if caller == "command":
        args = ["-m", "edgecap", "caption", str(photo), "--backend", "torch", "--max-length", "3"]
    else:
        code = (
            "from edgecap import Captioner\n"
            "c = Captioner(backend='torch', max_length=3)\n"
            "assert c.fusion is not None\n"
            f"print(c.caption({str(photo)!r}).text)\n"
        )
        args = ["-c", code]
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_convert_writes_no_telemetry(tiny_model_dir, tmp_path):
    """`edgecap convert` imports onnxruntime (its quantiser) outside any backend: nothing is
    written under HOME either (measured before the package set the default: onnxruntime's
    deviceid and onnxruntime.db under ~/.cache/Microsoft)."""
    pytest.importorskip("onnxruntime")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    args = [
        "-m",
        "edgecap",
        "convert",
        str(tiny_model_dir),
        "--precision",
        "int8",
        "--out",
        str(tmp_path / "o"),
    ]
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "manifest.json").is_file()
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_the_package_imports_nothing_heavy_before_the_cli_handler():
    """``python -m edgecap`` imports the package before ``edgecap.__main__`` can catch Ctrl-C:
    the package itself must import no numpy, Pillow or runtime (they come with ``Captioner``)."""
    code = (
        "import sys, edgecap, edgecap.cli\n"
        "print(sorted(m for m in ('numpy', 'PIL', 'onnxruntime') if m in sys.modules))\n"
        "from edgecap import Captioner, Caption, CaptionOptions\n"
        "print(Captioner.__module__, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "edgecap.api True"]


@pytest.mark.skipif(os.name != "posix", reason="SIGINT")
def test_ctrl_c_inside_a_command_unwinds_it_and_exits_130():
    """Ctrl-C while a command other than caption runs (eval here, as train, convert, build):
    a KeyboardInterrupt inside the command, so its cleanup runs (a training run's unfinished
    checkpoint removed, eval's decoding workers stopped), then exit 130 with no traceback; not
    an exit without cleanup, nor status 1."""
    code = (
        "import os, signal, sys, time\n"
        "from edgecap.commands import eval as command\n"
        "def run(args):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
        "command.run = run\n"
        "from edgecap.cli import main\n"
        "sys.exit(main(['eval', '--images', '.', '--references', 'refs.json']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert (out.returncode, out.stdout) == (130, "cleaned up\n"), out.stderr
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr


def test_a_ctrl_c_that_escapes_main_still_ends_the_command_130():
    """A KeyboardInterrupt that leaves ``main`` (a Ctrl-C while a command that finishes on
    Ctrl-C was finishing, run_command's comment): the ``edgecap`` command still exits 130, with
    no traceback."""
    code = (
        "from edgecap import cli\n"
        "def interrupted(argv=None):\n"
        "    raise KeyboardInterrupt\n"
        "cli.main = interrupted\n"
        "cli.run_command()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "")


@pytest.mark.parametrize("wrapper", [ImportError, "BackendError"])
def test_an_interrupted_import_is_still_a_ctrl_c(monkeypatch, capsys, wrapper):
    """onnxruntime's C extension, interrupted while it initialises, raises ImportError
    ("initialization failed") from the KeyboardInterrupt; a backend may wrap that again."""
    from edgecap import cli
    from edgecap.commands import caption as caption_command
    from edgecap.errors import BackendError

    error = BackendError if wrapper == "BackendError" else wrapper

    def interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise error("initialization failed") from exc

    monkeypatch.setattr(caption_command, "run", interrupted)
    assert cli.main(["caption", "photo.png"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("chain", ["implicit", "wrapped twice"])
def test_a_ctrl_c_under_any_chain_of_errors_is_still_a_ctrl_c(monkeypatch, capsys, chain):
    """A library that turns the KeyboardInterrupt into another error without ``from`` (its
    ``__context__`` only), and a backend that wraps such an ImportError again: exit 130, nothing
    printed, as for a plain Ctrl-C."""
    from edgecap import cli
    from edgecap.commands import caption as caption_command
    from edgecap.errors import BackendError

    def import_interrupted():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904 (a library's implicit chain)

    def interrupted(args):
        if chain == "implicit":
            import_interrupted()
        try:
            import_interrupted()
        except ImportError as exc:
            raise BackendError("onnxruntime failed to load") from exc

    monkeypatch.setattr(caption_command, "run", interrupted)
    assert cli.main(["caption", "photo.png"]) == 130
    assert capsys.readouterr().err == ""


def test_the_error_classes_are_the_documented_ones():
    """docs/cli.md, "Errors and exit codes": every deliberate error is an ``edgecap.EdgecapError``;
    ``InputError`` and ``DataError`` are also ``ValueError`` (code that checks for a bad value
    catches them), a missing package is also an ``ImportError``."""
    from edgecap.errors import MissingPackageError

    for cls in (edgecap.InputError, edgecap.ModelError, edgecap.BackendError, edgecap.DataError):
        assert issubclass(cls, edgecap.EdgecapError), cls
    assert issubclass(edgecap.InputError, ValueError)
    assert issubclass(edgecap.DataError, ValueError)
    assert issubclass(MissingPackageError, edgecap.BackendError)
    assert issubclass(MissingPackageError, ImportError)
    with pytest.raises(ValueError, match="photo.png: cannot read"):
        raise edgecap.InputError("photo.png", "cannot read")
