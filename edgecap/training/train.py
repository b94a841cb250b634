"""The training loop: teacher forcing on cached encoder features, dev check every epoch.

Frozen encoder (default): the feature map of every image (7x7x1280 at 224 px) is computed once
into a disk cache in shards (``shards.py``) and the decoder trains on them, read a batch at a
time; under torchrun on several processes (``distributed.py``). ``finetune_encoder``: the last encoder blocks
train too, on augmented photos (mirror, small rotation, colour jitter), which is ~50x slower on
a CPU; with ``finetune_cached`` they train on cached activations of the frozen blocks before
them (of the photos and of their mirror images: mirroring is the only augmentation), about
1.5x the time of a frozen-encoder epoch. ``init_from`` starts from the weights of an earlier
checkpoint (e.g. to fine-tune the encoder under a decoder trained on frozen features) or model
directory; a folder of your own photos starts from the shipped model (``start.py``). After
each epoch the dev split is captioned greedily and scored (BLEU-4, CIDEr); the best epoch by
CIDEr is kept in ``OUT/best`` and the latest in ``OUT/last`` (resumable).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from edgecap.commands.output import escape_field
from edgecap.data.readers import CaptionedImage
from edgecap.errors import BackendError, ModelError, counted
from edgecap.evaluation.metrics import score
from edgecap.files import FileProblem, read_regular
from edgecap.images import load_rgb
from edgecap.models.checkpoint import recover, save_checkpoint, save_tensors
from edgecap.models.config import encoder_spec
from edgecap.models.decoder import CaptionDecoder
from edgecap.models.efficientnet_lite import EfficientNetLite, as_regions, load_pretrained
from edgecap.objects import IMAGENET_CLASSES, ObjectClasses
from edgecap.preprocess import Preprocessing, to_model_input
from edgecap.training.config import TrainConfig, check_folders, feature_cache
from edgecap.training.distributed import rank_share, setup, world_size
from edgecap.training.features import cache_name, compute_features, progress_bar, split_features
from edgecap.training.records import MAX_RECORD_BYTES, RunLock, shown
from edgecap.training.shards import streamed_split
from edgecap.training.start import initial_model, training_items
from edgecap.training.text_mix import (
    NoImage,
    TextTags,
    clipped,
    read_text,
    text_batches,
    text_loss,
    text_steps,
)
from edgecap.vocab import Vocabulary


TAG_PARAMS = ("tag_down.", "tag_up.")  # the tag input's weights (DecoderConfig.tag_rank)
TAG_LR_SCALE = 10.0
NO_IMAGE_FILE = "no_image.safetensors"  # OUT/last: the training-only "no image" input (--text)


class TrainState(TypedDict):
    """What a run has done so far (``train_state`` of checkpoint.json; a resumed run reads it)."""

    epoch: int  # epochs finished
    best_cider: float  # the best dev CIDEr so far (-1.0 before the first epoch)
    best_epoch: int  # its epoch (0: none yet)
    history: list[dict]  # one record per epoch: train cross-entropy, seconds, dev scores


class _Batches:
    """Shuffled images with all their captions: (feature rows (n,), captions (m, T), image_index (m,)).

    ``batch_size`` counts captions; a batch holds ``batch_size // captions per image`` images so
    the per-image work (feature projection) is done once for all captions of an image.
    """

    def __init__(self, items: list[CaptionedImage], rows: list[int], vocab: Vocabulary, max_words: int):
        self.images = []
        for item, row in zip(items, rows):
            caps = []
            for cap in item.captions:
                caps.append(clipped(vocab.encode(cap), max_words, vocab.end))
            self.images.append((row, caps))
        self.n_captions = sum(len(c) for _, c in self.images)
        self.pad = vocab.pad

    def __len__(self):
        return self.n_captions

    def chunks(self, batch_size: int, rng: random.Random):
        """The global batches: lists of (feature row, caption ids) in ``rng``'s order."""
        per_image = max(1, round(self.n_captions / max(1, len(self.images))))
        n_images = max(1, batch_size // per_image)
        order = list(range(len(self.images)))
        rng.shuffle(order)
        for start in range(0, len(order), n_images):
            yield [self.images[i] for i in order[start : start + n_images]]

    def tensors(self, chunk):
        all_caps = [(j, ids) for j, (_, caps) in enumerate(chunk) for ids in caps]
        width = max(len(ids) for _, ids in all_caps)
        caps = np.full((len(all_caps), width), self.pad, dtype=np.int64)
        for k, (_, ids) in enumerate(all_caps):
            caps[k, : len(ids)] = ids
        return (
            np.array([r for r, _ in chunk]),
            torch.from_numpy(caps),
            torch.tensor([j for j, _ in all_caps]),
        )

    def shares(self, batch_size: int, rng: random.Random, rank: int = 0, world: int = 1):
        """This rank's part of each global batch: (rows, captions, image_index, totals, weight).

        ``totals``: the (predicted words, captions) of the whole global batch, which the loss
        divides its sums by, so the ranks' losses add up to the global batch's mean loss;
        ``weight`` (``world``) turns DDP's average of the ranks' gradients into their sum. A rank
        left without images (a last batch smaller than the world) runs one image at weight 0, so
        every rank takes part in each gradient reduction.
        """
        for chunk in self.chunks(batch_size, rng):
            totals = (
                sum(len(ids) - 1 for _, caps in chunk for ids in caps),
                sum(len(caps) for _, caps in chunk),
            )
            mine = [chunk[i] for i in rank_share(len(chunk), rank, world)]
            weight = float(world)
            if not mine:
                mine, weight = chunk[:1], 0.0
            yield (*self.tensors(mine), totals, weight)


def caption_loss(
    decoder: CaptionDecoder | DistributedDataParallel,
    fmap,
    caps,
    image_index,
    vocab,
    cfg: TrainConfig,
    sample_prob: float,
    totals: tuple[int, int] | None = None,
    class_probs: torch.Tensor | None = None,
):
    """(loss, cross-entropy) of a batch: means over its words and captions, or sums divided by
    ``totals`` (words, captions) of a global batch this one is a part of. ``decoder`` may be
    wrapped in DistributedDataParallel. ``class_probs``: the photos' tags (tag input)."""
    logits, targets, alphas = decoder(
        fmap, caps, image_index, sample_prob=sample_prob, class_probs=class_probs
    )
    n_words, n_captions = totals or (len(targets), len(caps))
    ce = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing, reduction="sum") / n_words
    loss = ce
    inner = decoder.module if isinstance(decoder, DistributedDataParallel) else decoder
    if inner.cfg.attention and cfg.alpha_c > 0:
        # Doubly stochastic regularisation: every region gets ~1 unit of attention over the caption.
        att_sum = alphas.sum(1)  # zero past each caption's end
        loss = loss + cfg.alpha_c * ((1.0 - att_sum) ** 2).sum() / (n_captions * att_sum.shape[1])
    return loss, ce


def greedy_captions(
    decoder: CaptionDecoder,
    fmap: torch.Tensor,
    vocab: Vocabulary,
    max_len: int = 20,
    class_probs: torch.Tensor | None = None,
) -> list[str]:
    """Greedy captions of a batch of feature maps (N, L, C) (the per-epoch dev check): the
    runtime's own search (beam 1, no n-gram rule) over the PyTorch backend's step graph.
    ``class_probs``: the photos' tags (tag input)."""
    from edgecap.backends.torch import TorchBackend
    from edgecap.decoding import CaptionOptions, search

    backend = TorchBackend.from_modules(None, decoder, device=str(fmap.device))
    options = CaptionOptions(beam_size=1, max_length=max_len, no_repeat_ngram=0)
    encoded = backend.encode_regions(fmap, class_probs)
    hypotheses = search(backend, encoded, options, vocab.start, vocab.end, len(vocab))
    return [vocab.decode(hyps[0].tokens) for hyps in hypotheses]


def class_probs_of(classifier: EfficientNetLite | None, fmap: torch.Tensor) -> torch.Tensor | None:
    """The class probabilities of regions (N, L, C) by ``classifier``, the pretrained encoder
    (``EfficientNetLite.region_class_probs``, as the exported encoder graph computes them); None
    without one (a decoder without tag input)."""
    if classifier is None:
        return None
    with torch.no_grad():
        return classifier.region_class_probs(fmap)


def evaluate_dev(decoder, dev_fmaps, dev_items, vocab, batch_size=250, classifier=None) -> dict[str, float]:
    decoder.eval()
    device = next(decoder.parameters()).device
    hyps = {}
    for start in range(0, len(dev_items), batch_size):
        fmap = torch.from_numpy(np.asarray(dev_fmaps[start : start + batch_size], dtype=np.float32)).to(
            device
        )
        captions = greedy_captions(decoder, fmap, vocab, class_probs=class_probs_of(classifier, fmap))
        for item, cap in zip(dev_items[start : start + batch_size], captions):
            hyps[item.file_name] = cap
    refs = {it.file_name: it.captions for it in dev_items}
    return score(refs, hyps, tokenizer="simple", metrics=("BLEU-1", "BLEU-4", "CIDEr"))


class _Augment:
    """Photo augmentations of the Show-and-Tell line of work: mirror, small rotation, colour jitter."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self, image):
        from PIL import Image, ImageEnhance

        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.rotate(self.rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(self.rng.uniform(0.8, 1.2))
        return image


def seeded(seed: int, threads: int) -> random.Random:
    """Seed Python and torch, set torch's threads (0: its default); -> the run's RNG."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    return random.Random(seed)


def train(cfg: TrainConfig, log=print, on_left_out=None) -> Path:
    """Train and return the directory of the best checkpoint. ``on_left_out(n)``: called once
    the data is read, with the number of rows or photos this run leaves out (each reported as
    it is met): the run's own, also where no epoch is left to train (its checkpoints then hold
    an earlier run's).

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) each process trains on its share of
    every global batch (DistributedDataParallel); rank 0 logs, checks the dev split and writes
    the checkpoints. The data order is a function of the seed and the epoch, so a resumed run
    and a run on any number of processes see the same global batches. The process group stays
    up after it returns (``edgecap.training.distributed`` says why): a script of your own that
    calls it under torchrun ends each rank with ``os._exit``, as the ``edgecap`` command does.
    Rank 0 holds ``OUT``'s lock while it writes there (``records.RunLock``): a second run into the
    same ``--out`` meanwhile is refused.
    """
    with RunLock() as lock:
        return _train(cfg, log, lock, on_left_out)


def _train(cfg: TrainConfig, log, lock: RunLock, on_left_out=None) -> Path:
    check_folders(cfg.out, cfg.cache_dir)
    seeded(cfg.seed, cfg.threads)
    if world_size() > 1 and cfg.finetune_encoder:
        raise BackendError(
            "--finetune-encoder runs in one process: under torchrun only the "
            "decoder trains, on cached features"
        )
    if world_size() > 1 and cfg.text:
        raise BackendError("--text runs in one process, not under torchrun")
    dist = setup()
    if not dist.main:
        log = _silent
    if cfg.precision != "fp32" and dist.device.type != "cuda":
        raise BackendError(
            f"--precision {cfg.precision} needs a CUDA device (mixed precision runs on GPUs only)"
        )
    out = Path(cfg.out)  # made once the data and the features are ready: no empty run folder
    data = Path(cfg.data)
    images = Path(cfg.images) if cfg.images else data / ("" if cfg.dataset == "folder" else "images")
    if cfg.image_size is None:  # TrainConfig settles it (the encoder's own size) when made
        raise ValueError("TrainConfig.image_size is None: a TrainConfig made without its checks")
    pre = Preprocessing(size=(cfg.image_size, cfg.image_size))

    train_items, dev_items, left_out = training_items(cfg, data, images, log)
    if on_left_out is not None:
        on_left_out(left_out)
    if cfg.max_dev_images:
        dev_items = dev_items[: cfg.max_dev_images]
    last = out / "last"
    if dist.main:  # which writes them; the other ranks read last once it is settled
        lock.take(out)  # a run to resume: before its recovery (a new run's: once OUT is made)
        for folder in (last, out / "best"):  # a run stopped while replacing one of them
            recover(folder)
    dist.barrier()
    start = initial_model(cfg, train_items, last, log)
    decoder, vocab, meta, resuming = start.decoder, start.vocab, start.meta, start.resuming
    log(
        f"train {counted(len(train_items), 'image')}, dev {counted(len(dev_items), 'image')}, "
        f"vocabulary {counted(len(vocab), 'word')}"
    )
    if len(dev_items) == 1 and dist.main:  # CIDEr-D weighs a word by log(photos / photos with it)
        warnings.warn(
            f"{shown(data)}: one dev photo ({escape_field(dev_items[0].file_name)}): its CIDEr is "
            "0 whatever its caption, so no epoch scores better than the first, which stays the "
            "best checkpoint (and --patience counts every later one as no better); give the dev "
            "split two photos or more (--dev-fraction, a split column, --max-dev-images)",
            stacklevel=2,
        )
    text_captions: list[list[int]] = []
    if cfg.text:
        text_captions, dropped = read_text(cfg.text, vocab, cfg.max_caption_words)
        log(
            f"text {len(text_captions)} captions ({dropped} with more than one unknown word dropped), "
            f"{cfg.text_share:.0%} of the batches"
        )

    cache = feature_cache(out, cfg.cache_dir)
    # Fine-tuning: the blocks before the tuned ones are frozen, so their activations are cached
    # (the train photos' are used by --finetune-cached, the dev photos' by the dev check).
    # Frozen encoder: the features stream from the shard cache a batch at a time.
    # split_at: the first tuned block, used only when fine-tuning (start.encoder is None
    # otherwise, and --finetune-cached needs --finetune-encoder).
    split_at = encoder_spec(cfg.encoder).n_blocks - cfg.finetune_blocks
    if cfg.finetune_encoder:
        train_rows, dev_maps, train_maps = split_features(
            train_items, dev_items, images, cache, pre, cfg.progress, split_at=split_at, encoder=cfg.encoder
        )
    else:
        train_rows, dev_maps, train_maps = streamed_split(
            train_items,
            dev_items,
            images,
            cache,
            pre,
            cfg.progress,
            cfg.shard_size,
            dist,
            log,
            encoder_name=cfg.encoder,
        )
    if cfg.finetune_cached:
        maps, index = compute_features(
            [images / it.file_name for it in train_items],
            cache,
            pre,
            progress=cfg.progress,
            split_at=split_at,
            mirrored=True,
            encoder=cfg.encoder,
        )
        mirror_maps = torch.from_numpy(np.asarray(maps, dtype=np.float32))
        mirror_row = np.zeros(len(train_maps), dtype=np.int64)  # cache row -> mirrored cache row
        mirror_row[train_rows] = [index[cache_name(images / it.file_name)] for it in train_items]

    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        lock.take(out)
    # The pretrained encoder, with the starting checkpoint's tuned blocks where it has them.
    encoder = start.encoder
    device = dist.device
    decoder.to(device)
    if encoder is not None:
        encoder.to(device)
    model: CaptionDecoder | DistributedDataParallel = decoder
    if dist.active:
        model = torch.nn.parallel.DistributedDataParallel(
            decoder, device_ids=[device.index] if device.type == "cuda" else None
        )
    # The tag input's projections (a decoder with tag input) learn TAG_LR_SCALE times faster than
    # the rest: they start at zero next to trained weights, whose learning rate hardly moves them.
    named = list(decoder.named_parameters())
    tag_params = [p for name, p in named if name.startswith(TAG_PARAMS)]
    params: list[dict[str, Any]] = [
        {"params": [p for name, p in named if not name.startswith(TAG_PARAMS)], "lr": cfg.lr}
    ]
    bases = [cfg.lr]  # each parameter group's learning rate before decay
    if tag_params:
        params.append({"params": tag_params, "lr": cfg.lr * TAG_LR_SCALE})
        bases.append(cfg.lr * TAG_LR_SCALE)
    if encoder is not None:
        for p in encoder.parameters():
            p.requires_grad_(False)
        tuned = list(encoder._blocks[split_at:]) + [encoder._conv_head, encoder._bn1]
        for m in tuned:
            for p in m.parameters():
                p.requires_grad_(True)
        params.append({"params": [p for m in tuned for p in m.parameters()], "lr": cfg.encoder_lr})
        bases.append(cfg.encoder_lr)
    no_image = None
    if text_captions:  # training-only: kept in OUT/last to resume, never in a checkpoint
        no_image = NoImage(decoder.cfg.feature_dim).to(device)
        if resuming and (last / NO_IMAGE_FILE).exists():
            from safetensors.torch import load_file

            no_image.load_state_dict(load_file(str(last / NO_IMAGE_FILE)))
        params.append({"params": list(no_image.parameters()), "lr": cfg.lr})
        bases.append(cfg.lr)
    optimizer = torch.optim.Adam(params)
    # Tags as an input: the pretrained classifier turns the regions into class probabilities
    # (frozen; a tuned encoder's regions go through it too, as in the exported encoder graph).
    classifier = None
    text_tags = None
    if decoder.cfg.tag_rank:
        classifier = load_pretrained(cfg.encoder).to(device).requires_grad_(False)
        if no_image is not None:
            tail = None if encoder is None else (encoder, split_at)
            text_tags = _text_tags(classifier, train_maps, train_rows, vocab, device, cfg.seed, tail)

    state: TrainState = {"epoch": 0, "best_cider": -1.0, "best_epoch": 0, "history": []}
    if resuming:
        _resume_optimizer(optimizer, last, log)
        state = _train_state(meta, last / "checkpoint.json")
        log(f"resumed from {last} after epoch {state['epoch']}")

    batches = _Batches(train_items, train_rows, vocab, cfg.max_caption_words)
    augment = _Augment(random.Random(cfg.seed))
    n_steps = math.ceil(len(batches) / (cfg.batch_size // 5 * 5 or 1))
    row_to_path = {r: images / it.file_name for r, it in zip(train_rows, train_items)}
    amp = (
        torch.autocast(
            device.type, dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[cfg.precision])
        )
        if cfg.precision != "fp32"
        else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    steps_log = out / "steps.jsonl"  # every step's loss (rank 0)
    if dist.main:
        _keep_steps(steps_log, state["epoch"])
    # one optimizer step on a text-only batch (--text): caps -> its cross-entropy
    text_step = functools.partial(
        _text_step,
        decoder,
        no_image,
        optimizer=optimizer,
        params=params,
        cfg=cfg,
        amp=amp,
        scaler=scaler,
        text_tags=text_tags,
    )
    if cfg.text_pretrain and no_image is not None and state["epoch"] == 0:
        # The decoder first learns as a caption language model (a run interrupted here begins
        # again: nothing of it is kept before the first photo epoch's checkpoint).
        own = [ids for _, caps in batches.images for ids in caps]
        _pretrain_text(decoder, text_step, text_captions + own, vocab.pad, cfg, text_tags, log, steps_log)
    first = state["epoch"] + 1
    if state["epoch"] and state["epoch"] - state["best_epoch"] >= cfg.patience:
        # the same command run again after it stopped early: no more epochs (a longer
        # --patience goes on)
        log(
            f"no better dev CIDEr for {counted(cfg.patience, 'epoch')} after epoch "
            f"{state['best_epoch']}: stopped before"
        )
        first = cfg.epochs + 1

    def resumable(folder: Path) -> None:  # last's training-only files, replaced with it
        _save_optimizer(optimizer, folder / "optimizer.safetensors", folder / "optimizer.json")
        if no_image is not None:
            save_tensors(
                {k: v.detach().cpu() for k, v in no_image.state_dict().items()}, folder / NO_IMAGE_FILE
            )

    for epoch in range(first, cfg.epochs + 1):
        decay = 0.5 ** ((epoch - 1) // cfg.lr_decay_epochs)
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * decay
        sample_prob = cfg.scheduled_sampling * min(1.0, (epoch - 1) / max(1, cfg.epochs - 1))
        # The epoch's randomness (order, augmentation, dropout) depends on the seed and the
        # epoch alone: a resumed run repeats it.
        rng = augment.rng = random.Random(f"{cfg.seed}:{epoch}")
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + dist.rank)
        model.train()
        if encoder is not None:
            # BatchNorm keeps its ImageNet statistics: batches of ~20 photos would only add
            # noise to them. The tuned blocks' weights still learn.
            encoder.eval()
        t0 = time.time()
        total, count = 0.0, 0
        bar = progress_bar(n_steps, f"epoch {epoch}", cfg.progress and dist.main)
        shares = batches.shares(cfg.batch_size, rng, dist.rank, dist.world)
        read = (lambda share: train_maps[share[0]]) if encoder is None else (lambda share: None)
        texts = text_batches(
            text_captions, cfg.batch_size, vocab.pad, random.Random(f"{cfg.seed}:{epoch}:text")
        )
        if text_tags is not None:  # and their tags: a resumed run draws the same ones
            text_tags.rng = random.Random(f"{cfg.seed}:{epoch}:text-tags")
        text_total, text_count = 0.0, 0
        # every step's record (rank 0), the file closed (and so written) on an error too: a
        # rank ends with os._exit (edgecap.training.distributed)
        with open(steps_log, "a") if dist.main else contextlib.nullcontext() as steps:
            for step, ((rows, caps, image_index, totals, weight), fmap) in enumerate(
                _prefetched(shares, read), 1
            ):
                # fmap: read ahead by _prefetched (frozen encoder) or computed here
                if encoder is not None and cfg.finetune_cached:
                    flip = torch.tensor([rng.random() < 0.5 for _ in rows])
                    x = torch.where(
                        flip[:, None, None, None], mirror_maps[mirror_row[rows]], train_maps[rows]
                    )
                    fmap = as_regions(encoder.tail(x.to(device), split_at))
                elif encoder is not None:
                    photos = np.stack([to_model_input(augment(load_rgb(row_to_path[r])), pre) for r in rows])
                    fmap = encoder.regions(torch.from_numpy(photos).to(device))
                fmap, caps, image_index = fmap.to(device), caps.to(device), image_index.to(device)
                with amp:
                    loss, ce = caption_loss(
                        model,
                        fmap,
                        caps,
                        image_index,
                        vocab,
                        cfg,
                        sample_prob,
                        totals,
                        class_probs_of(classifier, fmap),
                    )
                # norm: of the averaged gradient
                norm = _optimizer_step(loss * weight, optimizer, params, cfg, scaler)
                step_loss, step_ce = dist.all_sum([loss.item() * (weight > 0), ce.item() * (weight > 0)])
                total += step_ce * totals[1]
                count += totals[1]
                if steps is not None:
                    steps.write(
                        json.dumps(
                            {
                                "epoch": epoch,
                                "step": step,
                                "loss": step_loss,
                                "ce": step_ce,
                                "grad_norm": float(norm),
                            }
                        )
                        + "\n"
                    )
                for _ in range(text_steps(step, cfg.text_share) if no_image is not None else 0):
                    text_ce = text_step(next(texts))
                    text_total, text_count = text_total + text_ce, text_count + 1
                    if steps is not None:
                        steps.write(json.dumps({"epoch": epoch, "step": step, "text_ce": text_ce}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.3f}")
        bar.close()
        if not dist.main:  # rank 0 checks the dev split and writes the checkpoints
            if dist.from_main(None):
                break
            continue
        dev_fmaps = dev_maps if encoder is None else _tail_features(encoder, split_at, dev_maps)
        dev = evaluate_dev(decoder, dev_fmaps, dev_items, vocab, classifier=classifier)
        record = {
            "epoch": epoch,
            "train_ce": round(total / count, 4),
            **({"text_ce": round(text_total / text_count, 4)} if text_count else {}),
            "seconds": round(time.time() - t0),
            **{k: round(v, 4) for k, v in dev.items()},
        }
        state["history"].append(record)
        state["epoch"] = epoch
        improved = dev["CIDEr"] > state["best_cider"]
        if improved:
            state["best_cider"], state["best_epoch"] = dev["CIDEr"], epoch
        log(json.dumps(record) + ("  (best)" if improved else ""))
        info = {
            "train_state": state,
            "train_config": asdict(cfg),
            "training_data": {
                "dataset": cfg.dataset,
                "root": str(data),
                "split": "train",
                "left_out": left_out,
                "n_images": len(train_items),
            },
            "dev_metrics_greedy": dev,
        }
        if improved:
            save_checkpoint(out / "best", decoder, vocab, pre, info, encoder, cfg.encoder)

        save_checkpoint(last, decoder, vocab, pre, info, encoder, cfg.encoder, also=resumable)
        if dist.from_main(epoch - state["best_epoch"] >= cfg.patience):
            log(f"no better dev CIDEr for {counted(cfg.patience, 'epoch')}: stopping")
            break
    dist.barrier()  # the group stays up: see edgecap.training.distributed
    if not (out / "best" / "checkpoint.json").exists():
        raise ModelError(
            f"{shown(out / 'best')}: no best checkpoint (the run in {shown(out)} "
            f"had finished {counted(state['epoch'], 'epoch')} of --epochs {cfg.epochs}); "
            "raise --epochs, or start in another --out"
        )
    return out / "best"


def _pretrain_text(
    decoder, text_step, captions, pad, cfg: TrainConfig, text_tags, log, steps_log: Path
) -> None:
    """``cfg.text_pretrain`` epochs of text-only batches over ``captions`` (``--text-pretrain``),
    each one ``text_step`` (``_text_step`` bound to the run's decoder, "no image" input and
    optimizer), at the run's learning rate; each epoch's order and tags come from the seed and
    the epoch.
    Each step's cross-entropy goes to ``steps_log`` as a step of epoch 0 (before the photos')."""
    n_batches = math.ceil(len(captions) / cfg.batch_size)
    for epoch in range(1, cfg.text_pretrain + 1):
        t0 = time.time()
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + 7)
        texts = text_batches(captions, cfg.batch_size, pad, random.Random(f"{cfg.seed}:pretrain:{epoch}"))
        if text_tags is not None:
            text_tags.rng = random.Random(f"{cfg.seed}:pretrain:{epoch}:text-tags")
        decoder.train()
        total = 0.0
        bar = progress_bar(n_batches, f"text pretraining {epoch}", cfg.progress)
        with open(steps_log, "a") as steps:
            for done in range(1, n_batches + 1):
                ce = text_step(next(texts))
                total += ce
                record = {"epoch": 0, "text_pretrain_epoch": epoch, "step": done, "text_ce": ce}
                steps.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(text_ce=f"{total / done:.3f}")
        bar.close()
        log(
            json.dumps(
                {
                    "text_pretrain_epoch": epoch,
                    "text_ce": round(total / n_batches, 4),
                    "captions": len(captions),
                    "seconds": round(time.time() - t0),
                }
            )
        )


def _text_step(
    decoder, no_image, caps, optimizer, params, cfg: TrainConfig, amp, scaler, text_tags=None
) -> float:
    """One optimizer step on a text-only batch (``text_mix``; ``text_tags``: its tags, for a
    decoder with tag input); -> its cross-entropy."""
    device = next(decoder.parameters()).device
    probs = None if text_tags is None else text_tags(caps).to(device)
    with amp:
        ce = text_loss(decoder, no_image, caps.to(device), cfg.label_smoothing, probs)
    _optimizer_step(ce, optimizer, params, cfg, scaler)
    return ce.item()


def _optimizer_step(loss, optimizer, params, cfg: TrainConfig, scaler) -> torch.Tensor:
    """Backpropagate ``loss`` (through the AMP scaler), clip the gradient of every parameter
    group to ``cfg.grad_clip`` and step; -> the gradient's norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return norm


def _text_tags(
    classifier, train_maps, train_rows, vocab: Vocabulary, device, seed: int, tail=None, sample: int = 2000
) -> TextTags:
    """The text batches' tags (``TextTags``): the caption words of ``IMAGENET_CLASSES`` in the
    run's vocabulary, over the mean class probabilities of up to ``sample`` train photos.
    ``tail``: (encoder, split_at) when ``train_maps`` hold the activations before the tuned
    blocks (--finetune-encoder), which turns them into regions first."""
    rows = np.sort(np.asarray(train_rows)[:sample])
    n_classes = classifier._fc.out_features
    total = torch.zeros(n_classes, device=device)
    for start in range(0, len(rows), 250):
        maps = np.asarray(train_maps[rows[start : start + 250]], dtype=np.float32)
        if tail is not None:
            encoder, split_at = tail
            maps = _tail_features(encoder, split_at, maps)
        with torch.no_grad():
            total += classifier.region_class_probs(torch.from_numpy(maps).to(device)).sum(0)
    classes = ObjectClasses.load(IMAGENET_CLASSES, vocab.index, n_classes)
    return TextTags(classes.word_ids, (total / len(rows)).cpu(), f"{seed}:text-tags")


def _silent(*_args) -> None:
    """The log of ranks other than 0."""


def _prefetched(items, read):
    """(item, read(item)) for each item, reading the next item's data on a thread while the
    caller works on the current one (file reads release the GIL)."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for item in items:
            future = pool.submit(read, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _keep_steps(path: Path, epochs_done: int) -> None:
    """The step log without the steps of epochs after ``epochs_done`` (those of an interrupted
    epoch, which a resumed run repeats) and without lines that are not step records."""
    lines = []
    if epochs_done and os.path.lexists(path):
        try:
            text = read_regular(path, MAX_RECORD_BYTES, "step log")
        except FileProblem as exc:
            raise ModelError(f"{shown(path)}: {exc}") from None
        lines = text.decode("utf-8", "replace").split("\n")
    kept = [ln for ln in lines if _step_epoch(ln) <= epochs_done]
    path.write_text("".join(ln + "\n" for ln in kept))


def _step_epoch(line: str) -> float:
    """The epoch of a step record (infinite for a line that is not one: dropped)."""
    try:
        epoch = json.loads(line).get("epoch")
    except (ValueError, RecursionError, AttributeError):
        return math.inf
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else math.inf


def _train_state(meta: dict, path: Path) -> TrainState:
    """A resumed checkpoint's ``train_state``, its types checked (``ModelError`` otherwise)."""
    from edgecap.training.records import Record

    record = Record(path, Record(path, meta, ModelError).dict("train_state"), ModelError)
    epoch, best_epoch = record.int("epoch", 0, 1 << 20), record.int("best_epoch", 0, 1 << 20)
    best_cider = record.get("best_cider", (int, float), "a number")
    if isinstance(best_cider, bool) or not math.isfinite(best_cider):
        raise record.fail("'best_cider' is not a finite number")
    return {
        "epoch": epoch,
        "best_cider": float(best_cider),
        "best_epoch": best_epoch,
        "history": record.get("history", list, "a list"),
    }


@torch.inference_mode()
def _tail_features(encoder, split_at: int, maps: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """Cached activations after ``split_at`` blocks -> encoder features (n, 49, 1280) float32."""
    encoder.eval()
    out = []
    device = next(encoder.parameters()).device
    for start in range(0, len(maps), batch_size):
        x = torch.from_numpy(np.asarray(maps[start : start + batch_size], dtype=np.float32))
        out.append(as_regions(encoder.tail(x.to(device), split_at)).cpu().numpy())
    return np.concatenate(out)


def _save_optimizer(optimizer, tensor_path: Path, meta_path: Path) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_tensors(tensors, tensor_path)
    meta_path.write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _resume_optimizer(optimizer, last: Path, log=print) -> None:
    """The optimizer's state kept in ``last`` (``optimizer.safetensors`` and ``optimizer.json``)
    loaded into ``optimizer``; neither file there: a fresh optimizer, said in the log (the way
    to resume so, as a state of other shapes says); one without the other: ``ModelError`` (a
    lost file resumed silently with a fresh optimizer had scored less than half as well)."""
    tensors, record = last / "optimizer.safetensors", last / "optimizer.json"
    if tensors.exists():
        _load_optimizer(optimizer, tensors, record)
    elif record.exists():
        raise ModelError(
            f"{shown(tensors)}: missing beside optimizer.json (the optimizer's state): restore "
            "it, or delete optimizer.json too to resume with a fresh optimizer"
        )
    else:
        log(f"{last}: no optimizer state (optimizer.safetensors, optimizer.json): a fresh optimizer")


def _load_optimizer(optimizer, tensor_path: Path, meta_path: Path) -> None:
    """Adam's state from a resumed run, each moment checked against its parameter's shape
    (from the file's header, before anything is read); ``ModelError`` naming the file."""
    from safetensors.torch import load_file

    from edgecap.training.records import read_record, safetensors_shapes

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, shape in safetensors_shapes(tensor_path).items():
        pid, _, name = key.partition(".")
        expected = (
            ()
            if name == "step"
            else tuple(params[int(pid)].shape)
            if pid.isdigit() and int(pid) < len(params)
            else None
        )
        if shape != expected:
            raise ModelError(
                f"{shown(tensor_path)}: {key} is {shape}, not the state of this "
                "run's parameters; delete it (and optimizer.json) to resume with "
                "a fresh optimizer"
            )
    record = read_record(meta_path)
    scalars, groups = record.dict("scalars"), record.get("param_groups", list, "a list")
    try:
        tensors = load_file(str(tensor_path))
        state: dict = {}
        for key, v in list(tensors.items()) + list(scalars.items()):
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except Exception as exc:  # noqa: BLE001 - ValueError, KeyError, TypeError, SafetensorError
        raise ModelError(
            f"{shown(meta_path)}: cannot restore the optimizer ({exc}); delete it "
            "and optimizer.safetensors to resume with a fresh optimizer"
        ) from None
