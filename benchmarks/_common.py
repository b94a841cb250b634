"""What the benchmark scripts share: the model and its variants, a timing wrapper around a
backend, statistics, and the results files (JSON + markdown, with the machine named).

Variants (``VARIANTS``): one model directory run several ways.

    torch-eager      PyTorch eager on the CPU (the reference; weights read from the ONNX files)
    torch-eager-nhwc the same with the encoder channels-last (``channels_last=True``; not run
                     by default)
    torch-eager-bn-apart  the same with the encoder's BatchNorms apart, as exported
                     (``fold_batch_norms=False``: the torch backend's encoder until 2026-12-07;
                     not run by default)
    ort-fp32         onnxruntime, the exported FP32 graphs
    ort-int8         onnxruntime, `edgecap convert --precision int8` without calibration:
                     dynamic int8 decoder step, FP32 encoder
    ort-int8-static  as ort-int8, plus the encoder statically quantised (QDQ) on calibration photos
    ort-fp16         onnxruntime, `edgecap convert --precision fp16`
    tensorrt-fp16    the TensorRT backend's FP16 engines: the decoder step FP16 behind the FP32
                     encoder engine (only where tensorrt imports and a GPU is present)

    NAME             ``--model-dir NAME=DIR``: any model directory (e.g. an int8 model made by
                     hand), onnxruntime on the CPU

Converted model directories are cached under ``benchmarks/.cache/`` keyed by the source model's
checksums (``ort-int8-static`` by its calibration photos too), so only the first run pays for
the conversion; a copy made by other conversion code (``CONVERSION_SOURCES``) or another onnx
or onnxruntime is made again.

Each variant is timed in its own worker process through the isolated harness (``_isolated``):
``Variant.spec`` makes its harness spec, ``add_harness_arguments`` / ``run_harness`` the shared
options and call, ``harness_cells`` / ``isolation_markdown`` the alone and flag columns and the
harness report of a table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/NAME.py` from a checkout
    sys.path.insert(0, str(REPO))

from _machine import machine_info, machine_markdown  # noqa: E402

from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult  # noqa: E402
from edgecap.cli import HelpFormatter  # noqa: E402
from edgecap.extras import install_hint  # noqa: E402
from edgecap.files import nearest_existing  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"  # the committed figures: written only with --out
RUNS_DIR = BENCH_DIR / "runs"  # each run's own folder by default (git ignores runs/)
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_MODEL = REPO / "edgecap" / "assets" / "default"
EXAMPLES = REPO / "edgecap" / "assets" / "examples"
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"

VARIANTS = (
    "torch-eager",
    "torch-eager-nhwc",
    "torch-eager-bn-apart",
    "ort-fp32",
    "ort-int8",
    "ort-int8-static",
    "ort-fp16",
    "tensorrt-fp16",
)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in ("torch-eager-nhwc", "torch-eager-bn-apart"))
CALIBRATION_IMAGES = 64


def argument_parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """A script's parser: the first paragraph of its docstring ``doc`` as the description, and
    every option's default shown after its help, as ``edgecap --help`` shows them
    (``edgecap.cli.HelpFormatter``). Each script's ``build_parser()`` starts from it."""
    # (None under python -OO, which strips docstrings)
    return argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0], formatter_class=HelpFormatter, **kwargs
    )


def _number(text: str, kind, least, what: str):
    """``text`` as a ``kind`` (int or float) of at least ``least``, else an argparse usage error
    saying so: a count of 0 had run nothing and reported NaNs with exit 0, a negative one a
    traceback."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}; got {text!r}") from None
    if not value >= least:  # (NaN too)
        raise argparse.ArgumentTypeError(f"{what}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An option's value that counts something there must be one of (rounds, calls, photos)."""
    return _number(text, int, 1, "takes a whole number of 1 or more")


def non_negative_int(text: str) -> int:
    """An option's value where 0 means none (warm-up calls)."""
    return _number(text, int, 0, "takes a whole number of 0 or more")


def positive_float(text: str) -> float:
    """A length of time that must be more than 0 (a timed run's seconds)."""
    value = _number(text, float, 0, "takes a number of seconds more than 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"takes a number of seconds more than 0; got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A pause where 0 means none (--settle)."""
    return _number(text, float, 0, "takes a number of seconds of 0 or more")


def int_list(least: int = 1, most: int | None = None):
    """An argparse type for a comma-separated list of whole numbers from ``least`` to ``most``
    (--beams 1,3,5): an empty item, a word or a number out of range is a usage error naming it
    (had been a ValueError traceback, or the model's once the workers ran)."""
    span = f"from {least} to {most}" if most is not None else f"of {least} or more"

    def parse(text: str) -> list[int]:
        values = []
        for item in text.split(","):
            try:
                value = int(item)
            except ValueError:
                value = None
            if value is None or value < least or (most is not None and value > most):
                raise argparse.ArgumentTypeError(
                    f"takes whole numbers {span}, comma-separated; got {item.strip()!r} in {text!r}"
                )
            values.append(value)
        return values

    parse.__name__ = "number list"
    return parse


def batch_size(text: str) -> int:
    """A batch size the Captioner takes (1 to ``MAX_BATCH_SIZE``, 64): a larger one had been the
    Captioner's ValueError traceback once the model loaded."""
    from edgecap.decoding.options import MAX_BATCH_SIZE

    what = f"takes a whole number from 1 to {MAX_BATCH_SIZE}"
    value = _number(text, int, 1, what)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"{what}; got {text!r}")
    return value


def batch_sizes(text: str) -> list[int]:
    """Comma-separated batch sizes the Captioner takes (1 to 64 each)."""
    from edgecap.decoding.options import MAX_BATCH_SIZE

    return int_list(1, MAX_BATCH_SIZE)(text)


def backend_names(text: str) -> list[str]:
    """Comma-separated Captioner backends (onnxruntime, torch, tensorrt, auto)."""
    from edgecap.backends import NAMES

    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in NAMES:
            raise argparse.ArgumentTypeError(f"takes backends from {', '.join(NAMES)}; got {name!r}")
    return names


def backend_name(text: str) -> str:
    """One Captioner backend (onnxruntime, torch, tensorrt, auto)."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"takes one backend; got {text!r}")
    return backend_names(text)[0]


def device_name(text: str) -> str:
    """A device the backends take: cpu, cuda or cuda:N."""
    import re

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"takes cpu, cuda or cuda:N; got {text!r}")
    return text


# -- model and variants --------------------------------------------------------------------------


def add_model_arguments(parser, variants=DEFAULT_VARIANTS) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (default: the shipped model, edgecap/assets/default)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(variants),
        help=f"comma-separated, from {', '.join(VARIANTS)} (unavailable ones are skipped with a note)",
    )
    parser.add_argument(
        "--threads",
        type=int_list(1),
        default=None,
        help="onnxruntime intra-op threads; a comma list (e.g. 1,2) runs each "
        "onnxruntime variant once per value (default: the backend's default)",
    )
    parser.add_argument(
        "--spinning",
        default=None,
        help="onnxruntime intra-op thread spinning (session.intra_op."
        "allow_spinning): on, off, or on,off to run each onnxruntime "
        "variant both ways (default: the library's own setting, off)",
    )
    parser.add_argument(
        "--model-dir",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="a further variant NAME: model directory DIR on onnxruntime CPU "
        "(repeatable), e.g. an int8 model made by hand",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="photos for ort-int8-static's encoder calibration (default: the "
        f"first {CALIBRATION_IMAGES} Flickr8k training photos when present, "
        "else the package's example photos)",
    )


def run_main(main) -> None:
    """A script's ``main()`` as its command: an input that is not there or cannot be read is one
    line on stderr naming it (exit 1), not a traceback (edgecap's DataError names the file and
    what is wrong with it; a missing file or folder, its path)."""
    from edgecap.errors import DataError

    script = Path(sys.argv[0]).stem
    try:
        code = main()
    except DataError as exc:
        sys.exit(f"{script}: {exc}")
    except FileNotFoundError as exc:
        sys.exit(f"{script}: {exc.filename or exc}: no such file or folder")
    except NotADirectoryError as exc:  # a file where a folder of photos was asked for
        sys.exit(f"{script}: {exc.filename or exc}: not a folder")
    sys.exit(code)


def model_dir(path: Path | None) -> Path:
    path = DEFAULT_MODEL if path is None else Path(path)
    if not (path / "manifest.json").is_file():
        sys.exit(
            f"no model at {path} (manifest.json missing): pass --model DIR, a directory "
            "written by `edgecap export`"
        )
    return path


@dataclass
class Variant:
    name: str
    backend: str
    model: Path
    options: dict = field(default_factory=dict)  # backend keyword arguments
    session_config: dict = field(default_factory=dict)  # onnxruntime session config entries

    def captioner(self, **caption_options):
        from edgecap import Captioner

        with _session_config(self.session_config):
            return Captioner(self.model, backend=self.backend, **caption_options, **self.options)

    def timed_captioner(self, **caption_options):
        """-> (a Captioner whose backend is a ``TimedBackend``, that backend)."""
        captioner = self.captioner(**caption_options)
        timed = TimedBackend(captioner.backend)
        captioner.backend = timed
        return captioner, timed

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "backend": self.backend,
            "model": str(self.model),
            "options": self.options,
            "session_config": self.session_config,
        }

    @classmethod
    def from_json(cls, data: dict) -> Variant:
        return cls(
            data["name"],
            data["backend"],
            Path(data["model"]),
            dict(data["options"]),
            dict(data["session_config"]),
        )

    def spec(self, factory: str, **kwargs):
        """The harness spec running this variant in a worker: ``factory(variant=<to_json()>,
        **kwargs)``, the factory rebuilding it with ``Variant.from_json``."""
        import _isolated

        return _isolated.Spec(self.name, factory, {"variant": self.to_json(), **kwargs})


@contextlib.contextmanager
def _session_config(entries: dict):
    """Add onnxruntime session config entries to the sessions edgecap creates meanwhile: a
    benchmark-only knob, so settings can be compared before one becomes the default."""
    if not entries:
        yield
        return
    from edgecap.backends import onnxruntime as ort_backend

    original = ort_backend.session_options

    def with_entries(threads):
        options = original(threads)
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return options

    ort_backend.session_options = with_entries
    try:
        yield
    finally:
        ort_backend.session_options = original


def _threads(spec: list[int] | None) -> list[int | None]:
    if spec is None:
        return [None]
    return list(spec)


def _spinning(spec: str | None) -> list[str | None]:
    if spec is None:
        return [None]
    values = [v.strip() for v in spec.split(",")]
    if any(v not in ("on", "off") for v in values):
        sys.exit(f"--spinning takes on, off or on,off; got {spec!r}")
    return values


def parse_model_dirs(values: list[str]) -> list[tuple[str, Path]]:
    """``--model-dir NAME=DIR`` values -> [(NAME, DIR)], each DIR checked to hold a model."""
    out = []
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not name or not directory:
            sys.exit(f"--model-dir takes NAME=DIR, got {value!r}")
        if name in VARIANTS or name in (n for n, _ in out):
            sys.exit(f"--model-dir {value!r}: the name {name!r} is already a variant")
        out.append((name, model_dir(Path(directory).resolve())))
    return out


def resolve_variants(args) -> tuple[list[Variant], list[str]]:
    """-> (the variants to run, notes on the ones skipped)."""
    source = model_dir(args.model)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    threads, spinning = _threads(args.threads), _spinning(args.spinning)
    variants, notes = [], []

    def onnxruntime_variants(name: str, directory: Path) -> None:
        for t, spin in itertools.product(threads, spinning):
            label = (
                name + (f"/t{t}" if len(threads) > 1 else "") + (f"/spin-{spin}" if spin is not None else "")
            )
            options = {"device": "cpu"} if t is None else {"device": "cpu", "threads": t}
            config = {} if spin is None else {"session.intra_op.allow_spinning": "1" if spin == "on" else "0"}
            variants.append(Variant(label, "onnxruntime", directory, options, config))

    for name in wanted:
        why = _unavailable(name)
        if why:
            notes.append(f"{name} skipped: {why}")
            continue
        if name == "torch-eager":
            variants.append(Variant(name, "torch", source, {"device": "cpu"}))
        elif name == "torch-eager-nhwc":
            variants.append(Variant(name, "torch", source, {"device": "cpu", "channels_last": True}))
        elif name == "torch-eager-bn-apart":
            variants.append(Variant(name, "torch", source, {"device": "cpu", "fold_batch_norms": False}))
        elif name == "tensorrt-fp16":
            variants.append(Variant(name, "tensorrt", source))
        else:
            onnxruntime_variants(
                name, source if name == "ort-fp32" else converted(source, name, args.calibration)
            )
    for name, directory in parse_model_dirs(getattr(args, "model_dir", None) or []):
        if _unavailable("ort-fp32"):
            notes.append(f"{name} skipped: {_unavailable('ort-fp32')}")
        else:
            onnxruntime_variants(name, directory)
    return variants, notes


def _unavailable(name: str) -> str | None:
    def missing(*modules):
        return [m for m in modules if importlib.util.find_spec(m) is None]

    if name.startswith("torch-eager") and missing("torch", "onnx"):
        return f"needs {', '.join(missing('torch', 'onnx'))} ({install_hint('train')})"
    if name.startswith("ort-") and missing("onnxruntime"):
        return "needs onnxruntime"
    if name in ("ort-int8", "ort-int8-static", "ort-fp16") and missing("onnx"):
        return f"converting needs onnx ({install_hint('convert')})"
    if name == "tensorrt-fp16":
        if missing("tensorrt"):
            return "tensorrt is not installed here"
        try:
            import tensorrt
        except Exception as exc:  # a stub wheel or missing libraries
            return f"tensorrt does not import ({exc})"
        if not isinstance(getattr(tensorrt, "__version__", None), str):
            return "tensorrt is only type stubs here (tensorrt-stubs), not the library"
    return None


def converted(source: Path, variant: str, calibration: Path | None) -> Path:
    """The converted copy of ``source`` for ``variant``, made once and cached."""
    from edgecap.build.convert import convert_model_dir
    from edgecap.manifest import load_manifest

    manifest = load_manifest(source)
    key = manifest.sha256["encoder"][:8] + manifest.sha256["decoder_step"][:8]
    calibration_dir = None
    name = variant
    if variant == "ort-int8-static":
        calibration_dir = calibration or default_calibration()
        # the photos it is calibrated on make the model too: other photos, another copy
        name = f"{variant}-{photos_key(calibration_dir)}"
    out = CACHE_DIR / "models" / key / name
    # what made the copy: a copy made by other conversion code or libraries is made again
    stamp, made_by = out.with_name(name + ".made-by.json"), conversion_stamp()
    if (out / "manifest.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_by:
        return out
    precision = "fp16" if variant == "ort-fp16" else "int8"
    print(
        f"[prepare] converting {source} -> {out} ({variant}"
        + (f", calibrated on {calibration_dir}" if calibration_dir else "")
        + ")",
        file=sys.stderr,
    )
    stamp.unlink(missing_ok=True)  # a conversion cut short leaves no stamp
    convert_model_dir(source, out, precision, calibration=calibration_dir, force=True)
    stamp.write_text(json.dumps(made_by, indent=1) + "\n")
    return out


# the sources a converted model is made by (edgecap/...): another version of them, another model
CONVERSION_SOURCES = ("build/convert.py", "models/config.py")


def conversion_stamp() -> dict[str, str]:
    """What a cached conversion is made by: a checksum of edgecap's conversion code and the
    versions of onnx and onnxruntime (its quantiser and FP16 converter convert), those installed."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    import edgecap

    package = Path(edgecap.__file__).parent
    code = hashlib.sha256(b"".join((package / f).read_bytes() for f in CONVERSION_SOURCES)).hexdigest()
    stamp = {"code": code[:16]}
    for dist in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            stamp[dist] = version(dist)
    return stamp


def photos_key(folder: Path) -> str:
    """A short key of the files in ``folder`` (names and sizes): another set of calibration
    photos, another key."""
    import hashlib

    if not Path(folder).is_dir():
        sys.exit(f"--calibration {folder}: no such folder")
    files = sorted((p.name, p.stat().st_size) for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]


def default_calibration() -> Path:
    """A folder of links to the first Flickr8k training photos, else the example photos."""
    train_list = FLICKR8K / "Flickr_8k.trainImages.txt"
    if not train_list.is_file():
        return EXAMPLES
    names = [n.strip() for n in train_list.read_text().splitlines() if n.strip()]
    folder = CACHE_DIR / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names[:CALIBRATION_IMAGES]:
        link = folder / name
        if not link.exists():
            link.symlink_to(FLICKR8K / "images" / name)
    return folder


# -- inputs --------------------------------------------------------------------------------------


def reuse_captioner(cap, **options):
    """A Captioner sharing ``cap``'s model, backend and workers, with ``options`` replaced, as
    a new Captioner run at those options would be: its record of the largest batch run starts
    afresh (a graphed torch backend pads a batch up to it: a row timed at batch 3 after one at
    batch 8 would otherwise run 4 images)."""
    import copy
    from dataclasses import replace

    runner = copy.copy(cap)
    runner.options = replace(cap.options, **options)
    runner._largest_batch = 0
    return runner


def example_frames() -> list[np.ndarray]:
    """The package's example photos as decoded RGB uint8 arrays (H, W, 3), like camera frames."""
    from PIL import Image

    frames = []
    for path in sorted(EXAMPLES.iterdir()):
        if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
    return frames


def batch_arrays(batch: int, rng, frame: tuple = (480, 640, 3)) -> dict[str, list[np.ndarray]]:
    """A batch as the torch backend takes it, from separate arrays of random values: its
    ``preprocessed`` model inputs (float32 3 x 224 x 224 each) and its camera ``frames`` (uint8
    ``frame``, a VGA frame by default: ``preprocess="device"``'s input)."""
    return {
        "preprocessed": [rng.random((3, 224, 224), np.float32) for _ in range(batch)],
        "frames": [rng.integers(0, 256, frame, np.uint8) for _ in range(batch)],
    }


def image_files(folder: Path, limit: int | None) -> list[Path]:
    """The .jpg / .png photos in ``folder`` in name order, the first ``limit`` (None or 0: all);
    ``NotADirectoryError`` naming ``folder`` where it is a file (``run_main`` says so)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return files[:limit] if limit else files


# -- timing ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def steps_wrapped(kinds, wrap):
    """Within: each class of ``kinds`` steps with ``wrap(its own step)`` (the beam-step
    sessions' steps timed or counted); the classes' own put back after. The classes are
    patched for the whole process: not for use from two threads at once, nor nested over the
    same classes."""
    reals = [kind.step for kind in kinds]
    for kind, real in zip(kinds, reals):
        kind.step = wrap(real)
    try:
        yield
    finally:
        for kind, real in zip(kinds, reals):
            kind.step = real


class TimedBackend(Backend):
    """Wraps a backend and adds up the wall time of its ``encode`` and of every decoder
    ``step`` (which includes the backend's own small per-step conversions)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.top_k = inner.name, inner.top_k
        # a backend that preprocesses frames itself (preprocess="device") is handed frames
        self.prepares_frames = inner.prepares_frames
        self.reset()

    def reset(self) -> None:
        self.encode_s = 0.0
        self.step_times: list[float] = []

    def batch_input(self, images: list[np.ndarray]) -> Any:
        # the backend's own (the torch backend on CUDA: a kept page-locked buffer and a copy
        # that does not block), not the base class's fresh stack: its time is the encode's
        return self.inner.batch_input(images)

    def encode(self, images: np.ndarray) -> Encoded:
        return self._timed(self.inner.encode, images)

    def encode_frames(
        self, frames: list[np.ndarray], run_size: int | None = None, brighten: bool = False
    ) -> tuple[Encoded, np.ndarray, np.ndarray]:
        return self._timed(self.inner.encode_frames, frames, run_size, brighten)

    def run_size(self, n_images: int, largest: int) -> int:
        return self.inner.run_size(n_images, largest)  # the batch padded as the backend runs it

    def _timed(self, encode, *args):
        """``encode(*args)``, its wall time added to ``encode_s``."""
        t0 = time.perf_counter()
        encoded = encode(*args)
        self.encode_s += time.perf_counter() - t0
        return encoded

    def start(
        self, encoded: Encoded, image_index: np.ndarray, return_attention: bool = False
    ) -> DecoderSession:
        return _TimedSession(self, self.inner.start(encoded, image_index, return_attention))

    def describe(self) -> str:
        return self.inner.describe()


class _TimedSession(DecoderSession):
    def __init__(self, owner: TimedBackend, inner: DecoderSession):
        self.owner, self.inner = owner, inner

    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        t0 = time.perf_counter()
        result = self.inner.step(tokens, source_rows, word_bias)
        self.owner.step_times.append(time.perf_counter() - t0)
        return result


# operations that launch no kernel: allocations, and reading a 0-dim tensor's value
NO_KERNEL_OPS = {"empty", "empty_strided", "empty_like", "_local_scalar_dense"}


def operation_counter():
    """A ``TorchDispatchMode`` that counts the torch operations dispatched under it (``with
    operation_counter() as count``): ``kernels``, those that compute or write, and ``others``,
    those that return (a view of) their input and write nothing, or only allocate. Needs torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        kernels = others = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            inputs = {a.untyped_storage().data_ptr() for a in tensors}
            outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            aliasing = bool(outputs) and all(o.untyped_storage().data_ptr() in inputs for o in outputs)
            name = func._schema.name.split("::")[1]
            if (aliasing and not func._schema.is_mutable) or name in NO_KERNEL_OPS:
                self.others += 1
            else:
                self.kernels += 1
            return out

    return Count()


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def median(values) -> float:
    return percentile(values, 50)


# -- the isolated harness, as the scripts use it ---------------------------------------------------


def add_harness_arguments(parser, rounds: int, per_round: int, warmup: int) -> None:
    """The harness options every script takes, with that script's defaults; and ``--out``."""
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=rounds,
        help="interleaved rounds (and as many in the alone pass)",
    )
    parser.add_argument(
        "--per-round", type=positive_int, default=per_round, help="timed calls per variant, measure and round"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=warmup, help="unmeasured calls per worker and measure"
    )
    parser.add_argument(
        "--no-alone", action="store_true", help="skip the alone pass (then nothing can be flagged)"
    )
    parser.add_argument(
        "--settle",
        type=non_negative_float,
        default=0.25,
        help="untimed pause (s) before each turn, longer than onnxruntime's spinning",
    )
    add_out_argument(parser)


OUT_HELP = (
    "folder for the results files (default: a new folder benchmarks/runs/DATE-TIME, "
    "which git ignores; --out benchmarks/results replaces the committed figures)"
)


def add_out_argument(parser) -> None:
    """``--out DIR``, the same in every script: where its results files go (``output_dir``)."""
    parser.add_argument("--out", type=out_folder, default=None, metavar="DIR", help=OUT_HELP)


def out_folder(text: str) -> Path:
    """``--out``'s value, refused as a usage error when it cannot be a folder the results are
    written to (a file, below a file, a name too long, a folder that cannot be written): the
    results are written once the whole run is done, and the run's figures had been lost to a
    traceback then."""
    path = Path(text)
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # a new folder (below a file: said below)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is not a folder)"
        raise argparse.ArgumentTypeError(f"{text}: not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable")
    return path


def output_dir(out: Path | None) -> Path:
    """``out`` (created), or by default a fresh folder ``benchmarks/runs/YYYYmmdd-HHMMSS[-N]``:
    a run never replaces the committed files in ``benchmarks/results/`` unless told to."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        path = RUNS_DIR / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def run_harness(specs: list, measures: list[str], args) -> dict:
    """``_isolated.run_isolated`` with the options of ``add_harness_arguments``."""
    import _isolated

    return _isolated.run_isolated(
        specs,
        measures,
        rounds=args.rounds,
        per_round=args.per_round,
        warmup=args.warmup,
        alone=not args.no_alone,
        settle_s=args.settle,
    )


HARNESS_HEADERS = ["alone p50", "vs alone", "flag"]


def harness_cells(entry: dict, scale: float = 1.0) -> list:
    """The alone median (times ``scale``), the interleaved-vs-alone difference and the flag of
    one variant's ``run_isolated`` entry, as table cells."""
    alone = entry.get("alone", {}).get("median_ms", float("nan")) * scale
    diff = entry.get("interleaved_vs_alone")
    return [alone, "-" if diff is None else f"{100 * diff:+.0f}%", "FLAG" if entry.get("flagged") else ""]


HOW_ISOLATED = (
    "Each variant in its own worker process (`benchmarks/_isolated.py`; model loading "
    "not timed): {rounds} interleaved rounds x {per_round} calls per measure, one "
    "worker running at a time, after {warmup} warm-up calls; then each variant alone "
    "in a fresh worker, the same calls (alone: {alone}). `alone p50` / `vs alone` / "
    "`flag`: a variant whose interleaved median is more than 15% off its alone "
    "median is flagged. Ratios between variants come from the interleaved medians."
)


def isolation_markdown(result: dict) -> str:
    """How the harness ran, its flags and its idleness table (idle and bystander CPU, pids)."""
    import _isolated

    return HOW_ISOLATED.format(**result["settings"]) + "\n\n" + _isolated.flags_and_idleness(result)


# -- results -------------------------------------------------------------------------------------


def number_text(v: float) -> str:
    """A measured number as the results tables write it: 3 significant digits under 10, one
    decimal under 1000, none above; NaN as "-"."""
    if v != v:  # NaN
        return "-"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return number_text(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    data: dict,
    markdown: str,
    argv: list[str] | None = None,
    script: str | None = None,
    out: Path | None = None,
    echo: bool = True,
) -> Path:
    """Write ``NAME.json`` and ``NAME.md`` into ``out`` (the machine and the command line added
        to both; None: a fresh ``output_dir``), print the markdown (unless not ``echo``: stdout is the
    script's own), say on stderr where they went, and return the markdown's path.
        ``script``: the benchmark's file name without .py, where it is not ``name``."""
    out = output_dir(out)
    command = f"python benchmarks/{script or name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    payload = {"benchmark": name, "command": command.strip(), "date": stamp, "machine": info, **data}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = f"# {name}\n\n`{command.strip()}` ({stamp})\n\n{machine_markdown(info)}\n\n{markdown.strip()}\n"
    path = out / f"{name}.md"
    path.write_text(text)
    if echo:
        print(text)
    print(f"wrote {out / (name + '.json')} and {path}", file=sys.stderr)
    return path


def load_average() -> str:
    """The 1-minute load average: a busy machine makes every timing here slower and noisier."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"
