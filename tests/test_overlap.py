"""``Captioner(overlap=True)``: ``caption_batch`` over several batches builds each batch's
captions in a second thread while the next batch is searched. Users rely on the results being
those of ``overlap=False`` (the same captions, in the input order, a bad input's error in its
own slot or raised after nothing is returned), on the overlap really happening (the point of
it on a GPU, where the device otherwise waits for the host between batches), and on nothing
being left running once the call returns."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import Captioner, InputError

EXAMPLES = sorted(
    p for p in (Path(edgecap.__file__).parent / "assets" / "examples").iterdir() if p.suffix != ".md"
)


def _photos() -> list:
    """The example photos, as paths and as arrays (mirrored, so that no two are the same), with
    an unusable input (bytes of no image) in the middle."""
    arrays = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, ::-1]) for p in EXAMPLES]
    return [*map(str, EXAMPLES[:2]), b"not an image", *map(str, EXAMPLES[2:]), *arrays]


def _fields(result):
    if isinstance(result, InputError):
        return ("error", str(result))
    return (
        result.text,
        result.score,
        result.objects,
        result.confidence,
        [a.text for a in result.alternatives],
    )


def test_overlap_gives_the_same_results_in_the_same_order(default_model_dir):
    photos = _photos()
    with Captioner(default_model_dir, batch_size=2, n_best=2, decode_workers=0) as captioner:
        assert captioner.overlap is False  # on the CPU, by default
        plain = captioner.caption_batch(photos, on_error="return")
        captioner.overlap = True
        overlapped = captioner.caption_batch(photos, on_error="return")
        assert [_fields(r) for r in overlapped] == [_fields(r) for r in plain]
        assert isinstance(overlapped[2], InputError) and len(overlapped) == len(photos) == 9
        # the captions are the photos' own: the first photo alone gives the first caption
        assert overlapped[0].text == captioner.caption(photos[0]).text
        # "raise": the bad input's error, from the third batch on no batch searched
        with pytest.raises(InputError, match="not an image"):
            captioner.caption_batch(photos, on_error="raise")


def test_overlap_builds_a_batch_s_captions_while_the_next_is_searched(default_model_dir):
    """The second batch's search waits until the first batch's captions are being built: with the
    overlap they are, in another thread; without it the wait runs out (the search goes on and
    the test sees it was not overlapped). The last batch's captions are built in the calling
    thread, and the second thread is gone when the call returns."""
    captioner = Captioner(default_model_dir, batch_size=1, decode_workers=0, overlap=True)
    finishing = threading.Event()
    seen: dict = {"finished_in": [], "waited": []}
    search, finished = captioner._search, captioner._finished

    def slow_search(batch, return_attention, deferred=False):
        if len(seen["waited"]) == 1:  # the second batch: only once the first is being built
            seen["waited"].append(finishing.wait(timeout=10))
        else:
            seen["waited"].append(None)
        return search(batch, return_attention, deferred)

    def recorded_finished(prepared, searched):
        seen["finished_in"].append(threading.current_thread().name)
        finishing.set()
        return finished(prepared, searched)

    captioner._search, captioner._finished = slow_search, recorded_finished
    before = {t.name for t in threading.enumerate()}
    results = captioner.caption_batch([str(p) for p in EXAMPLES[:3]])
    assert seen["waited"][1] is True, "the second batch was searched before the first's captions were built"
    caller = threading.current_thread().name
    assert seen["finished_in"][0].startswith("edgecap-finish") and seen["finished_in"][-1] == caller
    assert {t.name for t in threading.enumerate()} <= before
    assert [r.text for r in results] == [captioner.caption(str(p)).text for p in EXAMPLES[:3]]


def test_one_batch_is_built_in_the_calling_thread(default_model_dir):
    captioner = Captioner(default_model_dir, batch_size=8, decode_workers=0, overlap=True)
    threads = []
    finished = captioner._finished

    def recorded(prepared, searched):
        threads.append(threading.current_thread().name)
        return finished(prepared, searched)

    captioner._finished = recorded
    captioner.caption_batch([str(p) for p in EXAMPLES])
    assert threads == [threading.current_thread().name]


def test_an_error_in_the_next_search_waits_for_the_batch_being_built(default_model_dir):
    """A search that fails (the backend's error) ends the call with that error, and the second
    thread has finished building the batch before it when the call raises."""
    captioner = Captioner(default_model_dir, batch_size=1, decode_workers=0, overlap=True)
    search, finished = captioner._search, captioner._finished
    calls = {"search": 0, "built": 0}

    def failing_search(batch, return_attention, deferred=False):
        calls["search"] += 1
        if calls["search"] == 2:
            raise RuntimeError("the device is gone")
        return search(batch, return_attention, deferred)

    def slow_finished(prepared, searched):
        time.sleep(0.3)  # still building when the next search fails
        calls["built"] += 1
        return finished(prepared, searched)

    captioner._search, captioner._finished = failing_search, slow_finished
    with pytest.raises(RuntimeError, match="the device is gone"):
        captioner.caption_batch([str(p) for p in EXAMPLES[:3]])
    assert calls == {"search": 2, "built": 1}


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_overlap_must_be_true_false_or_none(default_model_dir, value):
    with pytest.raises(ValueError, match="overlap must be True, False or None"):
        Captioner(default_model_dir, overlap=value)
    captioner = Captioner(default_model_dir)
    with pytest.raises(ValueError, match="overlap must be True, False or None"):
        captioner.overlap = value
    captioner.overlap = True
    captioner.overlap = None  # the default again: off on the CPU
    assert captioner.overlap is False


def test_the_device_search_s_results_unpacked_later_are_its_own(default_model_dir, monkeypatch):
    """With the overlap the device search's result is unpacked (and the consensus chosen) in the
    second thread, while the next batch is searched. Here each batch's host work waits until
    the next batch's search is over: the whole-decode graph (the CPU stand-in) writes every
    batch's result into one output buffer, so a result unpacked from it then would be the next
    batch's. The captions are those without the overlap, the last batch padded (5 photos, 2 a
    batch) included. The unpacking and the consensus of every batch but the last run in the
    second thread."""
    pytest.importorskip("torch")
    import edgecap.backends.torch_search as torch_search
    from edgecap.backends.torch_graphs import EagerGraph
    from edgecap.decoding.consensus import Consensus

    photos = [str(p) for p in EXAMPLES]
    photos.append(np.ascontiguousarray(np.asarray(Image.open(EXAMPLES[0]).convert("RGB"))[:, ::-1]))
    captioner = Captioner(
        default_model_dir,
        backend="torch",
        device="cpu",
        search="device",
        graph_factory=EagerGraph,
        batch_size=2,
    )
    want = [(c.text, c.score) for c in captioner.caption_batch(photos)]
    search, finished = captioner._search, captioner._finished
    searches: list[int] = []
    built: list[int] = []
    turn = threading.Condition()

    def counted_search(batch, return_attention, deferred=False):
        result = search(batch, return_attention, deferred)
        with turn:
            searches.append(len(batch))
            turn.notify_all()
        return result

    def late_finished(prepared, searched):
        k = len(built)
        built.append(k)
        with turn:  # the next batch's search over first (none after the last)
            assert turn.wait_for(lambda: len(searches) >= min(k + 2, 3), timeout=60)
        return finished(prepared, searched)

    where: dict[str, list[str]] = {"unpack": [], "consensus": []}

    def recorded(part, fn):
        def call(*args, **kwargs):
            where[part].append(threading.current_thread().name)
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(torch_search, "unpack", recorded("unpack", torch_search.unpack))
    monkeypatch.setattr(Consensus, "order", recorded("consensus", Consensus.order))
    captioner._search, captioner._finished = counted_search, late_finished
    captioner.overlap = True
    assert [(c.text, c.score) for c in captioner.caption_batch(photos)] == want
    assert searches == [2, 2, 1] and built == [0, 1, 2]
    caller = threading.current_thread().name
    assert [name.startswith("edgecap-finish") for name in where["unpack"]] == [True, True, False]
    assert [name.startswith("edgecap-finish") for name in where["consensus"]] == [True] * 4 + [False]
    assert where["consensus"][-1] == caller


def test_iter_captions_overlaps_when_asked_and_then_yields_a_batch_after_the_next_search(default_model_dir):
    """``iter_captions(overlap=True)``: the same results; the first batch's come out once the
    second batch is searched too (without it: after the first search alone)."""
    photos = _photos()
    captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0)
    want = [_fields(r) for r in captioner.caption_batch(photos, on_error="return")]
    search = captioner._search
    searched: list[int] = []

    def counted(batch, return_attention, deferred=False):
        searched.append(len(batch))
        return search(batch, return_attention, deferred)

    captioner._search = counted
    for overlap, before_the_first in ((False, 1), (True, 2)):
        searched.clear()
        results = captioner.iter_captions(photos, on_error="return", overlap=overlap)
        first = next(results)
        assert len(searched) == before_the_first, overlap
        assert [_fields(first), *map(_fields, results)] == want
    with pytest.raises(ValueError, match="overlap must be True, False or None"):
        captioner.iter_captions(photos, overlap="yes")


def test_edgecap_caption_asks_iter_captions_for_the_captioner_s_overlap(monkeypatch, capsys):
    """Over files the command line overlaps as the Captioner does (on a GPU by default: here
    the GPU default is forced on the CPU), with the captions of the README."""
    from edgecap import api
    from edgecap.cli import main

    monkeypatch.setattr(api, "_on_gpu", lambda name, device, backend: True)
    asked = []
    real = api.Captioner.iter_captions

    def recorded(self, images, *args, **kwargs):
        asked.append(kwargs.get("overlap"))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(api.Captioner, "iter_captions", recorded)
    assert main(["caption", *map(str, EXAMPLES), "--batch-size", "1", "--decode-workers", "0"]) == 0
    assert asked == [True]
    readme = (Path(edgecap.__file__).parents[1] / "README.md").read_text().splitlines()
    lines = [line.replace("edgecap/assets/examples/", "") for line in readme[10:14]]
    out = [line.split("/")[-1] for line in capsys.readouterr().out.splitlines()]
    assert out == lines
