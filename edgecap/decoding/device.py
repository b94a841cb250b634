"""The beam search on the device: ``edgecap.decoding.beam``'s loop and rules over torch tensors.

The same search as the numpy loop, so the same captions (``tests/test_device_search.py``;
``benchmarks/device_search_check.py`` on 200 Flickr8k dev photos), with no host round trip per
word: scores, the top candidates of beam x width, the rules, the finished hypotheses and the
back-pointer reorder of every per-row state all stay on the device, and the caption's tokens
come back in one copy per batch. What it keeps of the numpy loop, rule by rule:

- candidates: each live row's first ``width`` = beam + 1 words of the step's top K (ranked by
  log-probability + word bias), its image's candidates sorted best first, ties in row order
  (a stable sort), as the numpy loop's ``sorted``;
- filters: ``NeverFirst`` (the first word) and ``NoRepeatNgram`` (against each row's token
  history, kept on the device and reordered with the rows); a blocked candidate is skipped;
- selection: an image's ``beam`` best unblocked candidates that are not ``<end>`` continue; an
  ``<end>`` ranked before the last of them finishes a hypothesis while the image has fewer than
  ``beam``; an image is done with ``beam`` finished hypotheses or no live candidate (then, with
  none finished, its live beams become unfinished hypotheses); a done image's rows are masked
  (-inf) and keep their shape;
- scorers: ``TagBonus`` (a per-row "steered" flag, off once the row said a tag word) and the
  fused caption language models (``edgecap.decoding.fusion``: both LSTMs' steps as torch ops,
  their states reordered with the rows, ``weight * (log p_everyday - log p_in_domain)`` per
  row with the gate's weight) add to the step's ``word_bias`` and to the ranking score, never
  to the caption's own log-probability;
- ranking: finished captions before those cut at ``max_length``; when no beam ended, the best
  place one could have ended (``<end>`` in its top K) is the caption; the length penalty only
  when ranking. The final ranking of at most ``beam + 1`` hypotheses per image runs on the host
  after the one copy, with ``edgecap.decoding.beam.ranked``.

Scores are summed in float64, as the numpy loop sums them, so equal inputs rank equally.

Not here: the tag constraint (``TagConstraint``: per candidate a state transition, and a state
dropped once it has enough captions, a data-dependent partition of the candidates that the numpy
loop keeps) and the attention maps; ``search_on_device`` callers fall back to the host loop for
both.

``fixed=True`` runs all ``max_length`` steps with finished images masked and never reads a value
back until the end: the form a CUDA graph can capture (``DecodeGraphs``); ``fixed=False`` stops
when every image is done (one read-back per step, what the CPU wants). Both give the same
hypotheses (tested).

One step is ``_step``: the step's number comes both as a Python int and as a 0-dim tensor, so
that ``DeviceBeamSearch(compiled=True)`` can run every step after the first through one
``torch.compile``d ``_step`` (``fullgraph=True``, static shapes, the number as a tensor):
TorchInductor fuses the search's many small element-wise, gather and scatter operations (about
190 kernels a step on a GPU in eager form) into few generated kernels. It compiles once per
``Plan`` and batch shape (on a 2-core CPU 25 s cold for the first shape, 12 s for the next;
compiling the whole 20-step loop as one graph had taken 89 s there, and had not finished in 184
s on an H200 machine); past ``torch._dynamo``'s recompile limit a new shape runs uncompiled
(``_compile``: with ``fullgraph=True`` dynamo would raise there).
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from edgecap.backends.torch_graphs import GraphCache
from edgecap.decoding import fusion_weight
from edgecap.decoding.beam import Hypothesis, length_normalised, ranked
from edgecap.decoding.options import CaptionOptions
from edgecap.errors import BackendError
from edgecap.files import nearest_existing
from edgecap.models.decoder import CaptionDecoder
from edgecap.models.graphs import StepGraph
from edgecap.vocab import NEVER_FIRST_IDS

NEG_INF = float("-inf")
# The fixed-shape search on a GPU learns, after each of these steps, whether every image is
# done, and stops if so (the steps after run masked for nothing): the host reads it back, or,
# in one graph with conditional nodes, the graph decides it on the device (``DecodeGraphs``).
# The numpy loop's stops on the first 200 Flickr8k dev photos, beam 3 (max_length 20): batch 1
# after 7-20 steps, mean 11.9, 90% by 15; batch 8 after 11-20, mean 15.8: with these checks
# 13.4 and 17.1 steps run on average instead of 20.
DECODE_CHECKS = (8, 12, 16)
MAX_GRAPHS = 8  # whole-decode graphs kept (least recently used dropped beyond this)


class DeviceStep(Protocol):
    """One decoder step over device tensors: what the device search drives."""

    def first_state(self) -> Any:
        """The per-image state before the first word (the rows' source at step 0: images)."""

    def __call__(
        self, state: Any, tokens: torch.Tensor, source_rows: torch.Tensor, word_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens, source_rows int32 (R,), word_bias float32 (R, V) or None -> (top-K
        log-probabilities float32 (R, K) ranked by log-probability + bias, their ids (R, K),
        the new state)."""


class TorchStep:
    """``DeviceStep`` over the torch backend's ``StepGraph``: the state is the LSTM's h / c."""

    def __init__(self, step_graph: torch.nn.Module, tensors: dict, image_index: torch.Tensor):
        self.step_graph = step_graph
        self.tensors = tensors
        self.features, self.att_proj = tensors["features"], tensors["att_proj"]
        self.image_index = image_index
        # with a ``StepGraph``: its decoder, and the image tensors per row (``prepare``)
        self.decoder: CaptionDecoder | None = None
        self.rows: tuple[torch.Tensor, torch.Tensor] = (self.features, self.att_proj)

    def prepare(self) -> None:
        """Once per search, before its first step: the image tensors gathered per row, so that
        a step does not gather them again (``CaptionDecoder.step_rows``)."""
        if isinstance(self.step_graph, StepGraph):
            self.decoder = self.step_graph.decoder
            index = self.image_index
            self.rows = (self.features.index_select(0, index), self.att_proj.index_select(0, index))

    def first_state(self):
        return self.tensors["h0"], self.tensors["c0"]

    def __call__(self, state, tokens, source_rows, word_bias):
        h, c = state
        if self.decoder is not None:  # ``StepGraph``'s step, the ids left int64 (the search's)
            h, c = h.index_select(0, source_rows), c.index_select(0, source_rows)
            values, ids, h, c, _ = self.decoder.step_rows(tokens, h, c, *self.rows, word_bias)
            return values, ids, (h, c)
        values, ids, h, c, _ = self.step_graph(
            tokens, h, c, source_rows, self.features, self.att_proj, self.image_index, word_bias
        )
        return values, ids, (h, c)


class SessionStep:
    """``DeviceStep`` over any backend's numpy ``DecoderSession`` (one host round trip per
    step): the device search's bookkeeping checked against the numpy loop on the fake and
    onnxruntime backends of the tests, not a fast path."""

    def __init__(self, session):
        self.session = session

    def first_state(self):
        return None

    def __call__(self, state, tokens, source_rows, word_bias):
        bias = None if word_bias is None else word_bias.cpu().numpy()
        result = self.session.step(
            tokens.cpu().numpy().astype(np.int32), source_rows.cpu().numpy().astype(np.int32), bias
        )
        device = tokens.device
        return (
            torch.from_numpy(np.asarray(result.topk_logprobs, np.float32)).to(device),
            torch.from_numpy(np.asarray(result.topk_ids, np.int64)).to(device),
            None,
        )


@dataclass(frozen=True)
class Rules:
    """The scorers of one search, as the numpy loop would get them (``rules_for``)."""

    tag_words: tuple[frozenset[int], ...] | None = None  # per image, for the tag bonus
    fusion: Any = None  # ``fusion.Fusion``, when it runs
    fusion_weights: np.ndarray | None = None  # (R,) float32: each row's weight


def rules_for(
    options: CaptionOptions, n_images: int, tag_words, fusion, class_probs: np.ndarray | None
) -> Rules:
    """What ``edgecap.decoding.search_with_tags`` turns into scorers for an unconstrained
    search: the tag bonus when an image has tag words and the bonus is on; the fusion with the
    option's weight (None: the model's) times each photo's gate, when any row gets weight."""
    tags = tag_words if tag_words is not None and any(tag_words) and options.guidance_bonus > 0 else None
    weights = None
    weight = fusion_weight(options, fusion)
    if weight > 0:
        index = np.repeat(np.arange(n_images, dtype=np.int32), options.beam_size)
        scorer = fusion.scorer(weight, index, class_probs=class_probs)
        if scorer.active:
            weights = scorer.weights[:, 0]
    return Rules(tags, fusion if weights is not None else None, weights)


class TorchLM:
    """``fusion.CaptionLM``'s arrays as tensors on the device (each word's input row, the
    recurrent and output weights), which ``TorchLMPair`` steps."""

    def __init__(self, lm, device: torch.device):
        def tensor(array):
            return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(device)

        self.hidden = lm.hidden
        self.input = tensor(lm._input)  # (V, 4H): embedding @ w_ih.T + bias, per word
        self.w_hh_t = tensor(lm.arrays["w_hh"].T)  # (H, 4H)
        self.out_w_t = tensor(lm.arrays["out_w"].T)  # (H, V)
        self.out_b = tensor(lm.arrays["out_b"])


class TorchLMPair:
    """Both fused models' steps at once (everyday, in-domain), ``CaptionLM.step_logits``' math
    (sigmoid as 0.5 (tanh(x / 2) + 1), the normaliser as max + log-sum-exp):
    the element-wise work runs on (2, R, .) stacks, and each matrix product is one batched
    product over both models (``bmm``, and ``baddbmm`` for the recurrent product plus the words'
    input rows: one kernel for two, the sum in it; its rounding may differ from one product a
    model and a sum after it, in the last bits); the input and recurrent weights of the sigmoid
    gates (i, f, o) are pre-multiplied by 0.5 (exact in binary floating point), so that one tanh
    over all four gates gives tanh(0.5 x) for them and tanh(x) for g."""

    def __init__(self, lms: tuple[TorchLM, TorchLM]):
        self.models = tuple(lms)
        H = self.hidden = lms[0].hidden
        assert all(lm.hidden == H and lm.out_b.shape == lms[0].out_b.shape for lm in lms)
        scale = torch.full((4 * H,), 0.5, device=lms[0].input.device)
        scale[2 * H : 3 * H] = 1.0
        self.input = torch.stack([lm.input * scale for lm in lms])  # (2, V, 4H)
        self.w_hh_t = torch.stack([lm.w_hh_t * scale for lm in lms])  # (2, H, 4H)
        self.out_w_t = torch.stack([lm.out_w_t for lm in lms])  # (2, H, V)
        self.out_b = torch.stack([lm.out_b for lm in lms])[:, None, :]  # (2, 1, V)

    def __iter__(self):
        return iter(self.models)

    def step(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """tokens (R,), h, c (2, R, H) -> (logits (2, R, V), log-normalisers (2, R, 1), h, c)."""
        H = self.hidden
        # the words' input rows plus the recurrent product, one batched product (``baddbmm``);
        # t: tanh(0.5 x) for i, f, o, tanh(x) for g
        t = torch.tanh(torch.baddbmm(self.input.index_select(1, tokens), h, self.w_hh_t))
        s = 0.5 * (t + 1.0)
        c = s[:, :, H : 2 * H] * c + s[:, :, :H] * t[:, :, 2 * H : 3 * H]
        h = s[:, :, 3 * H :] * torch.tanh(c)
        logits = torch.bmm(h, self.out_w_t) + self.out_b
        top = logits.max(dim=2, keepdim=True).values
        norm = top + torch.log(torch.exp(logits - top).sum(dim=2, keepdim=True))
        return logits, norm, h, c


@dataclass(frozen=True)
class Plan:
    """What shapes one search (a whole-decode graph is captured per plan)."""

    n_images: int
    beam: int
    max_length: int
    width: int  # candidates per row: min(beam + 1, K)
    no_repeat_ngram: int
    penalty: float | None
    start_id: int
    end_id: int
    tag_bonus: float | None  # None: no tag bonus in this search
    fusion: bool  # the fused language models run
    endings: bool = False  # every place the search could have ended comes back (``beam_search``'s)


@dataclass
class Inputs:
    """A search's device tensors (static buffers, for a captured graph)."""

    state: Any  # the step's first state
    image_index: torch.Tensor  # (R,) int32
    tag_words: torch.Tensor | None  # (N, V) bool: each image's tag words
    fusion_weights: torch.Tensor | None  # (R, 1) float32: each row's fusion weight


def fused_available(device: torch.device) -> None:
    """Raises ``BackendError`` when the fused search cannot run on ``device``: it needs the
    ``triton`` package (PyTorch's CUDA wheels for Linux bring it), and a CUDA device or, on
    the CPU, Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported: slow, for
    the tests). Compiled for a GPU (not interpreted) it needs two writable folders: Triton's
    cache (``TRITON_CACHE_DIR``; else ``$TRITON_HOME/.triton/cache``; else ``~/.triton/cache``:
    with HOME unset the user's home in /etc/passwd, and for a user without an entry there a
    folder named ``~`` in the working folder) and a temporary folder (ptxas's files; the
    launcher's C build). Without either, Triton's compiler (triton 3.9, for sm_90 on a machine
    without a GPU) raised a raw OSError or tempfile's FileNotFoundError; on a GPU that would be
    the first caption's. Not yet run on a GPU."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            "the fused device search runs a Triton kernel: install triton (PyTorch's CUDA "
            f"wheels for Linux bring it) ({exc})"
        ) from None
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        raise BackendError(
            f"the fused device search runs its Triton kernel on a CUDA GPU, not on {device.type} "
            "(there only in Triton's interpreter, TRITON_INTERPRET=1: slow, for tests)"
        )
    if interpreted:  # nothing compiled, nothing written
        return
    _temporary_folder("the fused device search compiles its Triton kernel with temporary files (ptxas's)")
    try:
        from triton import knobs

        folder = knobs.cache.dir
    except (ImportError, AttributeError):  # a triton before its knobs (3.3): its own errors
        return
    if os.environ.get("TRITON_CACHE_MANAGER") is None:  # Triton's own files, not a custom cache
        _writable_cache("the fused device search: Triton's", folder, "TRITON_CACHE_DIR")


def compile_available() -> None:
    """Raises ``BackendError`` where ``torch.compile`` (``compiled=True``) cannot write what it
    compiles. TorchInductor keeps it in ``TORCHINDUCTOR_CACHE_DIR``, by default a folder
    ``torchinductor_USER`` in Python's temporary folder, and asks Python for that folder when
    it is imported even where ``TORCHINDUCTOR_CACHE_DIR`` is set (torch 2.13: its precompiled
    headers' folder). With no writable temporary folder (TMPDIR, /tmp, /var/tmp, /usr/tmp and
    the working folder: a read-only root file system) the first caption raised tempfile's
    FileNotFoundError from torch's import, a traceback; with an unwritable
    ``TORCHINDUCTOR_CACHE_DIR`` torch's InductorError (OSError: Read-only file system) after
    seconds of compiling."""
    _temporary_folder(
        "compile_search=True: torch.compile writes the code it compiles under the temporary folder"
    )
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        except ImportError:  # a torch that keeps it elsewhere: its own errors
            return
        folder = default_cache_dir()
    _writable_cache("compile_search=True: torch.compile's", folder, "TORCHINDUCTOR_CACHE_DIR")


def _temporary_folder(needs: str) -> None:
    """Raises ``BackendError``, ``needs`` and what to do, where Python finds no writable
    temporary folder (``tempfile.gettempdir``: TMPDIR, /tmp, /var/tmp, /usr/tmp, the working
    folder)."""
    try:
        tempfile.gettempdir()
    except OSError as exc:
        raise BackendError(
            f"{needs}, and no temporary folder can be written: set TMPDIR to a writable folder "
            f"({exc.strerror or exc})"
        ) from None


def _writable_cache(whose: str, folder: str, variable: str) -> None:
    """Raises ``BackendError`` where the cache folder ``folder`` (set by the environment
    variable ``variable``) cannot be written, or made where it is missing: a read-only file
    system, another user's folder."""
    path = Path(os.path.abspath(folder))
    existing = nearest_existing(path)
    which = variable if variable in os.environ else "cache folder"
    if not existing.is_dir():  # a file (an executable one passes the access check below)
        where = "is" if existing == path else f"cannot be made below {existing}, which is"
        raise BackendError(
            f"{whose} {which} {path} {where} not a folder: set {variable} to a writable folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable" if existing == path else f"cannot be made in {existing}, not writable"
        raise BackendError(f"{whose} {which} {path} {why}: set {variable} to a writable folder")


class DeviceBeamSearch:
    """The device search over one ``DeviceStep``; ``lms``: the fused models as ``TorchLM``
    (everyday, in-domain) or None."""

    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        never_first: tuple[int, ...] = NEVER_FIRST_IDS,
        compiled: bool = False,
        fused: bool = False,
    ):
        if compiled and fused:
            raise ValueError("a device search is compiled (torch.compile) or fused (Triton), not both")
        self.device = torch.device(device)
        if fused:
            fused_available(self.device)
        if compiled:
            compile_available()
        self.compiled = compiled
        self.fused = fused
        mask = np.zeros(vocab_size, bool)
        mask[list(never_first)] = True
        self.never_first = torch.from_numpy(mask).to(self.device)
        self.vocab_size = vocab_size
        self._lms: dict[int, tuple[object, TorchLMPair]] = {}

    def lms(self, fusion) -> TorchLMPair:
        """The fusion's two language models on the device (made once per ``Fusion``)."""
        kept = self._lms.get(id(fusion))
        if kept is None or kept[0] is not fusion:
            kept = (
                fusion,
                TorchLMPair((TorchLM(fusion.everyday, self.device), TorchLM(fusion.in_domain, self.device))),
            )
            self._lms[id(fusion)] = kept
        return kept[1]

    def plan(
        self,
        n_images: int,
        options: CaptionOptions,
        top_k: int,
        start_id: int,
        end_id: int,
        tag_words,
        fusion_weights,
        endings: bool = False,
    ) -> Plan:
        """``endings``: every place the search could have ended comes back (``unpack``)."""
        return Plan(
            n_images,
            options.beam_size,
            options.max_length,
            min(options.beam_size + 1, top_k),
            options.no_repeat_ngram,
            options.length_penalty,
            start_id,
            end_id,
            options.guidance_bonus if tag_words is not None else None,
            fusion_weights is not None,
            endings,
        )

    def inputs(self, plan: Plan, state, tag_words, fusion_weights) -> Inputs:
        """Host inputs to device tensors: ``tag_words`` (N,) frozensets or None,
        ``fusion_weights`` (R,) float32 or None."""
        image_index = torch.from_numpy(np.repeat(np.arange(plan.n_images, dtype=np.int32), plan.beam)).to(
            self.device
        )
        tags = None
        if tag_words is not None:
            mask = np.zeros((plan.n_images, self.vocab_size), bool)
            for image, words in enumerate(tag_words):
                mask[image, list(words)] = True
            tags = torch.from_numpy(mask).to(self.device)
        weights = (
            None
            if fusion_weights is None
            else torch.from_numpy(np.asarray(fusion_weights, np.float32).reshape(-1, 1)).to(self.device)
        )
        return Inputs(state, image_index, tags, weights)

    def run(
        self,
        step: DeviceStep,
        plan: Plan,
        inputs: Inputs,
        lms=None,
        fixed: bool = False,
        checks: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """The search's result, packed (``unpack``): float64 on the device. ``fixed`` with
        ``checks``: the steps after which it reads once whether every image is done (``_decode``).
        ``compiled``: the fixed form, compiled."""
        return _decode(
            step, plan, inputs, self.never_first, lms, fixed or self.compiled, self.one_step(), checks
        )

    def one_step(self) -> Callable[..., tuple] | None:
        """What runs the steps after the first: the compiled ``_step``, the fused one, or None
        (``_step`` itself)."""
        if self.compiled:
            return _compiled_step()
        return _fused_step if self.fused else None

    def search(
        self,
        make_step: Callable[[torch.Tensor], DeviceStep],
        n_images: int,
        options: CaptionOptions,
        top_k: int,
        start_id: int,
        end_id: int,
        rules: Rules = Rules(),
        describe: Callable[[], str] = lambda: "device search",
        fixed: bool = False,
        endings: bool = False,
        checks: tuple[int, ...] = (),
    ) -> list[list[Hypothesis]]:
        """Each image's hypotheses, best first (as ``beam.beam_search`` without a partition
        or attention, ``endings`` as there). ``make_step``: the rows' image index (R,) int32 ->
        the step; ``fixed``, ``checks``: as ``run``."""
        options.validate(top_k)
        plan = self.plan(
            n_images, options, top_k, start_id, end_id, rules.tag_words, rules.fusion_weights, endings
        )
        inputs = self.inputs(plan, None, rules.tag_words, rules.fusion_weights)
        step = make_step(inputs.image_index)
        inputs.state = step.first_state()
        lms = None if rules.fusion is None else self.lms(rules.fusion)
        packed = self.run(step, plan, inputs, lms, fixed, checks)
        return unpack(packed.cpu().numpy(), plan, options.n_best, describe)


def _denominator(length: int, penalty: float | None) -> float:
    """What ``length_normalised`` divides by, computed as it computes it (a Python float)."""
    return float(length) if penalty is None else ((5.0 + length) / 6.0) ** penalty


def _repeats(history: torch.Tensor, words: torch.Tensor, n: int, last_at, inside) -> torch.Tensor:
    """history (R, T) int64 whose first t words are each row's so far, words (R, W) -> (R, W)
    bool: the word would repeat an n-gram of those words (``NoRepeatNgram.blocks``; none while
    t < n). ``last_at`` (n-1,): where the last n-1 words are; ``inside`` (T-n+1,) bool: the
    n-grams that lie inside the t words (``_Loop.repeat_tables``' row t)."""
    R = history.shape[0]
    if n == 1:
        match = inside[None, :]  # (1, T)
        following = history
    else:
        prefixes = history.unfold(1, n - 1, 1)  # (R, T-n+2, n-1): the n-1 words from each j
        last = history.gather(1, last_at[None].expand(R, n - 1))  # (R, n-1)
        match = (prefixes[:, : inside.shape[0]] == last[:, None, :]).all(2) & inside  # (R, T-n+1)
        following = history[:, n - 1 :]  # (R, T-n+1): the word after each
    return ((following[:, :, None] == words[:, None, :]) & match[:, :, None]).any(1)


class _Pool:
    """Per image, up to ``beam + 1`` hypotheses (finished ones first, in the order they
    finished), plus a scratch slot that scatters of unused candidates write to."""

    def __init__(self, n: int, beam: int, length: int, device):
        slots = beam + 2
        self.beam = beam
        self.tokens = torch.zeros((n, slots, length), dtype=torch.int64, device=device)
        self.length = torch.zeros((n, slots), dtype=torch.int64, device=device)
        self.rank_lp = torch.zeros((n, slots), dtype=torch.float64, device=device)
        self.log_prob = torch.zeros((n, slots), dtype=torch.float64, device=device)
        self.finished = torch.zeros((n, slots), dtype=torch.bool, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)

    def put(
        self,
        add: torch.Tensor,
        pos: torch.Tensor,
        tokens,
        length: torch.Tensor,
        rank_lp,
        log_prob,
        finished: bool,
    ) -> None:
        """Write the entries ``add`` (N, M) at slots ``pos`` (N, M); tokens (N, M, T); length:
        0-dim int64."""
        index = torch.where(add, pos, self.beam + 1)  # unused: the scratch slot
        self.tokens.scatter_(1, index[:, :, None].expand_as(tokens), tokens)
        self.length.scatter_(1, index, length.expand_as(index))
        self.rank_lp.scatter_(1, index, rank_lp)
        self.log_prob.scatter_(1, index, log_prob)
        self.finished.scatter_(1, index, finished)
        self.count += add.sum(1)

    def keep_live(
        self, images: torch.Tensor, live: torch.Tensor, history, length: torch.Tensor, sum_lp, true_lp
    ) -> None:
        """The live rows (R,) of ``images`` (N,) bool become unfinished hypotheses, in row
        order, while the image has fewer than ``beam`` (``beam._keep_live``)."""
        n, beam = images.shape[0], self.beam
        rows = live.view(n, beam) & images[:, None]
        pos = self.count[:, None] + rows.long().cumsum(1) - 1
        add = rows & (pos < beam)
        self.put(
            add, pos, history.view(n, beam, -1), length, sum_lp.view(n, beam), true_lp.view(n, beam), False
        )


@functools.cache
def _step_numbers(device: torch.device, length: int) -> tuple[torch.Tensor, ...]:
    """0-dim int64 tensors 0 .. length on ``device``, made once: a step's number as the step
    function takes it (a tensor, so that one compiled step serves every step, and a captured
    graph keeps them alive)."""
    return tuple(torch.full((), t, dtype=torch.int64, device=device) for t in range(length + 1))


class _Loop:
    """What every step of one search reads or writes in place: the plan, the step, the rules'
    tensors, the pool of hypotheses and the best endings."""

    def __init__(self, step: DeviceStep, plan: Plan, x: Inputs, never_first: torch.Tensor, lms):
        N, B, T = plan.n_images, plan.beam, plan.max_length
        R, C = N * B, B * plan.width
        device = x.image_index.device
        self.step, self.plan, self.never_first, self.lms = step, plan, never_first, lms
        prepare = getattr(step, "prepare", None)
        if prepare is not None:
            prepare()
        self.fusion_weights = x.fusion_weights
        self.image_rows = x.image_index.long()
        self.rows_of_candidates = torch.arange(R, device=device)[:, None].expand(R, plan.width).reshape(N, C)
        self.image_first = torch.arange(N, device=device)[:, None] * B  # (N, 1)
        self.row_before = self.image_first - 1  # (N, 1): the new row of a 1-based slot
        self.rows_f64 = self.rows_of_candidates.view(R, plan.width).to(torch.float64)
        # the new rows' defaults (and a scratch row): rank sum, model sum, word, source row
        self.new_rows = torch.zeros((R + 1, 4), dtype=torch.float64, device=device)
        self.new_rows[:, 0].fill_(NEG_INF)
        self.new_rows[:, 2].fill_(plan.end_id)
        self.new_rows[:R, 3].copy_(self.image_first.expand(N, B).reshape(R))
        self.pool = _Pool(N, B, T, device)
        # the best place a beam could have ended, while no hypothesis of the image has finished
        # (without plan.endings; with them it is one of the endings, and stays empty)
        self.ending_tokens = torch.zeros((N, T), dtype=torch.int64, device=device)
        self.ending_length = torch.zeros(N, dtype=torch.int64, device=device)
        self.ending_rank = torch.full((N,), NEG_INF, dtype=torch.float64, device=device)
        self.ending_rank_lp = torch.zeros(N, dtype=torch.float64, device=device)
        self.ending_lp = torch.full((N,), NEG_INF, dtype=torch.float64, device=device)
        self.denominators, self.repeat_tables = _tables(device, T, plan.no_repeat_ngram, plan.penalty)
        # with plan.endings, per step: each row's <end> (rank sum, log-prob; -inf: none) and words
        self.end_rank_lp = torch.full((T, R), NEG_INF, dtype=torch.float64, device=device)
        self.end_lp = torch.zeros((T, R), dtype=torch.float64, device=device)
        self.end_words = torch.zeros((T, R, T), dtype=torch.int64, device=device)
        # per step: its log-probabilities were finite, or every image was done before it
        self.step_ok = torch.ones(T, dtype=torch.bool, device=device)
        self.tag_rows = self.tag_bias = None
        if plan.tag_bonus is not None:
            assert x.tag_words is not None  # the plan has a tag bonus only with tag words
            self.tag_rows = x.tag_words.index_select(0, self.image_rows)  # (R, V) bool
            self.tag_rows_unsaid = ~self.tag_rows
            self.tag_bias = self.tag_rows.to(torch.float32) * np.float32(plan.tag_bonus)

    def first(self, x: Inputs) -> tuple:
        """The carry before the first step: tokens, source rows, the step's state, the rank
        and model sums, the words so far, the done images, the steered rows, the language
        models' states (the first bad step is in ``step_ok``, not carried)."""
        plan, device = self.plan, x.image_index.device
        N, B, R, T = plan.n_images, plan.beam, plan.n_images * plan.beam, plan.max_length
        row_in_image = torch.arange(R, device=device) % B
        steered = None if self.tag_rows is None else self.tag_rows.any(1)
        lm_states = None
        if plan.fusion:
            hidden = self.lms.hidden
            lm_states = (
                torch.zeros((2, R, hidden), device=device),
                torch.zeros((2, R, hidden), device=device),
            )
        return (
            torch.full((R,), plan.start_id, dtype=torch.int32, device=device),
            x.image_index,
            x.state,
            torch.where(row_in_image == 0, 0.0, NEG_INF).to(torch.float64),
            torch.zeros(R, dtype=torch.float64, device=device),
            torch.zeros((R, T), dtype=torch.int64, device=device),
            torch.zeros(N, dtype=torch.bool, device=device),
            steered,
            lm_states,
        )


@functools.cache
def _tables(device: torch.device, length: int, n: int, penalty: float | None):
    """A search's constant tables on ``device``, made once (copies from the host, which a CUDA
    graph may not capture: the graph's warm-up runs make them): what ``length_normalised``
    divides by per length 0 .. T (float64, computed as it computes it); and with the no-repeat
    rule, per step t, where its last n-1 words are (T, n-1) int64 and which of the n-grams
    starting at 0 .. T-n lie inside its t words (T, T-n+1) bool (None without the rule)."""
    denominators = torch.tensor(
        [_denominator(k, penalty) for k in range(length + 1)], dtype=torch.float64, device=device
    )
    if not 0 < n <= length:
        return denominators, None
    t = np.arange(length)[:, None]
    last_at = np.maximum(t - (n - 1) + np.arange(n - 1)[None, :], 0)
    inside = np.arange(length - n + 1)[None, :] < t - n + 1
    return denominators, (torch.from_numpy(last_at).to(device), torch.from_numpy(inside).to(device))


def _decode(
    step: DeviceStep,
    plan: Plan,
    x: Inputs,
    never_first: torch.Tensor,
    lms,
    fixed: bool,
    one_step: Callable[..., tuple] | None = None,
    checks: tuple[int, ...] = (),
) -> torch.Tensor:
    """The search; ``one_step``: ``_step`` or a compiled ``_step``, for the steps after the
    first (the first step's state has a row per image, the later ones a row per beam: a
    compiled step of fixed shapes serves the later ones). ``fixed``: every step runs, finished
    images masked, except that after each step in ``checks`` the search reads once whether
    every image is done, and stops if so; not ``fixed``: it reads that after every step."""
    loop, carry = _start(step, plan, x, never_first, lms)
    T = plan.max_length
    for begin, end in _segments(T, checks if fixed else tuple(range(1, T))):
        carry = _steps(loop, carry, begin, end, one_step)
        if end < T and bool(carry[6].all()):
            break
    return _finish(loop, carry)


def _segments(length: int, checks: tuple[int, ...]) -> list[tuple[int, int]]:
    """The steps 0 .. length-1 cut after each step count in ``checks``: [(begin, end), ...]."""
    cuts = [0, *sorted({c for c in checks if 0 < c < length}), length]
    return list(zip(cuts[:-1], cuts[1:]))


def _start(step: DeviceStep, plan: Plan, x: Inputs, never_first: torch.Tensor, lms) -> tuple[_Loop, tuple]:
    """A search's tables and its carry before the first step."""
    loop = _Loop(step, plan, x, never_first, lms)
    return loop, loop.first(x)


def _steps(loop: _Loop, carry: tuple, begin: int, end: int, one_step: Callable[..., tuple] | None) -> tuple:
    """Steps ``begin`` .. ``end - 1`` of the search (the first through ``_step`` itself)."""
    numbers = _step_numbers(loop.image_rows.device, loop.plan.max_length)
    for t in range(begin, end):
        if one_step is _fused_step:  # every step, told which is the first
            carry = _fused_step(loop, 0 if t == 0 else None, numbers[t], carry)
        elif t == 0 or one_step is None:
            carry = _step(loop, t, numbers[t], carry)
        else:
            carry = one_step(loop, None, numbers[t], carry)
    return carry


def _finish(loop: _Loop, carry: tuple) -> torch.Tensor:
    """The search's result, packed (``unpack``), after its last step."""
    plan = loop.plan
    _, _, _, sum_lp, true_lp, history, done, _, _ = carry
    bad = ~loop.step_ok
    first_bad = torch.where(bad.any(), bad.to(torch.int64).argmax(), -1)
    pool = loop.pool
    B = plan.beam
    numbers = _step_numbers(loop.image_rows.device, plan.max_length)
    # out of words: the live beams of unfinished images become (unfinished) hypotheses
    pool.keep_live(~done, sum_lp != NEG_INF, history, numbers[plan.max_length], sum_lp, true_lp)
    return torch.cat(
        [
            pool.tokens[:, : B + 1].reshape(-1).to(torch.float64),
            pool.length[:, : B + 1].reshape(-1).to(torch.float64),
            pool.rank_lp[:, : B + 1].reshape(-1),
            pool.log_prob[:, : B + 1].reshape(-1),
            pool.finished[:, : B + 1].reshape(-1).to(torch.float64),
            pool.count.to(torch.float64),
            loop.ending_tokens.reshape(-1).to(torch.float64),
            loop.ending_length.to(torch.float64),
            loop.ending_rank_lp,
            loop.ending_lp,
            (loop.ending_rank != NEG_INF).to(torch.float64),
            first_bad.reshape(1).to(torch.float64),
            *(
                (
                    loop.end_rank_lp.reshape(-1),
                    loop.end_lp.reshape(-1),
                    loop.end_words.reshape(-1).to(torch.float64),
                )
                if plan.endings
                else ()
            ),
        ]
    )


def _step(loop: _Loop, t: int | None, number: torch.Tensor, carry: tuple) -> tuple:
    """One step of the search: ``t`` the step's number, or None for "some step after the
    first" (a compiled step serves them all: then only ``number``, the same as a 0-dim int64
    tensor, says which); ``carry`` as ``_Loop.first`` gives it; -> the next carry. Writes the
    pool and the endings in place."""
    plan, pool = loop.plan, loop.pool
    N, B, T, W = plan.n_images, plan.beam, plan.max_length, plan.width
    R, C, end = N * B, B * W, plan.end_id
    tokens, source, state, sum_lp, true_lp, history, done, steered, _ = carry
    all_done = done.all()  # no image left: the numpy loop had stopped before this step
    bias, lm_states = _word_bias(loop, t, carry)
    values, ids, state = loop.step(state, tokens, source, bias)
    ids = ids.long()
    at_t = number.view(1)
    # finite, or a step the numpy loop never ran; the first bad step is read in ``_finish``
    loop.step_ok.index_copy_(0, at_t, (torch.isfinite(values).all() | all_done).view(1))
    lp = values.to(torch.float64)
    ranked_lp = lp if bias is None else lp + bias.gather(1, ids).to(torch.float64)
    live = sum_lp != NEG_INF
    candidates = sum_lp[:, None] + ranked_lp  # (R, K): what ranks
    model_lp = true_lp[:, None] + lp  # (R, K): the model's own
    if t != 0 and plan.endings:
        # top-K ids are distinct: a row's one <end>, and where. A max over int32, not bool:
        # torch.compile (2.13, CPU) fails to generate one over bool, and a bool max has not run
        # on a GPU here
        has, at = (ids == end).to(torch.int32).max(1, keepdim=True)
        has = has.bool()
        # a dead row's <end> is no ending (its candidates are -inf, or NaN in a step after every
        # image is done that returned NaN, which the numpy loop never ran)
        end_rank_lp = torch.where(has[:, 0] & live, candidates.gather(1, at)[:, 0], NEG_INF)
        loop.end_rank_lp.index_copy_(0, at_t, end_rank_lp[None])
        loop.end_lp.index_copy_(0, at_t, model_lp.gather(1, at)[:, 0][None])
        loop.end_words.index_copy_(0, at_t, history[None])
    if t != 0 and not plan.endings:  # with endings, the best place to end is one of them
        _best_ending(loop, t, number, ids, live, candidates, model_lp, history, done)
    words = ids[:, :W]
    blocked = loop.never_first[words] if t == 0 else None
    n = plan.no_repeat_ngram
    if loop.repeat_tables is not None and (t is None or t >= n):
        last_at, inside = loop.repeat_tables
        if t is None:
            last_at, inside = last_at.index_select(0, at_t)[0], inside.index_select(0, at_t)[0]
        else:
            last_at, inside = last_at[t], inside[t]
        # <end> is never blocked: no live row's words so far hold it (a row given <end> is dead)
        repeats = _repeats(history, words, n, last_at, inside)
        blocked = repeats if blocked is None else blocked | repeats
    finite = torch.isfinite(candidates[:, :W])
    ok = finite if blocked is None else finite > blocked  # finite and not blocked
    score = candidates[:, :W].reshape(N, C)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    # what a candidate carries, sorted in one gather: float64 holds the word and row ids exactly
    carried = torch.stack((candidates[:, :W], model_lp[:, :W], words.to(torch.float64), loop.rows_f64), 2)
    s_all = carried.view(N, C, 4).gather(1, order[:, :, None].expand(N, C, 4))
    s_score, s_model, s_word, s_row_f = s_all.unbind(2)
    s_row = s_row_f.long()
    s_ok = ok.view(N, C).gather(1, order)  # a done image's rows are masked: none
    is_end = s_word == end
    going = s_ok & ~is_end
    going_before = going.long().cumsum(1)  # continuations up to here, inclusive
    taken = going & (going_before <= B)
    # an <end> before the beam's last continuation finishes, while there is room
    ending = s_ok & is_end & (going_before < B)
    pos = pool.count[:, None] + ending.long().cumsum(1) - 1
    add = ending & (pos < B)
    pool.put(
        add, pos, history.index_select(0, s_row.reshape(-1)).view(N, C, T), number, s_score, s_model, True
    )
    slot = torch.where(taken, going_before + loop.row_before, R)  # the new row; R: a scratch row
    # per new row: rank sum, model sum, word, source row (an unfilled one: -inf, 0, <end>, its
    # image's first row), in one scatter
    new = loop.new_rows.clone().scatter_(0, slot.view(N * C, 1).expand(N * C, 4), s_all.view(N * C, 4))
    image_live = going.any(1)
    # every continuation blocked and nothing finished: keep what the live beams have
    pool.keep_live((pool.count == 0) > (done | image_live), live, history, number, sum_lp, true_lp)
    done = (pool.count >= B) | (done >= image_live)  # done, or no live continuation
    new[:R].view(N, B, 4)[:, :, 0].masked_fill_(done[:, None], NEG_INF)
    new_lp, new_true = new[:R, 0], new[:R, 1]
    new_tokens, new_source = new[:R, 2].long(), new[:R, 3].long()
    if steered is not None and loop.tag_rows is not None:
        # a dead row's flag never reaches a live row (live rows come from live rows)
        unsaid = loop.tag_rows_unsaid.gather(1, new_tokens[:, None])[:, 0]
        steered = steered.index_select(0, new_source) & unsaid
    history = history.index_select(0, new_source)
    history.index_copy_(1, at_t, new_tokens[:, None])
    return (
        new_tokens,
        new_source,
        state,
        new_lp,
        new_true,
        history,
        done,
        steered,
        lm_states,
    )


def _word_bias(loop: _Loop, t: int | None, carry: tuple):
    """A step's word bias (R, V) float32 or None: the tag bonus of the steered rows and the
    fused language models' ratio times each row's weight; -> (the bias, the language models'
    new states). ``t``: as ``_step``'s."""
    tokens, source, steered, lm_states = carry[0], carry[1], carry[7], carry[8]
    parts = []
    if steered is not None:
        parts.append(loop.tag_bias * steered[:, None])
    if lm_states is not None:
        h, c = lm_states
        if t != 0:  # the first step's source rows are images, and every state is zero
            h, c = h.index_select(1, source), c.index_select(1, source)
        logits, norms, h, c = loop.lms.step(tokens, h, c)
        lm_states = (h, c)
        ratio = logits[0] - logits[1]
        ratio = ratio - (norms[0] - norms[1])
        parts.append(ratio * loop.fusion_weights)
    bias = parts[0] if len(parts) == 1 else (parts[0] + parts[1] if parts else None)
    return bias, lm_states


def _fused_step(loop: _Loop, t: int | None, number: torch.Tensor, carry: tuple) -> tuple:
    """``_step`` with its bookkeeping in one Triton kernel (``edgecap.decoding.device_kernel``;
    ``t``: 0 for the first step, None for one after it): over the torch backend's decoder, its
    step with its gathers and joins in kernels too (``edgecap.decoding.step_kernels``); over
    another step, the word bias as there with the language models' element-wise work in four
    kernels (``edgecap.decoding.lm_kernels``) and the step as it is; then the kernel. The same
    next carry and the same writes. Beams wider than the kernel takes
    (``device_kernel.supports``) run ``_step``."""
    from edgecap.decoding.device_kernel import bookkeeping, supports
    from edgecap.decoding.lm_kernels import word_bias
    from edgecap.decoding.step_kernels import decoder_of, fused_step

    assert t in (0, None)  # the first step, or one after it
    if not supports(loop.plan):  # a beam too wide for one program's ranking
        return _step(loop, t, number, carry)
    decoder = decoder_of(loop.step)
    if decoder is not None:  # the decoder's step with its joins in kernels too
        return fused_step(loop, decoder, t, number, carry)
    bias, lm_states = word_bias(loop, t, carry)
    values, ids, state = loop.step(carry[2], carry[0], carry[1], bias)
    return bookkeeping(loop, number, carry, values, ids, bias, state, lm_states, first=t == 0)


@functools.cache
def _compiled_step() -> Callable[..., tuple]:
    """``_step`` through ``torch.compile``, made once per process (its compiled graphs are
    cached per shape by torch): one compile per plan and batch shape, serving every step after
    the first (``_compile``)."""
    return _compile()


def _compile(backend: Any = "inductor") -> Callable[..., tuple]:
    """``_step`` compiled by ``backend``, and uncompiled for a shape past ``torch._dynamo``'s
    recompile limit (``torch._dynamo.config.recompile_limit`` compiles of one function, 8 by
    default: a service that meets many batch sizes and plans): with ``fullgraph=True`` dynamo
    raises there instead of running the function uncompiled as it otherwise would. The error
    comes before the step runs anything, so the uncompiled step runs in its place (a
    ``UserWarning`` says so, once), and for that shape from then on: asking dynamo again each
    step would cost its guards' evaluation and a logged warning every time."""
    exc = torch._dynamo.exc  # FailOnCacheLimitHit before torch 2.6
    limit_hit = tuple(
        getattr(exc, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit") if hasattr(exc, n)
    )
    compiled = torch.compile(_step, fullgraph=True, dynamic=False, backend=backend)
    uncompiled: set = set()  # the shapes past the limit (``_shape``)

    def step(loop: _Loop, t: int | None, number: torch.Tensor, carry: tuple) -> tuple:
        if uncompiled and _shape(loop, t, carry) in uncompiled:
            return _step(loop, t, number, carry)
        try:
            return compiled(loop, t, number, carry)
        except limit_hit:
            if not uncompiled:
                warnings.warn(
                    "the compiled device search met more shapes than torch._dynamo's recompile "
                    "limit (torch._dynamo.config.recompile_limit) compiles: those run uncompiled",
                    UserWarning,
                    stacklevel=2,
                )
            uncompiled.add(_shape(loop, t, carry))
            return _step(loop, t, number, carry)

    return step


def _shape(loop: _Loop, t: int | None, carry: tuple) -> tuple:
    """What a compiled step of ``_compile`` is told apart by: the search's plan, whether the
    step number is a tensor, the carry's tensors' shapes and types."""
    leaves = tree_flatten(carry)[0]
    return (
        loop.plan,
        t is None,
        tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in leaves),
    )


def _best_ending(
    loop: _Loop, t: int | None, number: torch.Tensor, ids, live, candidates, model_lp, history, done
) -> None:
    """Per image with no finished hypothesis, keep the best ``<end>`` of its live rows' top K
    at step ``t`` (after the first; None: ``number``) if it ranks above the one kept
    (``beam._best_ending``: by rank score, then log-probability; the first one on ties)."""
    plan, pool = loop.plan, loop.pool
    N, B = plan.n_images, plan.beam
    is_end = ids == plan.end_id
    has = is_end.any(1) & live
    k = is_end.to(torch.int32).argmax(1, keepdim=True)  # its first <end>
    e_lp = candidates.gather(1, k)[:, 0].view(N, B)
    # a tensor either way: divided by a Python float, CUDA multiplies by its reciprocal (which
    # may lose a bit), where the CPU, the numpy loop and the fused kernel divide
    denominator = (
        loop.denominators.index_select(0, number.view(1) + 1)
        if t is None
        else loop.denominators[t + 1 : t + 2]
    )
    e_rank = torch.where(has.view(N, B), e_lp / denominator, NEG_INF)
    e_model = torch.where(has.view(N, B), model_lp.gather(1, k)[:, 0].view(N, B), NEG_INF)
    best = e_rank.max(1).values
    best_model = torch.where(e_rank == best[:, None], e_model, NEG_INF).max(1).values
    pick = (
        ((e_rank == best[:, None]) & (e_model == best_model[:, None]) & has.view(N, B))
        .to(torch.int32)
        .argmax(1)
    )
    rank, log_prob = loop.ending_rank, loop.ending_lp
    better = (pool.count == 0) & ~done & ((best > rank) | ((best == rank) & (best_model > log_prob)))
    row = torch.arange(N, device=ids.device) * B + pick
    loop.ending_tokens.copy_(torch.where(better[:, None], history.index_select(0, row), loop.ending_tokens))
    loop.ending_length.copy_(torch.where(better, number, loop.ending_length))
    loop.ending_rank_lp.copy_(torch.where(better, e_lp.gather(1, pick[:, None])[:, 0], loop.ending_rank_lp))
    rank.copy_(torch.where(better, best, rank))
    log_prob.copy_(torch.where(better, best_model, log_prob))


def unpack(
    packed: np.ndarray, plan: Plan, n_best: int, describe: Callable[[], str]
) -> list[list[Hypothesis]]:
    """The packed result (read back once) -> each image's hypotheses, best first (``n_best``;
    with ``plan.endings``, every ending then the captions cut at ``max_length``, as
    ``beam_search`` gives them). Raises ``BackendError`` when a step returned non-finite
    log-probabilities."""
    N, B, T = plan.n_images, plan.beam, plan.max_length
    S = B + 1
    sizes = [N * S * T, N * S, N * S, N * S, N * S, N, N * T, N, N, N, N, 1]
    if plan.endings:
        sizes += [T * N * B, T * N * B, T * N * B * T]
    parts = np.split(packed, np.cumsum(sizes)[:-1])
    tokens = parts[0].reshape(N, S, T).astype(np.int64)
    length, rank_lp, log_prob = (p.reshape(N, S) for p in parts[1:4])
    finished = parts[4].reshape(N, S) != 0
    count = parts[5].astype(np.int64)
    e_tokens = parts[6].reshape(N, T).astype(np.int64)
    e_length, e_rank_lp, e_lp, e_valid = parts[7], parts[8], parts[9], parts[10] != 0
    first_bad = int(parts[11][0])
    if first_bad >= 0:
        raise BackendError(
            f"the decoder step returned non-finite log-probabilities at word {first_bad + 1} ({describe()})"
        )
    penalty = plan.penalty
    # Python lists once per call: a list's item is far cheaper to read than an array's
    tokens_l, length_l = tokens.tolist(), length.astype(np.int64).tolist()
    rank_l, lp_l = rank_lp.tolist(), log_prob.tolist()
    finished_l, count_l, e_valid_l = finished.tolist(), count.tolist(), e_valid.tolist()
    endings = _endings(parts, plan) if plan.endings else None
    out = []
    for image in range(N):
        hyps = [
            _hypothesis(
                tokens_l[image][j],
                length_l[image][j],
                rank_l[image][j],
                lp_l[image][j],
                finished_l[image][j],
                penalty,
            )
            for j in range(count_l[image])
        ]
        if e_valid_l[image] and not any(h.finished for h in hyps):
            hyps.append(
                _hypothesis(
                    e_tokens[image].tolist(),
                    int(e_length[image]),
                    float(e_rank_lp[image]),
                    float(e_lp[image]),
                    True,
                    penalty,
                )
            )
        best = ranked(hyps)
        best.sort(key=lambda h: not h.finished)  # stable: finished captions first
        if not best:  # pragma: no cover - with finite scores a live beam survives
            raise BackendError("beam search produced no hypothesis")
        if endings is not None:
            out.append(ranked(endings[image]) + [h for h in best if not h.finished])
        else:
            out.append(best[:n_best])
    return out


def _endings(parts: list[np.ndarray], plan: Plan) -> list[list[Hypothesis]]:
    """Each image's endings in the packed result (step by step, row by row), read at once: the
    steps and rows that ended (its rank score is not -inf), grouped by image in that order."""
    N, B, T = plan.n_images, plan.beam, plan.max_length
    rank_lp = parts[12].reshape(T, N * B)
    step, row = np.nonzero(rank_lp[1:] != NEG_INF)  # step-major, then row: the order kept
    step += 1
    words = parts[14].reshape(T, N * B, T)[step, row].astype(np.int64).tolist()
    ranks = rank_lp[step, row].tolist()
    log_probs = parts[13].reshape(T, N * B)[step, row].tolist()
    found: list[list[Hypothesis]] = [[] for _ in range(N)]
    for t, r, w, rank, lp in zip(step.tolist(), row.tolist(), words, ranks, log_probs):
        found[r // B].append(_hypothesis(w, t, rank, lp, True, plan.penalty))
    return found


def _hypothesis(
    tokens: list[int], n_words: int, rank_lp: float, log_prob: float, finished: bool, penalty
) -> Hypothesis:
    """As ``beam._hypothesis`` makes it (no attention)."""
    length = max(n_words + (1 if finished else 0), 1)
    return Hypothesis(
        tokens[:n_words],
        log_prob,
        length_normalised(log_prob, length, penalty),
        finished,
        None,
        rank_score=length_normalised(rank_lp, length, penalty),
    )


@dataclass
class _Captured:
    """One ``Plan``'s whole-decode graphs (``DecodeGraphs``): ``graphs``, replayed in order
    (the parts, the host reading ``done`` before each after the first; or, with conditional
    nodes, the one graph of the whole decode), ``packing`` (the parts' packing graph; None
    with conditional nodes, where the one graph packs), the static inputs, the output buffer,
    ``steps`` (with conditional nodes: the steps the last replay ran, an int32 scalar on the
    device) and ``kept``: what the graphs read and write that no capture made (the loop, the
    carry, the language models)."""

    graphs: list
    packing: Any
    static: dict
    inputs: Inputs
    out: torch.Tensor
    done: torch.Tensor
    steps: torch.Tensor | None
    kept: dict


class DecodeGraphs:
    """The whole decode captured per ``Plan`` (``capture(fn) -> graph``: ``torch_graphs.CudaGraph``
    on a GPU, ``EagerGraph`` in the CPU tests): the ``max_length`` steps (the fixed-shape form,
    finished images masked) cut after each step in ``checks`` (``DECODE_CHECKS``), static input
    buffers (the encoder outputs, the tag words, the fusion weights), a static carry between
    the stretches of steps and a static output buffer. Two forms:

    - with conditional nodes (the factory's ``conditional(pred, body)``: ``capture_if`` of a
      PyTorch that has them): one graph, whose every stretch after the first runs inside a
      conditional node only while some image is not done, then packs the result. The host
      launches it once and waits once, for the result's copy; nothing is read back between
      the steps;
    - otherwise a graph per stretch and a graph that packs: a call replays the first stretch,
      then before each further one reads once whether every image is done (the host waits for
      the GPU there) and stops if so, then packs.

    Both run the same steps and give the same result. Where capturing the conditional form
    fails (a CUDA that lacks conditional nodes for one of the step's kernels), the parts are
    captured instead, with a warning, and ``conditional_error`` says why. ``checks=()``: the
    steps in one graph (every step runs)."""

    def __init__(
        self,
        search: DeviceBeamSearch,
        step_graph: torch.nn.Module,
        capture: Callable[[Callable[[], None]], Any],
        checks: tuple[int, ...] = DECODE_CHECKS,
    ):
        self.search, self.step_graph, self.capture, self.checks = search, step_graph, capture, checks
        self.conditional: Callable[[torch.Tensor, Callable[[], None]], None] | None = getattr(
            capture, "conditional", None
        )
        self.conditional_error: str | None = None
        self._last_steps = 0
        self._steps_run: torch.Tensor | None = None
        self.graphs = GraphCache(MAX_GRAPHS)  # per key: its ``_Captured``

    @property
    def last_steps(self) -> int:
        """The steps the last call ran (through its last stretch's last step); with conditional
        nodes read from the device, so after the call's result."""
        return self._last_steps if self._steps_run is None else int(self._steps_run)

    def use_conditional(self, enabled: bool) -> None:
        """Capture the conditional form (where the factory has one) or the parts from now on;
        the graphs captured so far are dropped."""
        self.conditional = getattr(self.capture, "conditional", None) if enabled else None
        self.graphs = GraphCache(MAX_GRAPHS)

    def run(self, plan: Plan, tensors: dict, inputs: Inputs, lms) -> torch.Tensor:
        key = (
            plan,
            *(
                (name, tuple(v.shape), v.dtype)
                for name, v in sorted(tensors.items())
                if name != "class_probs"
            ),
            # the language models' weights are read in place by the captured steps
            None if lms is None else tuple(id(lm) for lm in lms),
        )
        entry = self.graphs.get(key, lambda: self._capture(plan, tensors, inputs, lms))
        for name, buffer in entry.static.items():
            buffer.copy_(tensors[name])
        for mine, theirs in (
            (entry.inputs.tag_words, inputs.tag_words),
            (entry.inputs.fusion_weights, inputs.fusion_weights),
        ):
            if mine is not None:
                assert theirs is not None  # graphs are keyed by plan: the same inputs exist
                mine.copy_(theirs)
        self._steps_run = entry.steps
        if entry.packing is None:  # one graph: it stops and packs by itself
            entry.graphs[0].replay()
            return entry.out
        cuts = _segments(plan.max_length, self.checks)
        entry.graphs[0].replay()
        self._last_steps = cuts[0][1]
        for part, (_, end) in zip(entry.graphs[1:], cuts[1:], strict=True):
            if bool(entry.done.all()):  # every image done: the steps left would run masked
                break
            part.replay()
            self._last_steps = end
        entry.packing.replay()
        return entry.out

    def _capture(self, plan: Plan, tensors: dict, inputs: Inputs, lms) -> _Captured:
        if self.conditional is not None:
            try:
                return self._capture_graphs(plan, tensors, inputs, lms, self.conditional)
            except Exception as error:  # any failure: the parts instead
                self.conditional_error = f"{type(error).__name__}: {error}"
                self.conditional = None
                warnings.warn(
                    "the whole decode with CUDA graph conditional nodes could not be captured "
                    f"({self.conditional_error}); capturing it in parts, with a host check between",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._capture_graphs(plan, tensors, inputs, lms, None)

    def _capture_graphs(self, plan: Plan, tensors: dict, inputs: Inputs, lms, conditional) -> _Captured:
        static = {name: torch.zeros_like(tensors[name]) for name in ("features", "att_proj", "h0", "c0")}
        static_inputs = Inputs(
            None,
            inputs.image_index.clone(),
            None if inputs.tag_words is None else inputs.tag_words.clone(),
            None if inputs.fusion_weights is None else inputs.fusion_weights.clone(),
        )
        step = TorchStep(self.step_graph, static, static_inputs.image_index)
        static_inputs.state = step.first_state()
        search = self.search
        one_step = search.one_step()
        cuts = _segments(plan.max_length, self.checks)
        # the loop of the first stretch's last run (its tables, written in place by every
        # stretch) and the carry between the stretches, in buffers made by the first (warm-up)
        # run; with conditional nodes the steps run, written by each stretch that runs
        kept: dict = {}
        device = inputs.image_index.device
        holder = [torch.empty(0, dtype=torch.float64, device=device)]
        steps_run = None if conditional is None else torch.zeros((), dtype=torch.int32, device=device)

        def keep(carry: tuple) -> None:
            flat, spec = tree_flatten(carry)  # tensors, and None for a rule not in the plan
            if "buffers" not in kept:
                # with the carry's own strides (a step's rank and model sums are columns of one
                # tensor): a compiled step guards on them, and would compile again for the
                # stretches after the first on contiguous copies
                kept["buffers"] = [
                    None
                    if value is None
                    else torch.empty_strided(
                        value.shape, value.stride(), dtype=value.dtype, device=value.device
                    )
                    for value in flat
                ]
                kept["carry"] = tree_unflatten(kept["buffers"], spec)
            for buffer, value in zip(kept["buffers"], flat, strict=True):
                if buffer is not None:
                    buffer.copy_(value)

        def stretch(begin: int, end: int) -> Callable[[], None]:
            def fn() -> None:
                if begin == 0:
                    kept["loop"], carry = _start(step, plan, static_inputs, search.never_first, lms)
                else:
                    carry = kept["carry"]
                keep(_steps(kept["loop"], carry, begin, end, one_step))
                if steps_run is not None:
                    steps_run.fill_(end)

            return fn

        def pack() -> None:
            result = _finish(kept["loop"], kept["carry"])
            if holder[0].shape != result.shape:  # the first (warm-up) run sizes the output
                holder[0] = torch.empty_like(result)
            holder[0].copy_(result)

        def whole() -> None:
            stretch(*cuts[0])()
            for cut in cuts[1:]:
                # the next stretch only while some image is not done: decided on the device
                conditional(~kept["carry"][6].all(), stretch(*cut))
            pack()

        with torch.no_grad():
            if conditional is not None:
                graphs, packing = [self.capture(whole)], None
            else:
                graphs = []
                for cut in cuts:
                    graphs.append(self.capture(stretch(*cut)))
                    if cut[0] == 0:
                        # a capture runs nothing: the loop's tensors the first part's capture
                        # made hold values only once it is replayed, and the next part warms
                        # up on them
                        graphs[0].replay()
                packing = self.capture(pack)
        # the graphs hold only addresses: keep the loop and the carry buffers alive with them
        kept["lms"] = lms  # their ids are in the key: kept alive with the graphs
        return _Captured(graphs, packing, static, static_inputs, holder[0], kept["carry"][6], steps_run, kept)
