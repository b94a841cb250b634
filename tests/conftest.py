"""Shared fixtures. ``tiny_model_dir`` is a real export of a small, randomly initialised decoder
on the real EfficientNet-Lite0 encoder: it exercises every code path quickly, its captions are
nonsense. ``default_model_dir`` is the model shipped in the package."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The fused device search's Triton kernel runs here on CPU tensors, in Triton's interpreter,
# which is chosen when triton is imported (edgecap.decoding.device_kernel)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from edgecap import images  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "examples"


@pytest.fixture(autouse=True)
def _restore_pixel_limit(monkeypatch):
    """The pixel limit is process-wide state (``images.set_max_pixels``, the environment
    variable, Pillow's own guard): every test starts from the defaults and leaves them so."""
    monkeypatch.delenv(images.MAX_PIXELS_ENV, raising=False)
    monkeypatch.setattr(images, "_max_pixels_override", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, pytestconfig) -> Path:
    """Built once a run. Under pytest-xdist (``-n``) the workers share one: the first to need it
    exports it into the run's common temporary folder, holding a file lock, and the others wait
    for it there instead of exporting their own (seconds each). Tests only read it."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from filelock import FileLock  # a dependency of torch
    from helpers import tiny_export

    from edgecap.models.efficientnet_lite import load_pretrained

    # an xdist worker's config has workerinput (not $PYTEST_XDIST_WORKER: a pytest that a test
    # starts in a subprocess inherits that)
    if not hasattr(pytestconfig, "workerinput"):
        return tiny_export(load_pretrained(), tmp_path_factory.mktemp("tiny-model"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's own
    out = shared / "tiny-model"
    with FileLock(str(shared / "tiny-model.lock")):
        if not (out / "manifest.json").is_file():  # the manifest is written last
            shutil.rmtree(out, ignore_errors=True)  # what a worker that failed left
            tiny_export(load_pretrained(), out)
    return out


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    path = Path(__file__).resolve().parents[1] / "edgecap" / "assets" / "default"
    # The package ships its model: a checkout without it is broken, not a reason to skip.
    assert (path / "manifest.json").exists(), f"the shipped model is missing from {path}"
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """A folder with one file of every kind of input (``helpers.make_zoo``)."""
    from helpers import make_zoo

    return make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def photos():
    """Four inputs of different kinds: two paths, an array, a PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # random colours blown up 15x: smooth enough to be a scene to the blank check (pixel noise
    # is "nothing recognisable": its detail is over 2.5 times its spread)
    small = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((90, 120), Image.Resampling.BICUBIC))
    return [
        str(EXAMPLES / "chelsea.png"),
        str(EXAMPLES / "rocket.jpg"),
        smooth,
        Image.open(EXAMPLES / "coffee.png"),
    ]


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".png", ".jpg"})


@pytest.fixture(scope="module")
def any_model_dir(request, tmp_path_factory) -> Path:
    """``tiny_model_dir`` where torch is installed, else a contract-shaped model built with onnx
    helpers only, so the conversion and fake-backend tests run without torch too."""
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.skip.Exception:
        from helpers import contract_model_dir

        return contract_model_dir(tmp_path_factory.mktemp("contract-model"))


@pytest.fixture(scope="session")
def _meteor_process():
    """pycocoevalcap's METEOR scorer, a Java process that loads its tables for seconds: one for
    the whole session (it scores each request on its own); None without Java."""
    from edgecap.evaluation import metrics

    if not metrics.java_available():
        yield None
        return
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    yield meteor
    metrics._close_meteor(meteor)


@pytest.fixture
def built(monkeypatch):
    """The Captioners the commands build (``edgecap.api.Captioner`` made to record each one),
    kept for inspection."""
    from edgecap import api

    made = []

    class Recorded(api.Captioner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(api, "Captioner", Recorded)
    return made


@pytest.fixture
def one_meteor(_meteor_process, monkeypatch):
    """``metrics.score`` starts a METEOR for each call and ends it (``metrics._close_meteor``):
    here every call gets the session's, and what it would end is recorded in ``.closed``."""
    from types import SimpleNamespace

    from pycocoevalcap.meteor import meteor as meteor_module

    from edgecap.evaluation import metrics

    closed: list = []
    monkeypatch.setattr(meteor_module, "Meteor", lambda: _meteor_process)
    monkeypatch.setattr(metrics, "_close_meteor", closed.append)
    return SimpleNamespace(process=_meteor_process, closed=closed)


# The quick subset for the edit-test loop, ``pytest -m "not slow"``: the tests that build the tiny
# model or train (these fixtures) and those listed in slow_tests.txt are marked ``slow``.
SLOW_FIXTURES = {"tiny_model_dir", "any_model_dir", "tiny_dataset", "noise_dataset"}
SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")


def slow_test_ids() -> set[str]:
    lines = SLOW_TESTS.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _gpu_run(config) -> bool:
    return config.getoption("markexpr", "").strip() == "gpu"


def pytest_configure(config):
    """In ``pytest -m gpu``, hypothesis's pytest plugin is left out: no gpu test uses hypothesis,
    and the plugin imports it (2 s) for its end-of-run summary whatever ran."""
    if _gpu_run(config):
        config.pluginmanager.set_blocked("hypothesispytest")


def pytest_ignore_collect(collection_path, config):
    """``pytest -m gpu`` (``benchmarks/gpu_check.py``) selects the ``gpu``-marked tests only: a
    test file that never writes ``mark.gpu`` is not imported for it (every file's imports, torch
    and hypothesis included, and its assertion rewriting: seconds of collection for nothing).
    ``pytest_collection_modifyitems`` checks, in every other run, that each ``gpu``-marked test
    is in a file that says so."""
    if _gpu_run(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if "mark.gpu" not in collection_path.read_text(encoding="utf-8"):
            return True
    return None


def pytest_collection_modifyitems(config, items):
    """``slow``: see ``SLOW_FIXTURES``. ``gpu``-marked tests skip before their fixtures are built
    where torch sees no CUDA GPU, so ``pytest -m gpu`` (``benchmarks/gpu_check.py``) is quick on
    a CPU-only machine."""
    slow_ids = slow_test_ids()
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.nodeid.split("[")[0] in slow_ids:
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    unread = sorted({str(item.path) for item in gpu_items if "mark.gpu" not in item.path.read_text("utf-8")})
    if unread:  # pytest_ignore_collect would leave these out of `pytest -m gpu`
        raise pytest.UsageError(f"gpu-marked tests in a file without the text 'mark.gpu': {unread}")
    if not gpu_items:
        return
    try:
        import torch

        reason = None if torch.cuda.is_available() else "no CUDA GPU (torch sees none)"
    except ImportError:
        reason = "torch is not installed"
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
