"""The torch backend's beam search on the device (``edgecap.decoding.device``).

``TorchBackend(search=...)``: ``"device"`` runs the search over torch tensors on the backend's
device, ``"host"`` the numpy loop between steps, ``"auto"`` (the default) the device search on
CUDA for a batch of at least ``AUTO_DEVICE_ROWS`` beam rows (images x beam) and the numpy loop
otherwise: on an NVIDIA H200 (benchmarks/results/gpu.md, docs/gpu-search.md) the device search
was the faster from 12 rows up (beam 3 x 4 images: 1.24x end to end, x 32 images: 2.0x) and the
numpy loop at 1 to 8 rows on a fast host; on the CPU the numpy loop measured faster. On CUDA the
device search waits for the GPU only after the steps of ``DECODE_CHECKS`` (to stop once every
image is done) and for the result: the steps run with finished images masked; with CUDA graphs
(``cuda_graphs=True``) the whole decode is captured per shape as one graph whose stretches of
steps after the first run in conditional nodes only while some image is not done (where PyTorch
has CUDA graph conditional nodes: no wait until the result), or else as a few graphs, one per
stretch of steps between those checks (``DecodeGraphs``). The tag constraint, the attention maps and
fused language models of two hidden sizes stay on the host loop (the backend answers None and
the caller runs the numpy loop).
"""

from __future__ import annotations

import numpy as np
import torch

from edgecap.decoding import fusion_weight, returns_endings

from edgecap.decoding.device import (
    DECODE_CHECKS,
    DecodeGraphs,
    DeviceBeamSearch,
    TorchStep,
    rules_for,
    unpack,
)

SEARCH_MODES = ("auto", "host", "device")
# "auto" on CUDA: the device search for batches of at least this many beam rows (images x
# beam), the numpy loop below. Two H200 runs (benchmarks/results/gpu.md and the one before it,
# CUDA graphs, e2e p50), the device search's speed-up over the host's: 0.65-0.88x at 1 row,
# 0.83-1.09x at 3, 0.98x at 4, 0.91-1.0x at 8 (beam 1), 1.24x at 12, 1.08-1.33x at 24, 1.26x at
# 32, 2.0x at 96; 2.8-4.9x at 192 (batch 64, from preprocessed tensors)
AUTO_DEVICE_ROWS = 12


def checked_search(search: str, device: torch.device) -> bool:
    """``search`` (one of ``SEARCH_MODES``) -> whether this backend may search on the device
    ("device"; "auto" on CUDA, for the batches ``use_device`` says)."""
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got {search!r}")
    return search == "device" or (search == "auto" and device.type == "cuda")


def use_device(search: str, rows: int) -> bool:
    """Whether a backend that may search on the device does so for a batch of ``rows`` beam
    rows: always with "device", from ``AUTO_DEVICE_ROWS`` rows with "auto"."""
    return search == "device" or rows >= AUTO_DEVICE_ROWS


def _one_stack(fusion) -> bool:
    """Whether the device search can run the fusion's language models: it steps both as one
    stack (``TorchLMPair``), so of equal hidden sizes only."""
    return fusion.everyday.hidden == fusion.in_domain.hidden


class TorchDeviceSearch:
    """The device search of one torch backend (its step graph, device and graph factory)."""

    def __init__(self, backend, capture=None, compiled: bool = False, fused: bool = False):
        self.backend = backend
        self.search = DeviceBeamSearch(
            backend.decoder.cfg.vocab_size, backend.device, compiled=compiled, fused=fused
        )
        self.graphs = None if capture is None else DecodeGraphs(self.search, backend.step_graph, capture)

    def warm(self, encoded, options, start_id: int, end_id: int, fusion, tag_word: int | None) -> int:
        """Capture the whole-decode graphs of every plan a batch of ``encoded``'s shape can meet
        with ``options`` (a plan is what a graph is captured for: whether the batch has tag
        words, whether a row gets the language models; those depend on each photo): with and
        without tag words (one, ``tag_word``, per image) where the tag bonus is on, the search
        unconstrained and the model has an object word (``tag_word`` not None), with and
        without the language models where they have weight; -> how many were captured now
        (none for a plan captured before). Their results are dropped."""
        if self.graphs is None:
            return 0
        backend, search = self.backend, self.search
        options.validate(backend.top_k)
        n, rows = encoded.n_images, encoded.n_images * options.beam_size
        # as ``edgecap.decoding.search_with_tags`` searches: a constrained search with tag words
        # runs on the host
        endings = returns_endings(options)
        tags: list[tuple[frozenset[int], ...] | None] = [None]
        if options.guidance_bonus > 0 and not options.constrained and tag_word is not None:
            tags.append(tuple(frozenset([tag_word]) for _ in range(n)))
        weights: list[np.ndarray | None] = [None]
        lm_weight = 0.0 if fusion is None else fusion_weight(options, fusion)
        if lm_weight > 0 and _one_stack(fusion):  # else the host loop runs the language models
            weights.append(np.full(rows, lm_weight, np.float32))
        made = self.graphs.graphs.made
        with torch.inference_mode():
            for words in tags:
                for weight in weights:
                    plan = search.plan(
                        n, options, backend.top_k, start_id, end_id, words, weight, endings=endings
                    )
                    inputs = search.inputs(plan, None, words, weight)
                    lms = None if weight is None else search.lms(fusion)
                    self.graphs.run(plan, encoded.tensors, inputs, lms)
        return self.graphs.graphs.made - made

    def __call__(
        self, encoded, options, start_id: int, end_id: int, tag_words, fusion, deferred: bool = False
    ):
        """Each image's hypotheses (``search_on_device``); ``deferred``: a function that unpacks
        them from the search's result, copied to the host now, when called."""
        backend = self.backend
        options.validate(backend.top_k)
        rules = rules_for(options, encoded.n_images, tag_words, fusion, encoded.class_probs)
        if rules.fusion is not None and not _one_stack(rules.fusion):
            return None
        search = self.search
        plan = search.plan(
            encoded.n_images,
            options,
            backend.top_k,
            start_id,
            end_id,
            rules.tag_words,
            rules.fusion_weights,
            endings=options.consensus,
        )
        inputs = search.inputs(plan, None, rules.tag_words, rules.fusion_weights)
        lms = None if rules.fusion is None else search.lms(rules.fusion)
        # both forms in inference mode: a compiled step (compile_search) traced in one grad mode
        # fails dynamo's guards in the other (the tensors' dispatch keys) and compiles again
        if self.graphs is not None:
            with torch.inference_mode():
                packed = self.graphs.run(plan, encoded.tensors, inputs, lms)
        else:
            with torch.inference_mode():
                step = TorchStep(backend.step_graph, encoded.tensors, inputs.image_index)
                inputs.state = step.first_state()
                # on a GPU, no read-back per step (finished images masked; "all done?" read
                # only after the steps of DECODE_CHECKS); on the CPU reading it is free and
                # saves the steps after it
                packed = search.run(
                    step, plan, inputs, lms, fixed=backend.device.type == "cuda", checks=DECODE_CHECKS
                )
        # deferred: a copy of the host's own, also on the CPU, where the search's tensor (the
        # whole decode's graph: its output buffer) is written by the next search while another
        # thread unpacks this one
        packed_host = packed.to("cpu", copy=deferred).numpy()
        if deferred:
            return lambda: unpack(packed_host, plan, options.n_best, backend.describe)
        return unpack(packed_host, plan, options.n_best, backend.describe)
