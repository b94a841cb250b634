"""Caption time by intra-op thread count, on a quiet machine and beside busy processes: the data
behind ``Captioner(threads=...)``'s default and ``edgecap caption --threads``.

    python benchmarks/threads.py                                 # onnxruntime and torch, default,1,2
    python benchmarks/threads.py --backends onnxruntime --threads 1,2,4 --burners 2
    python benchmarks/threads.py --rounds 1 --calls 3 --out /tmp/t   # a quick try, not a figure

Each (backend, threads, load) variant runs in a fresh Python process of its own (this script with
``--worker``): it loads ``Captioner(backend=..., threads=...)`` (``default``: no ``threads``
argument, what a user gets), captions ``--warmup`` frames untimed, then times ``--calls``
captions of in-memory frames of the example photos (beam 3, batch 1, the library's other
defaults; each call the next photo). ``busy``: ``--burners`` processes spinning on the CPU
(``python -c 'while True: pass'``) run beside the worker for its whole life and are ended after
it. Rounds go over every variant in turn (the order rotated each round), so a drift in the
machine's other load hits every variant alike. The table gives each variant's median and p90 over
all its timed calls, and the spread of the per-round medians.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import _common as C

BURNER = "while True: pass"


def worker(backend: str, threads: str, warmup: int, calls: int) -> dict:
    """In the worker process: load, warm up, time ``calls`` captions -> the figures."""
    from edgecap import Captioner

    keywords = {} if threads == "default" else {"threads": int(threads)}
    t0 = time.perf_counter()
    captioner = Captioner(backend=backend, device="cpu", **keywords)
    load_s = time.perf_counter() - t0
    frames = C.example_frames()
    photo = itertools.cycle(frames)
    for _ in range(warmup):
        captioner.caption(next(photo))
    times, texts = [], []
    for _ in range(calls):
        frame = next(photo)
        t0 = time.perf_counter()
        caption = captioner.caption(frame)
        times.append((time.perf_counter() - t0) * 1e3)
        texts.append(caption.text)
    return {
        "ms": times,
        "load_s": load_s,
        "describe": captioner.backend.describe(),
        "first_caption": texts[0] if texts else None,
        "pid": os.getpid(),
    }


def run_variant(backend: str, threads: str, burners: int, args) -> dict:
    """One variant in a fresh process, with ``burners`` busy processes beside it."""
    spinning = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(burners)]
    try:
        if spinning:
            time.sleep(0.5)  # the burners are on the CPU before the worker starts
        load = C.load_average()
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    backend,
                    threads,
                    "--warmup",
                    str(args.warmup),
                    "--calls",
                    str(args.calls),
                ],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:  # the worker was killed: a result of its own
            return {
                "ms": [],
                "timed_out": True,
                "load_average": load,
                "pid": None,
                "describe": None,
                "first_caption": None,
            }
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()
    if done.returncode != 0:
        sys.exit(
            f"{backend} threads={threads}: the worker failed (exit {done.returncode}):\n"
            + done.stderr[-2000:]
        )
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average": load, "timed_out": False}


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--worker",
        nargs=2,
        metavar=("BACKEND", "THREADS"),
        help="(internal) run one variant in this process and print its JSON",
    )
    p.add_argument(
        "--backends",
        type=C.backend_names,
        default="onnxruntime,torch",
        help="Captioner backends, comma-separated",
    )
    p.add_argument(
        "--threads",
        default="default,1,2",
        help="comma-separated thread counts; 'default': no threads argument",
    )
    p.add_argument(
        "--loads",
        default="quiet,busy",
        help="quiet (the machine as it is), busy (beside --burners spinning processes) or both, "
        "comma-separated",
    )
    p.add_argument("--burners", type=int, default=1, help="busy processes beside a 'busy' variant")
    p.add_argument("--rounds", type=C.positive_int, default=3, help="fresh processes per variant")
    p.add_argument("--calls", type=C.positive_int, default=12, help="timed captions per process")
    p.add_argument("--warmup", type=C.non_negative_int, default=3, help="untimed captions per process first")
    p.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds a worker may take; one that takes longer is killed and reported as timed out",
    )
    p.add_argument("--name", default="threads", help="results file name, without suffix")
    C.add_out_argument(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def report(data: dict) -> str:
    rows = []
    for v in data["variants"].values():
        medians = v["round_medians"]
        spread = f"{min(medians):.0f}-{max(medians):.0f}" if medians else "-"
        rows.append(
            [
                v["backend"],
                v["threads"],
                v["load"],
                C.median(v["ms"]),
                C.percentile(v["ms"], 90),
                spread,
                len(v["ms"]),
                v["timed_out"] or "",
                v.get("describe") or "",
            ]
        )
    s = data["settings"]
    return (
        f"Caption of one in-memory example frame (beam 3, batch 1), {s['calls']} timed calls "
        f"after {s['warmup']} untimed per process, {s['rounds']} rounds, every variant in a "
        f"fresh process; busy: {s['burners']} `python -c 'while True: pass'` beside it. "
        "Load average (1 min) before each worker: "
        + ", ".join(sorted({str(v) for r in data["variants"].values() for v in r["load_averages"]}))
        + ".\n\n"
        + C.markdown_table(
            [
                "backend",
                "threads",
                "load",
                "median ms",
                "p90 ms",
                "round medians",
                "calls",
                "workers timed out",
                "backend says",
            ],
            rows,
        )
        + f"\n\nA worker that took over {s['timeout']:.0f} s was killed: its calls are "
        "missing from the median (which is then too low) and it is counted as timed out."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, warmup=args.warmup, calls=args.calls)))
        return
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if any(x not in ("quiet", "busy") for x in loads):
        sys.exit(f"--loads takes quiet, busy or quiet,busy; got {args.loads!r}")
    counts = [t.strip() for t in args.threads.split(",")]
    bad = [t for t in counts if t != "default" and not (t.isdigit() and int(t) > 0)]
    if bad:
        sys.exit(f"--threads takes default or thread counts of 1 or more, comma-separated; got {bad[0]!r}")
    keys = list(itertools.product(args.backends, counts, loads))
    variants = {
        "/".join(k): {
            "backend": k[0],
            "threads": k[1],
            "load": k[2],
            "ms": [],
            "round_medians": [],
            "load_averages": [],
            "pids": [],
            "timed_out": 0,
        }
        for k in keys
    }
    for r in range(args.rounds):
        for backend, threads, load in keys[r % len(keys) :] + keys[: r % len(keys)]:
            got = run_variant(backend, threads, args.burners if load == "busy" else 0, args)
            v = variants[f"{backend}/{threads}/{load}"]
            v["load_averages"].append(got["load_average"])
            if got["timed_out"]:
                v["timed_out"] += 1
                print(f"[round {r + 1}] {backend} threads={threads} {load}: timed out", file=sys.stderr)
                continue
            v["ms"] += got["ms"]
            v["round_medians"].append(C.median(got["ms"]))
            v["pids"].append(got["pid"])
            v["describe"], v["first_caption"] = got["describe"], got["first_caption"]
            print(
                f"[round {r + 1}] {backend} threads={threads} {load}: {C.median(got['ms']):.1f} ms",
                file=sys.stderr,
            )
    settings = {k: getattr(args, k) for k in ("rounds", "calls", "warmup", "burners", "timeout")}
    data = {"settings": settings, "variants": variants}
    C.write_results(args.name, data, report(data), argv, script="threads", out=args.out)


if __name__ == "__main__":
    main()
