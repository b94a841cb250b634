"""Show, Attend and Tell (Xu et al. 2015) soft-attention decoder, and a Show-and-Tell baseline.

The decoder is split the way the runtime uses it:

- ``init_state(fmap, class_probs)``: everything that does not depend on the word being
  generated, computed once per image: projected image features (with the projected class
  probabilities added when the decoder takes tags as an input), their attention projection, the
  initial LSTM state.
- ``step(tokens, h, c, features, att_proj, image_index)``: one word for any number of rows.
  Rows are (image x beam) flattened; ``image_index`` maps each row to its image so the image
  tensors are passed once and gathered inside the graph, never copied per beam by the caller.

Shapes: N images, R rows, L = 49 regions, F = feature dim, A = attention dim, H = hidden dim,
E = embedding dim, V = vocabulary size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edgecap.models.config import DecoderConfig
from edgecap.vocab import NEVER_FIRST_IDS, NEVER_GENERATED_IDS

LOGIT_FLOOR = -1e4  # a finite "never": -inf would overflow to NaN in FP16 graphs


def mask_logits(logits: torch.Tensor, first_word: bool = False) -> torch.Tensor:
    """logits (R, V) with the words a caption never holds (``edgecap.vocab``) floored, and
    <end> too when ``first_word``. Out of place, so it traces into the step graph."""
    size = int(logits.shape[1])
    key = (size, str(logits.device), logits.dtype, first_word)
    # traced (an exported graph) or compiled (torch.compile: a cache read would make it
    # recompile once the cache is filled), the mask is a constant of the graph
    in_graph = torch.jit.is_tracing() or torch.compiler.is_compiling()
    kept = None if in_graph else _MASKS.get(key)
    if kept is None:
        banned = set(NEVER_GENERATED_IDS + (NEVER_FIRST_IDS if first_word else ()))
        # built from a Python list, so an exported graph holds it as one constant
        mask = torch.tensor([i in banned for i in range(size)], device=logits.device)
        if in_graph:
            return torch.where(mask, torch.full_like(logits[:, :1], LOGIT_FLOOR), logits)
        # kept: a CUDA graph capture may not copy from the host (its warm-up runs fill this);
        # the floor as a 0-dim tensor, made once: one operation a step instead of two. Not
        # inference tensors (a backend's step runs in inference mode): autograd (self-critical
        # training's sampling) saves the mask for backward
        with torch.inference_mode(False):
            floor = torch.full((), LOGIT_FLOOR, dtype=logits.dtype, device=logits.device)
            kept = _MASKS[key] = (mask.clone(), floor)
    mask, floor = kept
    return torch.where(mask, floor, logits)


_MASKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class StepJoins:
    """The element-wise joins of a decoder step, as torch operations: the LSTM's input (the
    word's embedding beside the gated context), the deep output's sum, and the word logits'
    projection. The fused device search does the joins in Triton kernels of the same arithmetic
    and floors the words a caption never holds in the projection (``edgecap.decoding.step_kernels``)."""

    masks_words = False  # ``word_logits`` leaves the words a caption never holds to ``mask_logits``

    def lstm_input(self, emb, beta, context):
        """-> the LSTM's input cat(emb, beta x context) (R, E + F), and the gated context."""
        context = beta * context
        return torch.cat([emb, context], dim=1), context

    def deep(self, emb, from_hidden, from_context):
        """-> the deep output's argument, (emb + from_hidden) + from_context."""
        return emb + from_hidden + from_context

    def word_logits(self, out_vocab: nn.Linear, x):
        """-> the word logits, ``out_vocab(x)`` (with ``masks_words``, those of the words a caption
        never holds already floored)."""
        return out_vocab(x)


TORCH_JOINS = StepJoins()


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_proj = nn.Linear(cfg.encoder_dim, cfg.feature_dim)
        self.feature_norm = nn.LayerNorm(cfg.feature_dim)
        if cfg.attention:
            self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
            self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        else:
            # Show and Tell: the image is the LSTM's first input, embedded like a word.
            self.image_embed = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        if cfg.attention:
            self.att_feat = nn.Linear(cfg.feature_dim, cfg.attention_dim)
            self.att_hidden = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
            self.att_score = nn.Linear(cfg.attention_dim, 1)
            self.gate = nn.Linear(cfg.hidden_dim, cfg.feature_dim)  # the gating scalar beta, per channel
            lstm_in = cfg.embed_dim + cfg.feature_dim
        else:
            lstm_in = cfg.embed_dim
        self.lstm = nn.LSTMCell(lstm_in, cfg.hidden_dim)
        # Deep output layer: p(y | E y_{t-1} + L_h h_t + L_z z_t).
        self.out_hidden = nn.Linear(cfg.hidden_dim, cfg.embed_dim)
        self.out_context = nn.Linear(cfg.feature_dim, cfg.embed_dim) if cfg.attention else None
        self.out_vocab = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.tag_rank:
            # Tags as an input: class probabilities -> rank -> feature_dim, zero at first, so a
            # decoder given this input starts out saying what it said without it.
            self.tag_down = nn.Linear(cfg.n_classes, cfg.tag_rank, bias=False)
            self.tag_up = nn.Linear(cfg.tag_rank, cfg.feature_dim, bias=False)
            nn.init.zeros_(self.tag_up.weight)

    # -- once per image ---------------------------------------------------------------------
    def init_state(self, fmap: torch.Tensor, class_probs: torch.Tensor | None = None):
        """fmap (N, L, encoder_dim) -> features (N, L, F), att_proj (N, L, A), h0, c0 (N, H).
        ``class_probs`` (N, n_classes): the encoder's, for a decoder with tag input."""
        return self.state_from(
            self.with_tags(self.feature_norm(F.relu(self.feature_proj(fmap))), class_probs)
        )

    def with_tags(self, features: torch.Tensor, class_probs: torch.Tensor | None) -> torch.Tensor:
        """Projected features (N, L', F) with the tags' projection added to every region (a
        decoder with tag input; the others ignore ``class_probs``)."""
        if not self.cfg.tag_rank:
            return features
        if class_probs is None:
            raise ValueError("this decoder takes the encoder's class probabilities (tag input)")
        tags = self.tag_up(self.tag_down(class_probs.to(features.dtype)))
        return features + tags.unsqueeze(1)

    def state_from(self, features: torch.Tensor):
        """Projected region features (N, L', F) -> features, att_proj (N, L', A), h0, c0 (N, H):
        the part of ``init_state`` after the projection (text-only training feeds a learned
        "no image" region here, ``edgecap.training.text_mix``)."""
        mean = features.mean(1)
        if self.cfg.attention:
            h0 = torch.tanh(self.init_h(mean))
            c0 = torch.tanh(self.init_c(mean))
            return features, self.att_feat(features), h0, c0
        zeros = mean.new_zeros(mean.shape[0], self.cfg.hidden_dim)
        h0, c0 = self.lstm(self.dropout(self.image_embed(mean)), (zeros, zeros))
        att_proj = features.new_zeros(features.shape[0], features.shape[1], self.cfg.attention_dim)
        return features, att_proj, h0, c0

    # -- once per word ----------------------------------------------------------------------
    def attend(self, h, features, att_proj):
        """-> context (R, F) not yet gated, the gate beta (R, F), alpha (R, L)."""
        scores = self.att_score(torch.tanh(att_proj + self.att_hidden(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores.float(), dim=1).to(features.dtype)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        beta = torch.sigmoid(self.gate(h))
        return context, beta, alpha

    def logits(self, tokens, h, c, features, att_proj, emb=None, joins: StepJoins | None = None):
        """One step for rows whose features are already per row. -> logits (R, V), h, c, alpha.
        ``emb``: the tokens' embeddings, already gathered; ``joins``: what does the step's
        element-wise joins (``StepJoins``: torch operations; the fused device search's
        kernels, ``edgecap.decoding.step_kernels``)."""
        joins = TORCH_JOINS if joins is None else joins
        emb = self.embed(tokens) if emb is None else emb
        if self.cfg.attention:
            context, beta, alpha = self.attend(h, features, att_proj)
            x, context = joins.lstm_input(emb, beta, context)
        else:
            context = None
            # Uniform weights, computed from the image tensors so that an exported step graph
            # keeps every input of the contract (the exporter drops unused inputs).
            alpha = torch.softmax((features.sum(2) + att_proj.sum(2)) * 0.0, dim=1)
            x = emb
        h, c = self.lstm(x, (h, c))
        from_hidden = self.out_hidden(self.dropout(h))
        if context is not None and self.out_context is not None:  # both exist with attention
            deep = joins.deep(emb, from_hidden, self.out_context(context))
        else:
            deep = emb + from_hidden
        logits = joins.word_logits(self.out_vocab, self.dropout(torch.tanh(deep)))
        return logits, h, c, alpha

    def step(self, tokens, h, c, features, att_proj, image_index, word_bias=None):
        """The exported step: rows gather their image's tensors by ``image_index``.

        tokens (R,) int64, h/c (R, H), features (N, L, F), att_proj (N, L, A), image_index (R,),
        word_bias (R, V) or None -> topk_logprobs (R, K), topk_ids (R, K) int64, h, c (R, H),
        alpha (R, L). The top K are chosen by log-probability + ``word_bias``; the values are
        the log-probabilities without it.
        """
        features = torch.index_select(features, 0, image_index)
        att_proj = torch.index_select(att_proj, 0, image_index)
        return self.step_rows(tokens, h, c, features, att_proj, word_bias)

    def step_rows(self, tokens, h, c, features, att_proj, word_bias=None):
        """``step`` with the image tensors already per row (R, L, .): what a search that
        gathers them once per search calls every step."""
        logprobs, h, c, alpha = self.log_probs(tokens, h, c, features, att_proj)
        if word_bias is None:
            values, ids = logprobs.topk(self.cfg.top_k, dim=1)
        else:
            _, ids = (logprobs + word_bias.float()).topk(self.cfg.top_k, dim=1)
            values = logprobs.gather(1, ids)
        return values, ids, h, c, alpha

    def log_probs(self, tokens, h, c, features, att_proj, emb=None, joins: StepJoins | None = None):
        """``logits``' step -> the words' log-probabilities (R, V) float32 (the words a caption
        never holds floored first), h, c, alpha."""
        joins = TORCH_JOINS if joins is None else joins
        logits, h, c, alpha = self.logits(tokens, h, c, features, att_proj, emb, joins)
        masked = logits if joins.masks_words else mask_logits(logits)
        return torch.log_softmax(masked.float(), dim=1), h, c, alpha

    # -- training ---------------------------------------------------------------------------
    def forward(
        self,
        fmap: torch.Tensor,
        captions: torch.Tensor,
        image_index=None,
        sample_prob: float = 0.0,
        class_probs: torch.Tensor | None = None,
    ):
        """Teacher forcing. fmap (N, L, encoder_dim); captions (R, T) start with <start>;
        image_index (R,) maps captions to images (None: one caption per image)
        -> logits (M, V) and targets (M,) of the M real (non-padding) words, packed;
           alphas (R, T', L), zero past each caption's end.

        Several captions of one image share its per-image work (``image_index``), which makes
        training ~5x cheaper on Flickr-style data with 5 captions per image. ``sample_prob`` > 0
        feeds the model's own greedy word instead of the true one with that probability
        (scheduled sampling). ``class_probs`` (N, n_classes): a decoder with tag input's.
        """
        return self.teacher_forced(self.init_state(fmap, class_probs), captions, image_index, sample_prob)

    def teacher_forced(self, state, captions: torch.Tensor, image_index=None, sample_prob: float = 0.0):
        """``forward`` from a per-image ``state`` (features, att_proj, h0, c0), as ``init_state`` or
        ``state_from`` give it."""
        features, att_proj, h, c = state
        if image_index is not None:
            features, att_proj = features[image_index], att_proj[image_index]
            h, c = h[image_index], c[image_index]
        # Rows sorted longest first, so the rows still inside their caption at step t are a
        # prefix and padding costs no compute.
        lengths = (captions != 0).sum(1) - 1  # <pad> is id 0; predictions per caption
        order = torch.argsort(lengths, descending=True, stable=True)
        captions, lengths = captions[order], lengths[order]
        features, att_proj, h, c = features[order], att_proj[order], h[order], c[order]
        rows, steps = captions.shape[0], captions.shape[1] - 1
        logits_all, targets, alphas = [], [], []
        token = captions[:, 0]
        for t in range(steps):
            n = int((lengths > t).sum())
            if n == 0:
                break
            logits, h_n, c_n, alpha = self.logits(token[:n], h[:n], c[:n], features[:n], att_proj[:n])
            h = torch.cat([h_n, h[n:]]) if n < rows else h_n
            c = torch.cat([c_n, c[n:]]) if n < rows else c_n
            logits_all.append(logits)
            targets.append(captions[:n, t + 1])
            alphas.append(F.pad(alpha, (0, 0, 0, rows - n)))
            token = captions[:, t + 1]
            if sample_prob > 0:
                use_model = torch.rand(n, device=token.device) < sample_prob
                token = token.clone()
                token[:n] = torch.where(use_model, logits.detach().argmax(1), token[:n])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(rows, device=order.device)
        # Packed (no padding): logits (M, V) and their targets (M,) for the M real words.
        return torch.cat(logits_all), torch.cat(targets), torch.stack(alphas, 1)[inverse]
