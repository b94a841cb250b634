"""CUDA graphs for the torch backend: the encoder captured per batch size, the decoder step per
rows shape, over static input / output buffers (``TorchBackend(..., cuda_graphs=True)``).

Everything here except ``CudaGraph`` itself is exercised on the CPU by the test suite with
``EagerGraph``, a stand-in that "replays" by calling the captured function again on the same
static buffers (``tests/test_torch_graphs.py``); the real capture is tested by the
``gpu``-marked tests and ``benchmarks/gpu_check.py``, run on an NVIDIA H200 (captions of 200 dev
photos as eager's; a caption 3.7x faster at batch 1: ``benchmarks/results/gpu.md``).

Why: at this model's size a GPU decoder step is ~70 small kernels, and launching them one by one
from Python costs far more than running them. A captured graph launches all of them at once.

The interface between the bookkeeping and the graph machinery is one callable,
``capture(fn) -> graph``: ``fn`` takes no arguments, reads only static input buffers and writes
only static output buffers (it returns nothing); ``graph.replay()`` runs it again. Both
``CudaGraph`` and ``EagerGraph`` fit it.

Step buffers, per key (n_images N, rows R), owned by a ``StepGraphs``:

- inputs: ``index`` int32 (2R,) = tokens then source_rows (one host-to-device copy per step),
  ``word_bias`` float32 (R, V) (zeroed once when a step passes None after one that did not),
  the batch's image tensors ``features`` (N, L, F), ``att_proj`` (N, L, A), ``image_index`` (R,)
  and ``h0`` / ``c0`` (N, H), copied in once per search by ``load``;
- the LSTM state ping-pongs between two slots of (R, H): the first step reads h0/c0 (S = N
  rows) and writes slot 0; step t >= 1 reads slot (t - 1) % 2 and writes slot t % 2. So three
  graphs per key: ``first``, ``from0``, ``from1``, and the state never leaves the device;
- outputs: one flat float32 buffer ``[topk_logprobs (R*K) | topk_ids as int32 bits (R*K) |
  alpha (R*L)]``, copied to pinned host memory in one device-to-host copy per step (its first
  2RK values, or all of it when the attention is asked for), followed by the step's only
  synchronisation.

The buffers of a key are shared by every search of that shape, so a graphed backend serves one
search at a time (``thread_safe = False``; ``Captioner`` serialises its batches). A session whose
buffers were taken over by a later session of the same shape raises ``BackendError`` rather than
read another search's state.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from edgecap.backends.base import DecoderSession, StepResult
from edgecap.backends.staging import Staging
from edgecap.errors import BackendError

MAX_KEYS = 8  # graph shapes kept per cache (least recently used dropped beyond this)


def graph_batch_size(n_images: int, largest: int) -> int:
    """The batch size a graphed backend runs ``n_images`` at: the next power of two, or
    ``largest`` (the most images a batch of the caller's has held, this one's included) when
    that is smaller. Graphs are captured per batch size and ``MAX_KEYS`` of them kept: a
    service whose batches take every size from 1 to 16 would otherwise capture again and again
    (a capture runs the whole decode, and with ``compile_search`` compiles it: seconds), while
    padded it meets 1, 2, 4, 8 and 16 (at most 8 sizes for batches of up to 128 images). No
    batch is padded past the largest the caller has run (a single batch of 5 images, a service
    of at most 5 a batch: none past 5), so a batch that is the largest yet runs at its own size,
    once. The padding is copies of the batch's last image, whose captions are dropped (the
    copies end their search when it does): fewer than as many images again, against the two
    warm-up runs and the capture of a shape met anew."""
    if not 1 <= n_images <= largest:
        raise ValueError(f"a batch of {n_images} images does not fit a batch size of {largest}")
    return min(1 << (n_images - 1).bit_length(), largest)


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphCache:
    """Graphs (and their static buffers) made on first use per key, the ``limit`` most recently
    used kept. A new shape (a smaller last batch, another beam size) captures once and comes back
    to its graphs the next time; a workload of more shapes than ``limit`` (a service whose batch
    sizes vary over a wide range) drops the least recently used, so their device memory is freed,
    rather than holding graphs of every shape it has seen. ``made``: how many were captured;
    ``dropped``: how many were dropped so."""

    def __init__(self, limit: int = MAX_KEYS):
        self.limit = limit
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.made = 0
        self.dropped = 0

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            entry = make()
            self.made += 1
            self.entries[key] = entry
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
                self.dropped += 1
        self.entries.move_to_end(key)
        return entry


GraphFactory = Callable[[Callable[[], None]], Graph]


# One capture at a time in the process (torch.cuda.graph: "only one capture may be underway at a
# time"): two graphed backends in two threads capture their first shapes one after the other.
_CAPTURE_LOCK = threading.Lock()


_IEEE_LOCK = threading.Lock()
_ieee_users = 0  # threads inside ieee_fp32 blocks now
_ieee_before: tuple[object, str, object] | None = None  # (target, name, value) to put back


def conv_fp32_flag() -> tuple[object, str, object, object]:
    """cuDNN's flag for the math of FP32 convolutions: (object, attribute, its IEEE FP32 value,
    its TF32 value). PyTorch 2.9 and later: the per-operator setting (reading the legacy
    allow_tf32 after it was set raises); before: the legacy flag."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv, "fp32_precision", "ieee", "tf32"
    return cudnn, "allow_tf32", False, True


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in full FP32 while the block runs (on a CUDA ``device``): PyTorch lets
    them use TF32 by default on Ampere and later GPUs (Orin, A100, H100/H200), 10-bit mantissas,
    which would make "FP32" the precision of FP16. The flag is process-wide: the first block to
    enter (in any thread) sets it, the last to leave puts back what was there, so blocks in
    several threads at once all run in FP32. A captured graph keeps the math it was captured
    with."""
    global _ieee_users, _ieee_before
    if device.type != "cuda":
        yield
        return
    with _IEEE_LOCK:
        if _ieee_users == 0:
            target, name, ieee, _ = conv_fp32_flag()
            _ieee_before = (target, name, getattr(target, name))
            setattr(target, name, ieee)
        _ieee_users += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _ieee_users -= 1
            if _ieee_users == 0 and _ieee_before is not None:
                target, name, before = _ieee_before
                setattr(target, name, before)
                _ieee_before = None


class CudaGraph:
    """A real CUDA graph of ``fn`` on ``device`` (default: the current CUDA device): a few
    warm-up runs on a side stream of that device (cuBLAS workspaces, lazy initialisation), then
    the capture on the same stream, FP32 convolutions in IEEE FP32 (``ieee_fp32``). The warm-up
    runs write the static outputs, as the replays will. Capture and replay make ``device`` the
    current one (a graph replays on the current device's stream: a model on cuda:1 must not
    capture or replay on cuda:0's); captures are serialised process-wide and raise only on
    unsafe calls in their own thread (``capture_error_mode="thread_local"``)."""

    WARMUP = 2

    def __init__(self, fn: Callable[[], None], device: torch.device | str | None = None):
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        )
        with _CAPTURE_LOCK, torch.cuda.device(self.device), ieee_fp32(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.WARMUP):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                fn()

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


# set to "0": ``CudaGraphs`` offers no conditional nodes (the whole decode captured in parts
# with a host check between, as on a PyTorch without them)
CONDITIONALS_VARIABLE = "EDGECAP_GRAPH_CONDITIONALS"


def conditionals_wanted() -> bool:
    """Whether the environment leaves conditional nodes on (``CONDITIONALS_VARIABLE`` not "0")."""
    return os.environ.get(CONDITIONALS_VARIABLE, "1").strip() != "0"


def conditional_nodes() -> bool:
    """Whether this PyTorch captures conditional (if) nodes into a CUDA graph: its
    ``CUDAGraph.begin_capture_to_if_node`` (PyTorch's ``torch.cond`` under a CUDA graph capture
    uses it; a CPU build of PyTorch has it not), built for CUDA 12.4 or newer and not for ROCm
    (PyTorch's methods exist there too, and raise: not supported)."""
    graph = getattr(torch._C, "_CUDAGraph", None)
    names = ("get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node")
    if not all(hasattr(graph, name) for name in names) or getattr(torch.version, "hip", None):
        return False
    try:
        major, minor = (int(part) for part in str(torch.version.cuda).split(".")[:2])
    except ValueError:  # None: not a CUDA build
        return False
    return (major, minor) >= (12, 4)


def capture_if(pred: torch.Tensor, body: Callable[[], None]) -> None:
    """Within a CUDA graph's capture: ``body``'s kernels captured into a conditional node that
    runs them at each replay only while ``pred`` (a bool scalar on the GPU, computed by the
    graph before this point) is true, with no read-back by the host. Outside a capture (the
    warm-up runs before it) ``body`` runs whatever ``pred`` says, as the warm-up of a graph's
    every kernel must. What ``body`` leaves for the kernels after it must be written into
    tensors that exist before it (a replay that skips it leaves them as they were)."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        body()
        return
    graph = torch._C._CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        body()
    finally:
        graph.end_capture_to_conditional_node()


class CudaGraphs:
    """The ``capture(fn) -> graph`` factory of real CUDA graphs on one device (what
    ``TorchBackend(cuda_graphs=True)`` uses). ``conditional``: ``capture_if`` where this
    PyTorch has conditional nodes (``conditional_nodes``) and the environment does not turn
    them off (``EDGECAP_GRAPH_CONDITIONALS=0``), else None: what lets the whole decode stop
    inside one graph once every image is done (``DecodeGraphs``)."""

    __name__ = "CudaGraph"

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.conditional: Callable[[torch.Tensor, Callable[[], None]], None] | None = (
            capture_if if conditional_nodes() and conditionals_wanted() else None
        )

    def __call__(self, fn: Callable[[], None]) -> CudaGraph:
        return CudaGraph(fn, self.device)


class EagerGraph:
    """A stand-in for ``CudaGraph`` on any device: capturing runs ``fn`` once (as the real
    warm-up does, writing the outputs) and ``replay`` runs it again on the same buffers. What
    the tests use on the CPU to check the buffer bookkeeping; ``gpu_check.py --device cpu``
    runs it as the "graphs (emulated)" mode."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.captures = 1
        self.replays = 0
        fn()

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def _pinned(shape, dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class EncoderGraphs:
    """The encoder graph captured per batch size N (up to ``MAX_KEYS`` sizes kept, least
    recently used dropped): a static image buffer (float32, cast to the model's dtype inside the
    graph) and static outputs; ``run`` returns clones of the outputs, so an ``Encoded`` stays
    valid after the next batch of the same size is encoded."""

    def __init__(
        self,
        encoder_graph: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        capture: GraphFactory,
        staging: Staging | None = None,
    ):
        self.module, self.device, self.dtype, self.capture = encoder_graph, device, dtype, capture
        self.staging = staging  # host images' way to the device (the backend's, on CUDA)
        self.graphs = GraphCache()

    @torch.inference_mode()
    def run(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``images`` already on the device (the Captioner's batches: ``TorchBackend.batch_input``,
        or preprocessed there), copied straight into the graph's input, or on the host, through
        ``staging``'s kept page-locked buffer (None: copied as they are). In inference mode
        whatever the caller's: its buffers, made in the first call, are written by every later
        one (an inference tensor may not be written outside inference mode)."""
        key = tuple(images.shape)
        graph, image, outputs = self.graphs.get(key, lambda: self._capture(key))
        if isinstance(images, torch.Tensor):
            image.copy_(images)
        elif self.staging is not None:
            image.copy_(self.staging.upload(self.staging.stack(list(images))))
        else:
            image.copy_(torch.from_numpy(np.ascontiguousarray(images, np.float32)))
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(self, shape: tuple):
        image = torch.zeros(shape, dtype=torch.float32, device=self.device)
        probe = self.module(image.to(self.dtype))
        outputs = tuple(torch.empty_like(p) for p in probe)

        def fn() -> None:
            for out, value in zip(outputs, self.module(image.to(self.dtype))):
                out.copy_(value)

        return self.capture(fn), image, outputs


class StepBuffers:
    """The static buffers and the three graphs of one (N, R) shape (see the module doc)."""

    def __init__(
        self,
        step_graph: torch.nn.Module,
        n_images: int,
        rows: int,
        tails: dict[str, tuple[int, ...]],
        top_k: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: GraphFactory,
    ):
        """``tails``: the shapes after the row dimension of ``features``, ``att_proj``, ``state``
        (h / c) and ``vocab`` (a word-bias row, (V,))."""
        self.n_images, self.rows, self.top_k, self.device = n_images, rows, top_k, device
        R, K, L = rows, top_k, tails["features"][0]
        self.regions = L

        def zeros(shape, dt=dtype):
            return torch.zeros(shape, dtype=dt, device=device)

        # inputs (zeros: indices in range, so a warm-up run on fresh buffers is valid)
        self.index = zeros((2 * R,), torch.int32)
        self.index_host = _pinned((2 * R,), torch.int32, device)
        self.word_bias = zeros((R, tails["vocab"][0]), torch.float32)
        self.bias_host = _pinned((R, tails["vocab"][0]), torch.float32, device)
        self.bias_zero = True
        self.image_index = zeros((R,), torch.int32)
        self.features = zeros((n_images, *tails["features"]))
        self.att_proj = zeros((n_images, *tails["att_proj"]))
        self.h0, self.c0 = zeros((n_images, *tails["state"])), zeros((n_images, *tails["state"]))
        self.h = [zeros((R, *tails["state"])) for _ in range(2)]
        self.c = [zeros((R, *tails["state"])) for _ in range(2)]
        # outputs: [values | ids (int32 bits) | alpha], float32
        self.out = zeros((R * (2 * K + L),), torch.float32)
        self.out_host = _pinned((R * (2 * K + L),), torch.float32, device)
        self.owner: object | None = None

        tokens, source_rows = self.index[:R], self.index[R:]
        values_out = self.out[: R * K].view(R, K)
        ids_out = self.out[R * K : 2 * R * K].view(torch.int32).view(R, K)
        alpha_out = self.out[2 * R * K :].view(R, L)

        def step_fn(h_in, c_in, h_out, c_out):
            def fn() -> None:
                values, ids, h, c, alpha = step_graph(
                    tokens,
                    h_in,
                    c_in,
                    source_rows,
                    self.features,
                    self.att_proj,
                    self.image_index,
                    self.word_bias,
                )
                h_out.copy_(h)
                c_out.copy_(c)
                values_out.copy_(values)
                ids_out.copy_(ids)
                alpha_out.copy_(alpha)

            return fn

        with torch.no_grad():
            self.first = capture(step_fn(self.h0, self.c0, self.h[0], self.c[0]))
            self.from_slot = [
                capture(step_fn(self.h[0], self.c[0], self.h[1], self.c[1])),
                capture(step_fn(self.h[1], self.c[1], self.h[0], self.c[0])),
            ]

    def load(self, owner: object, tensors: dict, image_index: np.ndarray) -> None:
        """Copy a search's image tensors in (device to device) and make ``owner`` the user."""
        self.features.copy_(tensors["features"])
        self.att_proj.copy_(tensors["att_proj"])
        self.h0.copy_(tensors["h0"])
        self.c0.copy_(tensors["c0"])
        self.image_index.copy_(torch.from_numpy(np.asarray(image_index, np.int32)))
        self.owner = owner

    def run(
        self,
        t: int,
        tokens: np.ndarray,
        source_rows: np.ndarray,
        word_bias: np.ndarray | None,
        attention: bool,
    ):
        """Step ``t`` of the search -> (topk_logprobs, topk_ids, alpha or None) on the host."""
        R, K = self.rows, self.top_k
        host = self.index_host.numpy()
        host[:R], host[R:] = tokens, source_rows
        self.index.copy_(self.index_host, non_blocking=True)
        if word_bias is not None:
            self.bias_host.numpy()[...] = word_bias
            self.word_bias.copy_(self.bias_host, non_blocking=True)
            self.bias_zero = False
        elif not self.bias_zero:
            self.word_bias.zero_()
            self.bias_zero = True
        graph = self.first if t == 0 else self.from_slot[(t - 1) % 2]
        graph.replay()
        n = R * (2 * K + self.regions) if attention else 2 * R * K
        self.out_host[:n].copy_(self.out[:n], non_blocking=True)
        _sync(self.device)  # the step's one synchronisation
        flat = self.out_host.numpy()
        values = flat[: R * K].reshape(R, K).copy()
        ids = flat[R * K : 2 * R * K].view(np.int32).reshape(R, K).copy()
        alpha = flat[2 * R * K : n].reshape(R, self.regions).copy() if attention else None
        return values, ids, alpha


class StepGraphs:
    """``StepBuffers`` per (N, R), made on first use and kept (up to ``MAX_KEYS``, least
    recently used dropped): a search whose rows differ from the last one's (a smaller last
    batch, another beam size) gets its own graphs, and comes back to them the next time."""

    def __init__(
        self,
        step_graph: torch.nn.Module,
        vocab_size: int,
        top_k: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: GraphFactory,
    ):
        self.step_graph, self.vocab_size, self.top_k = step_graph, vocab_size, top_k
        self.device, self.dtype, self.capture = device, dtype, capture
        self.keys = GraphCache()  # StepBuffers per key (each captures three graphs)

    def get(self, tensors: dict, rows: int) -> StepBuffers:
        """The buffers for a search of ``rows`` rows over the encoder outputs ``tensors``."""
        n_images = int(tensors["h0"].shape[0])
        tails = {
            "features": tuple(tensors["features"].shape[1:]),
            "att_proj": tuple(tensors["att_proj"].shape[1:]),
            "state": tuple(tensors["h0"].shape[1:]),
            "vocab": (self.vocab_size,),
        }
        key = (n_images, rows, *tails.values())
        return self.keys.get(
            key,
            lambda: StepBuffers(
                self.step_graph, n_images, rows, tails, self.top_k, self.device, self.dtype, self.capture
            ),
        )


class GraphedSession(DecoderSession):
    """A search over ``StepBuffers``: the ``DecoderSession`` of a graphed torch backend."""

    def __init__(self, graphs: StepGraphs, tensors: dict, image_index: np.ndarray, return_attention: bool):
        # in inference mode whatever the caller's, as every step (``EncoderGraphs.run``)
        with torch.inference_mode():
            self.buffers = graphs.get(tensors, len(image_index))
            self.buffers.load(self, tensors, image_index)
        self.return_attention = return_attention
        self.t = 0

    @torch.inference_mode()
    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None):
        if self.buffers.owner is not self:
            raise BackendError(
                "this CUDA-graph search's buffers were taken by a later search of "
                "the same shape: a graphed torch backend runs one search at a "
                "time (use one Captioner per thread)"
            )
        values, ids, alpha = self.buffers.run(self.t, tokens, source_rows, word_bias, self.return_attention)
        self.t += 1
        return StepResult(topk_logprobs=values, topk_ids=ids, alpha=alpha)


def keep_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """An FP32 island in an FP16 model: ``module``'s weights stay float32 and its floating
    inputs are cast to float32 (its output stays float32). Used for the attention-score
    projection and the image classifier, the projections ``edgecap convert --precision fp16``
    keeps in FP32 (``edgecap.build.convert.fp32_nodes``)."""
    module.float()

    def to_fp32(_module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    module.register_forward_pre_hook(to_fp32)
    return module


def keep_fp32_span(modules, dtype: torch.dtype) -> None:
    """A chain of modules kept FP32 as one island (``keep_fp32`` each), whose last output goes
    back to ``dtype`` for the FP16 modules after it."""
    for module in modules:
        keep_fp32(module)
    modules[-1].register_forward_hook(lambda _module, _args, output: output.to(dtype))
