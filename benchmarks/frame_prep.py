"""What the frames' preprocessing costs on the host (Pillow and numpy: ``edgecap.images.preprocess``
and the blank-frame check) and on a torch device (``TorchBackend(preprocess="device")``:
``edgecap.backends.torch_preprocess``), per frame, by frame size and batch size.

    python benchmarks/frame_prep.py [--device cpu|cuda] [--sizes 224x224,640x480] [--batches 1,8,32]

Frames: smooth random images (the cost does not depend on the content), each batch of one size,
as a camera gives them. Per (size, batch): the torch operations the device path dispatches for
the batch (views included; on a GPU each computing one is a kernel), then ``--repeats`` timed
calls of each path after one warm-up, alternating, in this one process with one torch thread
(no thread pool left spinning between them); on CUDA each device call ends with a
synchronisation. Medians in ms per frame. The device path's output is checked against the
host's (equal bit for bit) before timing.

``--threads 0,1,2`` (``--threads-only``: that alone): also what a ``Captioner``'s decoding
workers do for each in-memory frame (``Captioner._prepare``: the checks, resize,
normalisation, brightening and blank check; the shipped model's preprocessing) over one batch
of ``--thread-batch`` VGA frames, in the calling thread (0) and spread over N threads (a
``ThreadPoolExecutor``, as the workers are), the settings interleaved: frames/s, the speed-up
over the calling thread's and the minor page faults a frame. Where the speed-up stays near 1
with more threads, something serialises the workers: the cores the process may use, the GIL,
or the kernel's page faults for fresh memory (glibc gives the worker threads' big blocks back
and faults them in again; ``--keep-freed-memory`` keeps them, as ``edgecap.allocator`` does).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--device", default="cpu", help="torch device of the device path (cpu, cuda)")
    p.add_argument("--sizes", default="224x224,640x480", help="frame sizes, WIDTHxHEIGHT, comma-separated")
    p.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each path")
    p.add_argument(
        "--threads",
        default="",
        help="thread counts for the decoding workers' host preprocessing, comma-separated (0: the "
        "calling thread); empty: not measured",
    )
    p.add_argument("--thread-batch", type=int, default=64, help="VGA frames a timed call of --threads")
    p.add_argument("--threads-only", action="store_true", help="--threads alone: no host and device paths")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="first keep glibc's allocator from giving freed blocks back (edgecap.allocator, as "
        "the command line does for torch on the CPU): else a worker thread's big arrays come "
        "from fresh pages the kernel faults in",
    )
    C.add_out_argument(p)
    return p


def _sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"frame_prep: --sizes wants WIDTHxHEIGHT items, got {item!r}") from None
        if width < 1 or height < 1:
            raise SystemExit(f"frame_prep: --sizes wants positive sizes, got {item!r}")
        out.append((width, height))
    return out


def frames(width: int, height: int, n: int, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)))
    return out


def thread_rates(prepare, frames: list[np.ndarray], threads: list[int], repeats: int) -> list[dict]:
    """``prepare(frame)`` over ``frames`` in the calling thread (0) or spread over a pool of N
    threads, for each N in ``threads``, one warm-up call each, then ``repeats`` rounds over the
    settings: per setting the median call's ms, frames/s, the speed-up over the first
    setting's and the process's minor page faults a frame (median; fresh pages the kernel
    zeroed, where the platform counts them, else None)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        import resource

        def faults() -> int | None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # Windows

        def faults() -> int | None:
            return None

    pools = {n: ThreadPoolExecutor(n) if n else None for n in threads}

    def call(n: int) -> None:
        pool = pools[n]
        if pool is None:
            for frame in frames:
                prepare(frame)
        else:
            list(pool.map(prepare, frames))

    try:
        times: dict[int, list[float]] = {n: [] for n in threads}
        faulted: dict[int, list[int]] = {n: [] for n in threads}
        for n in threads:
            call(n)
        for _ in range(repeats):
            for n in threads:
                before = faults()
                t0 = time.perf_counter()
                call(n)
                times[n].append(time.perf_counter() - t0)
                after = faults()
                if before is not None and after is not None:
                    faulted[n].append(after - before)
    finally:
        for pool in pools.values():
            if pool is not None:
                pool.shutdown()
    first = C.median(times[threads[0]])
    return [
        {
            "threads": n,
            "frames": len(frames),
            "call_ms": 1e3 * C.median(times[n]),
            "frames_per_s": len(frames) / C.median(times[n]),
            "speedup": first / C.median(times[n]),
            "faults_per_frame": C.median(faulted[n]) / len(frames) if faulted[n] else None,
        }
        for n in threads
    ]


def thread_table(rows: list[dict]) -> str:
    return C.markdown_table(
        ["threads", "frames a call", "call ms", "frames/s", "speed-up", "page faults a frame"],
        [
            [r["threads"], r["frames"], r["call_ms"], r["frames_per_s"], r["speedup"]]
            + ["-" if r["faults_per_frame"] is None else r["faults_per_frame"]]
            for r in rows
        ],
    )


def captioner_prepare(captioner=None):
    """What a decoding worker runs for one in-memory RGB frame: ``Captioner._prepare`` of
    ``captioner`` (default: the shipped model on onnxruntime, its host preprocessing)."""
    if captioner is None:
        from edgecap import Captioner

        captioner = Captioner()
    return lambda frame: captioner._prepare(frame, "rgb")


def operations(prep, batch: list[np.ndarray]) -> int:
    """The torch operations one call dispatches (views and allocations included)."""
    with C.operation_counter() as count:
        prep(batch)
    return count.kernels + count.others


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help and a bad size need no torch
    sizes = _sizes(args.sizes)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        threads = [int(n) for n in args.threads.split(",")] if args.threads else []
    except ValueError:
        raise SystemExit(f"frame_prep: --threads wants whole numbers, got {args.threads!r}") from None
    if any(n < 0 for n in threads):
        raise SystemExit(f"frame_prep: --threads wants counts of 0 or more, got {args.threads!r}")
    if args.threads_only and not threads:
        raise SystemExit("frame_prep: --threads-only needs --threads")
    if threads and (args.thread_batch < 1 or args.repeats < 1):
        raise SystemExit("frame_prep: --threads wants --thread-batch and --repeats of 1 or more")
    kept = None
    if args.keep_freed_memory:  # before anything is allocated
        from edgecap.allocator import keep_freed_memory

        kept = keep_freed_memory()
    data: dict = {"memory": "kept" if kept else "default", "kept_freed_memory": kept}
    markdown = ""
    if not args.threads_only:
        rows, device, markdown = _device_paths(args, sizes, batches)
        data.update(device=device, rows=rows)
    if threads:
        data["threads"] = thread_rates(
            captioner_prepare(), frames(640, 480, args.thread_batch), threads, args.repeats
        )
        for r in data["threads"]:
            print(
                f"{r['threads']} threads: {r['frames_per_s']:.0f} frames/s, x{r['speedup']:.2f}",
                file=sys.stderr,
            )
        memory = (
            "glibc's allocator keeping freed memory (`edgecap.allocator.keep_freed_memory`)"
            if kept
            else "the C allocator as it comes"
            + (" (--keep-freed-memory refused: not glibc, or set already)" if kept is False else "")
        )
        markdown += (
            f"\n## The decoding workers' host preprocessing in threads\n\n`Captioner._prepare` of "
            f"{args.thread_batch} VGA frames (640x480) a call, in the calling thread (0) or spread over "
            f"a pool of N threads; medians of {args.repeats} interleaved calls; speed-up over the "
            f"first row's; {memory}.\n\n{thread_table(data['threads'])}\n"
        )
    C.write_results("frame_prep", data, markdown, argv, out=args.out)
    return 0


def _device_paths(args, sizes, batches) -> tuple[list[dict], str, str]:
    """The host and device paths by size and batch -> (rows, the device, the markdown)."""
    import torch
    from PIL import Image

    from edgecap.backends.torch_preprocess import FramePreprocess
    from edgecap.images import preprocess
    from edgecap.preprocess import Preprocessing, recognisable

    torch.set_num_threads(1)
    device = torch.device(args.device)
    pre = Preprocessing()
    prep = FramePreprocess(pre, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def host(batch):
        x = preprocess([Image.fromarray(f) for f in batch], pre)
        return x, [recognisable(v, pre) for v in x]

    def on_device(batch):
        out = prep(batch)
        sync()
        return out

    rows = []
    for width, height in sizes:
        for n in batches:
            batch = frames(width, height, n)
            want, seen = host(batch)
            got, visible = on_device(batch)
            if not np.array_equal(got.cpu().numpy(), want) or visible.cpu().tolist() != seen:
                raise SystemExit(f"frame_prep: the device path differs from the host's at {width}x{height}")
            times: dict[str, list[float]] = {"host": [], "device": []}
            for _ in range(args.repeats):
                for name, call in (("host", host), ("device", on_device)):
                    t0 = time.perf_counter()
                    call(batch)
                    times[name].append(time.perf_counter() - t0)
            host_ms = 1e3 * C.median(times["host"]) / n
            device_ms = 1e3 * C.median(times["device"]) / n
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "batch": n,
                    "operations": operations(prep, batch),
                    "host_ms_per_frame": host_ms,
                    "device_ms_per_frame": device_ms,
                }
            )
            print(
                f"{width}x{height} batch {n}: {rows[-1]['operations']} operations, host "
                f"{host_ms:.2f} ms a frame, {device.type} {device_ms:.2f}",
                file=sys.stderr,
            )
    table = C.markdown_table(
        ["frame", "batch", "torch operations a batch", "host ms a frame", f"{device.type} ms a frame"],
        [
            [r["size"], r["batch"], r["operations"], r["host_ms_per_frame"], r["device_ms_per_frame"]]
            for r in rows
        ],
    )
    markdown = (
        f"Device path on `{device}` (torch {torch.__version__}, one thread); medians of "
        f"{args.repeats} calls; its encoder inputs equal the host's bit for bit.\n\n{table}\n"
    )
    return rows, str(device), markdown


if __name__ == "__main__":
    raise SystemExit(main())
