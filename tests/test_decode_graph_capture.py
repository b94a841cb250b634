"""The whole-decode graphs (``DecodeGraphs``) under a stand-in that keeps two rules of a real CUDA
graph that ``EagerGraph`` does not: a captured graph holds no Python object, only the addresses
its kernels read and write (so every tensor it touches that was not made during a capture, in
the graph's private pool, must be kept alive by someone else: PyTorch's docs, "CUDA Graphs",
static inputs and outputs); and a capture records kernels without running them (so a tensor
made during a capture holds no computed value until the graph is replayed)."""

from __future__ import annotations

import gc
import warnings
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from edgecap import Captioner  # noqa: E402
from edgecap.backends import torch_graphs  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from edgecap.backends.torch_search import TorchDeviceSearch  # noqa: E402
from edgecap.decoding import CaptionOptions  # noqa: E402
from edgecap.decoding import device as device_module  # noqa: E402
from edgecap.decoding.device import DecodeGraphs  # noqa: E402
from edgecap.images import load_rgb, preprocess  # noqa: E402
from helpers import captioner_search  # noqa: E402


def _key(t: torch.Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


class _Record(TorchDispatchMode):
    """Every storage a run reads or writes that it did not make, and the tensors it made."""

    def __init__(self, made_before: set):
        super().__init__()
        self.made_before = made_before
        self.made: list[torch.Tensor] = []
        self.made_keys: set = set()
        self.outside: dict = {}  # key -> (StorageWeakRef, shape, dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        in_keys = {_key(t) for t in inputs}
        for t in inputs:
            k = _key(t)
            if k is not None and k not in self.made_keys and k not in self.made_before:
                self.outside.setdefault(k, (StorageWeakRef(t.untyped_storage()), tuple(t.shape), t.dtype))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                k = _key(t)
                if k is not None and k not in in_keys and k not in self.made_keys:
                    self.made_keys.add(k)
                    self.made.append(t)
        return out


class CapturingGraph:
    """Two warm-up runs, then the captured run, recorded: ``outside``, what it touched that no
    capture made (regular memory: the real graph only has its address); what it made (the
    graph's private pool, kept with the graph) is poisoned afterwards, as a real capture leaves
    it uncomputed. ``replay`` runs ``fn`` again (``forget`` drops it, as a real graph holds no
    Python object)."""

    made_in_captures: set = set()
    POISON = True

    def __init__(self, fn):
        self.fn = fn
        fn()
        fn()
        record = _Record(self.made_in_captures)
        with record:
            fn()
        self.outside = record.outside
        self.private = record.made  # the private pool lives as long as the graph
        CapturingGraph.made_in_captures |= record.made_keys
        if self.POISON:
            _poison(record.made)

    def forget(self) -> None:
        self.fn = None

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


class ReplayingGraph:
    """A stand-in whose replay runs no Python, as a real CUDA graph's: two warm-up runs, then
    the captured run, recorded op by op (the ATen operation, its arguments, its outputs); what
    the capture made is poisoned, and ``replay`` runs the recorded operations again on the same
    tensors, writing each result into the output the capture recorded. A tensor that the
    Python code makes anew after the capture (and that the captured run had read) is never
    read by a replay."""

    def __init__(self, fn):
        fn()
        fn()
        record = _Ops()
        with record:
            fn()
        self.ops = record.ops
        _poison(record.made)

    def replay(self) -> None:
        _run(self.ops)


def _run(ops: list) -> None:
    """Recorded operations run again; a conditional node's (``func`` None: its predicate, then
    its operations) only where its predicate, as computed by this run, is true."""
    for func, args, kwargs, outputs in ops:
        if func is None:
            if bool(args):
                _run(kwargs)
            continue
        result = func(*args, **kwargs)
        for out, value in zip(outputs, tree_flatten(result)[0]):
            if isinstance(out, torch.Tensor) and (
                out.data_ptr() != value.data_ptr() or out.stride() != value.stride()
            ):
                out.copy_(value)


def _poison(made: list[torch.Tensor]) -> None:
    """What a capture made, left as a real capture leaves it: not computed."""
    for t in made:
        if t.dtype == torch.bool:
            t.fill_(True)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(10**6)  # an index out of every range


class _Ops(TorchDispatchMode):
    """Every operation of a run with its arguments and outputs, and the tensors it made."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.made: list[torch.Tensor] = []
        self.made_keys: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_keys = {_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        outputs = tree_flatten(out)[0]
        for t in outputs:
            if isinstance(t, torch.Tensor):
                k = _key(t)
                if k is not None and k not in in_keys and k not in self.made_keys:
                    self.made_keys.add(k)
                    self.made.append(t)
        self.ops.append((func, args, kwargs, outputs))
        return out


class RecordingGraph(CapturingGraph):
    """``CapturingGraph`` that leaves what the capture made as computed."""

    POISON = False


@pytest.fixture(scope="module")
def shipped(default_model_dir, example_images):
    captioner = Captioner(default_model_dir, backend="torch", device="cpu", search="device")
    photos = [str(p) for p in example_images]
    batch = np.stack([preprocess([load_rgb(p)], captioner.manifest.preprocessing)[0] for p in photos])
    return captioner, captioner.backend.encode(batch)


def _captions(captioner, encoded, options, fusion=None):
    """Each image's hypotheses' tokens; ``fusion``: the language models (the Captioner's)."""
    hyps = captioner_search(captioner, encoded, options, fusion=fusion)
    return [[h.tokens for h in image] for image in hyps]


OPTIONS = CaptionOptions(n_best=2, guidance_bonus=2.0, no_repeat_ngram=2, length_penalty=0.7)


@pytest.mark.parametrize("numbered", [False, True])
def test_a_later_parts_warm_up_reads_only_computed_values(shipped, numbered):
    """The parts after the first warm up on the search's tables that the first part's capture
    made: a real capture leaves them uncomputed (poisoned here), so the first part must have
    run (replayed) before the next part warms up on them."""
    captioner, encoded = shipped
    backend = captioner.backend
    want = _captions(captioner, encoded, OPTIONS)  # the plain device search
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(backend, CapturingGraph, compiled=numbered)
        # the compiled search's form (every step after the first by its number), uncompiled
        with mock.patch.object(device_module, "_compiled_step", lambda: device_module._step):
            assert _captions(captioner, encoded, OPTIONS) == want
            assert _captions(captioner, encoded, OPTIONS) == want
    finally:
        backend.device_search = kept


class _Captured(Exception):
    pass


@pytest.mark.parametrize("conditional", [False, True])
def test_every_tensor_a_decode_graph_touches_outlives_its_capture(shipped, monkeypatch, conditional):
    """Every tensor the whole-decode graphs read or write outside their private pools (the
    static inputs, the carry between the parts, the output, the tables) is still alive once
    the graphs no longer hold the Python functions they were captured from, as a real CUDA
    graph never does: otherwise a replay reads and writes memory the allocator has given to
    something else. Checked as the capture returns (the stand-in cannot replay after). With
    ``conditional``: the one graph with conditional nodes (and the steps it ran, on the
    device)."""
    captioner, encoded = shipped
    backend = captioner.backend
    freed, forms = [], []
    real = DecodeGraphs._capture

    def capture(self, *args):
        entry = real(self, *args)
        forms.append((len(entry.graphs), entry.packing is None, entry.steps is not None))
        graphs = [*entry.graphs, *([] if entry.packing is None else [entry.packing])]
        for graph in graphs:
            graph.forget()
        gc.collect()
        freed.extend(
            (shape, dtype)
            for graph in graphs
            for ref, shape, dtype in graph.outside.values()
            if ref.expired()
        )
        raise _Captured

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(
            backend, IfRecordingGraph if conditional else RecordingGraph
        )
        with pytest.raises(_Captured):
            _captions(captioner, encoded, OPTIONS)
    finally:
        backend.device_search = kept
    assert forms == [(1, True, True) if conditional else (4, False, False)]
    assert freed == [], f"freed while the graphs live: {freed}"


def test_a_graphed_search_with_another_fusion_uses_its_language_models(shipped):
    """Two Fusions of the same shape through one graphed backend (``EagerGraph``): the second
    search's captions are its own (the plain device search's), not the first Fusion's. The
    second Fusion is the first with its two language models swapped (the ratio's sign flips)."""
    captioner, encoded = shipped
    backend = captioner.backend
    options = CaptionOptions(fusion_weight=1.0)
    first = captioner.fusion
    second = replace(first, everyday=first.in_domain, in_domain=first.everyday)

    def captions(fusion):
        return _captions(captioner, encoded, options, fusion)

    want = captions(second)
    assert want != captions(first)
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(backend, EagerGraph)
        captions(first)  # captured with the first Fusion's models
        assert captions(second) == want
    finally:
        backend.device_search = kept


@pytest.mark.parametrize("numbered", [False, True])
def test_replays_that_run_no_python_caption_each_batch_as_the_plain_search(shipped, example_images, numbered):
    """Under ``ReplayingGraph`` (replays run the captured operations only, no Python), two
    batches of the same shape through one graphed search, each twice: every time the plain
    device search's hypotheses for that batch. A tensor that a call makes outside the captured
    functions (the image tensors gathered per row, say) would leave the replays reading the
    capture's copy: the first batch's photos, or none."""
    captioner, _ = shipped
    backend = captioner.backend
    pre = captioner.manifest.preprocessing
    photos = [preprocess([load_rgb(str(p))], pre)[0] for p in example_images]
    batches = [backend.encode(np.stack(photos[:2])), backend.encode(np.stack(photos[2:4]))]
    want = [_captions(captioner, encoded, OPTIONS) for encoded in batches]
    assert want[0] != want[1]
    kept = backend.device_search
    try:
        backend.device_search = TorchDeviceSearch(backend, ReplayingGraph, compiled=numbered)
        with mock.patch.object(device_module, "_compiled_step", lambda: device_module._step):
            for _ in range(2):
                assert [_captions(captioner, encoded, OPTIONS) for encoded in batches] == want
    finally:
        backend.device_search = kept


# -- the whole decode in one graph, its stretches in conditional nodes --------------------------


class IfReplayingGraph(ReplayingGraph):
    """``ReplayingGraph`` with conditional nodes, as ``torch_graphs.capture_if`` captures them:
    in the warm-up runs the body runs, whatever its predicate; in the capture it runs once (a
    real capture records every kernel) and its operations are recorded apart, behind the
    predicate, a tensor the capture made (poisoned, as the rest); a replay recomputes the
    predicate with the operations before it and runs the body's only where it is true."""

    recording: _Ops | None = None

    def __init__(self, fn):
        fn()
        fn()
        record = _Ops()
        IfReplayingGraph.recording = record
        try:
            with record:
                fn()
        finally:
            IfReplayingGraph.recording = None
        self.ops = record.ops
        _poison(record.made)

    @staticmethod
    def conditional(pred, body) -> None:
        record = IfReplayingGraph.recording
        if record is None:  # a warm-up run
            body()
            return
        outer, record.ops = record.ops, []
        try:
            body()
        finally:
            inner, record.ops = record.ops, outer
        outer.append((None, pred, inner, None))


class IfRecordingGraph(RecordingGraph):
    """``RecordingGraph`` with conditional nodes: every body runs (a capture records them all)."""

    @staticmethod
    def conditional(pred, body) -> None:
        assert pred.dtype == torch.bool and pred.dim() == 0  # what an if node's condition is
        body()


def _stops(captioner, encoded, options) -> int:
    """The steps after which the device search's early-exit loop (on the CPU it reads "every
    image done?" after each step) stopped."""
    steps = []
    real = device_module._step

    def counting(loop, t, number, carry):
        steps.append(t)
        return real(loop, t, number, carry)

    with mock.patch.object(device_module, "_step", counting):
        _captions(captioner, encoded, options)  # the plain device search
    return len(steps)


@pytest.fixture(scope="module")
def two_batches(shipped, example_images):
    """The cat and the coffee (their captions end before step 16), and all four photos (the
    astronaut's caption runs to the last step)."""
    captioner, _ = shipped
    pre = captioner.manifest.preprocessing
    photos = [preprocess([load_rgb(str(p))], pre)[0] for p in example_images]
    return [captioner.backend.encode(np.stack(photos[1:3])), captioner.backend.encode(np.stack(photos))]


@pytest.mark.parametrize("numbered", [False, True])
def test_the_whole_decode_in_one_graph_stops_on_the_device_once_every_image_is_done(
    shipped, two_batches, numbered
):
    """With conditional nodes (``IfReplayingGraph``: replays run no Python, and a stretch's
    operations only where the graph's own "some image not done" is true) the whole decode is
    one graph, no packing graph beside it: each batch's captions are the plain device
    search's, captured and replayed, and the steps it ran (read from the device) are those of
    the first check at or after the step where the early-exit loop stopped."""
    captioner, _ = shipped
    backend = captioner.backend
    options = CaptionOptions(n_best=2)
    want = [_captions(captioner, encoded, options) for encoded in two_batches]
    stops = [_stops(captioner, encoded, options) for encoded in two_batches]
    ran = [min(c for c in (*device_module.DECODE_CHECKS, options.max_length) if c >= s) for s in stops]
    assert ran[0] < options.max_length == ran[1]  # a batch that stops early, and one that does not
    kept = backend.device_search
    try:
        backend.device_search = graphed = TorchDeviceSearch(backend, IfReplayingGraph, compiled=numbered)
        with mock.patch.object(device_module, "_compiled_step", lambda: device_module._step):
            for _ in range(2):  # captured, then replayed
                for encoded, captions, steps in zip(two_batches, want, ran, strict=True):
                    assert _captions(captioner, encoded, options) == captions
                    assert graphed.graphs.last_steps == steps
        entries = list(graphed.graphs.graphs.entries.values())  # a graph per batch shape
        assert len(entries) == 2 and all(len(e.graphs) == 1 and e.packing is None for e in entries)
        assert graphed.graphs.conditional_error is None
    finally:
        backend.device_search = kept


def test_a_replay_that_skips_stretches_reads_its_own_batch_not_the_last_one_that_ran_them(
    shipped, example_images
):
    """One shape, one graph with conditional nodes (``IfReplayingGraph``), checks after steps
    13 and 16: a batch whose captions run to the last step (the astronaut and the rocket), then
    one that is done within the first stretch (the cat and the coffee), then the first again,
    and so on: each batch's captions are the plain device search's and its steps are its own
    (20, then 13, written by the first stretch), not what the last replay that ran the later
    stretches left in their tensors. Then the parts (``use_conditional(False)``): the steps
    they ran, not the one graph's counter."""
    captioner, _ = shipped
    backend = captioner.backend
    pre = captioner.manifest.preprocessing
    photos = [preprocess([load_rgb(str(p))], pre)[0] for p in example_images]
    long, short = (backend.encode(np.stack([photos[i] for i in pair])) for pair in ((0, 3), (1, 2)))
    options = CaptionOptions(n_best=2)
    want = {
        name: _captions(captioner, encoded, options) for name, encoded in (("long", long), ("short", short))
    }
    assert _stops(captioner, long, options) == 20 and _stops(captioner, short, options) == 13
    kept = backend.device_search
    try:
        backend.device_search = graphed = TorchDeviceSearch(backend, IfReplayingGraph)
        graphed.graphs.checks = (13, 16)
        for name in ("long", "short", "long", "short", "short", "long"):
            encoded = long if name == "long" else short
            assert _captions(captioner, encoded, options) == want[name], name
            assert graphed.graphs.last_steps == (20 if name == "long" else 13), name
        assert graphed.graphs.graphs.made == 1  # one shape, one graph
        graphed.graphs.use_conditional(False)
        assert _captions(captioner, long, options) == want["long"]
        assert graphed.graphs.last_steps == 20
        assert _captions(captioner, short, options) == want["short"]
        assert graphed.graphs.last_steps == 13
    finally:
        backend.device_search = kept


def test_capturing_the_conditional_form_failing_falls_back_to_the_parts(shipped, two_batches):
    """A CUDA that cannot capture the conditional nodes (here: the node raises in the capture,
    not in the warm-up): one warning saying why, the decode captured in parts with a host check
    between (a packing graph), the same captions; the next shape goes to the parts directly."""
    captioner, _ = shipped
    backend = captioner.backend
    want = [_captions(captioner, encoded, OPTIONS) for encoded in two_batches]

    class Refusing(IfReplayingGraph):
        @staticmethod
        def conditional(pred, body) -> None:
            if IfReplayingGraph.recording is not None:
                raise RuntimeError("operation not permitted in a conditional body")
            body()

    kept = backend.device_search
    try:
        backend.device_search = graphed = TorchDeviceSearch(backend, Refusing)
        with pytest.warns(RuntimeWarning, match="operation not permitted in a conditional body"):
            assert _captions(captioner, encoded := two_batches[0], OPTIONS) == want[0]
        assert "RuntimeError: operation not permitted" in graphed.graphs.conditional_error
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _captions(captioner, encoded, OPTIONS) == want[0]
            assert _captions(captioner, two_batches[1], OPTIONS) == want[1]
        entries = list(graphed.graphs.graphs.entries.values())
        assert len(entries) == 2 and all(e.packing is not None and len(e.graphs) == 4 for e in entries)
    finally:
        backend.device_search = kept


def test_use_conditional_switches_the_form_for_the_next_capture(shipped, two_batches):
    """``DecodeGraphs.use_conditional``: off, the parts (what ``gpu_check.py`` times the
    conditional form against); on again, one graph; the same captions either way."""
    captioner, _ = shipped
    backend = captioner.backend
    encoded = two_batches[0]
    want = _captions(captioner, encoded, OPTIONS)
    kept = backend.device_search
    try:
        backend.device_search = graphed = TorchDeviceSearch(backend, IfReplayingGraph)
        shapes = []
        for enabled in (False, True):
            graphed.graphs.use_conditional(enabled)
            assert _captions(captioner, encoded, OPTIONS) == want
            ((entry,),) = [graphed.graphs.graphs.entries.values()]
            shapes.append((len(entry.graphs), entry.packing is None))
        assert shapes == [(4, False), (1, True)]
    finally:
        backend.device_search = kept


def test_capture_if_puts_the_body_in_an_if_node_only_while_capturing(monkeypatch):
    """``capture_if`` against PyTorch's calls (a fake capturing graph; no CUDA here): outside a
    capture the body runs; within one, the body between ``begin_capture_to_if_node(pred)``
    and ``end_capture_to_conditional_node()``, which is called even when the body raises."""
    calls = []

    class FakeGraph:
        def begin_capture_to_if_node(self, pred):
            calls.append(("begin", pred))

        def end_capture_to_conditional_node(self):
            calls.append("end")

    fake = type("FakeCUDAGraph", (), {"get_currently_capturing_graph": staticmethod(FakeGraph)})
    monkeypatch.setattr(torch._C, "_CUDAGraph", fake, raising=False)
    pred = torch.tensor(True)
    torch_graphs.capture_if(pred, lambda: calls.append("body"))
    assert calls == ["body"]  # not capturing: a warm-up run
    calls.clear()
    torch_graphs.capture_if(torch.tensor(False), lambda: calls.append("body"))
    assert calls == ["body"]  # a warm-up runs every kernel, whatever the predicate
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    torch_graphs.capture_if(pred, lambda: calls.append("body"))
    assert calls == ["body"]  # a CUDA GPU, not capturing
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    torch_graphs.capture_if(pred, lambda: calls.append("body"))
    assert calls == [("begin", pred), "body", "end"]
    calls.clear()

    def failing():
        raise ValueError("bad body")

    with pytest.raises(ValueError, match="bad body"):
        torch_graphs.capture_if(pred, failing)
    assert calls == [("begin", pred), "end"]


def test_cuda_graphs_offer_conditional_nodes_where_pytorch_has_them(monkeypatch):
    """``CudaGraphs.conditional`` is ``capture_if`` where PyTorch's CUDAGraph has the three
    calls it makes in a build for CUDA 12.4 or newer, None where one is missing (a CPU build of
    PyTorch), for an older CUDA or ROCm, or where ``EDGECAP_GRAPH_CONDITIONALS=0``."""
    full = type(
        "FullCUDAGraph",
        (),
        {
            name: staticmethod(lambda *a: None)
            for name in (
                "get_currently_capturing_graph",
                "begin_capture_to_if_node",
                "end_capture_to_conditional_node",
            )
        },
    )
    monkeypatch.setattr(torch._C, "_CUDAGraph", full, raising=False)
    monkeypatch.delenv("EDGECAP_GRAPH_CONDITIONALS", raising=False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    # CUDA 12.4 or newer (PyTorch's methods exist in older CUDA builds, and raise there)
    for cuda, supported in (("11.8", False), ("12.1", False), ("12.4", True), ("13.0", True), (None, False)):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        assert torch_graphs.conditional_nodes() == supported, cuda
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: not supported
    assert not torch_graphs.conditional_nodes()
    monkeypatch.setattr(torch.version, "hip", None)
    assert torch_graphs.conditional_nodes()
    assert torch_graphs.CudaGraphs("cuda").conditional is torch_graphs.capture_if
    for value, offered in (("0", False), (" 0 ", False), ("1", True), ("", True)):
        monkeypatch.setenv("EDGECAP_GRAPH_CONDITIONALS", value)  # the user's way to turn them off
        assert (torch_graphs.CudaGraphs("cuda").conditional is torch_graphs.capture_if) == offered
    monkeypatch.delenv("EDGECAP_GRAPH_CONDITIONALS")
    partial = type("OldCUDAGraph", (), {"get_currently_capturing_graph": staticmethod(lambda: None)})
    monkeypatch.setattr(torch._C, "_CUDAGraph", partial)
    assert not torch_graphs.conditional_nodes()
    assert torch_graphs.CudaGraphs("cuda").conditional is None
