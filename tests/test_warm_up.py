"""``Captioner.warm_up``: what a camera loop's first frames would meet, met before it starts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgecap import Captioner  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402


def _photos(example_images) -> list:
    """The example photos (each with tag words; the astronaut's gate gives it no language
    models) and a noise frame (no tag words)."""
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return [str(p) for p in example_images] + [noise]


def _graphed(model_dir, **options) -> Captioner:
    return Captioner(
        model_dir,
        backend="torch",
        device="cpu",
        search="device",
        graph_factory=EagerGraph,
        batch_size=2,
        **options,
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
    ],
)
def test_warm_up_captures_only_the_plans_the_options_allow(default_model_dir, options, plans):
    """Without the tag bonus no plan has tag words; without the language models' weight none
    runs them: the warm-up captures no plan a search of these options could not meet."""
    warmed = _graphed(default_model_dir, **options)
    out = warmed.warm_up((1,), frame_size=(64, 64))
    graphs = warmed.backend.device_search.graphs.graphs
    assert {(key[0].tag_bonus, key[0].fusion) for key in graphs.entries} == plans
    assert out[1]["plans"] == len(plans) - 1


def test_warm_up_without_graphs_captions_once_per_batch_size(default_model_dir, monkeypatch):
    """onnxruntime (no per-plan graphs): a caption of each batch size, nothing more to capture."""
    captioner = Captioner(default_model_dir, batch_size=4)
    sizes = []
    real = captioner.caption_batch
    monkeypatch.setattr(
        captioner, "caption_batch", lambda images, *a, **k: sizes.append(len(images)) or real(images, *a, **k)
    )
    out = captioner.warm_up([4, 1, 4])
    assert sizes == [1, 4] and sorted(out) == [1, 4]
    assert all(r["plans"] == 0 and r["seconds"] > 0 for r in out.values())


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
    ],
)
def test_warm_up_refuses_bad_arguments_naming_them(default_model_dir, kwargs, message):
    captioner = Captioner(default_model_dir, batch_size=2)
    with pytest.raises(ValueError) as raised:
        captioner.warm_up(**kwargs)
    assert message in str(raised.value)
