"""The torch backend's graph path (``edgecap.backends.torch_graphs``).

On the CPU the graphs are ``EagerGraph``: capturing runs the function once and replaying runs it
again on the same static buffers, as a CUDA graph replays its kernels on the addresses it
captured. So a bookkeeping bug (a buffer replaced rather than written into, the h/c ping-pong
reading the wrong slot, a stale word bias, buffers of another shape) shows up here as a
difference from the eager backend. The real CUDA graphs are tested by the ``gpu``-marked tests
at the end (run on an NVIDIA H200 by ``benchmarks/gpu_check.py``: 4 passed).
"""

from __future__ import annotations

import contextlib
import threading
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.torch import TorchBackend, TorchDecoderSession  # noqa: E402
from edgecap.backends.torch import _checked_device, _indexed  # noqa: E402
from edgecap.backends.torch_graphs import (  # noqa: E402
    _CAPTURE_LOCK,
    MAX_KEYS,
    CudaGraphs,
    EagerGraph,
    GraphedSession,
    graph_batch_size,
    ieee_fp32,
    keep_fp32,
)
from edgecap.errors import BackendError  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir)
    return (
        TorchBackend(manifest, device="cpu"),
        TorchBackend(manifest, device="cpu", graph_factory=EagerGraph),
    )


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 224, 224)).astype(np.float32)


def _steps(eager, graphed, n_images: int, beam: int, steps: int, seed: int, attention: bool = True) -> None:
    """Drive an eager and a graphed session with the same random tokens, beam reorderings and
    word biases (some steps none), and compare every output."""
    rng = np.random.default_rng(seed)
    images = _images(n_images, seed)
    enc_e, enc_g = eager.encode(images), graphed.encode(images)
    for key in enc_e.tensors:
        np.testing.assert_array_equal(enc_e.tensors[key].numpy(), enc_g.tensors[key].numpy())
    np.testing.assert_array_equal(enc_e.class_probs, enc_g.class_probs)
    image_index = np.repeat(np.arange(n_images, dtype=np.int32), beam)
    rows = len(image_index)
    a = eager.start(enc_e, image_index, return_attention=attention)
    b = graphed.start(enc_g, image_index, return_attention=attention)
    assert isinstance(a, TorchDecoderSession) and isinstance(b, GraphedSession)
    vocab = eager.decoder.cfg.vocab_size
    source = image_index.copy()  # first step: h0/c0 are per image (S = N)
    previous = None
    for t in range(steps):
        tokens = rng.integers(0, vocab, rows).astype(np.int32)
        bias = None
        if t % 3 == 1:
            bias = (rng.random((rows, vocab)) < 0.05).astype(np.float32) * 3.0
        ra, rb = a.step(tokens, source, bias), b.step(tokens, source, bias)
        # each step's results are the caller's (not views of buffers the next step writes), so
        # the previous step's are still the eager ones
        for x, y in [(ra, rb)] + ([] if previous is None else [previous]):
            np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
            np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=0, atol=1e-6)
            if attention:
                np.testing.assert_allclose(x.alpha, y.alpha, rtol=0, atol=1e-7)
            else:
                assert y.alpha is None
        previous = ra, rb
        assert rb.topk_ids.dtype == np.int32 and rb.topk_logprobs.dtype == np.float32
        # the next step's rows come from any row of the same image (beam reordering)
        source = (image_index * beam + rng.integers(0, beam, rows)).astype(np.int32)


def test_graphed_steps_match_eager(backends):
    eager, graphed = backends
    _steps(eager, graphed, n_images=2, beam=3, steps=7, seed=1)


def test_shape_changes_reuse_and_recapture(backends):
    eager, graphed = backends
    before = graphed.step_graphs.keys.made
    _steps(eager, graphed, n_images=3, beam=2, steps=4, seed=2, attention=False)
    _steps(eager, graphed, n_images=1, beam=2, steps=5, seed=3)  # a smaller last batch
    _steps(eager, graphed, n_images=3, beam=2, steps=3, seed=4)  # back to the first shape
    _steps(eager, graphed, n_images=1, beam=1, steps=3, seed=5)  # R = S = N
    assert graphed.step_graphs.keys.made == before + 3
    entries = graphed.step_graphs.keys.entries
    buffers = entries[next(k for k in entries if k[:2] == (3, 6))]
    # each replay of a graph of this shape is one step; the first step uses its own graph
    assert buffers.first.replays == 2
    assert [g.replays for g in buffers.from_slot] == [3, 2]  # steps 1, 3, 5 / 2, 4 (4 + 3 steps)


def test_graphs_of_a_decoder_of_another_top_k_step_as_eager():
    """The words a step returns per row are the model's own ``top_k`` (10 in the shipped model,
    4 here): the graphs' buffers hold that many, and every step gives the eager step's, on a
    decoder made in memory (``from_modules``, its image tensors from regions)."""
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig

    torch.manual_seed(0)
    sizes = dict(vocab_size=30, encoder_dim=12, feature_dim=8, attention_dim=6, embed_dim=8, hidden_dim=16)
    decoder = CaptionDecoder(DecoderConfig(**sizes, top_k=4)).eval()
    eager, graphed = TorchBackend.from_modules(None, decoder), TorchBackend.from_modules(None, decoder)
    graphed.enable_graphs(EagerGraph)
    regions = torch.randn(2, 5, 12)
    image_index = np.repeat(np.arange(2, dtype=np.int32), 3)
    a = eager.start(eager.encode_regions(regions), image_index, return_attention=True)
    b = graphed.start(graphed.encode_regions(regions), image_index, return_attention=True)
    assert isinstance(b, GraphedSession)
    source = image_index
    for t in range(3):
        tokens = np.arange(4 + t, 10 + t, dtype=np.int32)
        ra, rb = a.step(tokens, source), b.step(tokens, source)
        assert rb.topk_ids.shape == rb.topk_logprobs.shape == (6, 4)
        np.testing.assert_array_equal(rb.topk_ids, ra.topk_ids)
        np.testing.assert_allclose(rb.topk_logprobs, ra.topk_logprobs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(rb.alpha, ra.alpha, rtol=0, atol=1e-7)
        source = np.arange(6, dtype=np.int32)[::-1].copy()


def test_graphs_of_many_shapes_are_bounded_and_the_recent_ones_kept(tiny_model_dir):
    """A service whose batch sizes vary over a wide range: the encoder and step graphs kept stay
    at their cache's limit (``MAX_KEYS`` shapes; 2 here, to keep the test quick), the least
    recently used dropped (each holds device memory), and a shape in use is replayed rather than
    captured again. Captions are the eager backend's."""
    manifest = load_manifest(tiny_model_dir)
    eager = TorchBackend(manifest, device="cpu")
    graphed = TorchBackend(manifest, device="cpu", graph_factory=EagerGraph)
    caches = (graphed.encoder_graphs.graphs, graphed.step_graphs.keys)
    assert all(cache.limit == MAX_KEYS for cache in caches)
    assert MAX_KEYS == 8  # docs/gpu-search.md: the 8 most recently used of each kind
    for cache in caches:
        cache.limit = 2
    sizes = [1, 2, 1, 3, 2]  # 1 used again before 3 comes: 2, the least recent, is dropped
    for n in sizes:
        images = _images(n, seed=n)
        want, got = eager.encode(images), graphed.encode(images)
        np.testing.assert_array_equal(want.tensors["h0"].numpy(), got.tensors["h0"].numpy())
        image_index = np.repeat(np.arange(n, dtype=np.int32), 2)
        want_step = eager.start(want, image_index).step(np.ones(2 * n, np.int32), image_index)
        got_step = graphed.start(got, image_index).step(np.ones(2 * n, np.int32), image_index)
        np.testing.assert_array_equal(want_step.topk_ids, got_step.topk_ids)
    for cache in caches:
        assert cache.made == 4  # 1, 2, 3, and 2 again after it was dropped
        assert [key[0] for key in cache.entries] == [3, 2]  # the two most recent, oldest first
    (recent, *_buffers) = graphed.encoder_graphs.graphs.entries[(3, 3, 224, 224)]
    before = recent.replays
    graphed.encode(_images(3, seed=0))  # a shape kept: replayed
    assert graphed.encoder_graphs.graphs.made == 4 and recent.replays == before + 1


def test_encoder_outputs_outlive_the_next_batch(backends):
    _, graphed = backends
    first = graphed.encode(_images(2, seed=7))
    kept = {k: v.clone() for k, v in first.tensors.items()}
    graphed.encode(_images(2, seed=8))  # same shape: the same encoder graph and buffers
    for key, value in kept.items():
        assert torch.equal(first.tensors[key], value)


def test_a_later_search_of_the_same_shape_takes_the_buffers(backends):
    _, graphed = backends
    encoded = graphed.encode(_images(1, seed=9))
    index = np.zeros(3, np.int32)
    first = graphed.start(encoded, index)
    first.step(np.ones(3, np.int32), index)
    second = graphed.start(encoded, index)
    second.step(np.ones(3, np.int32), index)
    with pytest.raises(BackendError, match="one search at a time"):
        first.step(np.ones(3, np.int32), index)
    assert graphed.thread_safe is False and backends[0].thread_safe is True


@pytest.mark.parametrize("first_inside", [True, False])
def test_graphs_made_in_a_callers_inference_mode_serve_calls_outside_it(tiny_model_dir, photos, first_inside):
    """A caller may wrap a call in ``torch.inference_mode()`` (PyTorch's advice for inference)
    and make the next without it. The graphs' static buffers are made in the first call of a
    shape and written by every later one; made as inference tensors, a write outside inference
    mode is torch's RuntimeError "Inplace update to inference tensor outside InferenceMode".
    The encoder graph and the step graphs (the host loop, ``return_attention``) of one shape,
    made inside and used outside, and the other way round, caption as the eager backend."""
    options = dict(beam_size=2, batch_size=2, max_length=5)
    eager = Captioner(tiny_model_dir, backend="torch", device="cpu", **options)
    graphed = Captioner(tiny_model_dir, backend="torch", device="cpu", graph_factory=EagerGraph, **options)
    expected = [c.tokens for c in eager.caption_batch(photos[:2], return_attention=True)]
    for inside in (first_inside, not first_inside):
        with torch.inference_mode() if inside else contextlib.nullcontext():
            got = graphed.caption_batch(photos[:2], return_attention=True)
        assert [c.tokens for c in got] == expected


def test_captioner_graphs_match_eager_across_batches(tiny_model_dir, photos):
    options = dict(beam_size=3, batch_size=3, max_length=8)
    eager = Captioner(tiny_model_dir, backend="torch", device="cpu", **options)
    graphed = Captioner(tiny_model_dir, backend="torch", device="cpu", graph_factory=EagerGraph, **options)
    # 5 images in batches of 3: shapes (3, 9) then (2, 6), then a beam of 1
    inputs = photos + photos[:1]
    for a, b in zip(
        eager.caption_batch(inputs, return_attention=True),
        graphed.caption_batch(inputs, return_attention=True),
    ):
        assert a.tokens == b.tokens and a.score == b.score and a.objects == b.objects
        np.testing.assert_array_equal(a.attention, b.attention)
    assert "graphs: EagerGraph" in graphed.backend.describe()


def test_graph_batch_sizes_are_powers_of_two_up_to_the_batch_size():
    """Hand-listed: the next power of two, or the caller's batch size when that is smaller."""
    cases = {(1, 64): 1, (2, 64): 2, (3, 64): 4, (5, 8): 8, (8, 8): 8, (9, 12): 12, (12, 12): 12}
    cases.update({(17, 100): 32, (33, 64): 64, (64, 64): 64, (3, 3): 3})
    assert {case: graph_batch_size(*case) for case in cases} == cases
    for bad in ((0, 8), (9, 8)):
        with pytest.raises(ValueError, match="does not fit"):
            graph_batch_size(*bad)


def test_batches_are_padded_where_each_new_size_captures_or_compiles(tiny_model_dir):
    """Padding (``run_size``) only where a batch size met anew costs a capture or a compile:
    graphs, the compiled device search; not the eager backend (3 images of at most 8: 4 / 3)."""
    manifest = load_manifest(tiny_model_dir)
    kinds = {
        "eager": TorchBackend(manifest, device="cpu"),
        "graphs": TorchBackend(manifest, device="cpu", graph_factory=EagerGraph),
        "compiled": TorchBackend(manifest, device="cpu", search="device", compile_search=True),
        "device search": TorchBackend(manifest, device="cpu", search="device"),
    }
    sizes = {kind: backend.run_size(3, 8) for kind, backend in kinds.items()}
    assert sizes == {"eager": 3, "graphs": 4, "compiled": 4, "device search": 3}


@pytest.mark.parametrize("preprocess", ["host", "device"])
def test_graphed_batches_of_many_sizes_run_at_a_few(tiny_model_dir, photos, preprocess):
    """A service's batches of every size up to its largest: with graphs they run padded to 1,
    2, 4, ... or the largest batch run so far (``graph_batch_size``). A first batch of 5 runs as
    5 (not padded past the largest batch met: a single batch, a service of at most 5 a batch);
    then batches of 6, 3, 5, 1, 6 and 3 run as 6, 4, 6, 1, 6, 4: the encoder is captured at 4
    sizes (5, 6, 4, 1), not 5 (and 16 for batches of 1 to 16: past the 8 graphs kept). Every
    image gets its own caption, objects and confidence, the eager backend's, with the padding's
    dropped."""
    options = dict(beam_size=2, batch_size=8, max_length=6)
    eager = Captioner(tiny_model_dir, backend="torch", device="cpu", **options)
    graphed = Captioner(
        tiny_model_dir,
        backend="torch",
        device="cpu",
        graph_factory=EagerGraph,
        preprocess=preprocess,
        **options,
    )
    rng = np.random.default_rng(3)
    inputs = [*photos, *(rng.integers(0, 256, (64 + 8 * i, 80, 3), dtype=np.uint8) for i in range(2))]
    made = graphed.backend.encoder_graphs.graphs
    for n, runs in ((5, 5), (6, 6), (3, 4), (5, 6), (1, 1), (6, 6), (3, 4)):
        batch = [inputs[(n + i) % len(inputs)] for i in range(n)]
        want, got = eager.caption_batch(batch), graphed.caption_batch(batch)
        assert len(got) == n and next(reversed(made.entries))[0] == runs
        for a, b in zip(want, got, strict=True):
            assert (a.tokens, a.objects, a.confidence) == (b.tokens, b.objects, b.confidence)
            assert b.score == pytest.approx(a.score, abs=1e-5)
    assert made.made == 4 and sorted(key[0] for key in made.entries) == [1, 4, 5, 6]


def test_a_padding_backend_is_never_asked_past_the_largest_batch_under_threads(monkeypatch, tiny_model_dir):
    """A backend that pads and runs batches in several threads at once (``thread_safe``: the
    compiled device search, ``run_size`` = ``graph_batch_size``) is asked ``run_size(n,
    largest)`` with ``largest`` at least ``n`` (``Backend.run_size``'s contract), whatever another
    thread's batch does meanwhile. Here a batch of 5 (thread A) reads the largest batch so far
    (0) before a batch of 8 (thread B) records 8, and records its 5 after it: B's batch still
    runs as 8, not ``run_size(8, 5)`` (a ValueError, "does not fit"). The interleaving is forced
    by holding A inside its ``max`` and B at its ``run_size`` lookup."""
    import builtins

    import edgecap.api as api

    cap = Captioner(tiny_model_dir, backend="torch", device="cpu", beam_size=1, batch_size=8, max_length=3)
    assert cap.backend.thread_safe  # no lock: batches of two threads may overlap
    a_read, b_at_lookup, a_at_lookup = threading.Event(), threading.Event(), threading.Event()
    threads: dict[str, threading.Thread] = {}
    asked: list[tuple[int, int]] = []

    def held_max(*args):
        if threading.current_thread() is threads.get("A"):
            a_read.set()
            b_at_lookup.wait(10)  # B records its 8 meanwhile
        return builtins.max(*args)

    def padding(n_images, largest):
        asked.append((n_images, largest))
        return graph_batch_size(n_images, largest)

    def run_size(backend):
        if threading.current_thread() is threads.get("B"):
            b_at_lookup.set()
            a_at_lookup.wait(10)  # A records its 5 meanwhile
        else:
            a_at_lookup.set()
        return padding

    monkeypatch.setattr(api, "max", held_max, raising=False)
    monkeypatch.setattr(TorchBackend, "run_size", property(run_size))
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(8)]
    results, errors = {}, {}

    def caption(name, n):
        try:
            results[name] = cap.caption_batch(frames[:n])
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors[name] = exc

    threads["A"] = threading.Thread(target=caption, args=("A", 5))
    threads["B"] = threading.Thread(target=caption, args=("B", 8))
    threads["A"].start()
    assert a_read.wait(10)
    threads["B"].start()
    for thread in threads.values():
        thread.join(30)
    assert not errors, errors
    assert sorted(asked) == [(5, 5), (8, 8)]
    assert [len(results["A"]), len(results["B"])] == [5, 8]


def test_graphs_behind_an_fp32_encoder_encode_the_fp32_image(tiny_model_dir):
    """``fp16=True, fp32_encoder=True`` with graphs: the encoder graph runs in FP32 "from an FP32
    image" (docs/gpu-search.md), so the graphed encoder's outputs are the eager ones, bit for bit
    (FP16 emulated on the CPU, as tests/test_device_search.py does), not those of an image
    rounded to FP16 on its way in: both are the FP32 backend's outputs, rounded to FP16 for the
    decoder, with its image classes."""
    manifest = load_manifest(tiny_model_dir)
    eager, graphed = (TorchBackend.__new__(TorchBackend) for _ in range(2))
    for backend in (eager, graphed):
        # folded (the default) as the FP32 backend below folds its encoder
        backend._setup(
            *TorchBackend._build(manifest), "cpu", fp16=True, fp32_encoder=True, fold_batch_norms=True
        )
    graphed.enable_graphs(EagerGraph)
    images = _images(2, seed=11)
    fp32 = TorchBackend(manifest, device="cpu").encode(images)
    for got in (eager.encode(images), graphed.encode(images)):
        assert got.tensors["features"].dtype == torch.float16
        for key, value in fp32.tensors.items():
            want = value if key == "class_probs" else value.to(torch.float16)
            assert torch.equal(got.tensors[key], want), key
        np.testing.assert_array_equal(got.class_probs, fp32.class_probs)


def test_a_graph_factory_with_cuda_graphs_runs_on_any_device(tiny_model_dir):
    """``graph_factory`` "implies cuda_graphs" and runs "on any device" (``TorchBackend``'s
    doc): passing ``cuda_graphs=True`` as well on the CPU is not refused as CUDA-only."""
    backend = TorchBackend(
        load_manifest(tiny_model_dir), device="cpu", cuda_graphs=True, graph_factory=EagerGraph
    )
    assert backend.graph_factory is EagerGraph and backend.thread_safe is False
    encoded = backend.encode(_images(1, seed=12))
    assert backend.encoder_graphs.graphs.made == 1 and encoded.n_images == 1


def test_cuda_graphs_need_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        Captioner(tiny_model_dir, backend="torch", device="cpu", cuda_graphs=True)


def test_fp16_needs_cuda():
    """FP16 is a CUDA option (``TorchBackend``): on the CPU it is refused, not run slowly and
    inexactly."""
    with pytest.raises(ValueError, match="fp16=True needs device='cuda'"):
        Captioner(backend="torch", device="cpu", fp16=True)


@pytest.mark.parametrize("device", ["xpu", "meta", "gpu", "CPU", "cpu ", "mps", "cuda:x", 0])
def test_a_device_the_torch_backend_does_not_run_on_is_a_value_error_naming_it(device):
    """The torch backend runs on "cpu", "cuda" or "cuda:N" (its docstring): another device is a
    ValueError naming the option, as the onnxruntime backend's is, before any model is built;
    it had been torch's own error ("Torch not compiled with XPU enabled", "Expected one of cpu,
    cuda, ipu, xpu, ..."), and "meta" failed only after the model was built."""
    with pytest.raises(
        ValueError, match=r"^device must be 'cpu', 'cuda' or 'cuda:N' for the torch backend, got "
    ):
        Captioner(backend="torch", device=device)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_cuda_gpu_is_one_clear_error(monkeypatch, device):
    """device="cuda" (or "cuda:N") where torch sees no CUDA GPU: a BackendError that says so
    and names the way out, before any model is loaded (not a torch error from deep inside)."""
    from edgecap.errors import BackendError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        BackendError, match="device='cuda' but this torch has no usable CUDA GPU; use device='cpu'"
    ):
        Captioner(backend="torch", device=device)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_the_cuda_options_are_accepted_on_any_cuda_device(monkeypatch, device):
    """``TorchBackend``: device "cuda" or "cuda:N"; fp16 and cuda_graphs are refused only off
    CUDA, so a second GPU takes them as the first does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _checked_device(device, fp16=True, cuda_graphs=True) == device


def test_keep_fp32_island():
    layer = keep_fp32(torch.nn.Linear(4, 1).to(torch.bfloat16))
    assert layer.weight.dtype == torch.float32
    out = layer(torch.ones(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_cuda_convolutions_are_ieee_fp32_for_the_block_and_put_back_after():
    # PyTorch's default lets cuDNN convolutions use TF32 on Ampere and later (10-bit mantissas);
    # the flag is process-wide: set for the block, restored after, untouched for the CPU
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with ieee_fp32(torch.device("cpu")):
        assert conv.fp32_precision == before
    with ieee_fp32(torch.device("cuda", 1)):
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with pytest.raises(RuntimeError), ieee_fp32(torch.device("cuda")):
        raise RuntimeError("a failed encode")
    assert conv.fp32_precision == before


def test_ieee_fp32_blocks_in_two_threads_keep_fp32_until_the_last_leaves():
    # thread A enters, B enters, A leaves while B still encodes: B must still be in FP32, and
    # the flag is put back only when B leaves
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def a():
        with ieee_fp32(torch.device("cuda")):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with ieee_fp32(torch.device("cuda")):
            b_in.set()
            a_out.wait(5)
            seen["b after a left"] = conv.fp32_precision
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert b_done.is_set() and seen == {"b after a left": "ieee"}
    assert conv.fp32_precision == before


def test_the_eager_encoder_runs_with_ieee_fp32_convolutions(tiny_model_dir, monkeypatch):
    import edgecap.backends.torch as torch_backend

    inside = []

    @contextlib.contextmanager
    def recording(device):
        inside.append(device)
        yield
        inside.pop()

    monkeypatch.setattr(torch_backend, "ieee_fp32", recording)
    backend = TorchBackend(load_manifest(tiny_model_dir), device="cpu")
    forward = backend.encoder_graph.forward
    ran = []

    def checked(*args):
        ran.append(list(inside))  # the convolutions run inside the block, on the backend's device
        return forward(*args)

    monkeypatch.setattr(backend.encoder_graph, "forward", checked)
    backend.encode(_images(1))
    assert ran == [[torch.device("cpu")]]


def test_ieee_fp32_on_a_pytorch_before_2_9_clears_the_legacy_tf32_flag(monkeypatch):
    # torch>=2.1 is supported; before 2.9 cuDNN has no per-operator fp32_precision, only the
    # legacy allow_tf32 (PyTorch's default True): False for the block, put back after
    legacy = types.SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends, "cudnn", legacy)
    with ieee_fp32(torch.device("cuda")):
        assert legacy.allow_tf32 is False
    assert legacy.allow_tf32 is True


class _FakeCuda:
    """``torch.cuda`` as ``CudaGraph`` uses it, on the CPU: which GPU is current, which stream
    (a GPU's default one or a side stream made with ``Stream``), whether a capture is under way
    and in which error mode. A graph's replay records the GPU current when it runs."""

    def __init__(self, current: int):
        self.current = current
        self.stream = ("default", current)
        self.capture_mode: str | None = None
        self.replays: list[int] = []
        self.events: list[tuple] = []  # ("wait", stream, the stream it waits for), and the test's own

    @contextlib.contextmanager
    def _set(self, **values):
        before = {k: getattr(self, k) for k in values}
        for k, v in values.items():
            setattr(self, k, v)
        try:
            yield
        finally:
            for k, v in before.items():
                setattr(self, k, v)

    def install(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def __init__(self, device):
                self.id = ("side", torch.device(device).index)

            def wait_stream(self, other) -> None:
                fake.events.append(("wait", self.id, other.id))

        class Default:
            def __init__(self, index):
                self.id = ("default", index)

            def wait_stream(self, other) -> None:
                fake.events.append(("wait", self.id, other.id))

        class CUDAGraph:
            def replay(self) -> None:
                fake.replays.append(fake.current)

        def device(d):
            index = torch.device(d).index
            return fake._set(current=fake.current if index is None else index)

        @contextlib.contextmanager
        def graph(g, stream=None, capture_error_mode="global"):
            # without a stream, torch.cuda.graph captures on a side stream of its own
            with fake._set(
                stream=stream.id if stream else ("side", fake.current), capture_mode=capture_error_mode
            ):
                yield

        def current_stream(d=None):
            return Default(fake.current if d is None else torch.device(d).index)

        for name, value in dict(
            current_device=lambda: fake.current,
            device=device,
            Stream=Stream,
            stream=lambda s: fake._set(stream=s.id),
            current_stream=current_stream,
            CUDAGraph=CUDAGraph,
            graph=graph,
        ).items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_a_cuda_graph_is_captured_and_replayed_on_its_backends_gpu(monkeypatch):
    """docs/gpu-search.md: every graph is captured and replayed with its backend's GPU as the
    current device, on a side stream of that GPU, two warm-up runs then the capture, captures
    serialised in the process and failing only on their own thread's unsafe calls, the
    convolutions in IEEE FP32. Here the backend is made for device="cuda" while GPU 1 is
    current; the capture and the replay come later, from a thread whose current GPU is 0 (a
    graph captured on GPU 0's stream would be empty)."""
    fake = _FakeCuda(current=1)
    fake.install(monkeypatch)
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    capture = CudaGraphs(_indexed(torch.device("cuda")))  # "cuda" as TorchBackend takes it
    fake.current = 0
    runs = []

    def fn() -> None:
        runs.append(
            (fake.current, fake.stream, fake.capture_mode, conv.fp32_precision, _CAPTURE_LOCK.locked())
        )

    graph = capture(fn)
    side = ("side", 1)
    assert runs == [
        (1, side, None, "ieee", True),  # warm-up
        (1, side, None, "ieee", True),  # warm-up
        (1, side, "thread_local", "ieee", True),  # the capture
    ]
    assert (fake.current, conv.fp32_precision, _CAPTURE_LOCK.locked()) == (0, before, False)
    graph.replay()
    graph.replay()
    assert fake.replays == [1, 1] and fake.current == 0 and len(runs) == 3


def test_a_cuda_graph_is_warmed_up_and_captured_after_the_gpus_queued_work(monkeypatch):
    """PyTorch's recipe for a capture (``torch.cuda.graphs``: the warm-up on a side stream): the
    side stream first waits for the work already queued on the GPU's stream (the static inputs
    being written), and that stream waits for the warm-up runs before the capture begins, so no
    run reads a buffer another stream is still writing."""
    fake = _FakeCuda(current=0)
    fake.install(monkeypatch)
    capture = CudaGraphs(torch.device("cuda", 0))
    capture(lambda: fake.events.append(("run", fake.stream, fake.capture_mode)))
    side, default = ("side", 0), ("default", 0)
    assert fake.events == [
        ("wait", side, default),
        ("run", side, None),  # warm-up
        ("run", side, None),  # warm-up
        ("wait", default, side),
        ("run", side, "thread_local"),  # the capture
    ]


# -- on a real GPU (``pytest -m gpu``; deselected by default) -------------------------------------


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_the_gpu(tiny_model_dir):
    _cuda()
    manifest = load_manifest(tiny_model_dir)
    eager = TorchBackend(manifest, device="cuda")
    graphed = TorchBackend(manifest, device="cuda", cuda_graphs=True)
    assert isinstance(graphed.graph_factory, CudaGraphs)  # on the GPU current when it was made
    assert graphed.graph_factory.device == torch.device("cuda", torch.cuda.current_device())
    rng = np.random.default_rng(0)
    images = _images(2)
    enc_e, enc_g = eager.encode(images), graphed.encode(images)
    index = np.repeat(np.arange(2, dtype=np.int32), 3)
    a, b = eager.start(enc_e, index, True), graphed.start(enc_g, index, True)
    source = index.copy()
    for _ in range(6):
        tokens = rng.integers(0, eager.decoder.cfg.vocab_size, 6).astype(np.int32)
        ra, rb = a.step(tokens, source), b.step(tokens, source)
        np.testing.assert_array_equal(ra.topk_ids, rb.topk_ids)
        np.testing.assert_allclose(ra.topk_logprobs, rb.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(ra.alpha, rb.alpha, atol=1e-5)
        source = (index * 3 + rng.integers(0, 3, 6)).astype(np.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_graph_captions_on_the_gpu(tiny_model_dir, photos, fp16):
    _cuda()
    options = dict(beam_size=3, batch_size=3, max_length=8)
    cpu = Captioner(tiny_model_dir, backend="torch", device="cpu", **options)
    graphed = Captioner(
        tiny_model_dir, backend="torch", device="cuda", cuda_graphs=True, fp16=fp16, **options
    )
    for a, b in zip(cpu.caption_batch(photos + photos[:1]), graphed.caption_batch(photos + photos[:1])):
        assert np.isfinite(b.score)
        if not fp16:
            assert a.tokens == b.tokens and b.score == pytest.approx(a.score, abs=1e-3)
        else:
            assert b.score == pytest.approx(a.score, abs=0.05)


def test_fp16_alone_is_the_fp16_decoder_behind_the_fp32_encoder(monkeypatch, tiny_model_dir):
    """``fp16=True`` alone is the FP16 that keeps the captions, as the command line's
    ``--precision fp16`` is (docs/gpu-search.md: 98.6-99.4% of FP32's captions, 92% with the encoder
    in FP16 too): the encoder's weights FP32, the decoder's FP16. ``fp32_encoder=False`` puts the
    encoder in FP16 as well; without ``fp16`` nothing is FP16, and ``fp32_encoder=True`` alone
    is refused. On the CPU, with the device check (FP16 needs CUDA) let through."""
    import torch

    from edgecap.backends import torch as torch_backend
    from edgecap.manifest import load_manifest
    from edgecap.models.config import ENCODER_FP32_BLOCKS

    monkeypatch.setattr(torch_backend, "_checked_device", lambda device, *args, **kw: "cpu")
    manifest = load_manifest(tiny_model_dir)
    last_block = ENCODER_FP32_BLOCKS  # FP16 in the whole-model FP16 (its islands end before it)

    default = TorchBackend(manifest, device="cuda", fp16=True)
    assert default.encoder._blocks[last_block]._project_conv.weight.dtype == torch.float32
    assert default.decoder.embed.weight.dtype == torch.float16
    assert "fp16 decoder, fp32 encoder" in default.describe()

    whole = TorchBackend(manifest, device="cuda", fp16=True, fp32_encoder=False)
    assert whole.encoder._blocks[last_block]._project_conv.weight.dtype == torch.float16
    assert whole.decoder.embed.weight.dtype == torch.float16
    assert "fp16" in whole.describe() and "fp32 encoder" not in whole.describe()

    plain = TorchBackend(manifest, device="cuda")
    assert plain.encoder._blocks[last_block]._project_conv.weight.dtype == torch.float32
    assert plain.decoder.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="fp32_encoder=True goes with fp16=True"):
        TorchBackend(manifest, device="cuda", fp32_encoder=True)


def test_fp16_keeps_the_same_fp32_islands_as_the_fp16_onnx(tiny_model_dir):
    """The CUDA path's FP16 keeps FP32 where ``edgecap convert`` does: the encoder's stem and
    first blocks, the classifier, the attention scores (run here on the CPU, which has the FP16
    kernels these layers need, by setting the backend up directly)."""
    import torch

    from edgecap.backends.torch import TorchBackend
    from edgecap.manifest import load_manifest
    from edgecap.models.config import ENCODER_FP32_BLOCKS

    manifest = load_manifest(tiny_model_dir)
    reference = TorchBackend(manifest)
    half = TorchBackend.__new__(TorchBackend)
    encoder, decoder = TorchBackend._build(manifest)
    half._setup(encoder, decoder, "cpu", fp16=True)
    e = half.encoder
    assert e._conv_stem.weight.dtype == torch.float32
    assert e._blocks[ENCODER_FP32_BLOCKS - 1]._project_conv.weight.dtype == torch.float32
    assert e._blocks[ENCODER_FP32_BLOCKS]._project_conv.weight.dtype == torch.float16
    assert e._fc.weight.dtype == torch.float32
    d = half.decoder  # the attention scores and the word logits, the rest of the decoder FP16
    assert d.att_score.weight.dtype == d.out_vocab.weight.dtype == torch.float32
    assert d.att_hidden.weight.dtype == d.embed.weight.dtype == torch.float16
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    got = half.encode(image).tensors["features"].float().numpy()
    want = reference.encode(image).tensors["features"].numpy()
    assert np.abs(got - want).max() < 0.5  # FP16 features, FP32 islands: close, not equal


def test_host_images_reach_the_encoder_graph_through_the_backend_s_staging(tiny_model_dir):
    """Host images (a caller of ``encode`` with arrays; the Captioner's own batches arrive on the
    device) go through the backend's kept buffers on CUDA (``staging``; forced on the CPU here:
    the buffer of that shape kept call after call), else straight in; either way, and from the
    device, the same encoding, and no page-locked buffer of the graphs' own."""
    from edgecap.backends.staging import Staging

    manifest = load_manifest(tiny_model_dir)
    plain = TorchBackend(manifest, device="cpu", graph_factory=EagerGraph)
    staged = TorchBackend(manifest, device="cpu")
    staged.staging = Staging(torch.device("cpu"))
    staged.enable_graphs(EagerGraph)
    images = _images(2, seed=13)
    want = plain.encode(torch.from_numpy(images))
    assert staged.encoder_graphs.staging is staged.staging
    for _ in range(2):
        got = staged.encode(images)
        for key, value in want.tensors.items():
            assert torch.equal(got.tensors[key], value), key
    (buffer, _event), *others = staged.staging._kept().values()
    assert not others and buffer.shape == images.shape
    assert staged.encode(images) and staged.staging._kept()[(2, *images.shape[1:], "<f4")][0] is buffer
    for key, value in plain.encode(images).tensors.items():  # no staging: straight in
        assert torch.equal(value, want.tensors[key]), key
    (entry,) = staged.encoder_graphs.graphs.entries.values()
    assert len(entry) == 3  # the graph, its input, its outputs
