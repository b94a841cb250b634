"""The public API on a real (tiny, randomly initialised) exported model.

Needs the ``tiny_model_dir`` fixture (tests/conftest.py): a model directory from
``edgecap.build.export.export_model``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import BackendError, Caption, Captioner, InputError
from edgecap.backends import load_backend
from edgecap.contract import Limits
from edgecap.manifest import load_manifest

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=8)


def test_import_surface():
    """The version is written twice, in pyproject.toml (the wheel's and pip's) and in edgecap
    (``edgecap --version``, ``edgecap.__version__``): the two must agree."""
    try:
        import tomllib  # Python 3.11 and newer
    except ImportError:
        tomllib = None
    pyproject = Path(edgecap.__file__).parents[1] / "pyproject.toml"
    if tomllib is not None and pyproject.exists():  # a checkout (a wheel's install has none)
        assert tomllib.loads(pyproject.read_text())["project"]["version"] == edgecap.__version__
    assert edgecap.__version__ == "0.1.0"
    public = {"Captioner", "Caption", "InputError", "ModelError", "EdgecapError"}
    assert public <= set(edgecap.__all__)


def test_caption_fields(captioner):
    cap = captioner.caption(str(EXAMPLES / "chelsea.png"))
    assert isinstance(cap, Caption)
    assert cap.text == " ".join(cap.tokens)
    assert all(isinstance(w, str) and w not in ("<start>", "<end>", "<pad>") for w in cap.tokens)
    assert 1 <= len(cap.tokens) <= 8
    assert np.isfinite(cap.score) and cap.log_prob <= 0
    assert set(cap.timings) == {"preprocess_ms", "encode_ms", "decode_ms"}
    assert cap.attention is None and cap.alternatives == ()


def test_timings_are_each_photos_preparation_and_its_share_of_its_batchs_runs(
    default_model_dir, example_images
):
    """``Caption.timings`` (ms; the Caption docstring, docs/python-api.md): ``preprocess_ms`` the
    photo's own preparation, ``encode_ms`` and ``decode_ms`` its share of its batch's encoder run
    and search. The captions of one batch have the same shares; every timing is at least 0; and
    together they are at most the call's own wall time and at least a quarter of it (measured:
    99.6%, the rest building the captions; a quarter leaves room for a busy machine). A
    12-megapixel frame's preparation (its resize) is much of its call (measured: about 70%)."""
    captioner = Captioner(default_model_dir, backend="onnxruntime", threads=1)
    photos = [np.asarray(Image.open(path).convert("RGB")) for path in example_images]
    captioner.caption_batch(photos)  # warm
    start = time.perf_counter()
    captions = captioner.caption_batch(photos)
    wall_ms = (time.perf_counter() - start) * 1e3
    assert all(min(c.timings.values()) >= 0 for c in captions), [c.timings for c in captions]
    assert len({(c.timings["encode_ms"], c.timings["decode_ms"]) for c in captions}) == 1
    assert 0.25 * wall_ms <= sum(sum(c.timings.values()) for c in captions) <= wall_ms
    big = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    start = time.perf_counter()
    caption = captioner.caption(big)
    wall_ms = (time.perf_counter() - start) * 1e3
    assert 0.1 * wall_ms <= caption.timings["preprocess_ms"] <= sum(caption.timings.values()) <= wall_ms


def test_a_blank_frame_is_nothing_recognisable_unless_the_blank_check_is_off(tiny_model_dir):
    """docs/python-api.md: a frame with nothing in it is ``recognisable`` False, its text
    ``nothing recognisable`` and its tokens empty; ``blank_check=False`` captions it anyway. Here
    with a model that has no confidence model (so no blur measure either): the blank check is
    the only measure of the frame made."""
    black = np.zeros((64, 64, 3), np.uint8)
    checked = Captioner(tiny_model_dir, backend="onnxruntime", max_length=8)
    assert checked.confidence_model is None
    nothing = checked.caption(black)
    assert (nothing.recognisable, nothing.text, nothing.tokens) == (False, "nothing recognisable", [])
    shown = Captioner(tiny_model_dir, backend="onnxruntime", max_length=8, blank_check=False).caption(black)
    assert shown.recognisable and shown.tokens and shown.text == " ".join(shown.tokens)


def test_a_frame_in_good_light_is_not_judged_as_a_brightened_one(default_model_dir):
    """edgecap.preprocess's rule (docs/cameras.md, the blank check): a frame in good light with a
    spread of LOW_PIXEL_STD or more is not judged by the detail-to-spread ratio (close-ups of
    text and fine tiles reach the ratio of noise), while a brightened frame is, whatever its
    spread. Fine grey texture at levels 120-255 (spread about 9.7, ratio about 3.5, gain 1) is
    captioned; judged as brightened it would be noise, nothing recognisable."""
    from edgecap.preprocess import LOW_PIXEL_STD, MAX_DETAIL_RATIO, frame_grey, grey_statistics, model_input

    captioner = Captioner(default_model_dir, backend="onnxruntime")
    rng = np.random.default_rng(0)
    texture = np.repeat(rng.integers(120, 256, (224, 224, 1), dtype=np.uint8), 3, axis=2)
    x, gain = model_input(Image.fromarray(texture), captioner.manifest.preprocessing, True)
    spread, detail = grey_statistics(frame_grey(x, captioner.manifest.preprocessing))
    assert gain == 1 and spread >= LOW_PIXEL_STD and detail > MAX_DETAIL_RATIO * spread  # the case
    assert captioner.caption(texture).recognisable


def test_attention_maps(captioner):
    cap = captioner.caption(str(EXAMPLES / "chelsea.png"), return_attention=True)
    assert cap.attention.shape == (len(cap.tokens), 7, 7)
    assert cap.attention.dtype == np.float32
    assert np.allclose(cap.attention.sum((1, 2)), 1.0, atol=1e-4)


def test_bgr_frames(captioner):
    rgb = np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))
    assert captioner.caption(rgb[:, :, ::-1].copy(), color="bgr") == captioner.caption(rgb)


def test_batch_matches_single(captioner, photos):
    batch = captioner.caption_batch(photos)
    for image, cap in zip(photos, batch):
        alone = captioner.caption(image)
        assert cap.text == alone.text
        assert cap.score == pytest.approx(alone.score, abs=1e-4)


def test_batch_size_does_not_change_results(tiny_model_dir, captioner, photos):
    small = Captioner(tiny_model_dir, backend="onnxruntime", max_length=8, batch_size=3)
    for a, b in zip(small.caption_batch(photos + photos), captioner.caption_batch(photos + photos)):
        assert a.text == b.text and a.score == pytest.approx(b.score, abs=1e-4)


def test_on_error_return_keeps_slots(captioner, photos, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bad = [str(empty), np.zeros((4, 4, 2), np.uint8), str(tmp_path / "missing.png")]
    mixed = [bad[0], photos[0], bad[1], photos[1], photos[2], bad[2]]
    results = captioner.caption_batch(mixed, on_error="return")
    assert [type(r) for r in results] == [InputError, Caption, InputError, Caption, Caption, InputError]
    assert results[0].source == str(empty) and "0 bytes" in results[0].problem
    assert results[2].source == "<array (4, 4, 2) uint8>"
    assert results[5].source == str(tmp_path / "missing.png")
    # The good ones are exactly what they are without the bad ones around.
    assert [results[1], results[3], results[4]] == captioner.caption_batch(photos[:3])


def test_on_error_raise_names_input(captioner, photos, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a photo")
    with pytest.raises(InputError, match="notes.jpg"):
        captioner.caption_batch([photos[0], str(path)])
    with pytest.raises(InputError, match="notes.jpg"):
        captioner.caption(str(path))


def test_bad_call_arguments(captioner, photos):
    with pytest.raises(ValueError, match="on_error"):
        captioner.caption_batch(photos, on_error="skip")
    with pytest.raises(ValueError, match="color"):
        captioner.caption(photos[2], color="hsv")
    with pytest.raises(TypeError, match="caption\\(\\)"):
        captioner.caption_batch(photos[0])
    assert captioner.caption_batch([]) == []
    with pytest.raises(ValueError, match="color must be one of"):  # when called, not when iterated
        captioner.iter_captions(photos, color="BGR")
    with pytest.raises(ValueError, match="color must be one of"):
        captioner.caption_batch([], color="BGR")
    with pytest.raises(TypeError, match="model must be a model folder's path or None, got int"):
        Captioner(model=5)


def test_n_best_alternatives(tiny_model_dir, photos):
    # without object guidance (with it they are ordered by the steered score) and without the
    # consensus choice (with it, by agreement: test_consensus)
    captioner = Captioner(
        tiny_model_dir, beam_size=4, n_best=3, max_length=6, guidance_bonus=0.0, consensus=False
    )
    cap = captioner.caption(photos[0])
    assert len(cap.alternatives) == 2
    # ranked as the search ranks them: captions that ended first, each group by score
    from edgecap.images import load_rgb, preprocess

    encoded = captioner.backend.encode(preprocess([load_rgb(photos[0])], captioner.manifest.preprocessing))
    from edgecap.decoding import search

    hyps = search(
        captioner.backend,
        encoded,
        captioner.options,
        captioner.vocab.start,
        captioner.vocab.end,
        len(captioner.vocab),
    )[0]
    assert [h.score for h in hyps] == pytest.approx([cap.score] + [a.score for a in cap.alternatives])
    ended = [h.score for h in hyps if h.finished]
    cut = [h.score for h in hyps if not h.finished]
    assert [h.finished for h in hyps] == sorted((h.finished for h in hyps), reverse=True)
    assert ended == sorted(ended, reverse=True) and cut == sorted(cut, reverse=True)
    assert len({tuple(a.tokens) for a in (cap, *cap.alternatives)}) == 3


@pytest.mark.parametrize(
    "options, word",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 11}, "top_k"),
        ({"beam_size": 2.5}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_best": 4}, "n_best"),
        ({"length_penalty": -1.0}, "length_penalty"),
    ],
)
def test_option_validation(tiny_model_dir, options, word):
    with pytest.raises(ValueError, match=word):
        Captioner(tiny_model_dir, **options)


# -- backends ----------------------------------------------------------------------------------


def test_a_backend_that_is_not_thread_safe_is_serialised(tiny_model_dir, monkeypatch):
    """Threads sharing a Captioner over a backend with shared buffers never interleave batches."""
    import threading
    import time as _time

    from edgecap.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "thread_safe", False)  # as TensorRT's
    captioner = Captioner(tiny_model_dir, backend="onnxruntime", beam_size=2, max_length=4)
    inside, overlaps = [0], []
    real_encode = captioner.backend.encode

    def encode(batch):
        inside[0] += 1
        overlaps.append(inside[0])
        _time.sleep(0.01)  # widen the window an unserialised second thread would hit
        out = real_encode(batch)
        inside[0] -= 1
        return out

    captioner.backend.encode = encode
    photo = str(EXAMPLES / "coffee.png")
    threads = [threading.Thread(target=captioner.caption, args=(photo,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]


def test_default_model(default_model_dir):
    cap = Captioner().caption(str(EXAMPLES / "chelsea.png"))
    assert Captioner(default_model_dir).caption(str(EXAMPLES / "chelsea.png")) == cap
    assert cap.text


def test_cuda_request_without_gpu_runtime_fails_or_falls_back_with_a_warning(tiny_model_dir):
    """device="cuda" is a requirement (issue 16: a BackendError, as on torch); a providers=
    list is a preference, with the CPU as the warned fallback."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="device='cuda' but this onnxruntime has no CUDA"):
        load_backend("onnxruntime", load_manifest(tiny_model_dir), device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        backend = load_backend("onnxruntime", load_manifest(tiny_model_dir), providers=["cuda", "cpu"])
    assert backend.providers == ["CPUExecutionProvider"]


def test_backend_limits_device_and_missing_tensorrt(monkeypatch, tiny_model_dir):
    import edgecap.api

    asked = {}

    def fake_load_backend(name, manifest, *, device=None, limits=None, **options):
        asked.update(name=name, device=device, limits=limits, options=options)
        raise BackendError("stop here")

    monkeypatch.setattr(edgecap.api, "load_backend", fake_load_backend)
    with pytest.raises(BackendError, match="stop here"):
        Captioner(tiny_model_dir, backend="torch", device="cuda", beam_size=3, batch_size=16, fp16=True)
    assert asked == {
        "name": "torch",
        "device": "cuda",
        "limits": Limits(16, 3),
        "options": {"threads": 1, "fp16": True},
    }  # torch: 1 thread by default
    monkeypatch.undo()
    # what a backend builds for: at least the default engine's limits, so `edgecap build`'s
    # engines serve smaller requests
    assert Limits(16, 3).covering_default() == Limits(16, 5)
    assert Limits(2, 7).covering_default() == Limits(8, 7)
    from edgecap.backends.tensorrt import TensorRTBackend

    with pytest.raises(ValueError, match="GPU only"):
        TensorRTBackend(load_manifest(tiny_model_dir), device="cpu")
    from edgecap.trt import tensorrt_importable

    if not tensorrt_importable():  # not installed, or only its type stubs (tensorrt-stubs)
        with pytest.raises(BackendError, match=r"'\.\[tensorrt\]'"):
            Captioner(tiny_model_dir, backend="tensorrt")


def test_a_mistyped_keyword_names_itself_and_the_nearest_option():
    """Not the backend class's own TypeError about its __init__."""
    with pytest.raises(TypeError, match="unknown option 'beamsize'.*did you mean 'beam_size'"):
        Captioner(beamsize=5)
    with pytest.raises(TypeError, match="unknown option 'fp16x'.*onnxruntime backend.*did you mean 'fp16'"):
        Captioner(fp16x=True)
    with pytest.raises(TypeError, match="did you mean 'decode_workers'"):  # the Captioner's own
        Captioner(decode_worker=2)


def test_a_deep_copy_is_a_captioner_of_its_own(default_model_dir):
    """``copy.deepcopy`` went through ``__reduce__`` to the Captioner that unpickling shares in
    a process: two deep copies were one object, and closing one closed the other. Each is made
    again now, with the same options and settings."""
    import copy

    captioner = Captioner(default_model_dir, beam_size=2, decode_workers=1)
    first, second = copy.deepcopy(captioner), copy.deepcopy(captioner)
    assert first is not second and captioner not in (first, second)
    assert (first.options, first.decode_workers) == (captioner.options, 1)
    first.close()
    photo = EXAMPLES / "chelsea.png"
    assert second.caption(photo).text == captioner.caption(photo).text
    second.close()
    captioner.close()
