"""``Captioner(overlap=True)``: ``caption_batch`` over several batches builds each batch's
captions in a second thread while the next batch is searched. Users rely on the results being
those of ``overlap=False`` (the same captions, in the input order, a bad input's error in its
own slot or raised after nothing is returned), on the overlap really happening (the point of
it on a GPU, where the device otherwise waits for the host between batches), and on nothing
being left running once the call returns."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import CaptionOptions, Captioner, InputError
from helpers import every_field, run_script

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
    the test sees it was not overlapped). The wait is a minute, not a few seconds: a loaded
    machine may start the other thread's build late, which is no failure of the overlap. The
    last batch's captions are built in the calling thread, and the second thread is gone when
    the call returns."""
    captioner = Captioner(default_model_dir, batch_size=1, decode_workers=0, overlap=True)
    finishing = threading.Event()
    seen: dict = {"finished_in": [], "waited": []}
    search, finished = captioner._search, captioner._finished

    def slow_search(batch, return_attention, deferred=False, options=None, held=None):
        if len(seen["waited"]) == 1:  # the second batch: only once the first is being built
            seen["waited"].append(finishing.wait(timeout=60))
        else:
            seen["waited"].append(None)
        return search(batch, return_attention, deferred, options=options, held=held)

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

    def failing_search(batch, return_attention, deferred=False, options=None, held=None):
        calls["search"] += 1
        if calls["search"] == 2:
            raise RuntimeError("the device is gone")
        return search(batch, return_attention, deferred, options=options, held=held)

    def slow_finished(prepared, searched):
        time.sleep(0.3)  # still building when the next search fails
        calls["built"] += 1
        return finished(prepared, searched)

    captioner._search, captioner._finished = failing_search, slow_finished
    with pytest.raises(RuntimeError, match="the device is gone"):
        captioner.caption_batch([str(p) for p in EXAMPLES[:3]])
    assert calls == {"search": 2, "built": 1}


def test_overlap_keeps_the_attention_asked_for(default_model_dir):
    """``return_attention=True`` with the overlap (on a GPU by default): every caption, of the
    batches built in the second thread too, has its attention, one 7x7 map per word, each
    photo's own as it is captioned alone."""
    photos = [str(p) for p in EXAMPLES[:3]]
    captioner = Captioner(default_model_dir, batch_size=1, decode_workers=0, overlap=True)
    results = captioner.caption_batch(photos, return_attention=True)
    captioner.overlap = False
    for photo, result in zip(photos, results, strict=True):
        alone = captioner.caption(photo, return_attention=True)
        assert result.text == alone.text
        assert result.attention is not None and result.attention.shape == (len(result.tokens), 7, 7)
        np.testing.assert_allclose(result.attention, alone.attention, atol=1e-5)


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

    def counted_search(batch, return_attention, deferred=False, options=None, held=None):
        result = search(batch, return_attention, deferred, options=options, held=held)
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


def _device_search_captioner(default_model_dir) -> Captioner:
    """The torch backend's device search on the CPU with the whole-decode graph's stand-in: its
    result unpacked and the consensus chosen after the search (``deferred``), batches padded
    (``graph_batch_size``: 3 images run as 4)."""
    pytest.importorskip("torch")
    from edgecap.backends.torch_graphs import EagerGraph

    return Captioner(
        default_model_dir,
        backend="torch",
        device="cpu",
        search="device",
        graph_factory=EagerGraph,
        batch_size=4,
        decode_workers=0,
        overlap=True,
    )


def _seven_photos() -> list:
    """The four example photos and three of them mirrored: a batch of 4, then one of 3."""
    mirrored = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, ::-1]) for p in EXAMPLES[:3]]
    return [*map(str, EXAMPLES), *mirrored]


def test_a_padded_last_batch_unpacked_later_gives_each_photo_its_own_caption(default_model_dir):
    """With the overlap, the last batch (3 photos run as 4, padded with copies of its last)
    unpacked after its search: each photo has its own caption and objects, those it gets
    captioned alone, the padding's dropped."""
    captioner = _device_search_captioner(default_model_dir)
    photos = _seven_photos()
    results = captioner.caption_batch(photos)
    assert len(results) == 7
    for photo, result in zip(photos, results, strict=True):
        alone = captioner.caption(photo)
        assert (result.text, result.objects) == (alone.text, alone.objects)
        assert result.score == pytest.approx(alone.score, abs=1e-4)


def test_decode_ms_counts_the_unpacking_and_consensus_done_after_the_device_search(
    default_model_dir, monkeypatch
):
    """docs/performance-options.md: with the overlap a caption's decode_ms still includes the
    unpacking and the consensus, here done after the device search (in the second thread, and
    for the last batch in this one). A clock that moves only in the consensus, 100 ms each
    photo's: every caption's decode_ms is at least its own photo's 100 ms."""
    import types

    from edgecap import api
    from edgecap.decoding.consensus import Consensus

    captioner = _device_search_captioner(default_model_dir)
    now = [0.0]
    lock = threading.Lock()
    order = Consensus.order

    def timed_order(self, *args, **kwargs):
        with lock:
            now[0] += 0.1
        return order(self, *args, **kwargs)

    monkeypatch.setattr(Consensus, "order", timed_order)
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], sleep=time.sleep, monotonic=time.monotonic)
    monkeypatch.setattr(api, "time", clock)
    results = captioner.caption_batch(_seven_photos())
    assert len(results) == 7
    assert all(r.timings["decode_ms"] >= 100 - 1e-6 for r in results), [r.timings for r in results]


def test_iter_captions_overlaps_when_asked_and_then_yields_a_batch_after_the_next_search(default_model_dir):
    """``iter_captions(overlap=True)``: the same results; the first batch's come out once the
    second batch is searched too (without it: after the first search alone)."""
    photos = _photos()
    captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0)
    want = [_fields(r) for r in captioner.caption_batch(photos, on_error="return")]
    search = captioner._search
    searched: list[int] = []

    def counted(batch, return_attention, deferred=False, options=None, held=None):
        searched.append(len(batch))
        return search(batch, return_attention, deferred, options=options, held=held)

    captioner._search = counted
    for overlap, before_the_first in ((False, 1), (True, 2)):
        searched.clear()
        results = captioner.iter_captions(photos, on_error="return", overlap=overlap)
        first = next(results)
        assert len(searched) == before_the_first, overlap
        assert [_fields(first), *map(_fields, results)] == want
    with pytest.raises(ValueError, match="overlap must be True, False or None"):
        captioner.iter_captions(photos, overlap="yes")


def _gpu_default_recording_overlaps(monkeypatch) -> list:
    """The GPU's defaults forced on the CPU; -> the list each overlapped call appends its
    Captioner's ``overlap`` to."""
    from edgecap import api

    monkeypatch.setattr(api, "_on_gpu", lambda name, device, backend: True)
    overlapped: list = []
    real = api.Captioner._overlapped

    def recorded(self, *args, **kwargs):
        overlapped.append(self.overlap)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(api.Captioner, "_overlapped", recorded)
    return overlapped


def test_edgecap_caption_overlaps_as_its_captioner_does(monkeypatch, capsys):
    """Over files the command line overlaps as the Captioner does (on a GPU by default: here
    the GPU default is forced on the CPU), with the captions of the README."""
    from edgecap.cli import main

    overlapped = _gpu_default_recording_overlaps(monkeypatch)
    assert main(["caption", *map(str, EXAMPLES), "--batch-size", "1", "--decode-workers", "0"]) == 0
    assert overlapped == [True]
    readme = (Path(edgecap.__file__).parents[1] / "README.md").read_text().splitlines()
    lines = [line.replace("edgecap/assets/examples/", "") for line in readme[10:14]]
    out = [line.split("/")[-1] for line in capsys.readouterr().out.splitlines()]
    assert out == lines


def _failing_at(captioner, n: int, failure):
    """After the captioner's ``n``-th search, ``failure()``: an exception that search raises
    instead of returning, or None (``failure`` did something else, such as closing)."""
    search = captioner._search
    calls = {"n": 0}

    def failing(batch, return_attention, deferred=False, options=None, held=None):
        calls["n"] += 1
        if calls["n"] != n:
            return search(batch, return_attention, deferred, options=options, held=held)
        result = search(batch, return_attention, deferred, options=options, held=held)
        error = failure()
        if error is not None:
            raise error
        return result

    captioner._search = failing


def _yielded(captioner, photos, overlap, match):
    got = []
    with pytest.raises(Exception, match=match):
        for result in captioner.iter_captions(photos, on_error="return", overlap=overlap):
            got.append(_fields(result))
    return got


def test_a_failing_search_costs_no_result_of_a_batch_searched_before_it(default_model_dir):
    """The third batch's search fails: the two batches before it are yielded first, with the
    overlap as without (the second one's captions were being built in the other thread)."""
    photos = [p for p in _photos() if not isinstance(p, bytes)][:6]
    results = {}
    for overlap in (False, True):
        captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0)
        _failing_at(captioner, 3, lambda: RuntimeError("the device is gone"))
        results[overlap] = _yielded(captioner, photos, overlap, "the device is gone")
    assert len(results[False]) == 4 and results[True] == results[False]


def test_close_in_another_thread_costs_no_result_of_a_batch_already_searched(default_model_dir):
    """``close()`` from another thread as the second batch's search ends: the call ends at the
    third batch with the closed error, the first two batches' captions yielded before it."""
    photos = [p for p in _photos() if not isinstance(p, bytes)][:6]
    results = {}
    for overlap in (False, True):
        captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0)

        def close(captioner=captioner):
            closer = threading.Thread(target=captioner.close)
            closer.start()
            closer.join()

        _failing_at(captioner, 2, close)
        results[overlap] = _yielded(captioner, photos, overlap, "closed")
    assert len(results[False]) == 4 and results[True] == results[False]


def test_decode_ms_still_counts_the_consensus_done_in_the_other_thread(default_model_dir, monkeypatch):
    """With the overlap the consensus runs after the search, in the other thread (and for the
    last batch in this one): a caption's decode_ms still includes it (here 50 ms a batch)."""
    from edgecap.decoding.consensus import Consensus

    order = Consensus.order

    def slow_order(self, *args, **kwargs):
        time.sleep(0.025)  # two images a batch: 50 ms, 25 ms an image's share
        return order(self, *args, **kwargs)

    monkeypatch.setattr(Consensus, "order", slow_order)
    photos = [p for p in _photos() if not isinstance(p, bytes)][:4]
    captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0, overlap=True)
    start = time.perf_counter()
    results = captioner.caption_batch(photos)
    wall_ms = (time.perf_counter() - start) * 1e3  # and no more than the call took
    assert all(25 <= r.timings["decode_ms"] <= wall_ms for r in results), [r.timings for r in results]


def test_a_pickled_captioner_keeps_its_overlap(default_model_dir):
    """Sent to another process (pickled as what made it), a Captioner keeps ``overlap`` as set
    (here on, where the CPU's default is off)."""
    import pickle

    captioner = Captioner(default_model_dir)
    captioner.overlap = True
    assert pickle.loads(pickle.dumps(captioner)).overlap is True


def test_captioning_in_a_thread_the_main_thread_left_running_overlaps_or_not(tmp_path):
    """A program whose main thread returns while another (not a daemon) still captions: once
    the interpreter begins to exit no new work goes to threads; the overlap and the split stack
    do it in the calling thread instead of failing ("cannot schedule new futures")."""
    done = run_script(
        tmp_path,
        f"""
import threading, time
import numpy as np
from edgecap import Captioner
from edgecap.backends import staging

staging.SPLIT_AT_LEAST = 0
captioner = Captioner(batch_size=1, decode_workers=0, overlap=True)
photos = {[str(p) for p in EXAMPLES[:3]]!r}
started = threading.Event()

def late():
    started.set()
    time.sleep(0.5)  # the main thread has returned by now
    for caption in captioner.caption_batch(photos):
        print(caption.text)
    arrays = [np.full((2, 3), i, np.float32) for i in range(4)]
    out = np.empty((4, 2, 3), np.float32)
    staging.stack_into(arrays, out)
    print("stacked", bool((out == np.stack(arrays)).all()))

threading.Thread(target=late).start()
started.wait()
""",
    )
    assert done.returncode == 0, done.stderr
    readme = (Path(edgecap.__file__).parents[1] / "README.md").read_text().splitlines()[10:13]
    assert done.stdout.splitlines() == [line.split("\t")[1] for line in readme] + ["stacked True"]


def test_a_batch_that_cannot_be_read_costs_no_result_of_one_searched_before_it(
    default_model_dir, monkeypatch
):
    """Reading the third batch fails (the decoding workers shut down under the call, say): the
    second batch, searched and not yet built, is built and yielded before the error."""
    from edgecap import api

    real = api.Captioner._parts

    def two_then_broken(chunks, on_error, before_error):
        parts = real(chunks, on_error, before_error)
        yield next(parts)
        yield next(parts)
        raise RuntimeError("no third batch")

    monkeypatch.setattr(api.Captioner, "_parts", staticmethod(two_then_broken))
    photos = [p for p in _photos() if not isinstance(p, bytes)][:6]
    results = {}
    for overlap in (False, True):
        captioner = Captioner(default_model_dir, batch_size=2, decode_workers=0)
        results[overlap] = _yielded(captioner, photos, overlap, "no third batch")
    assert len(results[False]) == 4 and results[True] == results[False]


def test_no_overlap_on_the_command_line_turns_it_off_where_it_would_be_on(monkeypatch, capsys):
    """``--no-overlap``: where the overlap is the default (a GPU, forced here on the CPU), the
    command line builds each batch's captions before the next search, with the same output."""
    from edgecap import api
    from edgecap.cli import main

    monkeypatch.setattr(api, "_on_gpu", lambda name, device, backend: True)
    overlaps = []
    real = api.Captioner._results

    def recorded(self, *args, **kwargs):
        overlaps.append(kwargs.get("overlap"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(api.Captioner, "_results", recorded)
    outputs = []
    for flags in ([], ["--no-overlap"]):
        argv = ["caption", *map(str, EXAMPLES), "--batch-size", "1", "--decode-workers", "0", *flags]
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert overlaps == [True, False] and outputs[0] == outputs[1]


def test_edgecap_eval_overlaps_as_its_captioner_does(default_model_dir, monkeypatch):
    """``edgecap eval`` captions its split with the Captioner's overlap (on a GPU by default,
    forced here on the CPU; off with ``overlap=False``, which ``--no-overlap`` gives), with
    the same captions either way."""
    from edgecap.data.readers import CaptionedImage
    from edgecap.evaluation.evaluate import caption_split

    overlapped = _gpu_default_recording_overlaps(monkeypatch)
    items = [CaptionedImage(p.name, ["a photo"], i) for i, p in enumerate(EXAMPLES)]
    texts = []
    for overlap in (None, False):
        captioner = Captioner(default_model_dir, batch_size=1, decode_workers=0, overlap=overlap)
        texts.append(caption_split(captioner, items, EXAMPLES[0].parent))
    assert overlapped == [True] and texts[0] == texts[1] and len(texts[0]) == len(EXAMPLES)


@pytest.mark.parametrize("overlap", [False, True])
def test_options_set_between_two_results_of_iter_captions_leave_its_captions_as_they_began(
    default_model_dir, overlap
):
    """``options`` set by the loop over ``iter_captions`` after its first result (with the
    overlap, the second batch is being searched then; without, the first is built): the rest of
    its results are a sequential call's with the options it was called with, every field of
    them; the next call is one with the new options. Before, with the overlap the second batch
    came with the new objects and no confidence (the fusion weight above the confidence
    model's), without it the third batch with the new search."""
    photos = [str(p) for p in EXAMPLES] * 2
    old = CaptionOptions(batch_size=2)
    new = dataclasses.replace(old, fusion_weight=2.0, objects=1, beam_size=1, length_penalty=2.0)
    want = {}
    for options in (old, new):
        with Captioner(default_model_dir, options=options, decode_workers=0) as sequential:
            want[options] = [every_field(r) for r in sequential.caption_batch(photos)]
    assert [r[3] for r in want[old]] != [r[3] for r in want[new]]  # the objects differ
    captioner = Captioner(default_model_dir, options=old, decode_workers=0)
    got = []
    for result in captioner.iter_captions(photos, overlap=overlap):
        got.append(every_field(result))
        captioner.options = new
    assert got == want[old]
    assert [every_field(r) for r in captioner.iter_captions(photos, overlap=overlap)] == want[new]
