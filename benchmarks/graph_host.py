"""The host's work per word of the beam search whose bookkeeping is in the step graph
(``search="graph"``: onnxruntime, and TensorRT's beam-step engine): what the CPU does between
two runs of the graph, which a GPU runtime waits for at every word.

    python benchmarks/graph_host.py [--out DIR] [--data DIR] [--photos 40] [--rounds 3] [--batch 1]
                                    [--lms graph|host] [--session numpy|binding] [--replays 20]

The shipped model on onnxruntime CPU (one thread, ``search="graph"``, the default caption
options: the tag bonus, the fused language models, no repeated trigram), beam 3, ``--batch``
photos a call (the photos in turn), in memory: the first ``--photos`` of each photo set (the
everyday photos of ``coco-ood-dev``, where the fusion gate gives most photos the language
models, and Flickr8k dev, where it gives most of them none). Per call, from the search's start
to its hypotheses:

- *search*: the whole search, wall time;
- *graph runs*: inside the beam-step graph's session runs (on a GPU runtime the device's
  work and the copies; here the CPU's);
- *host*: the rest (search - graph runs): the host's own work, per call and per word
  (``words``: the graph runs of a call). On a GPU runtime this is what the device waits for
  between two words.

- *loop replayed*: the search loop's own host side (``graph_beam_search``: not the session's
  setup nor the choice among the endings after it), per word, re-run on the graph's results
  recorded in one more call of each batch (``--replays`` times, the median; each re-run must
  give the recorded call's hypotheses): the same decisions without the graph's runs in
  between, which on the CPU provider leave the host's caches cold. On a GPU runtime the
  device runs the graph and the host's caches stay warmer.

- *words with blocks*: the words of a call whose step was given words a row may not take (the
  first word's never-first words, the n-gram rule's), and what goes up for them: R x
  ``MAX_BLOCKED`` int32 ids each (``blocked_words``), against R x V float32 (``word_block``,
  what went up until 2026-12-07), R the call's rows.

``--lms``: where the fused language models step: ``graph`` (in the beam-step graph, what the
graph search does) or ``host`` (in their own session between two runs of the graph, what it did
until 2026-12-07). ``--session``: the beam-step session, ``numpy`` (numpy feeds, what the CPU
provider runs) or ``binding`` (the I/O-binding session a GPU provider runs, here on the CPU
provider with device 'cpu': its host work a word, the bind calls and copies, is the GPU's).
Each set's medians over
``--rounds`` passes over its photos, after one pass to warm up. Compare the two (or two
checkouts) each in its own process, run alternately.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SETS = {"everyday (coco-ood-dev)": "coco-ood-dev/images", "Flickr8k dev": "flickr8k"}


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_out_argument(p)
    p.add_argument(
        "--data",
        type=Path,
        default=C.REPO.parent / "shared" / "data",
        help="the folder holding coco-ood-dev/ and flickr8k/ (default: %(default)s)",
    )
    p.add_argument("--photos", type=int, default=40, help="photos of each set (default: 40)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the photos (default: 3)")
    p.add_argument(
        "--batch",
        type=C.positive_int,
        default=1,
        help="photos a call; --photos a multiple of it (default: 1)",
    )
    p.add_argument(
        "--lms",
        choices=("graph", "host"),
        default="graph",
        help="where the fused language models step (default: graph, as on a device)",
    )
    p.add_argument(
        "--session",
        choices=("numpy", "binding"),
        default="numpy",
        help="the beam-step session: numpy feeds (what the CPU provider runs) or I/O binding "
        "(what a GPU provider runs, here with device 'cpu') (default: numpy)",
    )
    p.add_argument(
        "--replays",
        type=C.positive_int,
        default=20,
        help="times each call's host side is re-run on its recorded graph results (default: 20)",
    )
    return p


def set_photos(data: Path, folder: str, n: int) -> list[Path]:
    """The first ``n`` photos of a set: Flickr8k's dev list in its order, else the folder's
    files by name."""
    if folder == "flickr8k":
        names = (data / "flickr8k" / "Flickr_8k.devImages.txt").read_text().split()[:n]
        return [data / "flickr8k" / "images" / name for name in names]
    return sorted((data / folder).iterdir())[:n]


class Timed:
    """The beam-step sessions' runs, wrapped: their summed wall time and count; and the steps
    given blocked words (``counting_blocks``)."""

    def __init__(self):
        self.seconds, self.runs, self.blocks = 0.0, 0, 0

    @contextlib.contextmanager
    def counting_blocks(self):
        """Within: count the steps of every beam-step session (numpy feeds or I/O binding)
        given blocked words (the classes' step wrapped, and put back after)."""
        from edgecap.backends.ort_beam import IOBindingBeamSession, OnnxBeamSession

        def counting(real):
            def step(session, tokens, source_rows, scores, word_bias, blocked_words):
                self.blocks += blocked_words is not None
                return real(session, tokens, source_rows, scores, word_bias, blocked_words)

            return step

        with C.steps_wrapped((OnnxBeamSession, IOBindingBeamSession), counting):
            yield

    def wrap(self, session) -> None:
        """Time ``session``'s runs: with numpy feeds (``run``) and with I/O binding
        (``run_with_iobinding``)."""
        if getattr(session, "_graph_host_timed", False):
            return
        for name in ("run", "run_with_iobinding"):
            real = getattr(session, name)

            def run(*args, _real=real, **kwargs):
                start = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.runs += 1

            setattr(session, name, run)
        session._graph_host_timed = True


def _same(a, b) -> bool:
    def key(hyps):
        return [[(h.tokens, h.log_prob, h.score, h.rank_score, h.finished) for h in image] for image in hyps]

    return key(a) == key(b)


def replayed(search_once, replays: int) -> tuple[float, int]:
    """The host's side of one search (``search_once()``), re-run ``replays`` times on the
    beam-step results its graph gave: the median ms and the words. Each re-run must give the
    recorded call's hypotheses."""
    from edgecap.decoding import graph_search

    real = graph_search.graph_beam_search
    recorded: list = []

    def recording(session, *args, **kwargs):
        results: list = []

        class Recorder:
            def step(self, *inputs):
                results.append(session.step(*inputs))
                return results[-1]

        hypotheses = real(Recorder(), *args, **kwargs)
        recorded.append((results, args, kwargs, hypotheses))
        return hypotheses

    graph_search.graph_beam_search = recording
    try:
        search_once()
    finally:
        graph_search.graph_beam_search = real
    [(results, args, kwargs, want)] = recorded

    class Replay:
        def __init__(self):
            self.steps = iter(results)

        def step(self, *inputs):
            return next(self.steps)

    seconds = []
    for _ in range(replays):
        start = time.perf_counter()
        got = real(Replay(), *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        if not _same(got, want):
            raise RuntimeError("a replayed search gave other hypotheses than its recorded call")
    return 1e3 * statistics.median(seconds), len(results)


def measure(captioner, inputs, rounds: int, timed: Timed, replays: int = 20) -> dict:
    from edgecap.build.beam_step import MAX_BLOCKED
    from edgecap.decoding import search

    backend, vocab = captioner.backend, captioner.vocab
    rules = (vocab.start, vocab.end, len(vocab), captioner.classes, captioner.fusion)
    calls: list[tuple[float, float, int]] = []
    blocked: list[int] = []

    def once(batch):
        encoded = backend.encode(batch)
        seconds, runs, blocks = timed.seconds, timed.runs, timed.blocks
        start = time.perf_counter()
        search(backend, encoded, captioner.options, *rules)
        wall = time.perf_counter() - start
        blocked.append(timed.blocks - blocks)
        return wall, timed.seconds - seconds, timed.runs - runs

    for batch in inputs:  # warm: every session made, then wrapped (once for every set)
        once(batch)
    for session in backend._graph_search._sessions.values():
        timed.wrap(session)
    blocked.clear()
    for _ in range(rounds):
        calls += [once(batch) for batch in inputs]
    replays_ms = [
        replayed(lambda b=batch: search(backend, backend.encode(b), captioner.options, *rules), replays)
        for batch in inputs
    ]
    rows = len(inputs[0]) * captioner.options.beam_size
    search_ms = [1e3 * wall for wall, _, _ in calls]
    graph_ms = [1e3 * inside for _, inside, _ in calls]
    host_ms = [s - g for s, g in zip(search_ms, graph_ms)]
    return {
        "calls": len(calls),
        "words": statistics.median(runs for _, _, runs in calls),
        "search_ms": statistics.median(search_ms),
        "graph_ms": statistics.median(graph_ms),
        "host_ms": statistics.median(host_ms),
        "host_ms_per_word": statistics.median(h / runs for h, (_, _, runs) in zip(host_ms, calls)),
        "replayed_ms_per_word": statistics.median(ms / words for ms, words in replays_ms),
        "words_with_blocks": statistics.median(blocked),
        "block_bytes": statistics.median(blocked) * rows * MAX_BLOCKED * 4,
        "block_bytes_as_matrix": statistics.median(blocked) * rows * len(captioner.vocab) * 4,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.photos % args.batch:
        sys.exit(f"--photos {args.photos} is not a multiple of --batch {args.batch}")
    import numpy as np

    from edgecap import Captioner
    from edgecap.images import load_rgb, preprocess

    captioner = Captioner(backend="onnxruntime", threads=1, search="graph")
    captioner.backend._graph_search.lms_in_graph = args.lms == "graph"
    if args.session == "binding":  # the GPU providers' session, on the CPU provider
        from edgecap.backends.ort_gpu import IOBindingDecoder

        backend = captioner.backend
        backend._device_decoder = IOBindingDecoder(
            backend.encoder, backend.decoder, captioner.manifest.dims.vocab_size, device="cpu"
        )
    timed = Timed()
    rows = []
    for label, folder in SETS.items():
        paths = set_photos(args.data, folder, args.photos)
        photos = [preprocess([load_rgb(str(p))], captioner.manifest.preprocessing)[0] for p in paths]
        inputs = [np.stack(photos[i : i + args.batch]) for i in range(0, len(photos), args.batch)]
        with timed.counting_blocks():
            figures = measure(captioner, inputs, args.rounds, timed, args.replays)
        rows.append({"set": label, "photos": len(paths), **figures})
        print(f"{label}: host {figures['host_ms_per_word']:.3f} ms a word", file=sys.stderr)
    table = C.markdown_table(
        [
            "photos",
            "calls",
            "words a call",
            "search ms",
            "graph runs ms",
            "host ms",
            "host ms a word",
            "loop replayed, ms a word",
            "words with blocks",
            "their bytes up (R x V float32 until 2026-12-07)",
        ],
        [
            [
                f"{r['set']}, {r['photos']}",
                r["calls"],
                r["words"],
                r["search_ms"],
                r["graph_ms"],
                r["host_ms"],
                r["host_ms_per_word"],
                r["replayed_ms_per_word"],
                r["words_with_blocks"],
                f"{r['block_bytes']:,.0f} ({r['block_bytes_as_matrix']:,.0f})",
            ]
            for r in rows
        ],
    )
    where = "in the graph" if args.lms == "graph" else "on the host"
    session = "numpy feeds" if args.session == "numpy" else "I/O binding (device 'cpu')"
    markdown = (
        f'onnxruntime CPU, one thread, search="graph", beam 3, batch {args.batch}, default options, the '
        f"language models stepped {where}, the beam-step session with {session}; medians per call. "
        f"Load average before: {C.load_average()}."
        f"\n\n{table}\n"
    )
    data = {"lms": args.lms, "session": args.session, "batch": args.batch, "rows": rows}
    C.write_results("graph_host", data, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
