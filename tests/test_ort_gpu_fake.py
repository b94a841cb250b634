"""onnxruntime GPU helpers: provider selection (pure logic), attachment warnings (fake sessions),
and the I/O-binding decoder: run for real on onnxruntime's CPU provider (device 'cpu'), and
checked with FAKE OrtValues / bindings for the 'cuda' device strings (fake-based: no
onnxruntime-gpu here, so the CUDA path itself has not run)."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgecap.backends.ort_gpu import IOBindingDecoder
from edgecap.backends.ort_providers import (
    CPU,
    CUDA,
    TENSORRT,
    attached_provider,
    provider_entries,
    providers_for_role,
    select_providers,
    trt_profile_options,
    warn_if_fallback,
)
from edgecap.contract import Limits, ModelDimensions

ALL = [TENSORRT, CUDA, CPU]


def _names(providers):
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def test_select_default_is_cuda_then_cpu_without_tensorrt(tmp_path):
    providers = select_providers(None, ALL, tmp_path)
    assert providers == [(CUDA, {"device_id": 0}), CPU]  # TensorRT EP only when asked for
    assert select_providers("auto", ALL, tmp_path, device_id=1) == [(CUDA, {"device_id": 1}), CPU]


def test_select_tensorrt_when_asked_with_cuda_fallback(tmp_path):
    providers = select_providers("tensorrt", ALL, tmp_path)
    assert _names(providers) == [TENSORRT, CUDA, CPU]
    name, options = providers[0]
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "fp16")  # a folder per precision
    assert options["trt_timing_cache_enable"] is True
    assert providers[1] == (CUDA, {"device_id": 0})
    # CUDA missing: no warning for the fallback edgecap added itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _names(select_providers("trt", [TENSORRT, CPU], tmp_path)) == [TENSORRT, CPU]
    # the user placed CUDA: their order stands
    assert _names(select_providers("cpu,tensorrt,cuda", ALL, tmp_path)) == [CPU, TENSORRT, CUDA]


def test_select_keeps_user_provider_options(tmp_path):
    providers = select_providers(
        [
            ("tensorrt", {"trt_fp16_enable": False, "trt_max_workspace_size": 123}),
            (CUDA, {"arena_extend_strategy": "kSameAsRequested", "device_id": 2}),
            ("cpu", {"arena_extend_strategy": "kNextPowerOfTwo"}),
        ],
        ALL,
        tmp_path,
    )
    (trt_name, trt_opts), (cuda_name, cuda_opts), cpu = providers
    assert trt_name == TENSORRT and trt_opts["trt_fp16_enable"] is False
    assert trt_opts["trt_max_workspace_size"] == 123
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "fp32")  # edgecap's defaults fill the
    # rest, the engine cache that of the user's precision
    assert cuda_opts == {"device_id": 2, "arena_extend_strategy": "kSameAsRequested"}
    assert cpu == (CPU, {"arena_extend_strategy": "kNextPowerOfTwo"})
    single = select_providers((CUDA, {"device_id": 3}), ALL, tmp_path)
    assert single == [(CUDA, {"device_id": 3}), CPU]
    with pytest.raises(ValueError, match="pair"):
        select_providers([("cuda", {}, "extra")], ALL, tmp_path)


def test_select_keeps_only_available_and_cpu_fallback(tmp_path):
    assert select_providers(None, [CPU], tmp_path) == [CPU]
    assert select_providers("auto", [CUDA, CPU], tmp_path) == [(CUDA, {"device_id": 0}), CPU]
    assert select_providers("cpu", ALL, tmp_path) == [CPU]
    got = select_providers("tensorrt", ALL, tmp_path, fp16=False)
    assert got[0][0] == TENSORRT and got[0][1]["trt_fp16_enable"] is False and got[-1] == CPU
    assert select_providers(["cuda", "cpu"], ALL, None)[0] == (CUDA, {"device_id": 0})


def test_select_warns_when_requested_provider_missing(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"CUDAExecutionProvider is not available.*'\.\[gpu\]'"):
        assert select_providers("cuda", [CPU], tmp_path) == [CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_providers(None, [CPU], tmp_path)  # auto: no warning


def test_provider_entries_aliases_and_errors():
    def names(request):
        return [name for name, _ in provider_entries(request)]

    assert names("trt,cuda") == [TENSORRT, CUDA]
    assert names(["GPU", CPU, "cpu"]) == [CUDA, CPU]
    assert names("OpenVINOExecutionProvider") == ["OpenVINOExecutionProvider"]
    with pytest.raises(ValueError, match="unknown execution provider"):
        provider_entries("tpu")


def test_a_tuple_of_names_is_a_list_of_providers_not_a_name_with_options(tmp_path):
    """providers=("cuda", "cpu") is two providers, as the list is; only (name, dict) is one
    provider with its options."""
    assert provider_entries(("cuda", "cpu")) == [(CUDA, {}), (CPU, {})]
    assert provider_entries(("tensorrt", {"trt_fp16_enable": False})) == [
        (TENSORRT, {"trt_fp16_enable": False})
    ]
    assert select_providers(("cuda", "cpu"), ALL, tmp_path) == [(CUDA, {"device_id": 0}), CPU]


def test_tensorrt_keeps_its_engine_and_timing_caches_in_the_folder_given(tmp_path):
    """Both caches in ``cache_dir`` (the module's doc): a timing cache kept elsewhere would be
    rebuilt, or shared with another model's engines, behind the user's back. The engines in a
    folder per precision: the TensorRT EP's docs say an engine is built for one precision and
    must be rebuilt when it changes, and older EPs name the file the same either way."""
    name, options = select_providers("tensorrt", ALL, tmp_path / "cache")[0]
    assert name == TENSORRT
    assert options["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert options["trt_engine_cache_path"] == str(tmp_path / "cache" / "fp16")
    fp32 = select_providers("tensorrt", ALL, tmp_path / "cache", fp16=False)[0][1]
    assert fp32["trt_engine_cache_path"] == str(tmp_path / "cache" / "fp32")
    as_text = select_providers([("tensorrt", {"trt_fp16_enable": "0"})], ALL, tmp_path / "cache")[0][1]
    assert as_text["trt_engine_cache_path"] == str(tmp_path / "cache" / "fp32")  # "0": FP32
    own = select_providers([("tensorrt", {"trt_engine_cache_path": "/mine"})], ALL, tmp_path)[0][1]
    assert own["trt_engine_cache_path"] == "/mine" and own["trt_fp16_enable"] is True


def test_fake_session_attachment_warning():
    session = types.SimpleNamespace(get_providers=lambda: [CPU])
    assert attached_provider(session) == CPU
    with pytest.warns(RuntimeWarning, match="could not use CUDAExecutionProvider"):
        assert warn_if_fallback(session, [(CUDA, {}), CPU]) == CPU
    gpu = types.SimpleNamespace(get_providers=lambda: [CUDA, CPU])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_fallback(gpu, [(CUDA, {}), CPU]) == CUDA


def test_tensorrt_and_its_cuda_fallback_run_on_the_gpu_asked_for(tmp_path):
    """device_id=1 on a two-GPU machine: the TensorRT EP and the CUDA EP edgecap puts behind it
    both run on GPU 1, not on GPU 0."""
    (trt_name, trt_opts), cuda, cpu = select_providers("tensorrt", ALL, tmp_path, device_id=1)
    assert trt_name == TENSORRT and trt_opts["device_id"] == 1
    assert cuda == (CUDA, {"device_id": 1}) and cpu == CPU


@pytest.fixture
def ort_backend(monkeypatch):
    """edgecap.backends.onnxruntime with FAKE providers: this onnxruntime is told it has all
    three; ``attach(...)`` sets the providers each session reports (``_session`` is replaced,
    so no graph is loaded: the checks before and after the sessions are made)."""
    pytest.importorskip("onnxruntime")
    import edgecap.backends.onnxruntime as module

    monkeypatch.setattr(module.ort, "get_available_providers", lambda: list(ALL))

    def attach(*providers):
        session = types.SimpleNamespace(get_providers=lambda: list(providers), get_inputs=lambda: [])
        monkeypatch.setattr(module.OnnxRuntimeBackend, "_session", lambda self, *args: session)

    monkeypatch.setattr(module, "attach", attach, raising=False)  # removed after the test
    return module


# a manifest stand-in: the backend reads only top_k before it makes its sessions
STUB = types.SimpleNamespace(dims=types.SimpleNamespace(top_k=5, vocab_size=20))


def test_device_cpu_stays_off_an_available_gpu_and_providers_win_over_device(ort_backend):
    """device="cpu" on a machine whose onnxruntime has CUDA runs on the CPU; a providers= list
    wins over device (OnnxRuntimeBackend's documentation)."""
    assert ort_backend.select_providers(None, "cpu") == [CPU]
    assert ort_backend.select_providers(None, "cuda") == [(CUDA, {"device_id": 0}), CPU]
    assert ort_backend.select_providers(None, None) == [(CUDA, {"device_id": 0}), CPU]
    assert ort_backend.select_providers(["cpu"], "cuda") == [CPU]
    assert _names(ort_backend.select_providers("tensorrt", "cpu")) == [TENSORRT, CUDA, CPU]


def test_device_cuda_is_a_requirement_and_providers_a_preference(ort_backend, monkeypatch):
    """device="cuda" fails when this onnxruntime has no CUDA or CUDA did not attach (the CPU is
    not used silently); providers=["cuda"] falls back to the CPU with a warning naming the
    graph, and then decodes with numpy feeds."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ort_backend.BackendError, match="device='cuda' but this onnxruntime has no CUDA"):
        ort_backend.OnnxRuntimeBackend(STUB, device="cuda")
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(ALL))
    ort_backend.attach(CPU)  # CUDA listed, but its libraries failed to load
    with pytest.raises(ort_backend.BackendError, match="could not use CUDA for the encoder graph"):
        ort_backend.OnnxRuntimeBackend(STUB, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not use CUDAExecutionProvider") as warned:
        backend = ort_backend.OnnxRuntimeBackend(STUB, providers=["cuda"])
    assert ["encoder graph" in str(w.message) for w in warned] == [True, False]
    assert "decoder_step graph" in str(warned[1].message)
    assert backend.providers == [CPU] and backend._device_decoder is None


@pytest.mark.parametrize("attached", [(CUDA, CPU), (TENSORRT, CUDA, CPU)])
def test_a_gpu_provider_keeps_the_decoder_state_on_the_gpu_asked_for(ort_backend, monkeypatch, attached):
    """CUDA or the TensorRT EP attached: the image tensors and h / c stay on the device
    (``ort_gpu.IOBindingDecoder``, OnnxRuntimeBackend's documentation) of ``device_id``."""
    made = []
    monkeypatch.setattr(ort_backend.ort_gpu, "IOBindingDecoder", lambda *a, **kw: made.append(kw) or "bound")
    ort_backend.attach(*attached)
    own_profile = {"trt_profile_min_shapes": "h:1x10"}  # no profile from the stand-in manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what was asked for attached: no fallback warning
        backend = ort_backend.OnnxRuntimeBackend(STUB, providers=[(attached[0], own_profile)], device_id=1)
    assert backend._device_decoder == "bound"
    assert made == [{"device": "cuda", "device_id": 1}]


def test_providers_win_over_device_cuda_too(ort_backend, monkeypatch):
    """``device`` is used only when ``providers`` is None (OnnxRuntimeBackend's documentation):
    providers=["cpu"] with device="cuda" runs on the CPU, on an onnxruntime without CUDA and
    on one whose CUDA would not attach, without an error or a warning."""
    ort_backend.attach(CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [CPU])
        assert ort_backend.OnnxRuntimeBackend(STUB, providers=["cpu"], device="cuda").providers == [CPU]
        monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(ALL))
        backend = ort_backend.OnnxRuntimeBackend(STUB, providers=["cpu"], device="cuda")
    assert backend.providers == [CPU] and backend._device_decoder is None


@pytest.mark.parametrize("device", ["gpu", "cuda:0", "CPU"])
def test_a_device_other_than_cpu_or_cuda_is_a_value_error_naming_both(ort_backend, device):
    """device is "cpu" or "cuda" (OnnxRuntimeBackend's documentation; torch's "cuda:0" is not
    one): anything else is a ValueError naming the two, not a KeyError from inside."""
    ort_backend.attach(CPU)
    for make in (
        lambda: ort_backend.select_providers(None, device),
        lambda: ort_backend.OnnxRuntimeBackend(STUB, device=device),
    ):
        with pytest.raises(ValueError, match="device must be one of") as raised:
            make()
        assert "'cpu'" in str(raised.value) and "'cuda'" in str(raised.value)
        assert repr(device) in str(raised.value)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2", 10**5])
def test_the_backend_made_directly_refuses_bad_threads(ort_backend, threads):
    """OnnxRuntimeBackend made without a Captioner checks ``threads`` itself (a whole number
    from 1; docs/performance-options.md): 0 would silently mean "one per physical core",
    True one thread, 10**5 minutes and gigabytes of thread pool."""
    ort_backend.attach(CPU)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ort_backend.OnnxRuntimeBackend(STUB, device="cpu", threads=threads)


def test_a_step_graph_that_fell_back_to_the_cpu_decodes_with_numpy_feeds(ort_backend, monkeypatch):
    """The encoder on CUDA but the decoder step fallen back to the CPU (its own warning): h / c
    live where the step graph runs, so the backend's providers are the step's and it decodes
    with numpy feeds, not with CUDA bindings into a CPU session."""
    made = []
    monkeypatch.setattr(ort_backend.ort_gpu, "IOBindingDecoder", lambda *a, **kw: made.append(kw) or "bound")
    sessions = {
        role: types.SimpleNamespace(get_providers=lambda p=attached: list(p), get_inputs=lambda: [])
        for role, attached in (("encoder", [CUDA, CPU]), ("decoder_step", [CPU]))
    }
    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "_session", lambda self, role, *a: sessions[role])
    with pytest.warns(RuntimeWarning, match="decoder_step graph"):
        backend = ort_backend.OnnxRuntimeBackend(STUB, providers=["cuda"])
    assert backend.providers == [CPU]
    assert backend._device_decoder is None and made == []


def test_providers_onnxruntime_refuses_are_a_backend_error(ort_backend, monkeypatch, default_model_dir):
    """A ValueError from onnxruntime's provider arguments (here its own message for two
    TensorRT providers in one session) says the providers were refused (BackendError), not
    that the graph file may be corrupt and must be re-copied (ModelError)."""
    from edgecap.errors import ModelError
    from edgecap.manifest import load_manifest

    def refuse(path, options=None, providers=None):
        raise ValueError(
            "Cannot enable both 'TensorrtExecutionProvider' and 'NvTensorRTRTXExecutionProvider' "
            "in the same session."
        )

    monkeypatch.setattr(ort_backend.ort, "InferenceSession", refuse)
    with pytest.raises(ort_backend.BackendError, match="refused the providers") as raised:
        ort_backend.OnnxRuntimeBackend(load_manifest(default_model_dir), providers=["cpu"])
    assert not isinstance(raised.value, ModelError)
    assert "Cannot enable both" in str(raised.value)


def test_trt_profile_options_from_manifest():
    manifest = MANIFEST
    enc = trt_profile_options(manifest, "encoder", Limits(8, 5))
    assert enc["trt_profile_max_shapes"] == "image:8x3x224x224"
    step = trt_profile_options(manifest, "decoder_step", Limits(8, 5))
    assert "h:40x512" in step["trt_profile_max_shapes"]
    assert "features:8x49x512" in step["trt_profile_max_shapes"]
    assert "tokens:5" in step["trt_profile_opt_shapes"]
    assert "h:1x512" in step["trt_profile_min_shapes"]


MANIFEST = types.SimpleNamespace(
    dims=ModelDimensions(
        regions=49,
        feature_dim=512,
        attention_dim=256,
        hidden_dim=512,
        vocab_size=100,
        top_k=10,
        n_classes=1000,
    ),
    preprocessing=types.SimpleNamespace(size=(224, 224)),
)


def test_providers_for_role_wires_profiles_into_tensorrt_only(tmp_path):
    providers = select_providers("tensorrt", ALL, tmp_path)
    enc = providers_for_role(providers, MANIFEST, "encoder", Limits(8, 5))
    step = providers_for_role(providers, MANIFEST, "decoder_step", Limits(4, 3))
    assert enc[0][1]["trt_profile_max_shapes"] == "image:8x3x224x224"
    shapes = {
        key: dict(part.split(":") for part in step[0][1][key].split(","))
        for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    }
    # every dynamic step input has a range; h/c take S rows: N (first step) up to R = N x K
    assert set(shapes["trt_profile_max_shapes"]) == {
        "tokens",
        "source_rows",
        "image_index",
        "h",
        "c",
        "features",
        "att_proj",
        "word_bias",
    }
    assert shapes["trt_profile_max_shapes"]["word_bias"] == "12x100"
    assert shapes["trt_profile_max_shapes"]["h"] == "12x512"
    assert shapes["trt_profile_min_shapes"]["c"] == "1x512"
    assert shapes["trt_profile_opt_shapes"]["tokens"] == "3"
    assert shapes["trt_profile_max_shapes"]["features"] == "4x49x512"
    assert enc[1:] == providers[1:] and step[1:] == providers[1:]  # CUDA / CPU untouched
    assert "trt_profile_min_shapes" not in providers[0][1]  # no mutation
    # the user's own profile shapes win
    mine = {
        "trt_profile_min_shapes": "image:2x3x224x224",
        "trt_profile_opt_shapes": "image:2x3x224x224",
        "trt_profile_max_shapes": "image:2x3x224x224",
    }
    own = select_providers([("tensorrt", mine)], ALL, tmp_path)
    assert providers_for_role(own, MANIFEST, "encoder")[0][1]["trt_profile_max_shapes"] == "image:2x3x224x224"
    assert providers_for_role([(CUDA, {}), CPU], MANIFEST, "encoder") == [(CUDA, {}), CPU]


def test_fake_onnxruntime_backend_passes_role_profiles(monkeypatch, model_dir):
    """FAKE providers: onnxruntime is told it has TensorRT and CUDA; the sessions really run on
    the CPU, so the backend warns that TensorRT did not attach and decodes with numpy feeds."""
    ort = pytest.importorskip("onnxruntime")
    import edgecap.backends.onnxruntime as ort_backend
    from edgecap.manifest import load_manifest

    real = ort.InferenceSession
    asked = []

    def fake_session(path, options=None, providers=None):
        asked.append((Path(path).name, providers))
        return real(path, options, providers=[CPU])

    monkeypatch.setattr(ort_backend.ort, "InferenceSession", fake_session)
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: ALL)
    m = load_manifest(model_dir)
    with pytest.warns(RuntimeWarning, match="could not use TensorrtExecutionProvider"):
        backend = ort_backend.OnnxRuntimeBackend(
            m, providers=[("tensorrt", {"trt_fp16_enable": False})], threads=1, limits=Limits(2, 3)
        )
    (enc_file, enc_providers), (step_file, step_providers) = asked
    assert enc_file == m.files["encoder"] and step_file == m.files["decoder_step"]
    enc_opts, step_opts = enc_providers[0][1], step_providers[0][1]
    assert enc_opts["trt_fp16_enable"] is False and step_opts["trt_fp16_enable"] is False
    h, w = m.preprocessing.size
    assert enc_opts["trt_profile_max_shapes"] == f"image:2x3x{h}x{w}"
    assert f"h:6x{m.dims.hidden_dim}" in step_opts["trt_profile_max_shapes"]
    assert _names(enc_providers) == [TENSORRT, CUDA, CPU]
    assert backend._device_decoder is None  # CPU attached: numpy feeds

    asked.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [CPU])
        ort_backend.OnnxRuntimeBackend(m, threads=1)  # default: no TensorRT EP, no warning
    assert [p for _, p in asked] == [[CPU], [CPU]]


def test_fake_tensorrt_ep_runs_the_encoder_fp32_behind_the_fp16_step(monkeypatch, model_dir, tmp_path):
    """FAKE providers: with the TensorRT EP's FP16 (the default), the encoder graph's session
    asks for FP32 and the FP32 engine cache, the decoder step's for FP16 (the FP16 that keeps the
    captions, as the torch and TensorRT backends run it); ``fp32_encoder=False``: both FP16; the
    user's own ``trt_fp16_enable`` holds for both graphs; ``fp32_encoder=True`` without FP16 is
    refused before any session is made."""
    ort = pytest.importorskip("onnxruntime")
    import edgecap.backends.onnxruntime as ort_backend
    from edgecap.manifest import load_manifest

    real = ort.InferenceSession
    asked = []

    def fake_session(path, options=None, providers=None):
        asked.append(providers[0][1])  # the TensorRT EP's options
        return real(path, options, providers=[CPU])

    monkeypatch.setattr(ort_backend.ort, "InferenceSession", fake_session)
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: ALL)
    m = load_manifest(model_dir)

    def precisions(**keywords):
        asked.clear()
        with pytest.warns(RuntimeWarning, match="could not use TensorrtExecutionProvider"):
            ort_backend.OnnxRuntimeBackend(m, threads=1, cache_dir=str(tmp_path), **keywords)
        return [(o["trt_fp16_enable"], Path(o["trt_engine_cache_path"]).name) for o in asked]

    assert precisions(providers="tensorrt") == [(False, "fp32"), (True, "fp16")]  # encoder, step
    assert precisions(providers="tensorrt", fp32_encoder=False) == [(True, "fp16"), (True, "fp16")]
    assert precisions(providers="tensorrt", fp16=False) == [(False, "fp32"), (False, "fp32")]
    mine = [("tensorrt", {"trt_fp16_enable": True})]
    assert precisions(providers=mine) == [(True, "fp16"), (True, "fp16")]
    asked.clear()
    with pytest.raises(ValueError, match="fp32_encoder=True goes with fp16=True"):
        ort_backend.OnnxRuntimeBackend(m, providers="tensorrt", fp16=False, fp32_encoder=True)
    assert asked == []


# -- the I/O-binding decoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(any_model_dir) -> Path:
    return any_model_dir


class _OutputFreedOnClear:
    """An OrtValue that ``IOBinding.get_outputs()`` gave, as onnxruntime 1.16.3 to 1.23.2 have
    it (every release with a Python 3.10 wheel; edgecap[gpu] asks for onnxruntime-gpu >= 1.16):
    the binding's own, its buffer freed by ``clear_binding_outputs()``, after which ``numpy()``
    read freed memory (seen: garbage log-probabilities and word ids, once a segfault); here a
    ValueError. Checked with 1.16.3, 1.17.3, 1.19.2, 1.20.1, 1.22.1, 1.23.2 on the CPU provider;
    1.32 keeps them."""

    def __init__(self, value):
        self._value, self.freed = value, False

    def numpy(self):
        if self.freed:
            raise ValueError("OrtValue read after clear_binding_outputs(): its memory was freed")
        return self._value.numpy()

    def __getattr__(self, name):
        return getattr(self._value, name)


class _BindingFreeingOnClear:
    """An IOBinding whose outputs are freed by ``clear_binding_outputs()`` (see above)."""

    def __init__(self, binding):
        self.binding, self._given = binding, []

    def get_outputs(self):
        values = [_OutputFreedOnClear(v) for v in self.binding.get_outputs()]
        self._given += values
        return values

    def clear_binding_outputs(self):
        for value in self._given:
            value.freed = True
        self._given = []
        self.binding.clear_binding_outputs()

    def __getattr__(self, name):  # the bind_* calls
        return getattr(self.binding, name)


class _SessionFreeingOnClear:
    def __init__(self, session):
        self._session = session

    def io_binding(self):
        return _BindingFreeingOnClear(self._session.io_binding())

    def run_with_iobinding(self, io, *args):
        return self._session.run_with_iobinding(io.binding, *args)


@pytest.mark.parametrize("freed_on_clear", [False, True], ids=["onnxruntime-1.32", "onnxruntime-1.16-1.23"])
def test_iobinding_decoder_on_cpu_matches_plain_run(model_dir, freed_on_clear):
    """With onnxruntime up to 1.23.2 too: each step's results are read before its outputs are
    cleared (before the fix they were read after it: garbage log-probabilities and word ids
    with a real onnxruntime 1.16.3)."""
    ort = pytest.importorskip("onnxruntime")
    from edgecap.manifest import load_manifest

    m = load_manifest(model_dir)
    enc = ort.InferenceSession(str(m.path("encoder")), providers=[CPU])
    step = ort.InferenceSession(str(m.path("decoder_step")), providers=[CPU])
    h, w = m.preprocessing.size
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    image_index = np.array([0, 0, 1, 1], np.int32)
    steps = [
        (np.full(4, m.tokens["start"], np.int32), image_index.copy()),
        (np.array([5, 6, 7, 8], np.int32), np.array([1, 0, 3, 2], np.int32)),
        (np.array([9, 9, 4, 4], np.int32), np.array([0, 0, 2, 3], np.int32)),
    ]

    V = m.dims.vocab_size
    bias = np.zeros((4, V), np.float32)
    bias[:, V - 1] = 30.0  # steers every row to the last word
    biases = [None, bias, None]  # and back: the zeros are bound again

    decoder = IOBindingDecoder(enc, _SessionFreeingOnClear(step) if freed_on_clear else step, V, device="cpu")
    encoded = decoder.encode(images)
    session = decoder.start(encoded, image_index, return_attention=True)
    got = [session.step(t, s, b) for (t, s), b in zip(steps, biases)]

    features, att_proj, hs, cs, probs = enc.run(None, {"image": images})
    np.testing.assert_allclose(encoded["class_probs"].numpy(), probs, rtol=1e-6, atol=1e-7)
    for (tokens, source_rows), b, result in zip(steps, biases, got):
        lp, ids, hs, cs, alpha = step.run(
            None,
            {
                "tokens": tokens,
                "h": hs,
                "c": cs,
                "source_rows": source_rows,
                "features": features,
                "att_proj": att_proj,
                "image_index": image_index,
                "word_bias": np.zeros((4, V), np.float32) if b is None else b,
            },
        )
        if b is not None:
            assert (ids[:, 0] == V - 1).all()
        np.testing.assert_allclose(result.topk_logprobs, lp, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(result.topk_ids, ids)
        np.testing.assert_allclose(result.alpha, alpha, rtol=1e-6, atol=1e-6)


class _FakeValue:
    def __init__(self, shape, device, tag):
        self._shape, self.device, self.tag = tuple(shape), device, tag

    def shape(self):
        return list(self._shape)

    def numpy(self):
        assert self.device == "cpu", "copied a device tensor to the host"
        return np.zeros(self._shape, np.float32)

    def update_inplace(self, data):  # (its array: what a fake run reads from it)
        assert data.shape == self._shape and data.dtype == self.array.dtype
        self.array[...] = data


def test_fake_iobinding_keeps_state_on_cuda():
    made = []

    def from_shape(shape, dtype, device, idx):
        made.append(_FakeValue(shape, device, f"state{len(made)}"))
        return made[-1]

    fake_ort = types.SimpleNamespace(
        OrtValue=types.SimpleNamespace(
            ortvalue_from_numpy=lambda a, d, i: _FakeValue(a.shape, d, "image_index"),
            ortvalue_from_shape_and_type=from_shape,
        )
    )

    class Binding:
        def __init__(self):
            self.inputs, self.outputs, self.log = {}, [], []

        def bind_cpu_input(self, name, array):
            self.inputs[name] = ("cpu", array)

        def bind_ortvalue_input(self, name, value):
            self.inputs[name] = (value.device, value)

        def bind_output(self, name, device, device_id=0):
            self.outputs.append((name, _FakeValue((4, 3), device, name)))

        def bind_ortvalue_output(self, name, value):
            self.outputs.append((name, value))

        def get_outputs(self):
            return [v for _, v in self.outputs]

        def clear_binding_outputs(self):
            self.log.append({n: v for n, v in self.outputs})
            self.outputs = []

    binding = Binding()
    step_session = types.SimpleNamespace(io_binding=lambda: binding, run_with_iobinding=lambda b: None)
    decoder = IOBindingDecoder.__new__(IOBindingDecoder)
    decoder._ort, decoder.step_session = fake_ort, step_session
    decoder.device, decoder.device_id, decoder.vocab_size = "cuda", 0, 20
    encoded = {
        "features": _FakeValue((2, 4, 8), "cuda", "features"),
        "att_proj": _FakeValue((2, 4, 6), "cuda", "att_proj"),
        "h0": _FakeValue((2, 10), "cuda", "h0"),
        "c0": _FakeValue((2, 10), "cuda", "c0"),
    }
    session = decoder.start(encoded, np.array([0, 0, 1, 1], np.int32))
    assert binding.inputs["features"] == ("cuda", encoded["features"])
    assert binding.inputs["image_index"][0] == "cuda"
    assert [v.device for v in made] == ["cuda"] * 4 and made[0].shape() == [4, 10]

    reads = []
    for _ in range(3):
        result = session.step(np.zeros(4, np.int32), np.arange(4, dtype=np.int32))
        reads.append(binding.inputs["h"][1].tag)
        assert result.alpha is None
        assert binding.inputs["word_bias"][0] == "cuda"  # no bias: device zeros, no upload
    writes = [entry["h_out"].tag for entry in binding.log]
    assert reads == ["h0", writes[0], writes[1]]  # state never leaves the device
    assert writes[0] != writes[1] and writes[2] == writes[0]  # ping-pong
    assert all(entry["alpha"].device == "cuda" for entry in binding.log)  # not copied back
    assert all(entry["topk_ids"].device == "cpu" for entry in binding.log)


def test_fake_iobinding_beam_session_keeps_state_on_cuda_and_never_writes_what_it_reads(monkeypatch):
    """search="graph" on a GPU provider (``ort_beam.IOBindingBeamSession``): the beam-step graph
    reads h / c and the tag bonus's rows still steered from one set of device tensors and writes
    the reordered ones into the other set (in place, a row could be overwritten before the rows
    pointing at it are read); only the (R,) results come back to the host, written by
    onnxruntime into host arrays bound once; each word's tokens, source rows and scores reach
    the graph (bound at each word); a bias or blocked words go up only on the words that have
    them. The fake binding copies a host input to the device when it is bound, as
    onnxruntime's ``IOBinding::BindInput`` does for a graph on another device
    (``utils::CopyOneInputAcrossDevices``): a host array bound once and written in place later
    is not seen (the bug a review found in a first version of the session)."""
    import sys

    from edgecap.backends.ort_beam import IOBindingBeamSession
    from edgecap.build.beam_step import BEAM_OUTPUTS
    from edgecap.decoding.graph_search import GraphRules

    made = []

    def from_numpy(array, device, device_id):
        made.append(_FakeValue(array.shape, device, "from_numpy"))
        # a host OrtValue is the array's own memory; a device one, a copy
        made[-1].array = array if device == "cpu" else array.copy()
        return made[-1]

    def from_shape(shape, dtype, device, device_id):
        made.append(_FakeValue(shape, device, f"state{len(made)}"))
        made[-1].array = np.zeros(shape, dtype)
        return made[-1]

    fake_ort = types.SimpleNamespace(
        OrtValue=types.SimpleNamespace(
            ortvalue_from_numpy=from_numpy, ortvalue_from_shape_and_type=from_shape
        )
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)
    runs, bindings = [], []

    class Binding:
        def __init__(self):
            self.inputs, self.outputs, self.binds, self.seen = {}, {}, 0, {}

        def bind_cpu_input(self, name, array):
            self.inputs[name] = _FakeValue(array.shape, "cpu", name)
            self.inputs[name].array = array
            self.seen[name] = array.copy()  # copied up now
            self.binds += 1

        def bind_ortvalue_input(self, name, value):
            self.inputs[name] = value
            # a host value copied up now; a device one read where it lies at each run
            self.seen[name] = value.array.copy() if value.device == "cpu" else value
            self.binds += 1

        def read(self, name):  # what the graph reads for an input at a run
            seen = self.seen[name]
            return seen.array.copy() if isinstance(seen, _FakeValue) else seen

        def bind_ortvalue_output(self, name, value):
            self.outputs[name] = value
            self.binds += 1

    def io_binding():
        bindings.append(Binding())
        return bindings[-1]

    def run(binding):
        word = len(runs)
        runs.append(
            {name: binding.inputs[name] for name in ("h", "c", "steered", "word_bias", "blocked_words")}
        )
        runs[-1]["out"] = [binding.outputs[name] for name in ("h_next", "c_next", "steered_next")]
        runs[-1]["binds"] = sum(b.binds for b in bindings)
        runs[-1]["read"] = {name: binding.read(name) for name in ("tokens", "source_rows", "scores")}
        for name in ("next_tokens", "next_scores"):  # what the graph writes back this word
            binding.outputs[name].array[:] = word + 10

    step_session = types.SimpleNamespace(io_binding=io_binding, run_with_iobinding=run)
    encoded = {name: _FakeValue((2, 10), "cuda", name) for name in ("features", "att_proj", "h0", "c0")}
    rules = GraphRules(
        {"tag_bias": np.zeros((4, 20), np.float32)}, {"steered": np.ones(4, np.float32)}, None, None
    )
    session = IOBindingBeamSession(
        step_session, encoded, np.array([0, 0, 1, 1], np.int32), 20, "cuda", 0, rules
    )
    first_steered = session._current["steered"]  # the rules' first value, on the device
    blocked = np.full((4, 200), -1, np.int32)
    blocked[0, 0] = 7
    bias = np.ones((4, 20), np.float32)
    results = []
    for word in range(5):  # a bias at the second word, blocked words at the third
        has_bias, has_blocks = word == 1, word == 2
        results.append(
            session.step(
                np.full(4, word),
                np.arange(4)[::-1],
                np.full(4, -word),
                bias if has_bias else None,
                blocked if has_blocks else None,
            )
        )
        binding = bindings[0 if word == 0 else 1 + (word - 1) % 2]
        assert binding.inputs["word_bias"].device == ("cpu" if has_bias else "cuda")
        assert binding.inputs["blocked_words"].device == ("cpu" if has_blocks else "cuda")
        assert binding.inputs["tag_bias"].device == "cuda"
        assert [binding.inputs[name].device for name in ("tokens", "source_rows", "scores")] == ["cpu"] * 3
        read = runs[-1]["read"]  # this word's, as the graph reads them
        assert read["tokens"].tolist() == [word] * 4 and read["tokens"].dtype == np.int32
        assert read["source_rows"].tolist() == [3, 2, 1, 0] and read["scores"].tolist() == [-word] * 4
    assert len(bindings) == 3  # the first word's, then two in turn, all bound before the first run
    # a word binds its three inputs, and the bias and the blocked words only where its binding
    # held others: both at words 1 to 3 (counted from 1: a binding's first use, or the bias and
    # the blocks), the zeros again at word 4 (its binding held the bias), the no-blocks again
    # at word 5
    assert [r["binds"] for r in runs] == [runs[0]["binds"] + n for n in (0, 5, 10, 14, 18)]
    assert [r.next_tokens.tolist() for r in results] == [[10 + w] * 4 for w in range(5)]  # kept apart
    assert results[0].next_tokens.dtype == np.int32 and results[0].next_scores.dtype == np.float32
    first = {"out": [encoded["h0"], encoded["c0"], first_steered]}
    for before, now in zip([first] + runs, runs):
        # what the last step wrote, never in place
        assert (now["h"], now["c"], now["steered"]) == tuple(before["out"][:3])
        assert all(now[name] is not now["out"][i] for i, name in enumerate(("h", "c", "steered")))
        assert [v.device for v in now["out"]] == ["cuda"] * 3
    # two sets, written in turn
    assert runs[0]["out"][0] is runs[2]["out"][0] and runs[1]["out"][0] is runs[3]["out"][0]
    assert runs[0]["out"][0] is not runs[1]["out"][0]
    assert {
        b.outputs[name].device for b in bindings for name in BEAM_OUTPUTS if not name.endswith("_next")
    } == {"cpu"}


def test_fake_graph_search_on_a_second_gpu_makes_its_beam_state_on_that_gpu(monkeypatch):
    """search="graph" with ``device_id=1``: the image index, both h / c pairs, the zeros and the
    no-blocked-words -1s the beam-step session makes are on GPU 1, where the encoder's tensors
    are (the backend's ``device_id``: the GPU asked for), not on GPU 0."""
    import sys

    from edgecap.backends import ort_beam
    from edgecap.decoding import CaptionOptions

    made = []
    fake_ort = types.SimpleNamespace(
        OrtValue=types.SimpleNamespace(
            ortvalue_from_numpy=lambda a, d, i: made.append((d, i)) or _FakeValue(a.shape, d, "numpy"),
            ortvalue_from_shape_and_type=lambda s, t, d, i: made.append((d, i)) or _FakeValue(s, d, "state"),
        )
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)
    binding = types.SimpleNamespace(
        bind_ortvalue_input=lambda name, value: None, bind_ortvalue_output=lambda name, value: None
    )
    step_session = types.SimpleNamespace(io_binding=lambda: binding)
    backend = types.SimpleNamespace(
        manifest=types.SimpleNamespace(dims=types.SimpleNamespace(top_k=5, vocab_size=20, hidden_dim=10)),
        _device_decoder=types.SimpleNamespace(device="cuda", device_id=1),
        describe=lambda: "fake",
    )
    search = ort_beam.OnnxGraphSearch(backend)
    monkeypatch.setattr(search, "session", lambda beam, end_id, lms=None: step_session)
    sessions = []
    monkeypatch.setattr(
        ort_beam, "search_with_rules", lambda session, *args, **kwargs: sessions.append(session) or []
    )
    tensors = {name: _FakeValue((2, 10), "cuda", name) for name in ("features", "att_proj", "h0", "c0")}
    encoded = types.SimpleNamespace(n_images=2, tensors=tensors, class_probs=np.zeros((2, 1000), np.float32))
    search(encoded, CaptionOptions(beam_size=2), 1, 2, None, None)
    assert [type(s) for s in sessions] == [ort_beam.IOBindingBeamSession]
    # on the GPU: image index, tag rows, rows steered, two sets of h / c / steered, zeros, no
    # blocked words; on the host (device "cpu", 0): the ten results
    on_gpu = [where for where in made if where[0] != "cpu"]
    assert len(on_gpu) == 11 and set(on_gpu) == {("cuda", 1)}
    assert made.count(("cpu", 0)) == 10 == len(made) - 11


def test_fake_iobinding_on_a_second_gpu_keeps_every_device_tensor_on_that_gpu():
    """``IOBindingDecoder(device="cuda", device_id=1)``: the encoder's features, att_proj, h0 and
    c0, the image index, both state pairs, the no-bias zeros and the unread alpha are all on
    GPU 1 (a tensor on GPU 0 would be another device's memory to the graph); the class
    probabilities come to the host (the backend reads them with ``numpy()``), as do the top K,
    and alpha when asked for."""
    made = []
    fake_ort = types.SimpleNamespace(
        OrtValue=types.SimpleNamespace(
            ortvalue_from_numpy=lambda a, d, i: made.append((d, i)) or _FakeValue(a.shape, d, "numpy"),
            ortvalue_from_shape_and_type=lambda s, t, d, i: made.append((d, i)) or _FakeValue(s, d, "state"),
        )
    )

    class Binding:
        def __init__(self):
            self.outputs = []

        def bind_cpu_input(self, name, array):
            pass

        def bind_ortvalue_input(self, name, value):
            pass

        def bind_output(self, name, device, device_id=0):
            self.outputs.append((name, device, device_id))

        def bind_ortvalue_output(self, name, value):
            self.outputs.append((name, value.device, "value"))

        def get_outputs(self):
            return [_FakeValue((4, 3), device, name) for name, device, _ in self.outputs]

        def clear_binding_outputs(self):
            pass

    encoder_binding, step_binding = Binding(), Binding()
    encoder = types.SimpleNamespace(io_binding=lambda: encoder_binding, run_with_iobinding=lambda b: None)
    step = types.SimpleNamespace(io_binding=lambda: step_binding, run_with_iobinding=lambda b: None)
    decoder = IOBindingDecoder.__new__(IOBindingDecoder)
    decoder._ort, decoder.encoder, decoder.step_session = fake_ort, encoder, step
    decoder.device, decoder.device_id, decoder.vocab_size = "cuda", 1, 20

    encoded = decoder.encode(np.zeros((2, 3, 16, 16), np.float32))
    on = {name: device for name, device, _ in encoder_binding.outputs}
    assert on == {"features": "cuda", "att_proj": "cuda", "h0": "cuda", "c0": "cuda", "class_probs": "cpu"}
    assert all(i == 1 for _, device, i in encoder_binding.outputs if device == "cuda")
    assert encoded["class_probs"].numpy().shape == (4, 3)  # readable on the host

    encoded["h0"] = encoded["c0"] = _FakeValue((2, 10), "cuda", "h0")
    session = decoder.start(encoded, np.array([0, 0, 1, 1], np.int32))
    assert made == [("cuda", 1)] * 6  # image index, two h / c pairs, the no-bias zeros

    session.step(np.zeros(4, np.int32), np.arange(4, dtype=np.int32))
    assert ("alpha", "cuda", 1) in step_binding.outputs  # unread: stays on GPU 1
    step_binding.outputs.clear()
    attention = decoder.start(encoded, np.array([0, 1], np.int32), return_attention=True)
    result = attention.step(np.zeros(2, np.int32), np.arange(2, dtype=np.int32))
    assert [device for name, device, _ in step_binding.outputs if name == "alpha"] == ["cpu"]
    assert result.alpha is not None
