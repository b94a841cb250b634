"""The two graphs of the model contract (``edgecap.contract``) as PyTorch modules: what
``edgecap export`` traces to ONNX and what the PyTorch backend runs, written once."""

from __future__ import annotations

import torch
from torch import nn

from edgecap.models.decoder import CaptionDecoder
from edgecap.models.efficientnet_lite import EfficientNetLite, as_regions


class EncoderGraph(nn.Module):
    """image (N, 3, H, W) -> features (N, L, F), att_proj (N, L, A), h0, c0 (N, H),
    class_probs (N, C)."""

    def __init__(self, encoder: EfficientNetLite, decoder: CaptionDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, image):
        fmap = self.encoder.features(image)
        if self.decoder.cfg.tag_rank:  # the class probabilities are the decoder's input too
            probs = self.encoder.class_probs(fmap)
            return (*self.decoder.init_state(as_regions(fmap), probs), probs)
        # computed after the decoder's state, so a model without tag input exports node for node
        # as before there was one (its ONNX files byte-identical)
        return (*self.decoder.init_state(as_regions(fmap)), self.encoder.class_probs(fmap))


class StepGraph(nn.Module):
    """One word for R rows: gather the previous state by ``source_rows``, then the decoder's
    step -> topk_logprobs (R, K), topk_ids int32 (R, K), h_out, c_out (R, H), alpha (R, L).
    ``word_bias`` (R, V) picks the top K by log-probability + bias; the log-probabilities come
    back without it."""

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, h, c, source_rows, features, att_proj, image_index, word_bias):
        h = torch.index_select(h, 0, source_rows)
        c = torch.index_select(c, 0, source_rows)
        values, ids, h, c, alpha = self.decoder.step(tokens, h, c, features, att_proj, image_index, word_bias)
        return values, ids.to(torch.int32), h, c, alpha
