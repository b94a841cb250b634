"""The preprocessing on the torch backend's device (``TorchBackend(preprocess="device")``, run
here on CPU tensors): Pillow's resized pixels and the host's encoder input bit for bit, the host's
blank-frame check, and a Captioner whose captions, errors and blank frames are the host path's."""

from __future__ import annotations

import dataclasses

import io
import weakref

import numpy as np
import pytest
from PIL import Image, ImageFilter

torch = pytest.importorskip("torch")

from edgecap import Captioner, CaptionOptions  # noqa: E402
from edgecap.api import NOTHING_RECOGNISABLE  # noqa: E402
from edgecap.backends.base import Backend  # noqa: E402
from edgecap.backends.torch import TorchBackend  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from edgecap.backends.torch_preprocess import PILLOW, FramePreprocess, vertical_first  # noqa: E402
from edgecap.errors import InputError  # noqa: E402
from edgecap.images import load_rgb, load_rgb_array, preprocess  # noqa: E402
from edgecap.manifest import load_manifest  # noqa: E402
from edgecap.preprocess import Preprocessing, frame_blurriness, recognisable  # noqa: E402
from helpers import EXAMPLES, every_field, hazy_and_blank_frames, with_lights  # noqa: E402

PRE = Preprocessing()
CPU = torch.device("cpu")


def _frame(rng, height: int, width: int, smooth: bool) -> np.ndarray:
    """Noise, or noise blown up from a few pixels (gradients, as in photos)."""
    if not smooth:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


# (height, width): shrinking, enlarging, one axis kept, both pass orders of Pillow 13 (the height
# shrinking by more than twice as many pixels as the width: vertical first), 100x taller than
# wide (Pillow 12.2-12.3's vertical-first case), single rows and columns, the model's own size
SHAPES = [
    (375, 500),
    (500, 375),
    (460, 243),
    (277, 37),
    (224, 224),
    (224, 700),
    (700, 224),
    (1, 1),
    (1, 900),
    (900, 1),
    (2500, 20),
    (223, 225),
    (100, 60),
    (1080, 1920),
    (2448, 3264),
]


@pytest.mark.parametrize("height, width", SHAPES)
def test_the_resize_is_pillows_pixel_for_pixel(height, width):
    rng = np.random.default_rng(height * 7919 + width)
    frames = np.stack([_frame(rng, height, width, smooth) for smooth in (False, True)])
    got = FramePreprocess(PRE, CPU).resized(torch.from_numpy(frames)).numpy()
    for frame, pixels in zip(frames, got):
        want = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(pixels, want)


@pytest.mark.parametrize("height, width", [(1, 37), (29, 1), (1, 1)])
def test_a_frame_one_pixel_high_or_wide_is_resized_as_pillow_resizes_it(height, width):
    """A frame of one row or column (a line-scan camera's, a raw image cut short) is resized as
    Pillow resizes it; a size of 0 pixels has no resampling (ValueError naming the sizes)."""
    from edgecap.backends.torch_preprocess import bilinear_taps

    frame = np.random.default_rng(height * 100 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    got = FramePreprocess(PRE, CPU).resized(torch.from_numpy(frame[None]))[0].numpy()
    want = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, want)
    for sizes in ((0, 224), (224, 0)):
        with pytest.raises(ValueError, match=f"sizes must be at least 1, got {sizes[0]} -> {sizes[1]}"):
            bilinear_taps(*sizes)
    # to one pixel: the taps' fixed-point sum (the docstring's formula) is Pillow's pixel
    line = np.random.default_rng(5).integers(0, 256, 5).astype(np.uint8)
    index, weight = bilinear_taps(5, 1)
    # kept for the next frame of that size: read-only, so that no caller changes them
    assert not index.flags.writeable and not weight.flags.writeable
    ours = (int((line[index[0]].astype(np.int64) * weight[0]).sum()) + 2**21) >> 22
    assert ours == np.asarray(Image.fromarray(line[None]).resize((1, 1), Image.Resampling.BILINEAR))[0, 0]


def test_both_pass_orders_are_met_under_this_pillow():
    """The shapes above hold a vertical-first case and a horizontal-first one for the Pillow
    installed (else the order would go untested; before 12.2 Pillow has one order). Checked
    also under Pillow 12.3.0 and 12.1.1 (scratch installs)."""
    orders = {vertical_first(shape, (224, 224)) for shape in SHAPES if shape[0] != 224 and shape[1] != 224}
    assert orders == ({True, False} if PILLOW >= (12, 2) else {False}), PILLOW


def test_the_pass_order_follows_pillows_version():
    """From Pillow's sources: 13.0 runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width (Resample.c); 12.2 and 12.3 when the image is over
    100 times taller than wide and its height shrinks (Image.resize); 12.1 never."""
    out = (224, 224)
    assert vertical_first((460, 243), out, (13, 0)) and not vertical_first((500, 375), out, (13, 0))
    assert not vertical_first((460, 243), out, (12, 3)) and vertical_first((23000, 200), out, (12, 2))
    assert not vertical_first((23000, 200), out, (12, 1)) and not vertical_first((2500, 20), out, (11, 3))
    assert not vertical_first((200, 1), out, (12, 3))  # taller than 100x, but the height grows


def test_device_frames_are_the_host_encoder_input_and_blank_check(example_images):
    """Frames of four sizes (the example photos, CC0), a uniform one and a blurred one: the
    encoder inputs equal ``edgecap.images.preprocess``'s exactly, in the input order, and the
    blank-frame check agrees with ``edgecap.preprocess.recognisable``."""
    frames = [np.asarray(load_rgb(str(p))) for p in example_images]
    frames.append(np.full((480, 640, 3), 90, np.uint8))
    frames.append(np.asarray(Image.fromarray(frames[0]).filter(ImageFilter.GaussianBlur(60))))
    frames.append(np.ascontiguousarray(frames[1][::-1]))  # a second frame of one size: one batch
    x, visible = FramePreprocess(PRE, CPU)(frames)
    want = preprocess([Image.fromarray(f) for f in frames], PRE)
    np.testing.assert_array_equal(x.numpy(), want)
    assert visible.tolist() == [recognisable(w, PRE) for w in want]
    assert visible.tolist() == [True] * 4 + [False, False, True]


def test_device_frames_are_brightened_as_the_host_brightens_them(example_images):
    """Dark frames (the example photos at a tenth to a half of their light, of two sizes in one
    call) brightened on the device are the host's brightened encoder inputs bit for bit, and so
    is the blank check; a frame that is not dark is as without brightening."""
    photos = [np.asarray(load_rgb(str(p))) for p in example_images[:2]]
    frames = [np.minimum(np.round(f * k), 255).astype(np.uint8) for f in photos for k in (0.1, 0.3, 0.5)]
    frames += photos
    x, visible = FramePreprocess(PRE, CPU)(frames, brighten=True)
    want = preprocess([Image.fromarray(f) for f in frames], PRE, brighten=True)
    np.testing.assert_array_equal(x.numpy(), want)
    assert visible.tolist() == [recognisable(w, PRE) for w in want] == [True] * 8
    np.testing.assert_array_equal(want[-2:], preprocess([Image.fromarray(f) for f in photos], PRE))
    assert not np.array_equal(want[0], preprocess([Image.fromarray(frames[0])], PRE)[0])


def test_the_device_blank_check_captions_hazy_photos_and_flags_blank_frames():
    """The blank check on the device judges low-contrast frames as the host does: the cat
    photo in fog (80% and 85% of the way to a light grey; also at a fifth of the light,
    brightened) is recognisable; uniform frames, with sensor noise, a gradient and a brightened
    lens cap with hot pixels are not (tests/helpers.py, ``hazy_and_blank_frames``)."""
    from edgecap.preprocess import model_input

    frames = list(hazy_and_blank_frames().values())
    x, visible = FramePreprocess(PRE, CPU)(frames, brighten=True)
    host = [model_input(Image.fromarray(f), PRE, brighten=True) for f in frames]
    np.testing.assert_array_equal(x.numpy(), np.stack([h for h, _ in host]))
    assert visible.tolist() == [recognisable(h, PRE, bool(g > 1)) for h, g in host]
    assert visible.tolist() == [True] * 3 + [False] * 5


def test_the_device_gain_is_the_documented_rule_at_its_boundaries():
    """Hand-computed gains on the device (docs/cameras.md: the 99th percentile of each pixel's
    largest channel at 224x224, below level 128 multiplied to 255, at most 8x; lights at twice
    the level of the brightest 5% let clip): of 50,176 pixels, 502 at 101 (over 1%) make a
    frame of 51 meter at 101 (255 / 101), 502 at 102 are lights (5x), as are 2,508 at 255
    (5%, 5x); 2,509 make it bright (1x); a night frame of 20 with 12,544 at 255 (25%) is
    metered on its brightest 25% (8x), with 12,545 is bright (1x); a frame at 127 gets 255 / 127,
    at 128 none, a black one the 8x cap."""

    def frame(level: int, bright: int = 0, at: int = 255) -> np.ndarray:
        pixels = np.full((224 * 224, 3), level, np.uint8)
        pixels[:bright] = at
        return pixels.reshape(224, 224, 3)

    frames = [frame(51, 502, 101), frame(51, 502, 102), frame(51, 2508), frame(51, 2509)]
    frames += [frame(20, 12544), frame(20, 12545)]
    frames += [frame(127), frame(128), frame(0)]
    gains = FramePreprocess(PRE, CPU).exposure_gains(torch.from_numpy(np.stack(frames)))
    assert gains.dtype == torch.float32
    quotient = [float(np.float32(255) / np.float32(d)) for d in (101, 127)]
    assert gains.tolist() == [quotient[0], 5.0, 5.0, 1.0, 8.0, 1.0, quotient[1], 1.0, 8.0]


def test_a_dark_scene_with_lights_in_view_is_brightened_on_the_device_as_on_the_host():
    """The cat photo at a tenth of its light with a white patch over 2% of the frame (a lamp):
    brightened 8x on the device, as on the host, the same encoder input bit for bit; over 6% of
    the frame too (lights over 5-25% of a night scene); over 30%, and the photo as taken, not
    brightened."""
    from edgecap.preprocess import model_input

    photo = np.asarray(load_rgb(str(EXAMPLES / "chelsea.png"), "rgb"))
    frames = [with_lights(photo, 0.1, share) for share in (0.02, 0.06, 0.3)] + [photo]
    x, gains = FramePreprocess(PRE, CPU).normalised(torch.from_numpy(np.stack(frames)), brighten=True)
    host = [model_input(Image.fromarray(f), PRE, brighten=True) for f in frames]
    assert gains.tolist() == [float(g) for _, g in host] == [8.0, 8.0, 1.0, 1.0]
    np.testing.assert_array_equal(x.numpy(), np.stack([got for got, _ in host]))


def test_the_noise_rule_judges_brightened_frames_only_on_the_device_as_on_the_host():
    """A lens cap's sensor noise (level 2, 8 levels of standard deviation, 320x240) is
    brightened 8x and then told apart as noise (its detail over 2.5 times its spread): not
    recognisable. A bright checkerboard of 4 px squares (ratio 8, as close-ups of tiles or text
    reach) is not brightened and not judged by the ratio: recognisable. The device path gives
    the host's verdicts (``model_input``'s gain, ``recognisable(..., brightened)``)."""
    from edgecap.preprocess import model_input

    rng = np.random.default_rng(3)
    lens_cap = np.clip(2 + rng.normal(0, 8, (240, 320, 1)), 0, 255).round().astype(np.uint8).repeat(3, 2)
    checker = (100 + 80 * (np.add.outer(np.arange(224) // 4, np.arange(224) // 4) % 2)).astype(np.uint8)
    frames = [lens_cap, np.repeat(checker[:, :, None], 3, axis=2)]
    x, visible = FramePreprocess(PRE, CPU)(frames, brighten=True)
    host = [model_input(Image.fromarray(f), PRE, brighten=True) for f in frames]
    np.testing.assert_array_equal(x.numpy(), np.stack([h for h, _ in host]))
    assert [float(g) for _, g in host] == [8.0, 1.0]
    assert visible.tolist() == [recognisable(h, PRE, bool(g > 1)) for h, g in host] == [False, True]


def test_each_frames_gain_reaches_the_noise_rule_on_every_device_path():
    """The gain the noise rule needs comes along whichever way a frame was preprocessed: a
    camera's batch of one size (a 224x224 lens cap, level 2 with 8 levels of standard deviation,
    brightened 8x, beside a bright 4 px checkerboard, not brightened), the same pair on a device
    with room for one frame at a time (one by one), and a 480x640 lens cap (16 levels) it has no
    room for at all (the host's). Each lens cap is noise, the checkerboard a scene; judged
    without its gain each lens cap would be taken for a scene."""
    rng = np.random.default_rng(3)

    def lens_cap(h, w, sigma):
        return np.clip(2 + rng.normal(0, sigma, (h, w, 1)), 0, 255).round().astype(np.uint8).repeat(3, 2)

    checker = (100 + 80 * (np.add.outer(np.arange(224) // 4, np.arange(224) // 4) % 2)).astype(np.uint8)
    pair = [lens_cap(224, 224, 8), np.repeat(checker[:, :, None], 3, axis=2)]
    _, visible = FramePreprocess(PRE, CPU)(pair, brighten=True)
    assert visible.tolist() == [False, True]
    frames = [*pair, lens_cap(480, 640, 16)]
    prep = SmallDevice(224 * 224)
    x, visible = prep(frames, brighten=True)
    assert sorted(prep.uploads) == sorted([(2, 224, 224), (1, 224, 224), (1, 224, 224), (1, 480, 640)])
    assert visible.tolist() == [False, True, False]
    assert [recognisable(v, PRE) for v in x.numpy()] == [True, True, True]  # without the gain


def test_the_taps_kept_on_the_device_are_bounded_and_remade_when_dropped():
    """A service meets photos of ever new sizes: the resize's taps kept on the device (a few KB
    to 0.1 MB each) are the ``TAPS_KEPT`` most recently used, not one set per size ever seen; a
    size whose taps were dropped is resized as Pillow does when it comes back."""
    from edgecap.backends.torch_preprocess import TAPS_KEPT

    prep = FramePreprocess(PRE, CPU)
    rng = np.random.default_rng(5)
    first = torch.from_numpy(rng.integers(0, 256, (1, 300, 301, 3), dtype=np.uint8))
    want = np.asarray(Image.fromarray(first[0].numpy()).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(prep.resized(first).numpy()[0], want)
    for height in range(2, 2 + TAPS_KEPT + 10):  # one new height each
        prep.resized(torch.zeros((1, height, 224, 3), dtype=torch.uint8))
    assert len(prep._taps) == TAPS_KEPT
    assert (300, 224) not in prep._taps
    np.testing.assert_array_equal(prep.resized(first).numpy()[0], want)


def test_a_frame_that_is_not_rgb_uint8_is_refused_by_position():
    with pytest.raises(ValueError, match="frame 1: RGB uint8"):
        FramePreprocess(PRE, CPU)([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])


def test_only_the_bilinear_resize_is_done_on_the_device():
    with pytest.raises(ValueError, match="'bicubic'.*preprocess='host'"):
        FramePreprocess(Preprocessing(resample="bicubic"), CPU)


@pytest.fixture(scope="module")
def captioners(default_model_dir):
    options = CaptionOptions(batch_size=4)
    host = Captioner(default_model_dir, backend="torch", device="cpu", options=options)
    device = Captioner(default_model_dir, backend="torch", device="cpu", options=options, preprocess="device")
    return host, device


def test_the_captioner_with_device_preprocessing_captions_as_the_host(captioners, example_images):
    """A batch with a bad input and a blank frame (``on_error="return"``): the photos get the
    host path's captions, the bad input its InputError in its slot, the blank frame "nothing
    recognisable"; with the blank check off that frame is captioned like any other."""
    host, device = captioners
    assert device.backend.prepares_frames and "preprocessing on the device" in device.backend.describe()
    blank = np.full((300, 400, 3), 200, np.uint8)
    bad = np.zeros((5, 5, 2), np.uint8)
    photos = [str(p) for p in example_images]
    inputs = [photos[0], bad, blank, *photos[1:]]
    got = device.caption_batch(inputs, on_error="return")
    want = host.caption_batch(inputs, on_error="return")
    assert isinstance(got[1], InputError) and "channels in the last axis, got 2" in str(got[1])
    assert str(got[1]) == str(want[1])
    assert [c.text for i, c in enumerate(got) if i != 1] == [c.text for i, c in enumerate(want) if i != 1]
    assert got[2].text == NOTHING_RECOGNISABLE and not got[2].recognisable
    assert [c.score for i, c in enumerate(got) if i not in (1, 2)] == pytest.approx(
        [c.score for i, c in enumerate(want) if i not in (1, 2)], abs=1e-5
    )
    device.options = CaptionOptions(batch_size=4, blank_check=False)
    try:
        unchecked = device.caption(blank)
    finally:
        device.options = CaptionOptions(batch_size=4)
    assert unchecked.recognisable and unchecked.text != NOTHING_RECOGNISABLE


def test_the_blur_penalty_reads_the_blurriness_measured_on_the_device(
    default_model_dir, example_images, tmp_path
):
    """A confidence model with a blur penalty every frame is under (below 10, weight 1): the
    captions' confidence with device preprocessing is the host path's (the frames' blurriness
    measured there), and lower than without the penalty."""
    import shutil

    from edgecap.confidence import ConfidenceModel, write

    shipped = ConfidenceModel.load(default_model_dir)
    confidences = {}
    for name, blur in (("with", (10.0, 1.0)), ("without", None)):
        model = tmp_path / name
        shutil.copytree(default_model_dir, model)
        write(model, dataclasses.replace(shipped, blur=blur))
        for where in ("host", "device"):
            captioner = Captioner(model, backend="torch", device="cpu", preprocess=where)
            confidences[name, where] = [
                c.confidence for c in captioner.caption_batch([str(p) for p in example_images])
            ]
    assert confidences["with", "device"] == pytest.approx(confidences["with", "host"], abs=2e-4)
    assert confidences["without", "device"] == pytest.approx(confidences["without", "host"], abs=2e-4)
    assert all(a < b for a, b in zip(confidences["with", "device"], confidences["without", "device"]))


def test_bgr_frames_are_flipped_before_the_device(captioners, example_images):
    host, device = captioners
    rgb = np.asarray(load_rgb(str(example_images[1])))
    assert device.caption(np.ascontiguousarray(rgb[:, :, ::-1]), color="bgr").text == host.caption(rgb).text


def test_a_frame_is_copied_from_the_callers_buffer():
    """A camera loop refills its buffer: the frame handed to the device is the caller's pixels
    at the time of the call, in memory of its own."""
    buffer = np.zeros((6, 8, 3), np.uint8)
    frame = load_rgb_array(buffer)
    assert not np.shares_memory(frame, buffer)
    buffer[:] = 7
    assert frame.max() == 0
    np.testing.assert_array_equal(load_rgb_array(buffer[:, :, ::-1], color="bgr"), buffer)
    with pytest.raises(InputError, match="array is empty"):
        load_rgb_array(np.zeros((0, 4, 3), np.uint8))


def test_graphs_take_the_frames_preprocessed_on_the_device(default_model_dir, example_images):
    """With graphs (the CPU stand-in ``EagerGraph``), the encoder graph's input is filled from
    the device tensor: its outputs are the host path's."""
    manifest = load_manifest(default_model_dir)
    backend = TorchBackend(manifest, device="cpu", graph_factory=EagerGraph, preprocess="device")
    frames = [np.asarray(load_rgb(str(p))) for p in example_images]
    encoded, visible, blurry = backend.encode_frames(frames)
    inputs = preprocess([Image.fromarray(f) for f in frames], manifest.preprocessing)
    want = backend.encode(inputs)
    for name, tensor in want.tensors.items():
        torch.testing.assert_close(encoded.tensors[name], tensor, rtol=0, atol=0)
    assert visible.tolist() == [True] * len(frames)
    # how blurred each looks, for the confidence's blur penalty: the host's measure, in float32
    host = [frame_blurriness(x, manifest.preprocessing) for x in inputs]
    np.testing.assert_allclose(blurry, host, rtol=0, atol=1e-4)


def test_frames_preprocessed_on_the_device_are_padded_to_the_run_size_with_the_last(
    default_model_dir, example_images
):
    """A batch of 2 frames run at a captured size of 4 (``run_size``, as the captioner pads a
    batch to a size its graphs keep): the encoder runs on the 2 frames' inputs and 2 copies of
    the last, as ``encode`` of the host's inputs padded alike gives them; whether each is
    recognisable and how blurred stay the 2 frames'. The last is dark and, asked for nothing
    else, not brightened (``brighten`` is off unless asked)."""
    manifest = load_manifest(default_model_dir)
    backend = TorchBackend(manifest, device="cpu", graph_factory=EagerGraph, preprocess="device")
    frames = [np.asarray(load_rgb(str(p))) for p in example_images[:2]]
    frames[1] = (frames[1] // 5).astype(np.uint8)  # dark: the host would brighten it if asked
    encoded, visible, blurry = backend.encode_frames(frames, run_size=4)
    inputs = preprocess([Image.fromarray(f) for f in frames], manifest.preprocessing)
    want = backend.encode(np.concatenate([inputs, inputs[1:], inputs[1:]]))
    assert encoded.n_images == 4
    for name, tensor in want.tensors.items():
        torch.testing.assert_close(encoded.tensors[name], tensor, rtol=0, atol=0)
    assert visible.shape == blurry.shape == (2,)


def test_preprocess_takes_host_or_device(default_model_dir):
    manifest = load_manifest(default_model_dir)
    with pytest.raises(ValueError, match=r"preprocess must be one of \('host', 'device'\), got 'gpu'"):
        TorchBackend(manifest, device="cpu", preprocess="gpu")
    host = TorchBackend(manifest, device="cpu")
    assert not host.prepares_frames
    with pytest.raises(NotImplementedError, match="preprocesses on the host"):
        host.encode_frames([np.zeros((4, 4, 3), np.uint8)])
    assert Backend.prepares_frames is False


# -- on a real GPU (``pytest -m gpu``; deselected by default, run by benchmarks/gpu_check.py) ----


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_frames_preprocessed_on_the_gpu_are_the_hosts(default_model_dir, example_images, graphs):
    """On CUDA: the encoder inputs made on the GPU equal the host's bit for bit (frames of
    four sizes and a blank one), and a Captioner with them, eager or with CUDA graphs, gives
    the host path's captions, twice (the second time through the captured graphs)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    frames = [np.asarray(load_rgb(str(p))) for p in example_images] + [np.full((480, 640, 3), 90, np.uint8)]
    x, visible = FramePreprocess(PRE, torch.device("cuda"))(frames)
    np.testing.assert_array_equal(x.cpu().numpy(), preprocess([Image.fromarray(f) for f in frames], PRE))
    assert visible.cpu().tolist() == [True] * len(example_images) + [False]
    options = {"backend": "torch", "device": "cuda", "search": "device", "cuda_graphs": graphs}
    host = Captioner(default_model_dir, **options)
    device = Captioner(default_model_dir, **options, preprocess="device")
    for _ in range(2):
        want, got = host.caption_batch(frames), device.caption_batch(frames)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)


def _grey_blocks(levels: np.ndarray) -> np.ndarray:
    """(56, 56) grey levels -> a 224x224 RGB frame of uniform 4x4 blocks (the blank check's
    blocks, so its grey image is ``levels`` less the mean, and nothing is resized)."""
    return np.repeat(np.repeat(levels.astype(np.uint8), 4, 0), 4, 1)[:, :, None].repeat(3, 2)


def _squares(d: int, k: int, side: int) -> np.ndarray:
    """k of the 56 * 56 = 3136 blocks at level 100 + d, the others at 100: a standard
    deviation of d * sqrt(p (1 - p)), p = k / 3136, wherever they are. They are k / side^2
    squares of side x side blocks, a block apart, from block (1, 1): a scene's edges, not the
    noise that scattered blocks would be (their mean |Laplacian| is over 2.5 times the spread)."""
    levels = np.full((56, 56), 100)
    corners = [(r, c) for r in range(1, 55 - side, side + 1) for c in range(1, 55 - side, side + 1)]
    for r, c in corners[: k // side**2]:
        levels[r : r + side, c : c + side] += d
    assert (levels > 100).sum() == k
    return _grey_blocks(levels)


def test_the_blank_check_keeps_the_hosts_thresholds_on_frames_near_them():
    """Hand-traced frames at the thresholds (``edgecap.preprocess``: the standard deviation of
    the grey 4x4-block image >= 1.5 levels as taken, over all blocks, not the sample's n - 1,
    and its mean |Laplacian| >= 1.5; under 6.4 levels, a mean |Laplacian| over 2.5 times the
    deviation is noise): a lens cap's faint texture (blocks 30 and 32 in a checkerboard:
    deviation 1, |Laplacian| 8) is blank; 528 blocks 4 levels up, in squares of 2 x 2 blocks,
    give a deviation of 4 * sqrt(528 * 2608) / 3136 = 1.49675 (blank), 536 blocks
    4 * sqrt(536 * 2600) / 3136 = 1.50575 (recognisable; a mean |Laplacian| of 2.83 and 2.87,
    under twice the deviation: a scene's edges, not noise). A
    checkerboard of blocks 100 and 112 (deviation 6, |Laplacian| 48) is noise; of 100 and 113
    (6.5, 52) it is not judged by the ratio. The device path judges them as the host."""
    lens_cap = _grey_blocks(30 + 2 * ((np.arange(56)[:, None] + np.arange(56)[None, :]) % 2))
    checker = (np.arange(56)[:, None] + np.arange(56)[None, :]) % 2
    frames = [lens_cap, _squares(4, 528, 2), _squares(4, 536, 2)]
    frames += [_grey_blocks(100 + 12 * checker), _grey_blocks(100 + 13 * checker)]
    x, visible = FramePreprocess(PRE, CPU)(frames)
    assert [recognisable(v, PRE) for v in x.numpy()] == [False, False, True, False, True]
    assert visible.tolist() == [False, False, True, False, True]


def test_the_blank_check_takes_the_deviation_over_all_blocks_not_a_samples():
    """The deviation of the grey block image is over all 3136 blocks (``numpy.std``'s, n), not
    the sample's (n - 1, sqrt(3136 / 3135) = 1.00016 times more), hand-traced at the threshold:
    528 blocks 4 levels up in squares of 2 x 2 blocks and 6 more blocks 3 up, each alone in
    the next squares' corners, give a mean of 100 + 2130 / 3136 and a deviation of
    sqrt(8502 / 3136 - (2130 / 3136)^2) = 1.499924 (blank; over n - 1, 1.500163: recognisable).
    The device path judges it as the host."""
    levels = np.full((56, 56), 100)
    corners = [(r, c) for r in range(1, 53, 3) for c in range(1, 53, 3)]
    for r, c in corners[:132]:
        levels[r : r + 2, c : c + 2] += 4
    for r, c in corners[132:138]:
        levels[r, c] += 3
    assert (levels - 100).sum() == 2130 and ((levels - 100) ** 2).sum() == 8502
    x, visible = FramePreprocess(PRE, CPU)([_grey_blocks(levels)])
    assert [recognisable(v, PRE) for v in x.numpy()] == [False]
    assert visible.tolist() == [False]


def test_the_blank_check_keeps_the_hosts_detail_threshold_on_frames_near_it():
    """The other threshold (``edgecap.preprocess``: the mean |Laplacian| of the grey 4x4-block
    image >= 1.5), hand-traced: a ramp of 4 levels a block row (contrast to spare, no
    Laplacian) with k blocks 2 levels up, 2 blocks apart and off the border, each adding 4 x 2 at
    itself and 2 at each of its 4 neighbours to the |Laplacian| of the 54 x 54 inner blocks:
    274 of them give 16 x 274 / 2916 = 1.5034 (recognisable), 273 give 1.4979 (blank). The
    device path judges them as the host."""

    def ramp(bumps: int) -> np.ndarray:
        levels = np.repeat(4 * np.arange(56)[:, None], 56, axis=1)
        for r, c in [(r, c) for r in range(2, 54, 2) for c in range(2, 54, 2)][:bumps]:
            levels[r, c] += 2
        return _grey_blocks(levels)

    x, visible = FramePreprocess(PRE, CPU)([ramp(274), ramp(273)])
    assert [recognisable(v, PRE) for v in x.numpy()] == [True, False]
    assert visible.tolist() == [True, False]


def test_the_pass_order_rules_are_strict_at_their_boundaries():
    """Both rules compare strictly (Pillow 13.0's Resample.c: ``(imIn->ysize - ysize) >
    (imIn->xsize - xsize) * 2``; 12.3's Image.resize: ``self.size[1] > self.size[0] * 100``):
    460x342 (the height shrinking by 236 = 2 x 118 pixels) is horizontal first under 13.0, one
    row more vertical first; 22400x224 (exactly 100 times taller) horizontal first under 12.3,
    one row more vertical first. The 460x342 frame's pixels are the installed Pillow's."""
    out = (224, 224)
    assert not vertical_first((460, 342), out, (13, 0)) and vertical_first((461, 342), out, (13, 0))
    assert not vertical_first((22400, 224), out, (12, 3)) and vertical_first((22401, 224), out, (12, 3))
    frame = np.random.default_rng(460).integers(0, 256, (460, 342, 3), dtype=np.uint8)
    got = FramePreprocess(PRE, CPU).resized(torch.from_numpy(frame[None]))[0].numpy()
    np.testing.assert_array_equal(
        got, np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BILINEAR))
    )
    # the height shrinking by one row while the width grows: vertical first under 13.0
    assert vertical_first((225, 100), out, (13, 0)) and not vertical_first((224, 100), out, (13, 0))
    if PILLOW >= (13, 0):  # and so the installed Pillow's pixels
        frame = np.random.default_rng(225).integers(0, 256, (225, 100, 3), dtype=np.uint8)
        got = FramePreprocess(PRE, CPU).resized(torch.from_numpy(frame[None]))[0].numpy()
        np.testing.assert_array_equal(
            got, np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BILINEAR))
        )


def test_the_captioner_brightens_dark_frames_on_the_device_as_on_the_host(captioners, example_images):
    """Photos at a twentieth of their light through a Captioner with device preprocessing:
    brightened there (``encode_frames(..., brighten=True)``) to the host path's captions, none of
    them "nothing recognisable"; with ``brighten=False`` both paths caption them as they are."""
    host, device = captioners
    dark = [
        np.minimum(np.round(np.asarray(load_rgb(str(p)), np.float64) * 0.05), 255).astype(np.uint8)
        for p in example_images
    ]
    got, want = device.caption_batch(dark), host.caption_batch(dark)
    assert [c.text for c in got] == [c.text for c in want]
    assert all(c.recognisable for c in got)
    options = host.options
    try:
        host.options = device.options = dataclasses.replace(options, brighten=False)
        got, want = device.caption_batch(dark), host.caption_batch(dark)
    finally:
        host.options = device.options = options
    assert [c.text for c in got] == [c.text for c in want]
    assert not all(c.recognisable for c in want)  # some as dark as they are are flagged


def test_options_set_during_a_batch_leave_its_device_preprocessing_as_the_call_began(
    captioners, example_images
):
    """``options`` set (by another thread) once a batch is in the backend, before its frames are
    preprocessed on the device: the frames are still brightened and blank-checked as the
    options the call began with say, as a sequential call does; the next call goes without.
    Before, that batch's frames were encoded unbrightened and the blank frame captioned."""
    _, device = captioners
    dark = np.minimum(np.round(np.asarray(load_rgb(str(example_images[1])), np.float64) * 0.2), 255)
    inputs = [np.full((300, 400, 3), 200, np.uint8), dark.astype(np.uint8)]
    options = device.options
    without = dataclasses.replace(options, brighten=False, blank_check=False)
    want = [every_field(c) for c in device.caption_batch(inputs)]
    device.options = without
    try:
        want_without = [every_field(c) for c in device.caption_batch(inputs)]
        device.options = options
        assert [r[0] for r in want] != [r[0] for r in want_without]  # both frames' captions differ
        run = device._run_batch

        def setting_the_options(*args, **kwargs):
            device.options = without
            return run(*args, **kwargs)

        device._run_batch = setting_the_options
        got = [every_field(c) for c in device.caption_batch(inputs)]
        del device._run_batch
        assert device.options == without
        assert got == want
        assert [every_field(c) for c in device.caption_batch(inputs)] == want_without
    finally:
        device.__dict__.pop("_run_batch", None)
        device.options = options


def test_the_device_blank_check_marks_the_blank_frame_in_its_own_slot(captioners, example_images):
    """A blank frame first in its batch: its slot, and only its, is "nothing recognisable" (the
    device's verdicts go back to the frames in their order), as on the host path."""
    host, device = captioners
    inputs = [np.full((300, 400, 3), 200, np.uint8), *[str(p) for p in example_images[:2]]]
    got, want = device.caption_batch(inputs), host.caption_batch(inputs)
    assert [c.recognisable for c in got] == [c.recognisable for c in want] == [False, True, True]
    assert [c.text for c in got] == [c.text for c in want]


def test_a_bgr_array_is_flipped_to_rgb_for_the_device():
    """``load_rgb_array(color="bgr")`` (a frame from OpenCV) gives the pixels in RGB order."""
    rgb = np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_rgb_array(np.ascontiguousarray(rgb[:, :, ::-1]), color="bgr"), rgb)


def test_a_big_jpeg_is_decoded_at_the_reduced_scale_on_the_device_path_too(captioners):
    """A 1000x800 JPEG with the model's 224x224 as the draft size decodes at 1/2 (500x400: 1/4
    would be 250x200, under 224), as ``load_rgb`` does it for the host path, and the Captioner
    with device preprocessing decodes it so: the host path's caption and score."""
    small = np.random.default_rng(5).integers(0, 256, (50, 62, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((1000, 800), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    frame = load_rgb_array(data, draft_size=(224, 224))
    assert frame.shape == (400, 500, 3)
    np.testing.assert_array_equal(frame, np.asarray(load_rgb(data, draft_size=(224, 224))))
    host, device = captioners
    got, want = device.caption(data), host.caption(data)
    assert got.text == want.text and got.score == pytest.approx(want.score, abs=1e-6)


def test_a_model_of_another_size_and_normalisation_gets_the_hosts_encoder_input():
    """A manifest with a non-square size that 4x4 blocks do not tile (150x222) and CLIP's
    normalisation in pixel levels (where -mean / std and -mean * (1 / std) differ by one float32
    step in green): frames of three sizes get ``edgecap.images.preprocess``'s encoder input bit
    for bit and ``recognisable``'s verdicts."""
    pre = Preprocessing(size=(150, 222), mean=(122.77, 116.75, 104.09), std=(68.5, 66.63, 70.32))
    rng = np.random.default_rng(150)
    frames = [_frame(rng, 375, 500, True), _frame(rng, 100, 60, False), _frame(rng, 150, 222, True)]
    x, visible = FramePreprocess(pre, CPU)(frames)
    want = preprocess([Image.fromarray(f) for f in frames], pre)
    assert x.shape == (3, 3, 150, 222)
    np.testing.assert_array_equal(x.numpy(), want)
    assert visible.tolist() == [recognisable(w, pre) for w in want]


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (4, 4, 1)])
def test_a_frame_of_other_channels_is_refused_by_position(shape):
    with pytest.raises(ValueError, match=r"frame 1: RGB uint8 \(H, W, 3\) expected"):
        FramePreprocess(PRE, CPU)([np.zeros((4, 4, 3), np.uint8), np.zeros(shape, np.uint8)])


@pytest.mark.parametrize(
    "version, want", [("13.0.0", (13, 0)), ("12.3.0", (12, 3)), ("12.2.0.dev0", (12, 2)), ("13", (13, 0))]
)
def test_the_pillow_version_is_read_as_major_and_minor(monkeypatch, version, want):
    """The pass order depends on Pillow's minor version (12.1 vs 12.2)."""
    import PIL

    from edgecap.backends.torch_preprocess import _pillow_version

    monkeypatch.setattr(PIL, "__version__", version)
    assert _pillow_version() == want


def test_a_size_met_again_keeps_its_taps_on_the_device():
    """The taps dropped are the least recently used: a camera's frame size, met between the
    other sizes, keeps its taps however many other sizes come and go."""
    from edgecap.backends.torch_preprocess import TAPS_KEPT

    prep = FramePreprocess(PRE, CPU)
    for height in range(2, 2 + 2 * TAPS_KEPT):
        prep._device_taps(300, 224)  # what each resize of a 300-row frame asks for
        prep._device_taps(height, 224)
    assert (300, 224) in prep._taps and len(prep._taps) == TAPS_KEPT


def test_the_device_blank_check_is_on_the_grey_image_as_the_hosts():
    """Blocks of two colours of one grey level ((100, 130, 100) and (115, 100, 115): both 110)
    in a checkerboard: green alone would vary by 30 levels, the grey image not at all, so the
    frame is blank on the host (``edgecap.preprocess``: the mean of the three channels) and on
    the device."""
    board = ((np.arange(56)[:, None] + np.arange(56)[None, :]) % 2).astype(bool)
    blocks = np.where(board[:, :, None], np.array([100, 130, 100]), np.array([115, 100, 115]))
    frame = np.repeat(np.repeat(blocks.astype(np.uint8), 4, 0), 4, 1)
    x, visible = FramePreprocess(PRE, CPU)([frame])
    assert not recognisable(x[0].numpy(), PRE) and visible.tolist() == [False]


def test_a_memory_mapped_frame_is_copied_too(tmp_path):
    """A frame in a memory-mapped buffer (a ring buffer shared with a camera process): the
    frame ``load_rgb_array`` returns has memory of its own (numpy hands it over as a plain
    array over the same memory, not the same object)."""
    buffer = np.memmap(tmp_path / "ring", np.uint8, "w+", shape=(6, 8, 3))
    frame = load_rgb_array(buffer)
    assert not np.shares_memory(frame, buffer)
    buffer[:] = 9
    assert frame.max() == 0


def test_an_fp16_encoder_takes_the_frames_preprocessed_on_the_device(default_model_dir, example_images):
    """FP16 (the GPU's precision; here torch's CPU FP16 kernels, the backend built through
    ``_setup`` as benchmarks/fp16_emulation.py does): the device's encoder input is converted to
    the encoder's FP16 as the host's is, so its outputs are the host path's exactly."""
    manifest = load_manifest(default_model_dir)
    backend = TorchBackend(manifest, device="cpu", preprocess="device")
    backend._setup(*TorchBackend._build(manifest), "cpu", fp16=True, fp32_encoder=False)
    frames = [np.asarray(load_rgb(str(example_images[0])))]
    encoded, _, _ = backend.encode_frames(frames)
    want = backend.encode(preprocess([Image.fromarray(f) for f in frames], manifest.preprocessing))
    for name, tensor in want.tensors.items():
        torch.testing.assert_close(encoded.tensors[name], tensor, rtol=0, atol=0)


class SmallDevice(FramePreprocess):
    """A device with room for ``room`` uploaded pixels at a time: a larger upload is CUDA's
    out-of-memory error, as a batch of big frames on a small GPU meets it. Records each
    upload's frames and sizes."""

    def __init__(self, room: int):
        super().__init__(PRE, CPU)
        self.room = room
        self.uploads: list[tuple[int, int, int]] = []  # (frames, height, width) of each tried

    def normalised(self, pixels, brighten=False):
        n, height, width = pixels.shape[:3]
        self.uploads.append((n, height, width))
        if n * height * width > self.room:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {pixels.numel()} bytes")
        return super().normalised(pixels, brighten)


def test_frames_the_device_has_no_room_for_still_get_their_inputs(example_images):
    """Two 600x520 frames that fit one at a time but not together go one by one; a 2448x3264
    frame that fits not even alone is preprocessed on the host: every frame's encoder input is
    still ``preprocess()``'s, in its slot, and so is the blank check; frames that fit go as
    before (one upload per size)."""
    rng = np.random.default_rng(7)
    pair = [_frame(rng, 600, 520, smooth=True) for _ in range(2)]
    big = _frame(rng, 2448, 3264, smooth=True)
    photos = [np.asarray(load_rgb(str(p))) for p in example_images]
    frames = [pair[0], photos[0], big, pair[1], np.full((100, 120, 3), 90, np.uint8)]
    room = 600 * 520  # one 600x520 frame; the example photos are 640x427 or smaller
    assert all(f.shape[0] * f.shape[1] <= room for f in (photos[0], frames[-1]))
    prep = SmallDevice(room)
    x, visible = prep(frames)
    want = preprocess([Image.fromarray(f) for f in frames], PRE)
    np.testing.assert_array_equal(x.numpy(), want)
    assert visible.tolist() == [recognisable(w, PRE) for w in want] == [True, True, True, True, False]
    assert sorted(prep.uploads) == sorted(
        [
            (2, 600, 520),
            (1, 600, 520),
            (1, 600, 520),
            (1, *photos[0].shape[:2]),
            (1, 2448, 3264),
            (1, 100, 120),
        ]
    )  # the pair, then each of it; the big frame tried once, then the host's


def test_frames_the_device_has_no_room_for_are_brightened_too():
    """The fallbacks brighten as the device does: two dark 60x50 frames (level 51) that fit only
    one at a time, and an 80x90 one (level 30) that fits not even alone and goes to the host,
    all with brighten=True. Hand-computed: 51 x 5 = 255, encoder input (255 - 127.5) / 127.5 =
    1; 30 x 8 (the cap) = 240, 112.5 / 127.5; without brightening they would be -0.6 and -0.76."""
    frames = [np.full((60, 50, 3), 51, np.uint8), np.full((60, 50, 3), 51, np.uint8)]
    frames.append(np.full((80, 90, 3), 30, np.uint8))
    prep = SmallDevice(60 * 50)
    x, _ = prep(frames, brighten=True)
    assert sorted(prep.uploads) == sorted([(2, 60, 50), (1, 60, 50), (1, 60, 50), (1, 80, 90)])
    np.testing.assert_allclose(x[:2].numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x[2].numpy(), 112.5 / 127.5, rtol=1e-6)
    want = preprocess([Image.fromarray(f) for f in frames], PRE, brighten=True)
    np.testing.assert_array_equal(x.numpy(), want)


def test_an_error_other_than_out_of_memory_is_not_hidden(example_images):
    """Only the device's out-of-memory error falls back: another failure is a bug to see."""

    class Broken(FramePreprocess):
        def normalised(self, pixels, brighten=False):
            raise RuntimeError("an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        Broken(PRE, CPU)([np.asarray(load_rgb(str(example_images[0])))])


class ForgetfulDevice(SmallDevice):
    """``SmallDevice`` that also keeps a weak reference to each upload it had no room for and
    notes, at each later step (an upload, the host's preprocessing), which of them still live."""

    def __init__(self, room: int):
        super().__init__(room)
        self.refused: list = []  # weak references to the uploads refused
        self.alive_at_retry: list[int] = []  # how many refused uploads lived at each later step

    def note(self):
        self.alive_at_retry.append(sum(ref() is not None for ref in self.refused))

    def normalised(self, pixels, brighten=False):
        self.note()
        if pixels.shape[0] * pixels.shape[1] * pixels.shape[2] > self.room:
            self.refused.append(weakref.ref(pixels))
        return super().normalised(pixels, brighten)


def test_an_upload_the_device_had_no_room_for_is_freed_before_the_retries(monkeypatch):
    """The frames that did not fit together are tried one by one, and a frame that did not fit
    alone goes to the host, only once the failed attempt's tensors are gone: an out-of-memory
    error's traceback holds them (PyTorch's FAQ: recover outside the ``except`` clause), and on
    a small GPU the retries would meet the same shortage. Two 60x50 frames with room for one:
    the pair's upload is refused, then each frame fits; a 90x80 frame is refused, then goes to
    the host."""
    from edgecap.backends import torch_preprocess

    rng = np.random.default_rng(3)
    frames = [_frame(rng, 60, 50, smooth=True) for _ in range(2)] + [_frame(rng, 90, 80, smooth=True)]
    prep = ForgetfulDevice(60 * 50)
    to_host = torch_preprocess.model_input

    def on_the_host(image, pre, brighten=False):
        prep.note()
        return to_host(image, pre, brighten)

    monkeypatch.setattr(torch_preprocess, "model_input", on_the_host)
    x, _ = prep(frames)
    np.testing.assert_array_equal(x.numpy(), preprocess([Image.fromarray(f) for f in frames], PRE))
    assert len(prep.refused) == 2  # the pair, then the 90x80 frame
    # at each step: the pair's upload (steps 2-3: the frames one by one) and the 90x80 frame's
    # (step 5: the host) already freed
    assert prep.alive_at_retry == [0, 0, 0, 0, 0]


def test_out_of_memory_falls_back_on_a_torch_before_2_5(monkeypatch):
    """pyproject allows torch 2.1; ``torch.OutOfMemoryError`` came in torch 2.5, and before it
    CUDA's out-of-memory error was ``torch.cuda.OutOfMemoryError`` only (since 2.5 the same
    class). On such a torch a batch the device has no room for still goes frame by frame, not
    an AttributeError for the whole batch."""
    out_of_memory = torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")  # torch 2.1-2.4

    class OneAtATime(FramePreprocess):
        def normalised(self, pixels, brighten=False):
            if pixels.shape[0] > 1:
                raise out_of_memory("CUDA out of memory. Tried to allocate 2 frames")
            return super().normalised(pixels, brighten)

    rng = np.random.default_rng(5)
    frames = [_frame(rng, 60, 50, smooth=True) for _ in range(2)]
    x, _ = OneAtATime(PRE, CPU)(frames)
    np.testing.assert_array_equal(x.numpy(), preprocess([Image.fromarray(f) for f in frames], PRE))
