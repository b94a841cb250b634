"""Checkpoints as safetensors + JSON (never pickled modules).

A checkpoint directory holds ``model.safetensors`` (decoder and, when fine-tuned, encoder
weights under ``decoder.`` / ``encoder.``), ``vocab.json`` and ``checkpoint.json`` (decoder
config, preprocessing, training state and metrics). ``optimizer.safetensors`` +
``optimizer.json`` make training resumable.

A checkpoint is written whole or not at all: into a sibling ``NAME.new`` folder, which then
takes the old one's place by two renames (``replacing``). A run stopped at any point leaves the
previous checkpoint or the new one, never the new weights beside the old training state or
optimizer (its files are flushed to the disk before the renames, so a power cut does not make
one of them empty either); ``recover`` (called before a run reads its ``last``) settles a stop
between the renames.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as serialise

from edgecap.commands.output import escape_field
from edgecap.errors import ModelError
from edgecap.models.config import DEFAULT_ENCODER
from edgecap.models.decoder import CaptionDecoder, DecoderConfig
from edgecap.models.efficientnet_lite import EfficientNetLite, load_pretrained
from edgecap.preprocess import Preprocessing
from edgecap.training.config import check_decoder, check_preprocessing
from edgecap.training.records import read_record, safetensors_shapes, shown
from edgecap.vocab import Vocabulary

FORMAT = "edgecap-checkpoint/1"


def save_tensors(tensors: dict, path: Path) -> None:
    """``tensors`` written to ``path`` as a safetensors file. Serialised here and written by
    Python, not by ``safetensors.torch.save_file``: its I/O errors (a full disk, no permission)
    are a ``SafetensorError`` whose only trace of the cause is its text, where these are the
    ``OSError`` the commands report in one line, always naming ``path``."""
    data = serialise(tensors)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # a write to the open file (a full disk) names no file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def save_checkpoint(
    directory: Path,
    decoder: CaptionDecoder,
    vocab: Vocabulary,
    pre: Preprocessing,
    info: dict,
    encoder: EfficientNetLite | None = None,
    encoder_name: str = DEFAULT_ENCODER,
    also: Callable[[Path], None] | None = None,
) -> None:
    """``encoder``: the fine-tuned encoder, whose weights are saved too; ``encoder_name``: which
    pretrained encoder the decoder was trained on when it is frozen (``encoder``'s own wins).
    ``also(folder)`` writes further files (a run's optimizer) into the same checkpoint, replaced
    with it as one (``replacing``)."""
    with replacing(Path(directory)) as folder:
        _write_checkpoint(folder, decoder, vocab, pre, info, encoder, encoder_name)
        if also is not None:
            also(folder)


def _write_checkpoint(directory, decoder, vocab, pre, info, encoder, encoder_name) -> None:
    tensors = {f"decoder.{k}": v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    if encoder is not None:
        tensors.update(
            {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        )
    save_tensors(tensors, directory / "model.safetensors")
    vocab.save(directory / "vocab.json")
    meta = {
        "format": FORMAT,
        "decoder": decoder.cfg.to_dict(),
        "preprocessing": pre.to_dict(),
        "finetuned_encoder": encoder is not None,
        "encoder": encoder.variant if encoder is not None else encoder_name,
        **info,
    }
    (directory / "checkpoint.json").write_text(json.dumps(meta, indent=2))


def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(directory.name + ".new"), directory.with_name(directory.name + ".old")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def recover(directory: Path) -> None:
    """Settle a ``replacing`` that was stopped: between its renames (the directory gone, the
    complete new one and the old one beside it) the new one takes its place; a half-written new
    one, and the old one once replaced, are removed."""
    directory = Path(directory)
    new, old = _siblings(directory)
    if not os.path.lexists(directory):
        if os.path.lexists(old) and os.path.lexists(new):
            os.replace(new, directory)  # the old one is renamed only once the new one is whole
        elif os.path.lexists(old):
            os.replace(old, directory)
    for leftover in (new, old):
        if os.path.lexists(leftover):
            _remove(leftover)


@contextlib.contextmanager
def replacing(directory: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``directory`` to write its new contents into; when the block
    ends without an error, that folder takes the directory's place (the old one is renamed
    away first, then removed). On an error the directory is left as it was."""
    directory = Path(directory)
    recover(directory)
    new, old = _siblings(directory)
    new.mkdir(parents=True)
    try:
        yield new
    except BaseException:
        _remove(new)
        raise
    _sync(new)  # its files on the disk before the renames make it the checkpoint
    if os.path.lexists(directory):
        os.replace(directory, old)
    os.replace(new, directory)
    _sync_folder(directory.parent)  # the renames themselves
    _remove(old)


def _sync(folder: Path) -> None:
    """Flush ``folder``'s files and its entries to the disk, so that a power cut after the renames
    cannot leave the checkpoint's name on files whose data never reached it."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    try:  # a folder opens read-only on POSIX; where it cannot (Windows), its entries go with the files
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the files are flushed all the same
        pass
    finally:
        os.close(fd)


def load_checkpoint(directory: Path):
    """-> (encoder, decoder, vocab, preprocessing, meta); models in eval mode on the CPU."""
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not os.path.lexists(meta_path):
        raise ModelError(
            f"{shown(directory)}: not a checkpoint directory (no checkpoint.json); "
            "pass the best/ or last/ folder that `edgecap train` wrote"
        )
    record = read_record(meta_path)  # a regular file, bounded, an object: ModelError otherwise
    meta = record.data
    if meta.get("format") != FORMAT:
        raise ModelError(
            f"{shown(meta_path)}: unknown checkpoint format "
            f"{escape_field(repr(meta.get('format')))}, expected {FORMAT}"
        )
    sizes = record.dict("decoder")
    try:
        check_decoder(sizes)
        decoder_cfg = DecoderConfig(**sizes)
        pre = check_preprocessing(record.dict("preprocessing"))
    except (TypeError, ValueError, KeyError) as exc:
        raise record.fail(f"decoder or preprocessing: {exc}") from None
    try:
        vocab = Vocabulary.load(directory / "vocab.json")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{shown(directory / 'vocab.json')}: cannot load it ({exc})") from None
    weights = directory / "model.safetensors"
    _check_shapes(weights, decoder_cfg)  # before any weight is allocated
    try:
        tensors = load_file(str(weights))
        decoder = CaptionDecoder(decoder_cfg)
        decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
        encoder = load_pretrained(meta.get("encoder", DEFAULT_ENCODER))  # older: Lite0
        enc = {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
        if enc:
            encoder.load_state_dict(enc)
    except Exception as exc:  # OSError, KeyError, torch's RuntimeError, SafetensorError
        raise ModelError(f"{directory}: cannot load the checkpoint ({exc})") from exc
    if len(vocab) != decoder.cfg.vocab_size:
        raise ModelError(
            f"{directory}: vocab.json has {len(vocab)} words, the decoder {decoder.cfg.vocab_size}"
        )
    return encoder.eval(), decoder.eval(), vocab, pre, meta


def _check_shapes(weights: Path, cfg: DecoderConfig) -> None:
    """``ModelError`` unless the decoder tensors ``weights`` declares are those of ``cfg``
    (read from the file's header; the expected shapes from a decoder on torch's meta device,
    which allocates nothing)."""
    import torch

    declared = safetensors_shapes(weights)
    with torch.device("meta"):
        expected = {f"decoder.{k}": tuple(v.shape) for k, v in CaptionDecoder(cfg).state_dict().items()}
    for name, shape in expected.items():
        if declared.get(name) != shape:
            raise ModelError(
                f"{shown(weights)}: {name} is "
                f"{declared.get(name, 'missing')}, "
                f"checkpoint.json's decoder sizes need {shape}"
            )
