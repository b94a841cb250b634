"""Peak memory of training's feature input: the disk shard cache streamed a batch at a time
against the old path (the whole cache as one float32 tensor in memory).

    python benchmarks/feature_stream.py --images 30000 --dir /tmp/edgecap-shards [--old]
                                        [--memory-limit-mb 1500]

writes a synthetic shard cache of IMAGES x 49 x 1280 float16 (1.25 GB per 10,000 images;
skipped when DIR already holds one of IMAGES and ``--shard-size``, refused when it holds
another), then, in fresh processes, reads one epoch of shuffled batches of 20 images (100
captions) and prints the peak resident memory (ru_maxrss) before and after, as
JSON. ``--old`` also measures the old path (its float32 copy needs 2x the cache in memory).
``--memory-limit-mb``: each reading process runs with that address-space limit (RLIMIT_AS), so
a cache larger than the limit shows that the streamed path needs no memory for the cache (the old
path then fails with a MemoryError, reported as such). The figures also go to
feature_stream.json / .md in ``--out DIR`` (default: a new folder under benchmarks/runs/).
Delete DIR afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _common as C

_READ = """
import json, resource, sys, time
limit = int(sys.argv[3]) << 20
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np, torch
directory, old = sys.argv[1], sys.argv[2] == "old"
from edgecap.training.shards import ShardedFeatures
features = ShardedFeatures(directory)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
before = peak()
t0 = time.perf_counter()
if old:  # what split_features did: every row as one float32 tensor
    try:
        features = torch.from_numpy(features.read(np.arange(len(features))).astype(np.float32))
    except MemoryError as exc:
        print(json.dumps({"path": "old in-memory", "memory_limit_mb": limit >> 20,
                          "failed": f"MemoryError: {exc}"}))
        sys.exit(0)
order = np.random.default_rng(0).permutation(len(features))
check = 0.0
for start in range(0, len(order), 20):
    check += float(features[order[start:start + 20]][:, 0, 0].sum())
print(json.dumps({"path": "old in-memory" if old else "shards streamed",
                  "memory_limit_mb": (limit >> 20) or None,
                  "peak_rss_mb_before": before, "peak_rss_mb_after": peak(),
                  "seconds": round(time.perf_counter() - t0, 1)}))
"""


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--images",
        type=int,
        default=30000,
        help="images in the synthetic cache, 49 x 1280 float16 each (1.25 GB per 10,000)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        required=True,
        help="folder of the shard cache: written when it holds none (index.json), else read as it "
        "is; delete it afterwards",
    )
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file of the cache written")
    p.add_argument(
        "--old",
        action="store_true",
        help="also measure the old path: the whole cache as one float32 tensor (2x the cache in memory)",
    )
    p.add_argument(
        "--memory-limit-mb", type=int, default=0, help="address-space limit of each reading process (0: none)"
    )
    C.add_out_argument(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from edgecap.training.shards import extract_shards

    index = args.dir / "index.json"
    if index.exists():  # a cache written before: measured only if it is the one asked for
        held = json.loads(index.read_text())
        images, shard_size = len(held.get("names", ())), held.get("shard_size")
        if (images, shard_size) != (args.images, args.shard_size):
            sys.exit(
                f"{args.dir} holds a cache of {images:,} images in shards of {shard_size}, not "
                f"--images {args.images:,} --shard-size {args.shard_size}: delete it or choose another --dir"
            )
    else:
        rng = np.random.default_rng(0)
        row = rng.standard_normal((49, 1280)).astype(np.float32)
        t0 = time.perf_counter()
        extract_shards(
            [f"img-{i:07d}.jpg" for i in range(args.images)],
            args.dir,
            load=lambda path: np.zeros(1, np.float32),
            encode=lambda x: np.broadcast_to(row, (len(x), 49, 1280)),
            shard_size=args.shard_size,
            batch_size=256,
            log=print,
        )
        print(
            json.dumps(
                {
                    "written_gb": round(sum(f.stat().st_size for f in args.dir.glob("shard-*.npy")) / 1e9, 2),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        )
    runs = []
    for mode in ["new"] + (["old"] if args.old else []):
        done = subprocess.run(
            [sys.executable, "-c", _READ, str(args.dir), mode, str(args.memory_limit_mb)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:  # e.g. a --memory-limit-mb too small for the reader's imports
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            limit = f" under --memory-limit-mb {args.memory_limit_mb}" if args.memory_limit_mb else ""
            sys.exit(f"the {mode} path's reading process failed{limit} (exit {done.returncode}): {tail}")
        print(done.stdout, end="")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = sorted({k for r in runs for k in r})
    C.write_results(
        "feature_stream",
        {"images": args.images, "shard_size": args.shard_size, "runs": runs},
        C.markdown_table(keys, [[r.get(k, "") for k in keys] for r in runs]),
        argv,
        out=args.out,
        echo=False,
    )


if __name__ == "__main__":
    main()
