"""One Captioner shared by several threads gives the same captions as sequential calls, with
the threads forced to interleave, so shared state mixes their images every time, not only when
the scheduler happens to interleave them:

- ``helpers.LockstepSessions``: a barrier before every decoder step, so the searches run word by
  word together (decoding state kept on the backend instead of the session: h/c);
- ``helpers.LineLockstep``: every line of the package's Python code in turn, so anything two
  calls share (an attribute of the Captioner, a module-level cache) is written between each
  other's lines.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap import CaptionOptions, Captioner
from helpers import LineLockstep, LockstepSessions, TableBackend, every_field, in_forked_child, solid

EXAMPLES = Path(edgecap.__file__).parent / "assets" / "examples"
CHELSEA, ROCKET, COFFEE, ASTRONAUT = (
    str(EXAMPLES / n) for n in ("chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png")
)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def captioner(request):
    pytest.importorskip(request.param)
    if request.param == "torch":
        pytest.importorskip("onnx")
    captioner = Captioner(backend=request.param)
    # A backend that is not thread-safe is serialised by the Captioner: lockstep would wait
    # for a thread that cannot start. The backends tested here share no per-call state.
    assert captioner.backend.thread_safe
    return captioner


def _in_lockstep(captioner, calls):
    """Run ``calls`` (functions of the captioner), one thread each, their searches in lockstep.
    -> (results in order, decoder steps taken by all threads together)."""
    original_start = captioner.backend.start
    lockstep = LockstepSessions(captioner.backend, len(calls))
    results, errors = [None] * len(calls), []

    def work(i, call):
        try:
            results[i] = call(captioner)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            lockstep.leave()  # the others go on without this thread

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        captioner.backend.start = original_start
    if errors:
        raise errors[0]
    return results, lockstep.steps_together


def _check(captioner, calls):
    sequential = [call(captioner) for call in calls]
    together, steps = _in_lockstep(captioner, calls)
    # The searches really ran word by word together (each caption here has at least 8 words).
    assert steps >= 8
    assert together == sequential


@pytest.mark.parametrize(
    "calls",
    [
        # two single images
        [lambda c: c.caption(CHELSEA), lambda c: c.caption(ROCKET)],
        # a batch of two beside one image (different row counts)
        [lambda c: c.caption_batch([COFFEE, ASTRONAUT]), lambda c: c.caption(CHELSEA)],
    ],
    ids=["two-images", "batch-beside-image"],
)
def test_interleaved_searches_give_sequential_captions(captioner, calls):
    _check(captioner, calls)


def test_four_threads_in_lockstep():
    """onnxruntime only: four torch threads on a small CPU oversubscribe it (slow, not wrong)."""
    pytest.importorskip("onnxruntime")
    _check(
        Captioner(backend="onnxruntime"),
        [lambda c, p=p: c.caption(p) for p in (CHELSEA, ROCKET, COFFEE, ASTRONAUT)],
    )


def _same_size_arrays(*paths, size=(320, 240)) -> list[np.ndarray]:
    """Photos as RGB arrays of one size: different pictures that take the same code path up to
    the search, so line-by-line turns keep the threads at the same line until then."""
    return [np.asarray(Image.open(p).convert("RGB").resize(size)) for p in paths]


def _line_by_line(captioner, calls):
    """Run ``calls`` (functions of the captioner), one thread each, every line of package code
    in turn. -> (results in order, number of turns)."""
    assert captioner.backend.thread_safe  # else the Captioner's lock would hold the baton
    lockstep = LineLockstep(Path(edgecap.__file__).parent, len(calls))
    results, errors = [None] * len(calls), []

    def work(i, call):
        try:
            results[i] = lockstep.run(lambda: call(captioner))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, lockstep.switches


def _with_attention_flag(caption):
    # Caption equality ignores the attention maps: say whether they came back.
    return caption, caption.attention is not None


@pytest.mark.parametrize("case", ["two-images", "two-batches", "attention-beside-none"])
def test_package_code_interleaved_line_by_line_gives_sequential_captions(case):
    pytest.importorskip("onnxruntime")
    a, b, c, d = _same_size_arrays(CHELSEA, ROCKET, COFFEE, ASTRONAUT)
    calls = {
        "two-images": [lambda cap: cap.caption(a), lambda cap: cap.caption(b)],
        "two-batches": [lambda cap: cap.caption_batch([a, c]), lambda cap: cap.caption_batch([d, b])],
        "attention-beside-none": [
            lambda cap: _with_attention_flag(cap.caption(a, return_attention=True)),
            lambda cap: _with_attention_flag(cap.caption(b)),
        ],
    }[case]
    captioner = Captioner(backend="onnxruntime")
    sequential = [call(captioner) for call in calls]
    together, switches = _line_by_line(captioner, calls)
    assert switches > 1000  # really interleaved, line by line
    assert together == sequential


# Two tables of the same shape over different words, chosen by the image's colour: the two
# threads' searches take the same path line for line, so they stay aligned to the end, and each
# would repeat its two words forever without the trigram block (<end> is likely only after
# "fast", which is 2.0 less likely than the cycle's next word).
def _cycle_of(w1: str, w2: str):
    return {
        None: {w1: -0.1, w2: -2.0, "fast": -3.0},
        w1: {w2: -0.1, "fast": -2.0, "<end>": -4.0},
        w2: {w1: -0.1, "fast": -2.0, "<end>": -3.0},
        "fast": {"<end>": -0.1, w1: -2.0, w2: -3.0},
    }


TABLES = {"red": _cycle_of("a", "dog"), "blue": _cycle_of("cat", "runs")}


def _by_colour(prefix, key):
    table = TABLES["red" if key > 0 else "blue"]  # channel 0: red 255 -> 1.0, 0 -> -1.0
    return table.get(prefix[-1] if prefix else None, {"<end>": -0.1})


def test_searches_of_a_fake_model_interleaved_line_by_line(monkeypatch):
    words = json.loads((Path(edgecap.__file__).parent / "assets" / "default" / "vocab.json").read_text())[
        "words"
    ]
    monkeypatch.setattr(
        edgecap.api,
        "load_backend",
        lambda name, manifest, **kw: TableBackend(words, _by_colour, top_k=10, keyed=True),
    )
    captioner = Captioner(backend="onnxruntime", blank_check=False)  # one-colour frames
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    calls = [lambda cap: cap.caption(red), lambda cap: cap.caption(blue)]
    sequential = [call(captioner) for call in calls]
    assert [s.text.split()[:2] for s in sequential] == [["a", "dog"], ["cat", "runs"]]
    together, switches = _line_by_line(captioner, calls)
    assert switches > 1000
    assert together == sequential


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_captions_with_a_captioner_whose_workers_ran(tiny_model_dir):
    """A process that has captioned with decoding workers, then forks (a multiprocessing pool on
    Linux, whose default start method is fork before Python 3.14): the child captions with the
    same Captioner, the parent's captions. The child has none of the parent's worker threads,
    and the pool's idle count still said its threads were waiting, so the child's batch waited
    for them forever (the child hung). Guarded: a child still waiting after 60 s is ended by
    SIGALRM."""
    captioner = Captioner(tiny_model_dir, max_length=6, decode_workers=2)
    photos = [CHELSEA, COFFEE, ROCKET]
    expected = [c.text for c in captioner.caption_batch(photos)]  # the workers run, then wait
    code, said = in_forked_child(lambda: json.dumps(_texts(captioner.caption_batch(photos))))
    assert code == 0, said
    assert json.loads(said) == expected
    assert [c.text for c in captioner.caption_batch(photos)] == expected  # the parent goes on
    captioner.close()


def _texts(captions) -> list[str]:
    return [c.text for c in captions]


def test_a_captioner_goes_to_a_spawned_worker_as_what_made_it(tiny_model_dir):
    """``pool.map(captioner.caption, paths)`` with the spawn start method (macOS's and Windows'
    default, Linux's from Python 3.14) pickles the Captioner: it failed ('cannot pickle
    onnxruntime...InferenceSession'). It goes as what made it (model folder, backend, options,
    settings) and each worker process makes it once, however many tasks bring it: the same
    captions, with the options it was given (max_length 4 here, beam 2). Unpickled in this
    process: one Captioner for every copy (made once); a closed one cannot be sent."""
    import multiprocessing
    import pickle

    captioner = Captioner(tiny_model_dir, max_length=4, beam_size=2, decode_workers=0)
    photos = [CHELSEA, COFFEE, ROCKET, ASTRONAUT]
    expected = _texts(captioner.caption_batch(photos))
    copy = pickle.loads(pickle.dumps(captioner))
    assert copy is not captioner and copy is pickle.loads(pickle.dumps(captioner))
    assert (copy.options, copy.decode_workers) == (captioner.options, 0)
    assert _texts(copy.caption_batch(photos)) == expected
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert _texts(pool.map(captioner.caption, photos, chunksize=1)) == expected
    captioner.close()
    with pytest.raises(TypeError, match="this Captioner is closed: it cannot be sent to another process"):
        pickle.dumps(captioner)
    copy.close()


def test_a_captioner_sent_again_with_other_settings_is_the_one_made_before(tiny_model_dir):
    """A worker that gets the Captioner again after the sender changed ``decode_workers`` or
    ``overlap`` (settings that may change between calls) keeps one model, with the new settings:
    it made and kept another whole Captioner per value sent (70 MB and the runtime's threads
    each, for as long as the worker lived)."""
    import pickle

    from edgecap import api

    captioner = Captioner(tiny_model_dir, max_length=4, decode_workers=0, overlap=False)
    first = pickle.loads(pickle.dumps(captioner))
    try:
        held = len(api._MADE_AGAIN)
        for workers, overlap in ((1, False), (2, True), (0, False)):
            captioner.decode_workers, captioner.overlap = workers, overlap
            again = pickle.loads(pickle.dumps(captioner))
            assert again is first
            assert (again.decode_workers, again.overlap) == (workers, overlap)
        assert len(api._MADE_AGAIN) == held
        with Captioner(tiny_model_dir, max_length=5) as other:  # other options: a model of its own
            with pickle.loads(pickle.dumps(other)) as made:
                assert made is not first
    finally:
        captioner.close()
        first.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_waits_for_the_batch_another_thread_runs(tiny_model_dir):
    """A process forks (a multiprocessing pool made by a robot app, os.fork) while another thread
    is inside a batch: onnxruntime holds its own mutexes while it runs, and a child that inherited
    them held hung on its first caption (1 fork in 10 to 40 with the shipped model). The fork
    waits for the batch to end. Here the encoder holds a lock while it runs, as onnxruntime
    does, for 0.3 s: the child finds it free and captions with the same Captioner, the parent's
    captions; the parent's batch ends with its own."""
    import time

    captioner = Captioner(tiny_model_dir, max_length=6, decode_workers=0)
    photos = [CHELSEA, COFFEE]
    expected = _texts(captioner.caption_batch(photos))
    running = threading.Lock()  # what onnxruntime holds while it runs
    inside = threading.Event()
    encode = captioner.backend.encode

    def encode_holding(x):
        if not running.acquire(timeout=5):
            raise RuntimeError("the encoder's lock is held by a thread this process does not have")
        try:
            inside.set()
            time.sleep(0.3)
            return encode(x)
        finally:
            running.release()

    captioner.backend.encode = encode_holding
    parent: list[list[str]] = []
    thread = threading.Thread(target=lambda: parent.append(_texts(captioner.caption_batch(photos))))
    thread.start()
    assert inside.wait(30)
    code, said = in_forked_child(lambda: json.dumps(_texts(captioner.caption_batch(photos))))
    thread.join(30)
    assert code == 0, said
    assert said == json.dumps(expected)
    assert parent == [expected]
    captioner.close()


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.register_at_fork")
def test_a_batch_begun_while_a_fork_is_under_way_waits_for_its_end(tiny_model_dir):
    """The other side of the test above: a thread that begins a batch while the process forks
    (between the hooks os.fork runs before and after, called here as it calls them) does not
    start it until the fork is done, so no child inherits a lock its run holds. And once the
    calls end no thread is counted inside a batch (a thread left counted would make every
    later fork wait out BATCHES_WAIT_S for it)."""
    from edgecap import api

    captioner = Captioner(tiny_model_dir, max_length=6, decode_workers=0)
    expected = _texts(captioner.caption_batch([CHELSEA]))
    assert api._batches == {}
    entered = threading.Event()
    encode = captioner.backend.encode

    def encode_seen(x):
        entered.set()
        return encode(x)

    captioner.backend.encode = encode_seen
    said: list[list[str]] = []
    api._before_fork()  # os.fork's "before" hook
    try:
        thread = threading.Thread(target=lambda: said.append(_texts(captioner.caption_batch([CHELSEA]))))
        thread.start()
        assert not entered.wait(0.5), "a batch began while the process forked"
    finally:
        api._after_fork_in_parent()  # and its "after, in the parent" one
    thread.join(30)
    assert entered.is_set() and said == [expected]
    assert api._batches == {}
    captioner.close()


def test_the_interpreter_exits_cleanly_while_a_daemon_thread_captions(tiny_model_dir, tmp_path):
    """A robot app captions in a daemon thread and its main thread exits (sys.exit, the end of
    the script, Ctrl-C): a daemon thread whose onnxruntime run ended while the interpreter was
    finalizing was ended by Python in onnxruntime's frames, which aborts ('terminate called
    without an active exception', SIGABRT: exit code 134 as the shell says, a core dump, a
    failure for systemd). The exit waits for the batch and the daemon thread starts no other:
    exit code 0, nothing on stderr. Here the main thread exits 50 ms into the encoder's run, and
    an object of its module takes 1 s to go, so that the run ends while the interpreter
    finalizes whatever the machine's speed."""
    import subprocess
    import sys

    script = tmp_path / "app.py"
    script.write_text(
        f"""
import sys, threading, time
from edgecap import Captioner

captioner = Captioner({str(tiny_model_dir)!r}, max_length=6, batch_size=8, decode_workers=0)
photos = {[CHELSEA, COFFEE, ROCKET, ASTRONAUT]!r} * 2
inside = threading.Event()
encode = captioner.backend.encode


def encode_saying(x):
    inside.set()
    return encode(x)


captioner.backend.encode = encode_saying


def loop():
    while True:
        captioner.caption_batch(photos)


class SlowToGo:
    def __del__(self):
        time.sleep(1.0)  # while the interpreter finalizes: the run ends meanwhile


slow_to_go = SlowToGo()
threading.Thread(target=loop, daemon=True).start()
inside.wait(60)
time.sleep(0.05)  # the daemon thread inside onnxruntime's run
sys.exit(0)
"""
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


# Options another thread may set while a call runs (docs/python-api.md): every field they touch
# differs from the defaults', so a caption that took any of them from the new options shows it.
# NEW_PENALTY: the length penalty turns the score back into the confidence's signals, the
# objects count, the blank check and brightening of the host's preprocessing; NEW_FUSION: a
# fusion weight above the confidence model's (captions get no confidence) and a narrower beam.
OLD = CaptionOptions(batch_size=2)
NEW_PENALTY = replace(OLD, length_penalty=2.0, objects=1, blank_check=False, brighten=False)
NEW_FUSION = replace(OLD, fusion_weight=2.0, objects=1, beam_size=1)


def _options_photos() -> list:
    """The example photos, a blank frame and a dark one (a fifth of a photo's light)."""
    dark = np.asarray(Image.open(CHELSEA).convert("RGB"), np.float64) * 0.2
    return [
        CHELSEA,
        ROCKET,
        COFFEE,
        ASTRONAUT,
        solid((128, 128, 128), (320, 240)),
        np.round(dark).astype(np.uint8),
    ]


@pytest.fixture(scope="module")
def sequential_under():
    """Options -> the photos' captions from a Captioner of its own, made with them."""
    pytest.importorskip("onnxruntime")
    made: dict = {}

    def under(options):
        if options not in made:
            with Captioner(backend="onnxruntime", options=options) as captioner:
                made[options] = [every_field(r) for r in captioner.caption_batch(_options_photos())]
        return made[options]

    return under


@pytest.mark.parametrize("new", [NEW_PENALTY, NEW_FUSION], ids=["penalty", "fusion"])
@pytest.mark.parametrize("when", ["preparing", "searched", "overlapped"])
def test_options_set_during_a_call_leave_its_captions_those_of_the_options_it_began_with(
    sequential_under, new, when
):
    """Another thread sets ``options`` while a call runs (here from inside the call, at the
    point where such a thread's change would land): while the call prepares its first photo,
    or between the first batch's search and the building of its captions (the second batch,
    with ``overlap``, searched meanwhile). Every result is the one a sequential call with the
    options it began with gives (text, score, objects, confidence, blank frame), and the next
    call is one with the new options. Before, the captions searched with the old options got
    the new number of object tags and a confidence worked out under the new ones (0.2579
    instead of 0.1078 for the astronaut; None at fusion weight 2), and a change while the
    photos were prepared gave the batch the new search."""
    old_results, new_results = sequential_under(OLD), sequential_under(new)
    # every kind of field differs between the two sets, so a mix of them shows
    assert {len(r[3]) for r in old_results} == {5} and {len(r[3]) for r in new_results} == {1}
    assert [r[4] for r in old_results] != [r[4] for r in new_results]
    captioner = Captioner(backend="onnxruntime", options=OLD, decode_workers=0, overlap=when == "overlapped")
    hooked = "_prepare" if when == "preparing" else "_search"
    real = getattr(captioner, hooked)
    changes = []

    def setting_the_options(*args, **kwargs):
        result = real(*args, **kwargs)
        if not changes:
            changes.append(True)
            captioner.options = new
        return result

    setattr(captioner, hooked, setting_the_options)
    got = [every_field(r) for r in captioner.caption_batch(_options_photos())]
    assert changes and captioner.options == new
    assert got == old_results
    assert [every_field(r) for r in captioner.caption_batch(_options_photos())] == new_results


def test_an_exit_hook_that_joins_a_daemon_captioning_thread_returns(tiny_model_dir, tmp_path):
    """A robot app's shutdown hook (atexit, registered before edgecap.api was imported: a lazy
    import, a plugin) stops its daemon captioning thread and joins it. atexit runs the hooks
    last registered first, so edgecap's own had already held the thread's next batch, for good:
    the join waited forever and the process never exited (4 runs in 6, by the moment of the
    exit). The held batch ends the thread (SystemExit, which a thread ends on quietly) instead.
    Here the thread's first batch waits for the exit to begin, so that the next one, in the
    same call, is asked for during the exit every time."""
    import subprocess
    import sys

    script = tmp_path / "app.py"
    script.write_text(
        f"""
import atexit, sys, threading, time

stop = threading.Event()


def stop_captioning():
    stop.set()
    worker.join()
    print("joined", flush=True)


atexit.register(stop_captioning)  # before edgecap.api is imported: run after its own hook

from edgecap import Captioner, api

captioner = Captioner({str(tiny_model_dir)!r}, max_length=6, batch_size=2, decode_workers=0)
photos = {[CHELSEA, COFFEE, ROCKET, ASTRONAUT]!r}  # two batches a call
inside = threading.Event()
encode = captioner.backend.encode


def encode_at_the_exit(x):
    inside.set()
    deadline = time.monotonic() + 60
    while not api._exiting and time.monotonic() < deadline:
        time.sleep(0.005)
    return encode(x)


captioner.backend.encode = encode_at_the_exit


def loop():
    while not stop.is_set():
        captioner.caption_batch(photos)


worker = threading.Thread(target=loop, daemon=True)
worker.start()
inside.wait(60)
sys.exit(0)
"""
    )
    # about a second; a process that never exits is ended by the timeout (an error, not a hang)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "joined\n", "")
