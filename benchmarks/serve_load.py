"""Load test of ``edgecap serve``: N concurrent clients on loopback for a bounded time.

    python benchmarks/serve_load.py                          # 1, 4, 16 clients, batched and not
    python benchmarks/serve_load.py --clients 1 4 16 --seconds 10 --rounds 5 --out benchmarks/results

Each service setting (``batched``: ``--max-batch`` 8, ``--max-wait-ms`` 5, the defaults;
``unbatched``: ``--max-batch 1``; ``no-wait``, with ``--settings``: batched with ``--max-wait-ms
0``, no batch waiting for more) runs as ``edgecap serve`` on a free loopback port in a process
of its own, all started (and warmed up) before the first run; only one is loaded at a time. Each
round runs, for each client count, each setting in turn (the order alternating between rounds),
so that the two settings of a pair ran seconds apart under the same machine load: that many
clients for ``--seconds``, each POSTing the example photos (the encoded files, in turn) one
request at a time, as fast as the answers come. A request still in flight when the time is up
is waited for, never dropped: every request sent must get its answer (``lost`` counts those
that did not), and every answer must be a 200 with a caption (``errors``). Latency is measured
by the client, from sending the request to reading the whole answer. The tables give the median
over rounds of each round's p50, p99 and throughput, the load average of the machine, and the
batched / unbatched throughput ratio of each round's pair.

Needs aiohttp (the ``serve`` extra), the client and the server's library.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    non_negative_float,
    positive_float,
    positive_int,
    DEFAULT_MODEL,
    EXAMPLES,
    REPO,
    add_out_argument,
    argument_parser,
    load_average,
    markdown_table,
    median,
    percentile,
    write_results,
)

SETTINGS = {"batched": [], "unbatched": ["--max-batch", "1"], "no-wait": ["--max-wait-ms", "0"]}
TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def photos() -> list[tuple[bytes, str]]:
    return [
        (p.read_bytes(), TYPES[p.suffix.lower()])
        for p in sorted(EXAMPLES.iterdir())
        if p.suffix.lower() in TYPES
    ]


class Server:
    """``edgecap serve`` in a process of its own, on a free loopback port."""

    def __init__(self, model: Path, extra: list[str]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgecap", "serve", "--port", "0", "--model", str(model), *extra],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.process.stderr.readline()
        if "listening on http://127.0.0.1:" not in line:
            self.process.kill()
            raise SystemExit(f"edgecap serve did not start: {line}{self.process.stderr.read()}")
        self.port = int(line.split("127.0.0.1:")[1].split()[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.process.stderr.close()


async def load(port: int, clients: int, seconds: float, images) -> dict:
    """``clients`` clients for ``seconds``; -> counts and latencies (ms)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/caption"
    latencies: list[float] = []
    batches: list[int] = []
    counts = {"sent": 0, "ok": 0, "errors": 0}
    error_samples: list[str] = []

    async def client(session, offset: int, until: float) -> None:
        i = offset
        while time.perf_counter() < until:
            data, kind = images[i % len(images)]
            i += 1
            counts["sent"] += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=data, headers={"Content-Type": kind}) as reply:
                    answer = await reply.json()
                    ok = reply.status == 200 and isinstance(answer.get("caption"), str)
            except (aiohttp.ClientError, ValueError) as exc:
                ok, answer = False, {"error": repr(exc)}
            latencies.append((time.perf_counter() - t0) * 1e3)
            if ok:
                counts["ok"] += 1
                batches.append(answer["batch"])
            else:
                counts["errors"] += 1
                error_samples.append(str(answer)[:200])

    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(client(session, k, until) for k in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        **counts,
        "lost": counts["sent"] - counts["ok"] - counts["errors"],
        "elapsed_s": elapsed,
        "throughput": counts["ok"] / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": sum(batches) / len(batches) if batches else float("nan"),
        "error_samples": error_samples[:3],
    }


def build_parser():
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--clients",
        type=positive_int,
        nargs="+",
        default=[1, 4, 16],
        metavar="N",
        help="concurrent client counts, one run each per setting and round (default: 1 4 16)",
    )
    parser.add_argument("--seconds", type=positive_float, default=20.0, help="length of each run (s)")
    parser.add_argument(
        "--warmup",
        type=non_negative_float,
        default=3.0,
        help="untimed load (s) on each server after it starts, before the first run",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds over every client count and setting"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=sorted(SETTINGS),
        default=["batched", "unbatched"],
        help="batched: edgecap serve's defaults (--max-batch 8, --max-wait-ms 5); unbatched: "
        "--max-batch 1; no-wait: batched, --max-wait-ms 0 (default: batched unbatched)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory the servers load")
    parser.add_argument("--name", default="serve_load", help="results file names: NAME.json and NAME.md")
    add_out_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images = photos()
    runs: list[dict] = []
    servers: dict[str, Server] = {}
    try:
        for setting in args.settings:
            servers[setting] = Server(args.model, SETTINGS[setting])
            asyncio.run(load(servers[setting].port, max(args.clients), args.warmup, images))
        for round_ in range(args.rounds):
            for clients in args.clients:
                order = args.settings if round_ % 2 == 0 else args.settings[::-1]
                for setting in order:
                    before = load_average()
                    result = asyncio.run(load(servers[setting].port, clients, args.seconds, images))
                    runs.append(
                        {
                            "round": round_,
                            "setting": setting,
                            "clients": clients,
                            "load_before": before,
                            "load_after": load_average(),
                            **result,
                        }
                    )
                    print(
                        f"round {round_} {setting:9s} {clients:2d} clients: "
                        f"{result['throughput']:.2f}/s p50 {result['p50_ms']:.0f} ms "
                        f"p99 {result['p99_ms']:.0f} ms batch {result['mean_batch']:.2f} "
                        f"errors {result['errors']} lost {result['lost']} "
                        f"(load {before})",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for setting in args.settings:
        for clients in args.clients:
            mine = [r for r in runs if r["setting"] == setting and r["clients"] == clients]
            rows.append(
                [
                    setting,
                    clients,
                    f"{median([r['throughput'] for r in mine]):.2f}",
                    f"{median([r['p50_ms'] for r in mine]):.0f}",
                    f"{median([r['p99_ms'] for r in mine]):.0f}",
                    f"{median([r['mean_batch'] for r in mine]):.2f}",
                    sum(r["ok"] for r in mine),
                    sum(r["errors"] for r in mine),
                    sum(r["lost"] for r in mine),
                    " / ".join(sorted({r["load_before"] for r in mine})),
                ]
            )
    table = markdown_table(
        [
            "service",
            "clients",
            "captions/s",
            "p50 ms",
            "p99 ms",
            "mean batch",
            "answered",
            "errors",
            "lost",
            "load average (1 min) before each run",
        ],
        rows,
    )
    if {"batched", "unbatched"} <= set(args.settings):
        ratios = []
        for clients in args.clients:
            pairs = [
                [
                    r["throughput"]
                    for r in runs
                    if r["round"] == k and r["clients"] == clients and r["setting"] == s
                ]
                for k in range(args.rounds)
                for s in ("batched", "unbatched")
            ]
            per_round = [b[0] / u[0] for b, u in zip(pairs[0::2], pairs[1::2])]
            ratios.append([clients, f"{median(per_round):.2f}", ", ".join(f"{x:.2f}" for x in per_round)])
        table += (
            "\n\nBatched over unbatched throughput, each round's pair (run seconds apart):"
            "\n\n" + markdown_table(["clients", "median ratio", "per round"], ratios)
        )
    markdown = (
        f"{args.rounds} rounds x {args.seconds:g} s per cell, medians over rounds; the "
        f"{len(images)} example photos (PNG / JPEG files) in turn; client and server on "
        "the same machine (loopback), the clients in one asyncio process.\n\n" + table
    )
    write_results(
        args.name,
        {"runs": runs, "settings": SETTINGS, "args": vars(args)},
        markdown,
        argv=argv,
        script="serve_load",
        out=args.out,
    )
    bad = sum(r["errors"] + r["lost"] for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
