"""The torch backend's beam search on the device (``edgecap.decoding.device``).

``TorchBackend(search=...)``: ``"device"`` runs the search over torch tensors on the backend's
device, ``"host"`` the numpy loop between steps, ``"auto"`` (the default) the numpy loop for now: the
device search has not yet run on a real GPU (docs/gpu-search.md); on the CPU the numpy loop
also measured faster. On CUDA the
device search never waits for the GPU until the result: all ``max_length`` steps run with
finished images masked; with CUDA graphs (``cuda_graphs=True``) the whole decode is one graph
per shape (``DecodeGraphs``). The tag constraint and the attention maps stay on the host loop
(the backend answers None and the caller runs the numpy loop).
"""

from __future__ import annotations

import torch

from edgecap.decoding.device import DecodeGraphs, DeviceBeamSearch, TorchStep, rules_for, unpack

SEARCH_MODES = ("auto", "host", "device")


def checked_search(search: str, device: torch.device) -> bool:
    """``search`` (one of ``SEARCH_MODES``) -> whether this backend searches on the device."""
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got {search!r}")
    # "auto" stays on the host until the device search has run on a real GPU: it is tested on
    # torch CPU tensors (and the whole-decode graph with a CPU stand-in), not yet on CUDA.
    del device
    return search == "device"


class TorchDeviceSearch:
    """The device search of one torch backend (its step graph, device and graph factory)."""

    def __init__(self, backend, capture=None, compiled: bool = False):
        self.backend = backend
        self.search = DeviceBeamSearch(backend.decoder.cfg.vocab_size, backend.device, compiled=compiled)
        self.graphs = None if capture is None else DecodeGraphs(self.search, backend.step_graph, capture)

    def __call__(self, encoded, options, start_id: int, end_id: int, tag_words, fusion):
        """Each image's hypotheses (``search_on_device``)."""
        backend = self.backend
        options.validate(backend.top_k)
        rules = rules_for(options, encoded.n_images, tag_words, fusion, encoded.class_probs)
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
        if self.graphs is not None:
            with torch.no_grad():
                packed = self.graphs.run(plan, encoded.tensors, inputs, lms)
                result = packed.cpu()
        else:
            with torch.inference_mode():
                step = TorchStep(backend.step_graph, encoded.tensors, inputs.image_index)
                inputs.state = step.first_state()
                # on a GPU, no read-back per step (every step runs, finished images masked);
                # on the CPU reading "all done?" is free and saves the steps after it
                packed = search.run(step, plan, inputs, lms, fixed=backend.device.type == "cuda")
                result = packed.cpu()
        return unpack(result.numpy(), plan, options.n_best, backend.describe)
