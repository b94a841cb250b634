"""edgecap on a locked-down machine, as robots and containers run it: a read-only root file
system leaves no temporary folder Python can write (TMPDIR, /tmp, /var/tmp, /usr/tmp and the
working folder all read-only; ``tempfile.gettempdir()`` then raises CPython's 'No usable temporary
directory found in [...]'). What needs one (eval's PTB tokenizer, convert's int8 quantizer,
export's torch.onnx) says so in one line and what to do, exit 2: not a traceback, and not a
problem with --out, which can be written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import edgecap
from edgecap.cli import main
from helpers import coco_json

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
# CPython's tempfile._get_default_tempdir: FileNotFoundError(ENOENT, this), no file name
NO_TEMP = "No usable temporary directory found in ['/ro/tmp', '/tmp', '/var/tmp', '/usr/tmp', '/ro/cwd']"


@pytest.fixture
def no_temporary_folder(monkeypatch):
    """``tempfile`` as on a read-only root file system: no folder chosen yet (``tempdir`` None)
    and none can be (``gettempdir`` raises as CPython's does; mkdtemp, TemporaryDirectory and
    NamedTemporaryFile all go through it)."""

    def none_usable():
        raise FileNotFoundError(errno.ENOENT, NO_TEMP)

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "gettempdir", none_usable)


def test_eval_with_no_writable_temporary_folder_is_one_line(
    no_temporary_folder, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The PTB tokenizer's captions file cannot be made: eval said why in a message that itself
    asked tempfile for the folder's name, which raised again, so the user got two tracebacks
    (FileNotFoundError). Now one line: what is missing, what to do, the system's reason."""
    pytest.importorskip("pycocoevalcap")
    from edgecap.evaluation import metrics

    said = (
        "coco-caption's PTB tokenizer cannot write its temporary file: set TMPDIR to a writable "
        f"folder ({NO_TEMP})"
    )
    monkeypatch.setattr(metrics, "java_available", lambda: True)  # Java never runs: the file comes first
    with pytest.raises(metrics.JavaFailed) as failed:
        metrics.score({1: ["a cat sits"]}, {1: "a cat"}, "ptb", metrics=("BLEU-1",))
    assert str(failed.value) == said
    (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    refs = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat."]})
    args = ["--images", str(tmp_path), "--references", str(refs), "--model", str(tiny_model_dir)]
    assert main(["eval", *args, "--max-length", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"edgecap eval: error: {said}"
    assert "Traceback" not in err


def test_convert_int8_with_no_writable_temporary_folder_does_not_blame_out(
    no_temporary_folder, tiny_model_dir, tmp_path, capsys
):
    """edgecap's int8 conversion runs onnxruntime's quantizer in a temporary folder (its C++ half
    takes no folder name that is not UTF-8; from 1.17 on it writes the model it shape-infers to
    one too). Where none can be made the error has no file name, and convert named --out
    (writable) as the problem: 'OUT: No usable temporary directory ...'. Now the temporary
    folder and TMPDIR."""
    pytest.importorskip("onnxruntime.quantization")
    out = tmp_path / "int8"
    assert main(["convert", str(tiny_model_dir), "--precision", "int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"edgecap convert: error: no writable temporary folder: set TMPDIR to one ({NO_TEMP})"


def _run_read_only(argv: list[str], ro: list, rw: list, cwd: Path, env: dict, timeout: int = 300):
    """``argv`` run in ``cwd`` with the folders ``ro`` mounted read-only and ``rw`` (inside them)
    writable, for this process alone (unshare -m, bind mounts); ``env`` added to a bare one (PATH,
    PYTHONPATH: this edgecap). Skips where this machine cannot mount folders so."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount")
    script = (
        'for d in $RO; do mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" || exit 99; done; '
        'for d in $RW; do mount --bind "$d" "$d" && mount -o remount,bind,rw "$d" || exit 98; done; '
        'cd "$CWD" && exec "$@"'
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "RO": " ".join(map(str, ro)),
        "RW": " ".join(map(str, rw)),
        "CWD": str(cwd),
        "PYTHONPATH": str(Path(edgecap.__file__).parents[1]),
        **env,
    }
    command = ["unshare", "-m", "bash", "-c", script, "bash"]
    probe = subprocess.run(
        [*command, "touch", os.path.join(ro[0], "probe"), *(os.path.join(d, "ok") for d in rw)],
        env=env,
        capture_output=True,
    )
    made = probe.returncode not in (98, 99) and b"Read-only file system" in probe.stderr
    if not made or not all(os.path.exists(os.path.join(d, "ok")) for d in rw):
        pytest.skip("this machine cannot mount folders read-only for one process (unshare -m)")
    return subprocess.run([*command, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_convert_int8_on_a_read_only_root_file_system(tiny_model_dir, tmp_path):
    """The same for real: TMPDIR, /tmp, /var/tmp and the working folder mounted read-only for one
    process (unshare -m, read-only bind mounts; skipped where this machine cannot), --out on a
    writable mount."""
    ro_tmp, cwd, out = tmp_path / "tmpdir", tmp_path / "cwd", tmp_path / "out"
    for folder in (ro_tmp, cwd, out):
        folder.mkdir()
    done = _run_read_only(
        [sys.executable, "-m", "edgecap", "convert", str(tiny_model_dir), "--precision", "int8"]
        + ["--out", str(out / "int8")],
        ro=[ro_tmp, cwd, "/tmp", "/var/tmp"],
        rw=[out],
        cwd=cwd,
        env={"TMPDIR": str(ro_tmp)},
    )
    assert done.returncode == 2, done.stderr
    folders = [str(ro_tmp), "/tmp", "/var/tmp", "/usr/tmp", str(cwd)]
    assert done.stderr.splitlines() == [
        "edgecap convert: error: no writable temporary folder: set TMPDIR to one "
        f"(No usable temporary directory found in {folders})"
    ]


# a short caption through Captioner(compile_search=True); an EdgecapError as one line, exit 2
COMPILED_CAPTION = """
import sys
from edgecap import Captioner, CaptionOptions
from edgecap.errors import EdgecapError
try:
    captioner = Captioner(
        sys.argv[1], backend="torch", search="device", compile_search=True,
        options=CaptionOptions(max_length=6),
    )
    print(captioner.caption(sys.argv[2]).text)
except EdgecapError as exc:
    sys.exit(f"error: {exc}")
"""


def test_compile_search_with_no_writable_temporary_folder_is_one_line(no_temporary_folder):
    """torch.compile's TorchInductor keeps what it compiles under the temporary folder (and asks
    for that folder on import even with TORCHINDUCTOR_CACHE_DIR set): a compiled device search
    is refused when it is made, naming TMPDIR, not on the first caption with tempfile's
    FileNotFoundError from inside torch's import."""
    torch = pytest.importorskip("torch")
    from edgecap.decoding.device import DeviceBeamSearch
    from edgecap.errors import BackendError

    with pytest.raises(BackendError) as refused:
        DeviceBeamSearch(20, torch.device("cpu"), compiled=True)
    assert str(refused.value) == (
        "compile_search=True: torch.compile writes the code it compiles under the temporary folder, "
        f"and no temporary folder can be written: set TMPDIR to a writable folder ({NO_TEMP})"
    )


@pytest.mark.parametrize("where", ["no temporary folder", "read-only TORCHINDUCTOR_CACHE_DIR"])
def test_compile_search_in_a_read_only_place_is_one_line(tiny_model_dir, tmp_path, where):
    """For real (unshare -m, as above): Captioner(compile_search=True) with no writable temporary
    folder (TMPDIR, /tmp, /var/tmp and the working folder read-only) raised a FileNotFoundError
    from torch's import on the first caption; with TORCHINDUCTOR_CACHE_DIR read-only, torch's
    InductorError (OSError: Read-only file system) after seconds of compiling. Now the Captioner
    is refused in one line (a BackendError) naming what to set."""
    pytest.importorskip("torch")
    ro_tmp, cwd, cache = tmp_path / "tmpdir", tmp_path / "cwd", tmp_path / "cache"
    for folder in (ro_tmp, cwd, cache):
        folder.mkdir()
    if where == "no temporary folder":
        env, rw = {"TMPDIR": str(ro_tmp)}, []
        folders = [str(ro_tmp), "/tmp", "/var/tmp", "/usr/tmp", str(cwd)]
        said = (
            "compile_search=True: torch.compile writes the code it compiles under the temporary "
            "folder, and no temporary folder can be written: set TMPDIR to a writable folder "
            f"(No usable temporary directory found in {folders})"
        )
    else:  # a writable TMPDIR
        writable = tmp_path / "writable"
        writable.mkdir()
        env, rw = {"TMPDIR": str(writable), "TORCHINDUCTOR_CACHE_DIR": str(cache)}, [writable]
        said = (
            f"compile_search=True: torch.compile's TORCHINDUCTOR_CACHE_DIR {cache} is not writable: "
            "set TORCHINDUCTOR_CACHE_DIR to a writable folder"
        )
    photo = str(EXAMPLES / "chelsea.png")
    done = _run_read_only(
        [sys.executable, "-c", COMPILED_CAPTION, str(tiny_model_dir), photo],
        ro=[ro_tmp, cwd, cache, "/tmp", "/var/tmp"],
        rw=rw,
        cwd=cwd,
        env=env,
    )
    assert done.returncode == 1, done.stderr  # sys.exit(message)
    assert done.stderr.splitlines() == [f"error: {said}"]


def test_a_photo_is_read_without_reserving_the_whole_file_size_limit(tmp_path):
    """Reading a photo asked Python for max_bytes + 1 in one read (EDGECAP_MAX_FILE_BYTES,
    128 MiB by default), and a read of n bytes reserves n first: every photo, even one of 70 KB,
    took 128 MiB of address space (each decode worker too). Under an address-space limit
    (ulimit -v: 500 MiB ran the shipped model but failed every photo, 'cannot load this input
    (MemoryError)') or strict overcommit, photos failed while memory was free. Here a child
    process may map 64 MiB more than it has when it loads a 70 KB photo (Linux: RLIMIT_AS)."""
    pytest.importorskip("resource")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to size the limit")
    photo = EXAMPLES / "chelsea.png"
    child = "\n".join(
        [
            "import resource",
            "from edgecap.images import load_rgb",
            f"load_rgb({str(photo)!r})  # Pillow's PNG plugin and numpy loaded before the limit",
            "status = open('/proc/self/status').read().split('VmSize:')[1].split()",
            "mapped = int(status[0]) * 1024",
            "resource.setrlimit(resource.RLIMIT_AS, (mapped + (64 << 20), resource.RLIM_INFINITY))",
            "try:",
            f"    print(load_rgb({str(photo)!r}).size)",
            "except Exception as exc:",
            "    print(exc)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(Path(edgecap.__file__).parents[1])}
    env.pop("EDGECAP_MAX_FILE_BYTES", None)  # the default ceiling, 128 MiB
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(451, 300)"]


# What a capped process (ulimit -v, one CPU) raised while captioning the example photos, as
# measured: onnxruntime's encoder at 340-420 MiB, torch's at 800 MiB, and numpy / Pillow /
# imports a MemoryError. Each ended in a traceback, exit 1.
ORT_ARENA = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
    "Name:'/_blocks.1/Clip_output_0_nchwc' Status Message: /onnxruntime_src/onnxruntime/core/"
    "framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, "
    "onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 19267584"
)
TORCH_CPU = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 19267584 bytes. Error code 12 (Cannot allocate memory)"
)


def _ort_fail(message: str) -> Exception:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    return Fail(message)


@pytest.mark.parametrize(
    "raised, said",
    [
        (lambda: _ort_fail(ORT_ARENA), "onnxruntime could not allocate 19,267,584 bytes"),
        (lambda: RuntimeError(TORCH_CPU), "torch could not allocate 19,267,584 bytes"),
        (MemoryError, "MemoryError"),
    ],
)
def test_running_out_of_memory_while_captioning_is_one_line(
    tiny_model_dir, monkeypatch, capsys, raised, said
):
    """Out of memory in the model's run is one line saying so and what to do, exit 2, not a
    traceback (the captions of the batches before it are printed)."""
    pytest.importorskip("onnxruntime")
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    def encode(self, images):
        raise raised()

    monkeypatch.setattr(OnnxRuntimeBackend, "encode", encode)
    photo = str(EXAMPLES / "chelsea.png")
    assert (
        main(["caption", photo, "--model", str(tiny_model_dir), "--backend", "onnxruntime", "--no-progress"])
        == 2
    )
    assert capsys.readouterr().err.splitlines() == [
        f"edgecap caption: error: out of memory ({said}): allow it more memory (ulimit -v, the "
        "container's limit), or a smaller --batch-size"
    ]


def test_other_failures_of_the_model_are_not_called_out_of_memory(tiny_model_dir, monkeypatch):
    """A failure that is not memory (another onnxruntime error, a RuntimeError of torch's
    without an allocator) goes on as before."""
    pytest.importorskip("onnxruntime")
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    failure = _ort_fail(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node."
    )
    for error in (failure, RuntimeError("you tried to allocate 5 bytes of patience")):

        def encode(self, images, error=error):
            raise error

        monkeypatch.setattr(OnnxRuntimeBackend, "encode", encode)
        with pytest.raises(type(error)):
            main(["caption", str(EXAMPLES / "chelsea.png"), "--model", str(tiny_model_dir), "--no-progress"])


def test_eval_says_java_does_not_start_under_a_memory_limit_not_that_it_is_missing(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Under an address-space limit (ulimit -v 2 GiB here: the JVM reserves its heap and class
    space first) ``java -version`` fails, and edgecap eval said 'Java not found ... install a Java
    runtime' of a Java that is installed. It now names the java that does not start and why,
    from what the JVM said, measured (the cause on stdout, its log lines and 'Error: Could not
    create the Java Virtual Machine.' on stderr; exit 1). A stand-in java on PATH."""
    pytest.importorskip("pycocoevalcap")
    from edgecap.evaluation import metrics

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text(
        "#!/bin/sh\n"
        "echo '[0.014s][warning][os,thread] Failed to start thread \"G1 Refine#0\"' >&2\n"
        "echo 'Error occurred during initialization of VM'\n"
        "echo 'Could not allocate compressed class space: 1073741824 bytes'\n"
        "echo 'Error: Could not create the Java Virtual Machine.' >&2\n"
        "exit 1\n"
    )
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    metrics._java_starts.cache_clear()
    try:
        (tmp_path / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
        refs = coco_json(tmp_path / "refs.json", {"cat.png": ["A cat."]})
        args = ["--images", str(tmp_path), "--references", str(refs), "--model", str(tiny_model_dir)]
        assert main(["eval", *args, "--max-length", "3", "--no-progress"]) == 0
    finally:
        metrics._java_starts.cache_clear()
    assert capsys.readouterr().err.splitlines()[0] == (
        f"edgecap eval: warning: Java {java} does not start (java -version: exit 1; Error occurred "
        "during initialization of VM; Could not allocate compressed class space: 1073741824 bytes): "
        "METEOR skipped and the simple tokenizer used instead of coco-caption's PTB tokenizer "
        "(BLEU / ROUGE-L / CIDEr are then close to, but not exactly, coco-caption's); make it start "
        "for exact numbers"
    )


# What loading the shipped model raised under ulimit -v, as measured (taskset -c 0): onnxruntime
# at 250-380 MiB, the torch backend's onnx.load (protobuf) at 700 MiB.
ORT_LOAD = "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: std::bad_alloc"
PROTOBUF = "Error parsing message with type 'onnx.ModelProto': Arena alloc failed"


def _failing_load(backend: str, monkeypatch):
    if backend == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        def session(*args, **kwargs):
            raise RuntimeException(ORT_LOAD)

        monkeypatch.setattr(ort, "InferenceSession", session)
        return "onnxruntime could not allocate memory (bad_alloc)"
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from google.protobuf.message import DecodeError

    def load(*args, **kwargs):
        raise DecodeError(PROTOBUF)

    monkeypatch.setattr(onnx, "load", load)
    return "protobuf could not allocate memory (Arena alloc failed)"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_model_that_does_not_fit_in_memory_is_not_called_corrupt(
    tiny_model_dir, monkeypatch, capsys, backend
):
    """A graph that cannot be loaded for want of memory was 'cannot load the graph (...bad_alloc);
    the file may be corrupt or truncated, or need a newer runtime: re-copy the model directory or
    re-export it', which would not help. Now it says out of memory and what to do."""
    said = _failing_load(backend, monkeypatch)
    photo = str(EXAMPLES / "chelsea.png")
    assert (
        main(["caption", photo, "--model", str(tiny_model_dir), "--backend", backend, "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"edgecap caption: error: {tiny_model_dir}{os.sep}")
    assert err[0].endswith(
        f".onnx: cannot load the graph: out of memory ({said}): allow it more memory (ulimit -v, the "
        "container's limit)"
    )


def test_fused_search_with_no_writable_temporary_folder_is_one_line(no_temporary_folder, monkeypatch):
    """Compiled for a GPU (not in the interpreter), Triton's compiler writes ptxas's files in
    the temporary folder: the fused search is refused when it is made, naming TMPDIR."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from edgecap.decoding.device import fused_available
    from edgecap.errors import BackendError

    monkeypatch.delenv("TRITON_INTERPRET")  # read when called: a CUDA device, compiled
    with pytest.raises(BackendError) as refused:
        fused_available(torch.device("cuda"))
    assert str(refused.value) == (
        "the fused device search compiles its Triton kernel with temporary files (ptxas's), and no "
        f"temporary folder can be written: set TMPDIR to a writable folder ({NO_TEMP})"
    )


# fused_available on a CUDA device, then Triton's compiler for sm_90 (no GPU needed) on a small
# kernel, as Triton compiles the fused search's on its first launch on a GPU
TRITON_COMPILE = """
import sys
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgecap.decoding.device import fused_available
from edgecap.errors import EdgecapError

try:
    fused_available(torch.device("cuda"))
except EdgecapError as exc:
    sys.exit(f"error: {exc}")


@triton.jit
def add_one(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


triton.compile(ASTSource(fn=add_one, signature={"x_ptr": "*fp32"}), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.parametrize(
    "where", ["writable", "read-only HOME", "read-only TRITON_CACHE_DIR", "no temporary folder"]
)
def test_fused_search_where_triton_cannot_write_is_one_line(tmp_path, where):
    """Triton keeps what it compiles in TRITON_CACHE_DIR, else ~/.triton/cache, and runs ptxas
    on files in the temporary folder. Its compiler (for sm_90, on this machine without a GPU)
    with HOME read-only raised OSError 'Read-only file system', and with no temporary folder
    tempfile's FileNotFoundError: tracebacks, which on a GPU would come from the first caption.
    Now fused_available refuses it in one line naming what to set; where both can be written it
    compiles. (unshare -m as above.)"""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    home, cwd, cache, writable = (tmp_path / name for name in ("home", "cwd", "cache", "writable"))
    for folder in (home, cwd, cache, writable):
        folder.mkdir()
    script = tmp_path / "compile.py"
    script.write_text(TRITON_COMPILE)
    env = {"HOME": str(home), "TMPDIR": str(writable)}
    ro, rw = [cwd, "/tmp", "/var/tmp"], [writable, home]
    cannot = "set TRITON_CACHE_DIR to a writable folder"
    if where == "read-only HOME":
        rw = [writable]
        said = (
            f": Triton's cache folder {home}/.triton/cache cannot be made in {home}, not writable: {cannot}"
        )
    elif where == "read-only TRITON_CACHE_DIR":
        env["TRITON_CACHE_DIR"] = str(cache)
        said = f": Triton's TRITON_CACHE_DIR {cache} is not writable: {cannot}"
    elif where == "no temporary folder":
        env["TMPDIR"] = str(tmp_path / "missing")
        folders = [env["TMPDIR"], "/tmp", "/var/tmp", "/usr/tmp", str(cwd)]
        said = (
            " compiles its Triton kernel with temporary files (ptxas's), and no temporary folder can "
            f"be written: set TMPDIR to a writable folder (No usable temporary directory found in {folders})"
        )
    done = _run_read_only([sys.executable, str(script)], ro=ro, rw=rw, cwd=cwd, env=env)
    if where == "writable":
        assert (done.returncode, done.stdout) == (0, "compiled\n"), done.stderr
    else:
        assert done.returncode == 1, done.stderr  # sys.exit(message)
        assert done.stderr.splitlines() == [f"error: the fused device search{said}"]


@pytest.mark.parametrize("below", [False, True])
def test_a_compile_cache_that_is_a_file_is_refused_as_not_a_folder(tmp_path, monkeypatch, below):
    """TORCHINDUCTOR_CACHE_DIR naming a file, or a folder below one: refused before any compile,
    saying it is not a folder (an executable file had passed the writable check: its mode has
    w and x)."""
    pytest.importorskip("torch")
    from edgecap.decoding.device import compile_available
    from edgecap.errors import BackendError

    program = tmp_path / "program"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    cache = program / "cache" if below else program
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    with pytest.raises(BackendError, match="not a folder: set TORCHINDUCTOR_CACHE_DIR to a writable folder"):
        compile_available()
