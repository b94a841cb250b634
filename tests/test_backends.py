"""The backend registry and the backends against each other: ``auto`` picks the first installed
runtime, a missing runtime names the extra to install, the PyTorch reference gives the same
captions as onnxruntime from the same ONNX weights.

Uses the ``tiny_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from edgecap import BackendError, Captioner, ModelError
from edgecap.backends import load_backend
from edgecap.manifest import load_manifest
from helpers import copy_model


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=8)


def test_unknown_backend(tiny_model_dir):
    with pytest.raises(ValueError, match="onnxruntime"):
        Captioner(tiny_model_dir, backend="tflite")


def test_missing_runtime_names_the_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.delitem(sys.modules, "edgecap.backends.onnxruntime", raising=False)
    with pytest.raises(BackendError, match=r"pip install '\.\[cpu\]'.*pip install '\.\[gpu\]'.*Jetson"):
        load_backend("onnxruntime", load_manifest(tiny_model_dir))


def test_onnxruntime_describe_names_attached_provider(tiny_model_dir):
    backend = load_backend("onnxruntime", load_manifest(tiny_model_dir), threads=1)
    assert "CPUExecutionProvider" in backend.describe()
    assert backend.providers[-1] == "CPUExecutionProvider"


def test_torch_matches_onnxruntime(tiny_model_dir, captioner, photos):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    torch.set_num_threads(1)
    reference = Captioner(tiny_model_dir, backend="torch", max_length=8)
    assert "torch" in reference.backend.describe()
    for a, b in zip(
        reference.caption_batch(photos, return_attention=True),
        captioner.caption_batch(photos, return_attention=True),
    ):
        assert a.tokens == b.tokens
        assert a.score == pytest.approx(b.score, abs=1e-4)
        assert np.allclose(a.attention, b.attention, atol=1e-4)


def test_torch_computes_the_shipped_graphs(default_model_dir, example_images):
    """The torch backend rebuilds the encoder and decoder as PyTorch modules and loads the ONNX
    weights into them: on the shipped model (its graphs exported by an earlier edgecap, not by
    the modules under test, as the tiny model's are) its encoder outputs, image classes and
    decoder steps are onnxruntime's running those graphs, within float rounding, with the
    contract's dtypes."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from edgecap.contract import ENCODER_OUTPUTS
    from edgecap.images import load_rgb, preprocess

    manifest = load_manifest(default_model_dir)
    graphs, modules = load_backend("onnxruntime", manifest), load_backend("torch", manifest)
    images = preprocess([load_rgb(str(p)) for p in example_images[:2]], manifest.preprocessing)
    want, got = graphs.encode(images), modules.encode(images)
    for name in ENCODER_OUTPUTS:
        np.testing.assert_allclose(got.tensors[name].numpy(), want.tensors[name], atol=2e-4, err_msg=name)
    np.testing.assert_allclose(got.class_probs, want.class_probs, atol=1e-5)
    rows = np.repeat(np.arange(len(images), dtype=np.int32), 2)
    a, b = graphs.start(want, rows, return_attention=True), modules.start(got, rows, return_attention=True)
    rng = np.random.default_rng(0)
    source = rows
    for _ in range(3):
        tokens = rng.integers(4, manifest.dims.vocab_size, len(rows)).astype(np.int32)
        ra, rb = a.step(tokens, source), b.step(tokens, source)
        assert rb.topk_ids.dtype == ra.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(rb.topk_ids, ra.topk_ids)
        np.testing.assert_allclose(rb.topk_logprobs, ra.topk_logprobs, atol=2e-4)
        np.testing.assert_allclose(rb.alpha, ra.alpha, atol=1e-5)
        source = (rows * 2 + rng.integers(0, 2, len(rows))).astype(np.int32)


def test_torch_weights_must_match(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    model = copy_model(tiny_model_dir, tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["decoder_config"]["hidden_dim"] += 1
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="decoder.init_h.weight"):
        load_backend("torch", load_manifest(model))


def test_torch_refuses_weights_missing_left_over_or_misshapen(default_model_dir):
    """The torch backend loads the ONNX initializers strictly (``TorchBackend._build``): a
    weight the graphs lack is not left at its random initial value, an extra one is not ignored,
    a misshapen one is a ModelError naming it, not a torch error."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import edgecap.backends.torch as torch_backend
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig

    manifest = load_manifest(default_model_dir)
    weights = torch_backend.read_initializers(manifest)
    decoder = CaptionDecoder(DecoderConfig(**manifest.info["decoder_config"]))
    torch_backend._load(decoder, weights, "decoder.", (), manifest)  # the shipped weights fit
    name = "decoder.init_h.weight"
    changed = {
        "missing": {k: v for k, v in weights.items() if k != name},
        "unexpected": {**weights, "decoder.extra.weight": weights[name]},
        "wrong shape": {**weights, name: weights[name][:, :-1]},
    }
    for problem, edited in changed.items():
        with pytest.raises(ModelError, match=rf"{problem} \['decoder\.(init_h|extra)\.weight"):
            torch_backend._load(decoder, edited, "decoder.", (), manifest)


@pytest.mark.parametrize(
    "installed, expected",
    [
        ({"onnxruntime", "tensorrt", "torch"}, "onnxruntime"),
        ({"tensorrt", "torch"}, "tensorrt"),  # a Jetson: JetPack's TensorRT, no onnxruntime-gpu
        ({"torch"}, "torch"),
    ],
)
def test_auto_picks_the_first_installed_runtime(monkeypatch, installed, expected):
    import types

    from edgecap import backends

    def find_spec(name):  # a package with its __init__.py
        return (
            types.SimpleNamespace(origin=f"/site-packages/{name}/__init__.py") if name in installed else None
        )

    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)
    assert backends.resolve("auto") == expected


def test_auto_passes_over_tensorrts_type_stubs_alone(monkeypatch):
    """README / .ci/run: the TensorRT API stubs are installed for the type check
    (tensorrt-stubs: a ``tensorrt`` folder of .pyi files, a namespace package, no __init__.py),
    and edgecap says that TensorRT is then not installed. So ``auto`` (docs/backends.md:
    onnxruntime when it is installed, else tensorrt, else torch) goes on to torch where
    onnxruntime is missing, instead of choosing a TensorRT backend that cannot start
    ("TensorRT is not installed"). Before the fix it chose tensorrt."""
    import importlib.machinery

    from edgecap import backends

    stubs = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)  # as find_spec gives one
    specs = {
        "tensorrt": stubs,
        "torch": importlib.machinery.ModuleSpec("torch", None, origin="/t/__init__.py"),
    }
    monkeypatch.setattr(backends.importlib.util, "find_spec", specs.get)
    assert stubs.origin is None
    assert backends.resolve("auto") == "torch"
    del specs["torch"]
    with pytest.raises(BackendError, match="no backend is installed"):
        backends.resolve("auto")


def test_auto_without_any_runtime_names_the_extras(monkeypatch):
    from edgecap import backends

    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match=r"pip install '\.\[cpu\]'.*pip install '\.\[gpu\]'"):
        backends.resolve("auto")


@pytest.mark.gpu
def test_torch_cuda_fp16(tiny_model_dir, captioner, photos):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = Captioner(tiny_model_dir, backend="torch", device="cuda", max_length=8)
    half = Captioner(tiny_model_dir, backend="torch", device="cuda", fp16=True, max_length=8)
    for a, b, c in zip(
        gpu.caption_batch(photos), half.caption_batch(photos), captioner.caption_batch(photos)
    ):
        assert a.tokens == c.tokens and a.score == pytest.approx(c.score, abs=1e-3)
        assert np.isfinite(b.score) and b.score == pytest.approx(c.score, abs=0.05)


def test_load_backend_builds_at_least_the_default_engine_limits(monkeypatch, tiny_model_dir):
    """A backend with fixed-size engines is asked for at least 8 images x 5 beams, so the
    engines `edgecap build` makes by default serve smaller requests; larger ones get theirs."""
    import edgecap.backends as registry
    from edgecap.contract import Limits

    got = []

    class Recorder:
        def __init__(self, manifest, device=None, limits=None, **options):
            got.append((device, limits, options))

    monkeypatch.setattr(registry, "backend_class", lambda name: Recorder)
    manifest = load_manifest(tiny_model_dir)
    load_backend("tensorrt", manifest, limits=Limits(2, 3))
    load_backend("tensorrt", manifest, device="cuda", limits=Limits(16, 3), precision="fp32")
    load_backend("onnxruntime", manifest)
    assert got == [
        (None, Limits(8, 5), {}),
        ("cuda", Limits(16, 5), {"precision": "fp32"}),
        (None, Limits(8, 5), {}),
    ]


def test_onnxruntime_threads_do_not_spin_between_runs(tiny_model_dir):
    """Spin-waiting worker threads burn a robot's cores between captions and, on a small CPU,
    slow the search between the step runs (benchmarks/results/spinning.md): off by default."""
    backend = load_backend("onnxruntime", load_manifest(tiny_model_dir), threads=2)
    for session in (backend.encoder, backend.decoder):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_an_unknown_backend_lists_every_name_it_takes():
    """The error for a backend name it does not know lists the names ``--backend`` and
    ``Captioner(backend=...)`` take: the three backends and ``auto`` (docs: README's backends)."""
    from edgecap import backends

    with pytest.raises(ValueError, match="unknown backend 'tflite'; choose one of ") as info:
        backends.resolve("tflite")
    listed = str(info.value).split("choose one of ")[1].split(", ")
    assert sorted(listed) == ["auto", "onnxruntime", "tensorrt", "torch"]


def test_a_backend_module_failing_on_another_import_keeps_its_import_error(monkeypatch, tmp_path):
    """Only a missing runtime (a package one of the extras installs) becomes a BackendError
    naming the extra; a backend module missing from the install says to upgrade edgecap; any
    other ImportError is a bug or a broken install and reaches the caller as it is."""
    from edgecap import backends

    (tmp_path / "edgecap_test_broken_backend.py").write_text("import edgecap_test_no_such_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKENDS, "torch", ("edgecap_test_broken_backend", "Backend"))
    with pytest.raises(ModuleNotFoundError) as info:
        backends.backend_class("torch")
    assert info.value.name == "edgecap_test_no_such_package"
    monkeypatch.setitem(backends.BACKENDS, "torch", ("edgecap_test_absent_backend", "Backend"))
    with pytest.raises(
        BackendError, match="the torch backend is not part of this edgecap install; upgrade edgecap"
    ):
        backends.backend_class("torch")


@pytest.mark.parametrize("missing, extra", [("torch", "train"), ("onnx", "export")])
def test_the_torch_backend_without_its_packages_names_their_extra(monkeypatch, missing, extra):
    """The PyTorch backend needs torch (the train extra) and onnx (the export extra, to read the
    ONNX weights): a missing one is a BackendError naming it and its extra's install line."""
    from edgecap import backends

    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    monkeypatch.delitem(sys.modules, "edgecap.backends.torch", raising=False)
    with pytest.raises(
        BackendError,
        match=rf"the torch backend needs {missing}, which is not installed: .*pip install '\.\[{extra}\]'",
    ):
        backends.backend_class("torch")


def test_the_onnxruntime_hint_warns_against_installing_both_extras():
    """onnxruntime and onnxruntime-gpu installed together break each other: the hint for a
    missing onnxruntime offers the cpu or the gpu extra, not both."""
    from edgecap.backends import missing_package_hint

    hint = missing_package_hint("onnxruntime")
    assert "'.[cpu]'" in hint and "'.[gpu]'" in hint
    assert hint.index("'.[gpu]'") < hint.index("not both")


def test_an_onnxruntime_left_incomplete_is_one_error_saying_how_to_repair_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    """onnxruntime and onnxruntime-gpu install the same files (docs/getting-started.md: pick one):
    uninstalling one after installing both leaves a folder of the other's leftovers, which
    imports as an empty namespace package. Loading the backend is then a BackendError naming the
    folder and the repair, not an AttributeError from deep inside (before the fix: "module
    'onnxruntime' has no attribute 'get_available_providers'", a traceback from the CLI)."""
    import importlib.machinery
    import importlib.util

    leftovers = tmp_path / "site-packages" / "onnxruntime"
    (leftovers / "capi").mkdir(parents=True)
    (leftovers / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("onnxruntime", None, is_package=True)
    spec.submodule_search_locations = [str(leftovers)]  # as Python imports a namespace package
    monkeypatch.setitem(sys.modules, "onnxruntime", importlib.util.module_from_spec(spec))
    monkeypatch.delitem(sys.modules, "edgecap.backends.onnxruntime", raising=False)
    with pytest.raises(
        BackendError,
        match=r"onnxruntime at .*site-packages/onnxruntime is incomplete .*pip uninstall -y "
        r"onnxruntime onnxruntime-gpu, then .*'\.\[cpu\]'",
    ):
        load_backend("onnxruntime", load_manifest(tiny_model_dir))
