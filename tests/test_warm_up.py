"""``Captioner.warm_up``: what a camera loop's first frames would meet, met before it starts."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from test_device_search import _lm  # noqa: E402


def _photos(example_images) -> list:
    """The example photos (each with tag words; the astronaut's gate gives it no language
    models) and a noise frame (no tag words)."""
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return [str(p) for p in example_images] + [noise]


def _graphed(model_dir, **options) -> Captioner:
    options = {"batch_size": 2, **options}
    return Captioner(
        model_dir, backend="torch", device="cpu", search="device", graph_factory=EagerGraph, **options
    )


def test_warm_up_captures_every_plan_so_that_no_photo_captures_one_later(default_model_dir, example_images):
    """With the whole decode in graphs (``EagerGraph`` standing in), ``warm_up`` at batch 1 and
    2 captures the four plans of each size (with and without tag words, with and without the
    language models): one by its caption, three more by the warm search. Afterwards no photo,
    alone or in pairs, captures a graph, and every caption is the one without warm-up."""
    warmed = _graphed(default_model_dir)
    out = warmed.warm_up((2, 1), frame_size=(120, 160))
    assert sorted(out) == [1, 2] and all(r["seconds"] > 0 for r in out.values())
    assert [out[size]["plans"] for size in (1, 2)] == [3, 3]
    graphs = warmed.backend.device_search.graphs.graphs
    assert graphs.made == 8
    plans = {(key[0].n_images, key[0].tag_bonus, key[0].fusion) for key in graphs.entries}
    assert plans == {(n, tags, lms) for n in (1, 2) for tags in (None, 2.0) for lms in (False, True)}
    cold = _graphed(default_model_dir)
    photos = _photos(example_images)
    batches = [[p] for p in photos] + [photos[:2], photos[2:4], [photos[0], photos[4]]]
    for batch in batches:
        assert [c.text for c in warmed.caption_batch(batch)] == [c.text for c in cold.caption_batch(batch)]
    assert graphs.made == 8  # nothing captured after the warm-up
    assert cold.backend.device_search.graphs.graphs.made > 1  # these photos do meet several plans


@pytest.mark.parametrize(
    "options, plans",
    [
        ({"guidance_bonus": 0.0}, {(None, False), (None, True)}),
        ({"guidance_bonus": 0.0, "fusion_weight": 0.0}, {(None, False)}),
        ({"guidance_bonus": 0.5, "fusion_weight": 0.0}, {(None, False), (0.5, False)}),
    ],
)
def test_warm_up_captures_only_the_plans_the_options_allow(default_model_dir, options, plans):
    """Without the tag bonus no plan has tag words; without the language models' weight none
    runs them: the warm-up captures no plan a search of these options could not meet, and
    every plan they can (a small tag bonus: with tag words too)."""
    warmed = _graphed(default_model_dir, **options)
    out = warmed.warm_up((1,), frame_size=(64, 64))
    graphs = warmed.backend.device_search.graphs.graphs
    assert {(key[0].tag_bonus, key[0].fusion) for key in graphs.entries} == plans
    assert out[1]["plans"] == len(plans) - 1


@pytest.mark.parametrize("hold", [False, True])
def test_warm_up_without_graphs_captions_once_per_batch_size(default_model_dir, monkeypatch, hold):
    """onnxruntime (no per-plan graphs): one caption of each batch size, the largest first, each
    batch encoded once, nothing more to capture (for holding either)."""
    captioner = Captioner(default_model_dir, batch_size=4)
    sizes, encoded = [], []
    real, encode = captioner.caption_batch, captioner.backend.encode
    monkeypatch.setattr(
        captioner, "caption_batch", lambda images, *a, **k: sizes.append(len(images)) or real(images, *a, **k)
    )
    monkeypatch.setattr(captioner.backend, "encode", lambda x: encoded.append(len(x)) or encode(x))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = captioner.warm_up([1, 4, 1], hold=hold)
    wall_s = time.perf_counter() - start
    # nothing dropped: nothing to warn of (its warning is a RuntimeWarning; a ResourceWarning of
    # another test's garbage collected meanwhile is not this call's)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert sizes == encoded == [4, 1] and list(out) == [1, 4]
    assert all(r["plans"] == 0 and r["seconds"] > 0 for r in out.values())
    assert sum(r["seconds"] for r in out.values()) <= wall_s  # each size's own time, in seconds
    assert list(captioner.warm_up(frame_size=(64, 64))) == [1]  # by default, batches of one


def test_a_constrained_captioner_warms_the_plans_it_searches_on_the_device(default_model_dir, example_images):
    """``constrained=True``: a batch with tag words is searched on the host, and no search
    returns endings for the consensus; the warm-up captures only plans the device search can
    meet then (no tag words, no endings; with and without the language models), after which
    no photo captures one."""
    warmed = _graphed(default_model_dir, constrained=True)
    warmed.warm_up((1,), frame_size=(64, 64))
    graphs = warmed.backend.device_search.graphs.graphs
    assert {(key[0].tag_bonus, key[0].fusion, key[0].endings) for key in graphs.entries} == {
        (None, False, False),
        (None, True, False),
    }
    made = graphs.made
    for photo in _photos(example_images):
        warmed.caption(photo)
    assert graphs.made == made


def test_the_smaller_sizes_warm_at_the_size_they_will_run(default_model_dir):
    """Sizes padded by the graphed backend (up to a power of two, at most the largest batch
    run): ``warm_up((3, 5))`` runs 5 first, so 3 warms padded to 4, as a batch of 3 runs
    afterwards: neither a batch of 3 nor one of 5 captures anything later."""
    warmed = _graphed(default_model_dir, batch_size=5)
    warmed.warm_up((3, 5), frame_size=(64, 64))
    graphs = warmed.backend.device_search.graphs.graphs
    assert {key[0].n_images for key in graphs.entries} == {4, 5}
    made = graphs.made
    frames = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(5)]
    warmed.caption_batch(frames[:3])
    warmed.caption_batch(frames)
    assert graphs.made == made


def test_a_warm_up_that_outgrows_the_kept_graphs_says_so(default_model_dir):
    """Three batch sizes of four plans each: more than the 8 whole-decode graphs kept; the
    warm-up warns, naming the sizes, instead of leaving the first ones to be captured again
    mid-stream unannounced. Two sizes do not warn, and a second warm-up captures nothing."""
    warmed = _graphed(default_model_dir, batch_size=4)
    with pytest.warns(
        RuntimeWarning, match=r"batch sizes \[1, 2, 4\] need more graphs than the backend keeps"
    ):
        warmed.warm_up((1, 2, 4), frame_size=(64, 64))
    quiet = _graphed(default_model_dir, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.warm_up((1, 4), frame_size=(64, 64))
        again = quiet.warm_up((1, 4), frame_size=(64, 64))
    assert [r["plans"] for r in again.values()] == [0, 0]


def test_the_warm_up_leaves_to_the_host_what_the_host_searches(default_model_dir):
    """A batch the device search does not take (``search="auto"``: fewer than 12 beam rows)
    and language models of two sizes (which only the host loop steps): no plan captured for
    them."""
    auto = _graphed(default_model_dir)
    auto.backend.search_mode = "auto"  # as on a GPU: the device search from 12 beam rows
    assert auto.warm_up((1,), frame_size=(64, 64))[1]["plans"] == 0
    assert auto.backend.device_search.graphs.graphs.made == 0
    mixed = _graphed(default_model_dir)
    rng = np.random.default_rng(5)
    vocab = len(mixed.vocab)
    mixed.fusion = replace(
        mixed.fusion, everyday=_lm(rng, vocab, hidden=8), in_domain=_lm(rng, vocab, hidden=5)
    )
    mixed.warm_up((1,), frame_size=(64, 64))
    plans = {(key[0].tag_bonus, key[0].fusion) for key in mixed.backend.device_search.graphs.graphs.entries}
    assert plans == {(None, False), (2.0, False)}


def _captured(captioner: Captioner) -> tuple[int, int]:
    """(host step-graph shapes, whole-decode plans) the graphed backend has captured so far."""
    backend = captioner.backend
    device = getattr(backend, "device_search", None)  # none with search="host"
    return backend.step_graphs.keys.made, device.graphs.graphs.made if device else 0


@pytest.mark.parametrize("search", ["host", "device"])
def test_a_warm_up_for_holding_captures_the_hold_pass_so_that_holding_captures_nothing_later(
    default_model_dir, example_images, search
):
    """``warm_up(hold=True)``: the step graphs of the pass that scores a previous caption are
    captured for each batch size (one shape each), so that frames given the caption said last,
    one or two at a time, capture nothing afterwards; a warm-up without it leaves that capture
    to the first frame that holds (the searches' own graphs as before either way)."""
    photos = [str(p) for p in example_images]
    previous = "a dog runs through the grass"
    made = {}
    for hold in (False, True):
        warmed = Captioner(
            default_model_dir,
            backend="torch",
            device="cpu",
            search=search,
            graph_factory=EagerGraph,
            batch_size=2,
        )
        warmed.warm_up((1, 2), frame_size=(120, 160), hold=hold)
        before = _captured(warmed)
        for photo in photos:
            warmed.caption(photo)
        assert _captured(warmed)[1] == before[1]  # every plan was warm
        for photo in photos:
            warmed.caption(photo, previous=previous)
        warmed.caption_batch(photos[:2], previous=[previous, None])
        warmed.caption_batch(photos[2:4], previous=[previous, previous])
        after = _captured(warmed)
        made[hold] = (after[0] - before[0], after[1] - before[1])
    assert made == {False: (2, 0), True: (0, 0)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_sizes": [0]}, "batch size 0 is outside 1 to this Captioner's batch_size (2)"),
        ({"batch_sizes": [3]}, "batch size 3 is outside 1 to this Captioner's batch_size (2)"),
        ({"batch_sizes": [1.5]}, "batch sizes must be integers, got 1.5"),
        ({"batch_sizes": [True]}, "batch sizes must be integers, got True"),
        ({"frame_size": (480,)}, "frame_size must be (height, width), two positive integers, got (480,)"),
        ({"frame_size": (0, 640)}, "frame_size must be (height, width), two positive integers, got (0, 640)"),
        (
            {"frame_size": "480x640"},
            "frame_size must be (height, width), two positive integers, got '480x640'",
        ),
        (
            {"frame_size": (20000, 20000)},
            "frame_size 20000 x 20000 is over the 89,478,485 pixels edgecap decodes",
        ),
        ({"batch_sizes": 1}, "batch_sizes must be a list of batch sizes, got 1"),
        ({"batch_sizes": None}, "batch_sizes must be a list of batch sizes, got None"),
        ({"batch_sizes": []}, "batch_sizes is empty: give at least one batch size"),
        ({"hold": "yes"}, "hold must be True or False, got 'yes'"),
    ],
)
def test_warm_up_refuses_bad_arguments_naming_them(default_model_dir, kwargs, message):
    captioner = Captioner(default_model_dir, batch_size=2)
    with pytest.raises(ValueError) as raised:
        captioner.warm_up(**kwargs)
    assert message in str(raised.value)


def test_a_frame_size_at_the_image_limits_is_warmed_and_one_past_them_refused(default_model_dir):
    """``warm_up``'s frame is checked against the limits on decoded images (docs: the pixel
    limit, ``edgecap.images.set_max_pixels``, and the longest side, ``MAX_SIDE``): at a limit
    it is a frame edgecap would caption, one pixel past it refused, naming the limit."""
    from edgecap import api, images

    captioner = Captioner(default_model_dir, batch_size=1)
    images.set_max_pixels(64 * 64)
    assert set(captioner.warm_up((1,), frame_size=(64, 64))) == {1}
    with pytest.raises(ValueError, match="frame_size 64 x 65 is over the 4,096 pixels edgecap decodes"):
        captioner.warm_up((1,), frame_size=(64, 65))
    images.set_max_pixels(None)
    assert api._warm_frame((1, images.MAX_SIDE)).shape == (1, images.MAX_SIDE, 3)
    with pytest.raises(ValueError, match="frame_size 1 x 1000001 has a side over the 1,000,000 pixels"):
        captioner.warm_up((1,), frame_size=(1, images.MAX_SIDE + 1))


def test_the_service_warms_every_size_its_batches_run_at(default_model_dir, monkeypatch, capsys):
    """``edgecap serve``'s warm-up: batch 1 for a backend that keeps nothing per batch size
    (onnxruntime); with graphs, every size a batch of 1 to ``max_batch`` images runs at, padded
    (1, 2, 4 for 4), with the pass that scores a previous caption (``hold=True``: a request
    holding one captures nothing then), and what ``warm_up`` warns of is one line on stderr,
    not a Python warning with its file and line."""
    from edgecap.serve import warm_up

    asked = []

    def spy(captioner):
        real = captioner.warm_up
        monkeypatch.setattr(
            captioner,
            "warm_up",
            lambda sizes, **k: asked.append((list(sizes), k["hold"])) or real(sizes, **k),
        )
        return captioner

    warm_up(spy(Captioner(default_model_dir, batch_size=4)), 4)
    graphed = spy(_graphed(default_model_dir, batch_size=4))
    warm_up(graphed, 2)
    assert capsys.readouterr().err == ""
    warm_up(graphed, 4)
    assert asked == [([1], True), ([1, 2], True), ([1, 2, 4], True)]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "edgecap serve: warning: warm_up: batch sizes [1, 2, 4] need more graphs than the backend keeps "
        "(the whole decode's of 8 plans): the first ones were dropped, and will be captured again when "
        "a batch needs them; warm up fewer batch sizes"
    ]


def test_after_the_services_warm_up_a_held_request_captures_nothing(default_model_dir, example_images):
    """``edgecap serve``'s warm-up with graphs: a photo captioned alone or in pairs, with and
    without a previous caption to hold (as the Edgecap-Previous-Caption header passes it),
    captures no graph afterwards."""
    from edgecap.serve import warm_up

    graphed = _graphed(default_model_dir)
    warm_up(graphed, 2)
    before = _captured(graphed)
    photos = [str(p) for p in example_images]
    previous = "a dog runs through the grass"
    graphed.caption(photos[0])
    graphed.caption(photos[1], previous=previous)
    graphed.caption_batch(photos[2:4], previous=[previous, previous])
    assert _captured(graphed) == before


@pytest.mark.parametrize(
    "search, sizes, fits",
    [
        ("cuda-auto", [1, 2, 4, 8, 16, 32], True),  # 6 hold shapes + batches 1, 2 on the host: 8 kept
        ("cuda-auto", [1, 2, 4, 8, 16, 32, 64], False),  # 9
        ("host", [1, 2, 4, 8], True),  # 4 + 4
        ("host", [1, 2, 4, 8, 16], False),  # 5 + 5
        ("device", [1, 2, 4, 8, 16, 32, 64], True),  # 7: every batch searched in the decode's graphs
    ],
)
def test_the_service_warms_the_hold_pass_only_where_its_shapes_fit_beside_the_searchs(
    default_model_dir, monkeypatch, search, sizes, fits
):
    """At beam 3 with graphs (8 step-graph shapes kept): the hold pass's shape per size, and
    the host search's per size it runs on the host, must all be kept, else warming the hold
    pass would drop the search's own; a backend that keeps no shapes always warms it.
    "cuda-auto": ``search="auto"`` as it picks on CUDA (the device search from 12 beam rows;
    on the CPU it picks the host's), stood in for on the CPU."""
    from edgecap.backends.torch_search import AUTO_DEVICE_ROWS
    from edgecap.serve import hold_fits

    graphed = Captioner(
        default_model_dir,
        backend="torch",
        device="cpu",
        search="device" if search == "cuda-auto" else search,
        graph_factory=EagerGraph,
        batch_size=64,
    )
    if search == "cuda-auto":
        monkeypatch.setattr(
            graphed.backend, "warms_search", lambda n, options: n * options.beam_size >= AUTO_DEVICE_ROWS
        )
    assert graphed.backend.step_shapes_kept() == 8
    assert hold_fits(graphed, sizes) is fits
    assert hold_fits(Captioner(default_model_dir, batch_size=64), sizes) is True


def test_a_service_searching_on_the_host_keeps_its_searchs_graphs_warm(default_model_dir, example_images):
    """``search="host"`` with graphs and batches of up to 16 (too many shapes to warm the hold
    pass too): after the service's warm-up a batch of each size captures nothing."""
    from edgecap.serve import warm_up

    graphed = Captioner(
        default_model_dir,
        backend="torch",
        device="cpu",
        search="host",
        graph_factory=EagerGraph,
        batch_size=16,
    )
    warm_up(graphed, 16)
    before = _captured(graphed)
    photos = [str(p) for p in example_images]
    for size in (1, 2, 4, 8, 16):
        graphed.caption_batch((photos * 4)[:size])
    assert _captured(graphed) == before
