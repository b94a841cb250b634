"""onnxruntime on a GPU: device-resident decoding with I/O binding.

``IOBindingDecoder`` keeps the image tensors and the decoder state on the device between steps
(the CUDA provider's ``OrtValue`` on 'cuda'): per step only ``tokens`` / ``source_rows`` go up and
``topk_logprobs`` / ``topk_ids`` (and ``alpha`` when asked) come back. The same code runs with
``device="cpu"`` on the CPU provider, which is how it is tested here; the 'cuda' path has not yet
run (no onnxruntime-gpu on our machines). Which provider runs a graph is
``edgecap.backends.ort_providers``' business.
"""

from __future__ import annotations

import numpy as np

from edgecap.backends.base import DecoderSession, StepResult
from edgecap.contract import ENCODER_OUTPUTS


class IOBindingDecoder:
    """Encoder and decoder step on one device with the state kept there between steps."""

    def __init__(
        self, encoder_session, step_session, vocab_size: int, device: str = "cuda", device_id: int = 0
    ):
        import onnxruntime as ort

        self._ort = ort
        self.encoder, self.step_session = encoder_session, step_session
        self.vocab_size = vocab_size
        self.device, self.device_id = device, device_id

    def encode(self, images: np.ndarray) -> dict:
        """images float32 (N, 3, H, W) -> the encoder's outputs as OrtValues on the device."""
        io = self.encoder.io_binding()
        io.bind_cpu_input("image", np.ascontiguousarray(images, dtype=np.float32))
        for name in ENCODER_OUTPUTS:
            # the class probabilities are read on the host; the rest stays on the device
            if name == "class_probs":
                io.bind_output(name, "cpu")
            else:
                io.bind_output(name, self.device, self.device_id)
        self.encoder.run_with_iobinding(io)
        return dict(zip(ENCODER_OUTPUTS, io.get_outputs()))

    def start(
        self, encoded: dict, image_index: np.ndarray, return_attention: bool = False
    ) -> IOBindingSession:
        return IOBindingSession(self, encoded, np.asarray(image_index, dtype=np.int32), return_attention)


class IOBindingSession(DecoderSession):
    """Ping-pong state: each step reads one pair of (R, H) device tensors and writes the other."""

    def __init__(
        self, owner: IOBindingDecoder, encoded: dict, image_index: np.ndarray, return_attention: bool
    ):
        ort, dev, idx = owner._ort, owner.device, owner.device_id
        self._session = owner.step_session
        self._owner = owner
        self._return_attention = return_attention
        self._rows = len(image_index)
        h0 = encoded["h0"]
        hidden = h0.shape()[1]
        self._io = self._session.io_binding()
        self._io.bind_ortvalue_input("features", encoded["features"])
        self._io.bind_ortvalue_input("att_proj", encoded["att_proj"])
        self._io.bind_ortvalue_input("image_index", ort.OrtValue.ortvalue_from_numpy(image_index, dev, idx))
        self._state = [
            tuple(
                ort.OrtValue.ortvalue_from_shape_and_type((self._rows, hidden), np.float32, dev, idx)
                for _ in range(2)
            )
            for _ in range(2)
        ]
        self._current = (h0, encoded["c0"])
        self._next = 0
        # no bias: one device-resident block of zeros, bound without a copy per step
        self._no_bias = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((self._rows, owner.vocab_size), np.float32), dev, idx
        )

    def _step(self, tokens: np.ndarray, source_rows: np.ndarray, word_bias: np.ndarray | None) -> StepResult:
        io, dev, idx = self._io, self._owner.device, self._owner.device_id
        io.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int32))
        io.bind_cpu_input("source_rows", np.ascontiguousarray(source_rows, dtype=np.int32))
        if word_bias is None:
            io.bind_ortvalue_input("word_bias", self._no_bias)
        else:
            io.bind_cpu_input("word_bias", word_bias)
        h, c = self._current
        io.bind_ortvalue_input("h", h)
        io.bind_ortvalue_input("c", c)
        h_out, c_out = self._state[self._next]
        io.bind_ortvalue_output("h_out", h_out)
        io.bind_ortvalue_output("c_out", c_out)
        io.bind_output("topk_logprobs", "cpu")
        io.bind_output("topk_ids", "cpu")
        # alpha stays on the device unless asked for
        io.bind_output(
            "alpha", "cpu" if self._return_attention else dev, 0 if self._return_attention else idx
        )
        self._session.run_with_iobinding(io)
        # get_outputs() follows the order of the bind calls above
        outputs = dict(zip(("h_out", "c_out", "topk_logprobs", "topk_ids", "alpha"), io.get_outputs()))
        # read before clear_binding_outputs(): up to onnxruntime 1.23 that frees these values
        result = StepResult(
            topk_logprobs=outputs["topk_logprobs"].numpy(),
            topk_ids=outputs["topk_ids"].numpy(),
            alpha=outputs["alpha"].numpy() if self._return_attention else None,
        )
        io.clear_binding_outputs()
        self._current = (h_out, c_out)
        self._next = 1 - self._next
        return result
