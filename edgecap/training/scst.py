"""Self-critical sequence training (Rennie et al. 2017) on CIDEr-D, after cross-entropy training.

For each image, ``n_samples`` captions are sampled from the decoder; each sample's reward is its
CIDEr-D against the image's references minus the mean reward of the image's other samples (the
baseline of Luo 2020, no greedy pass needed). Cheap here because the encoder is frozen and its
features are cached. The best epoch by dev CIDEr (greedy, simple tokenizer) is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgecap.errors import BackendError, ModelError
from edgecap.models.checkpoint import load_checkpoint, save_checkpoint
from edgecap.models.decoder import mask_logits
from edgecap.training.cider import CiderD
from edgecap.training.config import ScstConfig, feature_cache
from edgecap.training.distributed import world_size
from edgecap.training.features import progress_bar, split_features
from edgecap.training.records import RunLock, shown
from edgecap.training.start import dataset_items
from edgecap.training.train import class_probs_of, evaluate_dev, seeded
from edgecap.vocab import tokenize


def sample_captions(decoder, fmap, n_samples: int, max_length: int, start: int, end: int, class_probs=None):
    """Sample ``n_samples`` captions per image -> tokens (R, T), summed log-probs (R,), mask (R, T).
    ``class_probs``: the images' tags, for a decoder with tag input."""
    features, att_proj, h, c = decoder.init_state(fmap, class_probs)
    index = torch.arange(fmap.shape[0]).repeat_interleave(n_samples)
    features, att_proj, h, c = features[index], att_proj[index], h[index], c[index]
    rows = index.shape[0]
    token = torch.full((rows,), start, dtype=torch.long)
    alive = torch.ones(rows, dtype=torch.bool)
    tokens, logps, masks = [], [], []
    for t in range(max_length):
        logits, h, c, _ = decoder.logits(token, h, c, features, att_proj)
        logprobs = torch.log_softmax(mask_logits(logits, first_word=t == 0), dim=1)
        token = torch.multinomial(logprobs.detach().exp(), 1).squeeze(1)
        masks.append(alive.clone())
        logps.append(logprobs.gather(1, token[:, None]).squeeze(1) * alive)
        tokens.append(torch.where(alive, token, torch.full_like(token, end)))
        alive = alive & (token != end)
        if not alive.any():
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1).sum(1), torch.stack(masks, 1)


def train_scst(cfg: ScstConfig, log=print, on_left_out=None) -> Path:
    """``on_left_out(n)``: called once the data is read, with the rows or photos this run leaves
    out (as ``train``'s)."""
    with RunLock() as lock:  # OUT's, once it is there (``records.RunLock``)
        return _train_scst(cfg, log, lock, on_left_out)


def _train_scst(cfg: ScstConfig, log, lock: RunLock, on_left_out=None) -> Path:
    if world_size() > 1:
        raise BackendError("self-critical training (--scst-from) runs in one process, not under torchrun")
    seeded(cfg.seed, cfg.threads)  # torch's threads for the feature extraction; the RNG after it
    out = Path(cfg.out)
    data = Path(cfg.data)
    images = Path(cfg.images) if cfg.images else data / "images"
    encoder, decoder, vocab, pre, meta = load_checkpoint(Path(cfg.checkpoint))
    if meta.get("finetuned_encoder"):
        raise ModelError(
            f"{shown(cfg.checkpoint)}: its encoder was fine-tuned; self-critical training runs on "
            "cached features of the pretrained encoder: start from a checkpoint with a frozen encoder"
        )
    train_items, dev_items, left_out = dataset_items(cfg.dataset, data, images, cfg.allow_outside_data)
    if on_left_out is not None:
        on_left_out(left_out)
    cache = feature_cache(out, cfg.cache_dir)
    encoder_name = encoder.variant  # the checkpoint's pretrained encoder
    train_rows, dev_fmaps, all_fmaps = split_features(
        train_items, dev_items, images, cache, pre, cfg.progress, encoder=encoder_name
    )
    # Seeded again: extracting the features (a first run) draws from torch's generator, reading
    # them from the cache does not, and the samples must not depend on which happened.
    rng = seeded(cfg.seed, cfg.threads)
    refs = [[tokenize(c) for c in it.captions] for it in train_items]
    cider = CiderD(refs)

    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    classifier = encoder.requires_grad_(False) if decoder.cfg.tag_rank else None  # the pretrained one
    best = evaluate_dev(decoder, dev_fmaps, dev_items, vocab, classifier=classifier)
    log(json.dumps({"epoch": 0, **{k: round(v, 4) for k, v in best.items()}}) + "  (start)")
    history = [{"epoch": 0, **best}]
    info_base = {k: meta[k] for k in ("train_state", "train_config", "training_data") if k in meta}
    info_base["training_data"] = {**info_base.get("training_data", {}), "left_out": left_out}
    out.mkdir(parents=True, exist_ok=True)
    lock.take(out)
    save_checkpoint(
        out / "best",
        decoder,
        vocab,
        pre,
        {**info_base, "dev_metrics_greedy": best, "scst": {"config": asdict(cfg), "history": history}},
        encoder_name=encoder_name,
    )
    order = list(range(len(train_items)))
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(order)
        decoder.train()
        t0, rewards = time.time(), []
        n_batches = (len(order) + cfg.images_per_batch - 1) // cfg.images_per_batch
        bar = progress_bar(n_batches, f"scst {epoch}", cfg.progress)
        for start in range(0, len(order), cfg.images_per_batch):
            batch = order[start : start + cfg.images_per_batch]
            fmap = all_fmaps[[train_rows[i] for i in batch]]
            tokens, logp, _ = sample_captions(
                decoder,
                fmap,
                cfg.n_samples,
                cfg.max_length,
                vocab.start,
                vocab.end,
                class_probs_of(classifier, fmap),
            )
            words = [vocab.decode(row).split() for row in tokens.tolist()]
            reward = np.array(
                [
                    cider.score(w, refs[batch[r // cfg.n_samples]], batch[r // cfg.n_samples])
                    for r, w in enumerate(words)
                ]
            ).reshape(len(batch), cfg.n_samples)
            baseline = (reward.sum(1, keepdims=True) - reward) / (cfg.n_samples - 1)
            advantage = torch.from_numpy((reward - baseline).reshape(-1)).float()
            loss = -(advantage * logp).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
            optimizer.step()
            rewards.append(float(reward.mean()))
            bar.update(1)
            bar.set_postfix(reward=f"{np.mean(rewards[-50:]):.3f}")
        bar.close()
        dev = evaluate_dev(decoder, dev_fmaps, dev_items, vocab, classifier=classifier)
        record = {
            "epoch": epoch,
            "train_reward": round(float(np.mean(rewards)), 4),
            "seconds": round(time.time() - t0),
            **{k: round(v, 4) for k, v in dev.items()},
        }
        history.append(record)
        improved = dev["CIDEr"] > best["CIDEr"]
        log(json.dumps(record) + ("  (best)" if improved else ""))
        info = {
            **info_base,
            "dev_metrics_greedy": dev,
            "scst": {"config": asdict(cfg), "history": history, "epoch": epoch},
        }
        if improved:
            best = dev
            save_checkpoint(out / "best", decoder, vocab, pre, info, encoder_name=encoder_name)
        save_checkpoint(out / "last", decoder, vocab, pre, info, encoder_name=encoder_name)
    return out / "best"
