"""Builders shared by several test modules (import them from here, never from another test): a
fake backend driven by a hand-written table of log-probabilities, solid-colour images, two ways to
force threads to interleave deterministically (decoder steps in lockstep; every line of package
code in turn), what the loader gives the preprocessing, a contract-shaped model directory
built with onnx helpers only, the training configuration of the tiny decoder, and the command
run in this process (``run_edgecap``).

Everything here uses the backend interface (``edgecap.backends.base``) only, so it survives a
refactor of the package's internals.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import images
from edgecap.backends.base import Backend, DecoderSession, Encoded, StepResult
from edgecap.manifest import FORMAT, file_sha256

EXAMPLES = Path(images.__file__).parent / "assets" / "examples"

FILL = -30.0  # log-prob of every word a table does not name (far below any named word)


# A table for ``TableBackend`` (prefix -> the next words' log-probabilities; any other prefix
# "c" -0.25, <end> -5), searched at beam 2 with the tag bonus 1 on "a" and three words at most:
# no beam ever ends, and "a <end>" after the first word and "b c <end>" after the second tie
# exactly, in rank (-2.0 over 2 words, -3.0 over 3) and log-probability (-3.0 both); the numpy
# loop keeps the earlier, a later place to end having to rank strictly better.
LATER_TIED_ENDING = {
    (): {"a": -1.25, "b": -0.5},
    ("a",): {"c": -0.25, "<end>": -1.75},
    ("b",): {"c": -0.25, "<end>": -2.5},
    ("a", "c"): {"b": -0.25, "<end>": -5.0},
    ("b", "c"): {"a": -0.25, "<end>": -2.25},
}

# Beam 2, no word twice, at most 2 words: "a" and "b" first; then "a <end>" and "b a" (-1.0)
# are taken, and "a b" and "b <end>" tie exactly (-1.5), each third in its row (the repeated
# word second). The numpy loop meets row 0's "a b" first, which fills the beam, so "b <end>"
# finishes no caption: the captions are "a" (finished) and "b a" (cut at max_length).
END_TIED_WITH_THE_LAST_CONTINUATION = {
    (): {"a": -0.5, "b": -0.5},
    ("a",): {"<end>": -0.5, "a": -0.5, "b": -1.0},
    ("b",): {"a": -0.5, "b": -0.5, "<end>": -1.0},
}


class TableBackend(Backend):
    """A decoder whose next-word log-probabilities come from ``rule(prefix)``.

    ``words``: the vocabulary (id = position); ``rule``: a function of the words generated so far
    (a tuple of strings, without <start>) returning ``{word: log_prob}``; every other word gets
    ``FILL``. The step returns the ``top_k`` best, best first (ties: lower id first). Each
    session keeps its rows' prefixes itself (never the backend), as a real session keeps h/c.
    ``keyed=True``: the rule is ``rule(prefix, key)``, ``key`` the image's mean input value in
    channel 0 (so differently coloured images can follow different tables).
    """

    name = "fake-table"

    def __init__(
        self,
        words: list[str],
        rule: Callable[..., dict[str, float]],
        top_k: int = 4,
        start: str = "<start>",
        keyed: bool = False,
    ):
        self.words, self.rule, self.top_k, self.start_word = list(words), rule, top_k, start
        self.keyed = keyed
        self.index = {w: i for i, w in enumerate(self.words)}
        self.n_regions = 4
        self.encoded_batches: list[np.ndarray] = []

    def encode(self, images: np.ndarray) -> Encoded:
        self.encoded_batches.append(np.array(images))
        keys = [float(np.asarray(image)[0].mean()) for image in images]
        return Encoded(n_images=len(images), tensors=keys)

    def start(self, encoded, image_index, return_attention=False):
        return TableSession(self, encoded.tensors, image_index, return_attention)

    def logprobs(self, prefix: tuple[str, ...], key: float | None = None) -> np.ndarray:
        lp = np.full(len(self.words), FILL)
        rule = self.rule(prefix, key) if self.keyed else self.rule(prefix)
        for word, value in rule.items():
            lp[self.index[word]] = value
        return lp


class TableSession(DecoderSession):
    def __init__(self, backend: TableBackend, keys: list[float], image_index, return_attention):
        self.backend = backend
        self.prefixes: list[tuple[str, ...] | None] = [None] * len(keys)  # None: before <start>
        self.row_keys = [keys[i] for i in np.asarray(image_index).tolist()]
        self.return_attention = return_attention

    def _step(self, tokens, source_rows, word_bias=None):
        b = self.backend
        new = []
        for src, tok in zip(source_rows.tolist(), tokens.tolist()):
            prev = self.prefixes[src]
            word = b.words[tok]
            new.append(() if prev is None else prev + (word,))
            assert prev is not None or word == b.start_word
        self.prefixes = new
        lp = np.stack([b.logprobs(p, k) for p, k in zip(new, self.row_keys)])
        ranked = lp if word_bias is None else lp + word_bias  # the top K with the bias
        ids = np.argsort(-ranked, axis=1, kind="stable")[:, : b.top_k]
        alpha = (
            np.full((len(new), b.n_regions), 1.0 / b.n_regions, np.float32) if self.return_attention else None
        )
        return StepResult(np.take_along_axis(lp, ids, 1).astype(np.float32), ids.astype(np.int32), alpha)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """uint8 (H, W, 3) array of one colour; ``size`` is (width, height)."""
    w, h = size
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def encoded_bytes(array: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    """An RGB uint8 array encoded as PNG / JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


class LockstepSessions:
    """Wraps ``backend.start`` so that every session's ``step`` first waits at a barrier shared by
    ``parties`` threads: the searches of those threads advance one word at a time together, so
    all of them are mid-decoding at once whatever the scheduler does (no sleeps, no timing).

    A thread whose search ends (or fails) calls ``leave()``: the barrier is then broken and the
    others carry on without waiting, so nobody waits forever.
    """

    def __init__(self, backend: Backend, parties: int):
        self.barrier = threading.Barrier(parties)
        self.steps_together = 0
        self._lock = threading.Lock()
        self._start = backend.start
        backend.start = self.start  # instance attribute: only this backend object is affected

    def start(self, *args, **kwargs):
        return _LockstepSession(self, self._start(*args, **kwargs))

    def leave(self) -> None:
        self.barrier.abort()


class _LockstepSession(DecoderSession):
    def __init__(self, owner: LockstepSessions, inner: DecoderSession):
        self.owner, self.inner = owner, inner

    def _step(self, tokens, source_rows, word_bias=None):
        try:
            if self.owner.barrier.wait() == 0:
                with self.owner._lock:
                    self.owner.steps_together += 1
        except threading.BrokenBarrierError:
            pass  # another thread is finished: no partner left to wait for
        return self.inner.step(tokens, source_rows, word_bias)


class LineLockstep:
    """Threads run the Python code of files under ``directory`` one line each in turn.

    Each thread calls ``run(fn)``; once all ``parties`` have, a baton goes round: at every line
    of traced code a thread hands the baton to the next thread and waits for it to come back
    (``sys.settrace``, this thread only). Code outside ``directory`` (numpy, onnxruntime, the
    test) runs freely, so a thread inside a backend call simply keeps the others waiting until
    its next traced line. Two calls that run the same code are thus interleaved line by line,
    whatever the scheduler does: state they share (an attribute set on a shared object, a
    module-level cache) is read and written between each other's lines.

    Never use it around code that waits for another thread (a lock another traced thread can
    hold): the waiting thread would hold the baton.
    """

    def __init__(self, directory, parties: int):
        self.prefix = str(directory)
        self.parties = parties
        self.cond = threading.Condition()
        self.ring: list[int] = []  # threads inside run(), in turn order
        self.joined = 0  # threads that have called run() (still in it or left)
        self.turn: int | None = None
        self.switches = 0

    def run(self, fn):
        me = threading.get_ident()
        with self.cond:
            self.ring.append(me)
            self.joined += 1
            if self.joined == self.parties:
                self.turn = self.ring[0]  # everyone is here: the baton starts
                self.cond.notify_all()
        sys.settrace(self._on_call)
        try:
            return fn()
        finally:
            sys.settrace(None)
            with self.cond:
                i = self.ring.index(me)
                self.ring.remove(me)
                if self.turn == me:
                    self.turn = self.ring[i % len(self.ring)] if self.ring else None
                self.cond.notify_all()

    def _on_call(self, frame, event, arg):
        return self._on_line if frame.f_code.co_filename.startswith(self.prefix) else None

    def _on_line(self, frame, event, arg):
        if event == "line":
            me = threading.get_ident()
            with self.cond:
                if self.turn == me and len(self.ring) > 1:
                    self.turn = self.ring[(self.ring.index(me) + 1) % len(self.ring)]
                    self.switches += 1
                    self.cond.notify_all()
                self.cond.wait_for(lambda: self.turn == me)
        return self._on_line


def rgb_array(image, color: str = "rgb") -> np.ndarray:
    """What the loader gives the preprocessing, as uint8 (H, W, 3) RGB."""
    return np.asarray(images.load_rgb(image, color))


TINY_CAPTIONS = [
    "a dog runs on the grass",
    "a cat sits on a red mat",
    "two dogs play in the snow",
    "a man rides a bike",
]


def tiny_export(
    encoder, out: Path, preprocessing=None, width: int = 64, name: str = "tiny-random", attention: bool = True
) -> Path:
    """A real export of a small, randomly initialised decoder (seed 0; ``width`` its hidden and
    feature sizes; ``attention=False``: the Show-and-Tell baseline) on ``encoder``, into ``out``
    (needs torch and onnx)."""
    import torch

    from edgecap.build.export import export_modules
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.preprocess import Preprocessing
    from edgecap.vocab import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    decoder = CaptionDecoder(
        DecoderConfig(
            vocab_size=len(vocab),
            hidden_dim=width,
            feature_dim=width,
            embed_dim=width // 2,
            attention_dim=width // 2,
            attention=attention,
        )
    )
    export_modules(encoder, decoder, vocab, preprocessing or Preprocessing(), out, {"name": name})
    return out


def contract_model_dir(directory: Path) -> Path:
    """A model directory that fulfils the contract (``edgecap.contract``) with a few nodes of
    random weights, built with onnx helpers only (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    C, F, A, H, E, V, K, NC, size = 8, 8, 6, 10, 6, 20, 5, 7, 16
    L = (size // 8) ** 2
    inits = []

    def w(name, *shape, scale=0.5):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def i64(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def linear(nodes, x, out, n_in, n_out, prefix):
        nodes.append(helper.make_node("MatMul", [x, w(prefix + ".w", n_in, n_out)], [prefix + ".mm"]))
        nodes.append(helper.make_node("Add", [prefix + ".mm", w(prefix + ".b", n_out)], [out]))

    n = helper.make_node
    enc = [
        n("Conv", ["image", w("conv.w", C, 3, 8, 8, scale=0.1)], ["conv"], strides=[8, 8]),
        n("Relu", ["conv"], ["relu"]),
        n("Reshape", ["relu", i64("shape_ncl", [0, C, -1])], ["ncl"]),
        n("Transpose", ["ncl"], ["fmap"], perm=[0, 2, 1]),
    ]
    linear(enc, "fmap", "fp", C, F, "feature_proj")
    enc += [
        n("Relu", ["fp"], ["fp_relu"]),
        n("LayerNormalization", ["fp_relu", w("ln.g", F), w("ln.b", F)], ["features"], axis=-1),
    ]
    linear(enc, "features", "att_proj", F, A, "att_feat")
    enc.append(n("ReduceMean", ["features", i64("ax_l", [1])], ["mean"], keepdims=0))
    enc.append(n("ReduceMean", ["fmap", "ax_l"], ["pooled"], keepdims=0))
    linear(enc, "pooled", "class_logits", C, NC, "classifier")
    enc.append(n("Softmax", ["class_logits"], ["class_probs"], axis=1))
    for s in ("h", "c"):
        linear(enc, "mean", f"{s}0_pre", F, H, f"init_{s}")
        enc.append(n("Tanh", [f"{s}0_pre"], [f"{s}0"]))
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    vi = helper.make_tensor_value_info
    encoder = helper.make_graph(
        enc,
        "encoder",
        [vi("image", f32, ["N", 3, size, size])],
        [
            vi("features", f32, ["N", L, F]),
            vi("att_proj", f32, ["N", L, A]),
            vi("h0", f32, ["N", H]),
            vi("c0", f32, ["N", H]),
            vi("class_probs", f32, ["N", NC]),
        ],
        list(inits),
    )

    inits.clear()
    st = [
        n("Gather", [w("embed", V, E), "tokens"], ["emb"]),
        n("Gather", ["h", "source_rows"], ["hp"]),
        n("Gather", ["c", "source_rows"], ["cp"]),
        n("Gather", ["features", "image_index"], ["f"]),
        n("Gather", ["att_proj", "image_index"], ["ap"]),
    ]
    linear(st, "hp", "ah", H, A, "att_hidden")
    st += [
        n("Unsqueeze", ["ah", i64("ax1", [1])], ["ah1"]),
        n("Add", ["ah1", "ap"], ["e"]),
        n("Tanh", ["e"], ["te"]),
    ]
    linear(st, "te", "score", A, 1, "att_score")
    st += [
        n("Squeeze", ["score", i64("ax2", [2])], ["scores"]),
        n("Softmax", ["scores"], ["alpha"], axis=1),
        n("Unsqueeze", ["alpha", "ax1"], ["alpha1"]),
        n("MatMul", ["alpha1", "f"], ["ctx1"]),
        n("Squeeze", ["ctx1", "ax1"], ["ctx"]),
        n("Concat", ["emb", "ctx", "hp"], ["x"], axis=1),
    ]
    linear(st, "x", "gates", E + F + H, 4 * H, "lstm")
    st += [n("Split", ["gates"], ["gi", "gf", "gg", "go"], axis=1, num_outputs=4)]
    st += [
        n("Sigmoid", ["gi"], ["si"]),
        n("Sigmoid", ["gf"], ["sf"]),
        n("Tanh", ["gg"], ["tg"]),
        n("Sigmoid", ["go"], ["so"]),
        n("Mul", ["sf", "cp"], ["fc"]),
        n("Mul", ["si", "tg"], ["ig"]),
        n("Add", ["fc", "ig"], ["c_out"]),
        n("Tanh", ["c_out"], ["tc"]),
        n("Mul", ["so", "tc"], ["h_out"]),
    ]
    linear(st, "h_out", "deep", H, E, "out_hidden")
    st.append(n("Tanh", ["deep"], ["tdeep"]))
    linear(st, "tdeep", "logits", E, V, "out_vocab")
    st += [
        n("LogSoftmax", ["logits"], ["logprobs"], axis=1),
        n("Add", ["logprobs", "word_bias"], ["biased"]),
        n("TopK", ["biased", i64("k", [K])], ["topk_biased", "ids64"], axis=1),
        n("GatherElements", ["logprobs", "ids64"], ["topk_logprobs"], axis=1),
        n("Cast", ["ids64"], ["topk_ids"], to=i32),
    ]
    step = helper.make_graph(
        st,
        "decoder_step",
        [
            vi("tokens", i32, ["R"]),
            vi("h", f32, ["S", H]),
            vi("c", f32, ["S", H]),
            vi("source_rows", i32, ["R"]),
            vi("features", f32, ["N", L, F]),
            vi("att_proj", f32, ["N", L, A]),
            vi("image_index", i32, ["R"]),
            vi("word_bias", f32, ["R", V]),
        ],
        [
            vi("topk_logprobs", f32, ["R", K]),
            vi("topk_ids", i32, ["R", K]),
            vi("h_out", f32, ["R", H]),
            vi("c_out", f32, ["R", H]),
            vi("alpha", f32, ["R", L]),
        ],
        list(inits),
    )

    directory.mkdir(parents=True, exist_ok=True)
    for graph, name in ((encoder, "encoder.onnx"), (step, "decoder_step.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        onnx.save(model, str(directory / name))
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    (directory / "vocab.json").write_text(json.dumps({"words": words}))  # Vocabulary's format
    classes = [{"name": f"class {i}", "words": [f"w{i}"]} for i in range(NC)]
    (directory / "classes.json").write_text(json.dumps({"classes": classes}))  # edgecap.objects
    files = {
        "encoder": "encoder.onnx",
        "decoder_step": "decoder_step.onnx",
        "vocab": "vocab.json",
        "classes": "classes.json",
    }
    manifest = {
        "format": FORMAT,
        "files": files,
        "dims": {
            "regions": L,
            "encoder_dim": C,
            "feature_dim": F,
            "attention_dim": A,
            "hidden_dim": H,
            "embed_dim": E,
            "vocab_size": V,
            "top_k": K,
            "n_classes": NC,
        },
        "tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3},
        "preprocessing": {"size": [size, size], "mean": [127.5] * 3, "std": [127.5] * 3},
        "precision": "fp32",
        "attention": True,
        "sha256": {role: file_sha256(directory / f) for role, f in files.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


# -- a folder of every kind of image file ----------------------------------------------------
def needs_onnxruntime_for_opset_18(model_dir: Path, what: str) -> None:
    """Skips the calling test where ``model_dir``'s encoder is opset 18 or newer (the stand-in of
    ``contract_model_dir``, used where torch is missing; edgecap's exports are opset 17) and
    onnxruntime is older than 1.17, naming ``what``: onnxruntime 1.16 (edgecap[cpu] allows it)
    runs an FP16 LayerNormalization through ONNX's opset-17 function body, whose ReduceMean has
    the axes attribute that opset 18 removed ("Unrecognized attribute: axes for operator
    ReduceMean"), and its symbolic shape inference, which int8 calibration runs first, gives an
    opset-18 ReduceMean no shape ("object of type 'NoneType' has no len()")."""
    import onnx
    import onnxruntime

    encoder = onnx.load(str(Path(model_dir) / "encoder.onnx"), load_external_data=False)
    opset = max(o.version for o in encoder.opset_import if o.domain in ("", "ai.onnx"))
    version = tuple(int(p) for p in re.findall(r"\d+", onnxruntime.__version__)[:2])
    if opset >= 18 and version < (1, 17):
        pytest.skip(
            f"{what} of an opset-{opset} model needs onnxruntime >= 1.17 "
            f"(here onnxruntime {onnxruntime.__version__})"
        )


def needs_pillow(version: str, what: str) -> None:
    """Skips the calling test where the installed Pillow is older than ``version``, naming
    ``what`` (a fixture that Pillow cannot make): edgecap itself asks for Pillow >= 9.1."""
    import PIL

    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text)[:2])

    if parts(PIL.__version__) < parts(version):
        pytest.skip(f"{what} needs Pillow >= {version} (here Pillow {PIL.__version__})")


def chelsea(size=(96, 64)) -> Image.Image:
    """The bundled cat photo (scikit-image, public domain), small."""
    with Image.open(EXAMPLES / "chelsea.png") as im:
        return im.convert("RGB").resize(size)


def with_lights(photo: np.ndarray, light: float, share: float) -> np.ndarray:
    """``photo`` at ``light`` of its levels, with a white rectangle (a lamp, a window) over
    ``share`` of the frame in its top left corner."""
    frame = np.round(photo * light).astype(np.uint8)
    h, w = frame.shape[:2]
    side = round(np.sqrt(share * h * w))
    frame[:side, :side] = 255
    return frame


def hazy_and_blank_frames() -> dict[str, np.ndarray]:
    """Frames for the blank check (edgecap.preprocess.recognisable): the cat photo in fog (its
    levels 80% and 85% of the way to a light grey, level 200: a standard deviation of 6.0 and
    4.5 levels at 224 px, under the 6.4 that flagged every frame before) and at a fifth of its
    light in the same fog (brightened 6.4x: a spread of 7.7), then frames with nothing in them:
    uniform, uniform with sensor noise (3 levels per channel; 12 levels of brightness: a spread
    of 2.2 whose detail is 3.4 times it, as noise has), a gradient (detail 0.2), and a lens cap
    (level 2, 1 level of noise) with hot pixels (0.1% at 255; brightened 8x: a spread of 6.0,
    its detail 1.7 times it, a scene's ratio). The first three hold a cat; the others nothing."""
    photo = np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB"), np.float64)
    rng = np.random.default_rng(5)
    h, w = 240, 320

    def frame(levels) -> np.ndarray:
        return np.clip(np.round(levels), 0, 255).astype(np.uint8)

    lens_cap = 2 + rng.normal(0, 1, (h, w, 3))
    lens_cap.reshape(-1, 3)[rng.choice(h * w, h * w // 1000, replace=False)] = 255
    return {
        "fog 80%": frame(photo * 0.2 + 200 * 0.8),
        "fog 85%": frame(photo * 0.15 + 200 * 0.85),
        "dim, fog 80%": frame((photo * 0.2 + 200 * 0.8) * 0.2),
        "uniform": np.full((h, w, 3), 200, np.uint8),
        "uniform, noise": frame(128 + rng.normal(0, 3, (h, w, 3))),
        "uniform, strong noise": frame(128 + rng.normal(0, 12, (h, w, 1))).repeat(3, 2),
        "gradient": frame(np.repeat(np.linspace(0, 255, w)[None, :, None], h, 0).repeat(3, 2)),
        "lens cap, hot pixels": frame(lens_cap),
    }


def _png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow cannot write itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    h, w, _ = rgb16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


GOOD = (
    "photo.png",
    "alpha.png",
    "gray.png",
    "gray_alpha.png",
    "palette.png",
    "palette_transparent.png",
    "cmyk.jpg",
    "gray16.png",
    "rgb48.png",
    "exif_rotated.jpg",
    "animated.gif",
    "photo.webp",
    "dot.png",
    "sliver.png",
    "photo.bmp",
    "photo.tif",
)


BAD = {
    "empty.jpg": "0 bytes",
    "truncated.jpg": "truncated",
    "notes.jpg": "not an image",
    "bomb.png": images.MAX_PIXELS_ENV,
}


def make_zoo(root: Path) -> Path:
    """One file of each kind of input in ``root``: GOOD ones are captioned, BAD ones refused
    with an error whose problem holds BAD's words."""
    photo = chelsea()
    photo.save(root / "photo.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(root / "alpha.png")
    photo.convert("L").save(root / "gray.png")
    photo.convert("LA").save(root / "gray_alpha.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette_transparent.png", transparency=0)
    photo.convert("CMYK").save(root / "cmyk.jpg")
    gray16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    (root / "rgb48.png").write_bytes(_png_16bit_rgb(np.asarray(photo, np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(root / "exif_rotated.jpg", exif=exif)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    photo.save(root / "photo.webp")
    Image.new("RGB", (1, 1), (120, 80, 40)).save(root / "dot.png")
    photo.resize((2000, 3)).save(root / "sliver.png")
    photo.save(root / "photo.bmp")
    photo.save(root / "photo.tif")
    (root / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("shopping list: eggs, milk\n")
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    assert sorted(p.name for p in root.iterdir()) == sorted([*GOOD, *BAD])
    return root


# -- editing a copy of a model directory -----------------------------------------------------
def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def without_optional_files(model: Path, *roles: str) -> Path:
    """``model`` as a model made without its optional files of ``roles`` (``fusion``,
    ``confidence``: ``edgecap.contract.OPTIONAL_FILES``) is: the files gone (the language models'
    with fusion.json) and its manifest naming none of them (one that names a file that is not
    there is refused: a partial copy)."""
    from edgecap.contract import FUSION, OPTIONAL_FILES
    from edgecap.decoding.fusion import remove_fusion

    for role in roles:
        if role == FUSION:
            remove_fusion(model)
        else:
            (model / OPTIONAL_FILES[role]).unlink(missing_ok=True)

    def drop(data):
        for role in roles:
            data["files"].pop(role, None)

    edit_manifest(model, drop)
    return model


def edit_manifest(model: Path, edit) -> None:
    """Apply ``edit(data)`` to the manifest.json of ``model``."""
    path = model / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def set_field(keys, value):
    """An ``edit_manifest`` edit that sets ``data[k0][k1]... = value``."""

    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def every_field(result) -> tuple:
    """What a ``Caption`` says, every field but the timings and arrays (its equality leaves out
    the objects, the confidence and ``recognisable``), its alternatives' too."""
    return (
        result.text,
        result.score,
        result.log_prob,
        result.objects,
        result.confidence,
        result.recognisable,
        [(a.text, a.score, a.objects, a.confidence) for a in result.alternatives],
    )


def has_repeated_ngram(words, n: int) -> bool:
    """Does the word sequence hold some n-gram twice?"""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def plain_search(backend, encoded, options, start_id, end_id, return_attention=False, tag_words=None):
    """The decoding layer's search over ``backend`` with the rules ``options`` asks for and,
    given per image, ``tag_words`` (the fakes have no image classes); vocabulary size from the
    backend (``vocab_size``) or its model."""
    from edgecap.decoding import search_with_tags

    vocab_size = vocab_size_of(backend) if tag_words else 0  # only tags need it
    return search_with_tags(
        backend, encoded, options, start_id, end_id, vocab_size, tag_words, return_attention=return_attention
    )


def captioner_search(captioner, encoded, options, backend=None, fusion=None):
    """The decoding layer's search as ``captioner`` runs it (its vocabulary, image classes and
    language models; ``fusion`` others), over its backend or ``backend``."""
    from edgecap.decoding import search

    return search(
        captioner.backend if backend is None else backend,
        encoded,
        options,
        captioner.vocab.start,
        captioner.vocab.end,
        len(captioner.vocab),
        captioner.classes,
        captioner.fusion if fusion is None else fusion,
    )


def vocab_size_of(backend) -> int:
    """A fake's vocabulary size (``vocab_size`` or its ``words``), or a real backend's model's."""
    if hasattr(backend, "vocab_size"):
        return backend.vocab_size
    if hasattr(backend, "words"):
        return len(backend.words)
    return backend.manifest.dims.vocab_size


TINY_DECODER = {"hidden_dim": 32, "feature_dim": 32, "embed_dim": 16, "attention_dim": 16}


def tiny_train_config(data: Path, out: Path, epochs: int, **given):
    """A ``TrainConfig`` of the tiny decoder (``TINY_DECODER``, with ``given["decoder"]`` merged
    in) on ``data``: batches of 6, every word kept, one thread, no progress bar, the features
    cached in ``out``'s parent folder unless ``given["cache_dir"]`` says where; ``given``: any
    other fields."""
    from edgecap.training.train import TrainConfig

    fields = {
        "batch_size": 6,
        "min_word_count": 1,
        "progress": False,
        "threads": 1,
        "cache_dir": Path(out).parent / "cache",
        **given,
    }
    fields["cache_dir"] = str(fields["cache_dir"])
    fields["decoder"] = {**TINY_DECODER, **given.get("decoder", {})}
    return TrainConfig(data=str(data), out=str(out), epochs=epochs, **fields)


# Python's default warning filters that hide a category (a fresh interpreter's ``-W`` defaults)
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def unwritable_output_cases(command: str) -> list[tuple[OSError, tuple[int, str]]]:
    """(the error every write to stdout raises, (exit code, stderr)) for ``edgecap COMMAND``
    whose output cannot be written (docs/cli.md): a full disk is exit 2 in one line, a reader
    gone away (| head) 141, quietly."""
    return [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            (2, f"edgecap {command}: error: cannot write the output (No space left on device)\n"),
        ),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), (141, "")),
    ]


class UnwritableStdout(io.TextIOBase):
    """A stdout whose every write fails with ``error`` (a full disk, a reader gone away), for a
    command run in this process (``edgecap.cli.main``)."""

    def __init__(self, error: OSError):
        self.error = error

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise self.error


def run_edgecap(capfd, *args) -> subprocess.CompletedProcess:
    """``python -m edgecap ARGS`` run in this process, for tests that are not about the process
    itself (signals, a closed stdout, what gets imported): ``edgecap.cli.main`` with its output
    read at the file descriptors (``capfd``: what C++ libraries and child processes write, too),
    a ``SystemExit`` taken as the exit status, and each warning it raised appended to its stderr
    as a fresh interpreter would print it (under Python's default filters), so that checks of
    what stderr holds see them. -> a CompletedProcess: returncode, stdout, stderr (text). Saves
    each run the interpreter's start-up and the imports (most of a second)."""
    import warnings

    from edgecap.cli import main

    argv = [str(a) for a in args]
    capfd.readouterr()  # what the test printed before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for category in _HIDDEN_WARNINGS:
            warnings.filterwarnings("ignore", category=category)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    out = capfd.readouterr()
    shown = "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught
    )
    return subprocess.CompletedProcess(["edgecap", *argv], code, out.out, out.err + shown)


def run_script(folder: Path, source: str) -> subprocess.CompletedProcess:
    """``source`` written to ``folder/script.py`` and run by this Python in a process of its own,
    from the checkout's root (the edgecap under test): its exit code, stdout and stderr (text).
    For what only a fresh interpreter shows: its exit, its threads' end."""
    script = folder / "script.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(edgecap.__file__).parents[1],
    )


def in_forked_child(work: Callable[[], str], alarm_s: int = 60) -> tuple[int, str]:
    """``work()`` run in a fork's child of this process: the child's exit code and the string
    ``work`` returned (or its exception's repr). The child leaves with ``os._exit`` (no pytest
    teardown); one still running after ``alarm_s`` (a hang: what these tests guard against) is
    ended by SIGALRM, so the test fails instead of waiting."""
    import signal

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            signal.alarm(alarm_s)
            try:
                said = work()
            except Exception as exc:  # noqa: BLE001 (said to the parent)
                said = repr(exc)
            os.write(write, said.encode())
            os._exit(0)
        finally:
            os._exit(2)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), said


def coco_json(path: Path, captions: dict[str, list[str]], ids: dict[str, int] | None = None) -> Path:
    """Write COCO caption JSON for {file_name: [captions]}; ids default to 10, 11, ..."""
    ids = ids or {name: 10 + i for i, name in enumerate(captions)}
    images = [{"id": ids[name], "file_name": name} for name in captions]
    annotations = [
        {"id": 100 + k, "image_id": ids[name], "caption": c}
        for k, (name, c) in enumerate((n, c) for n, cs in captions.items() for c in cs)
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
