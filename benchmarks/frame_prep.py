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


def operations(prep, batch: list[np.ndarray]) -> int:
    """The torch operations one call dispatches (views and allocations included)."""
    with C.operation_counter() as count:
        prep(batch)
    return count.kernels + count.others


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help and a bad size need no torch
    sizes = _sizes(args.sizes)
    batches = [int(b) for b in args.batches.split(",")]

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
    C.write_results("frame_prep", {"device": str(device), "rows": rows}, markdown, argv, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
