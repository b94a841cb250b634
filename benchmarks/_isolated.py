"""Time variants undisturbed: each in its own worker process, rounds interleaved, and each alone.

    from _isolated import Spec, run_isolated, report_markdown
    result = run_isolated([Spec("ort-fp32", "e2e:make_task", {...}), Spec("torch-eager", ...)],
                          rounds=10, per_round=4, warmup=3)

Why: variants timed in one process disturb each other (one variant's onnxruntime or OpenMP
threads, still spinning after its call, take the cores from the next variant's call), which is
how a 1.7x ratio was once reported as 6x. Here:

- **Worker per variant.** A variant is a factory (``"module:function"`` plus JSON keyword
  arguments) called once in a fresh interpreter (``python benchmarks/_isolated.py --worker``); it
  loads the model and returns a *task*: an object whose ``measures`` maps a name ("e2e",
  "encoder") to a zero-argument callable, with an optional ``info`` dict. Loading is not timed.
  A call may return a ``Fields`` dict (numbers it measured itself, e.g. the encoder's share of
  an end-to-end call): those are kept beside the call's time, one dict per timed call.
  The parent drives the worker over its stdin/stdout pipes, one JSON line per request and reply.
- **Interleaved.** All workers are started, each warmed up, then in round r every variant in turn
  (the first one rotating) makes ``per_round`` timed calls of each measure. Only the worker being
  driven runs; the others sit blocked in a pipe read. That they really are idle is measured, not
  assumed: the CPU time (``/proc/PID/stat``) the *other* workers use during each turn is added up
  (``bystander_cpu``), and every worker reports the CPU time it burns in consecutive windows of
  idleness after a call (``idle``: ``time.process_time`` over sleeps, all its threads together).
  Each turn starts after a pause (``settle_s``, untimed) longer than onnxruntime's spinning tail,
  so a spinning worker that just finished does not overlap the next one's turn.
- **Alone.** Then each variant once more in a fresh worker with no other worker alive, the same
  number of calls. A variant whose interleaved median is more than ``tolerance`` (15%) off its
  alone median is flagged (``differs``): its figures depend on what ran beside it. With
  ``alone_passes`` N > 1 the alone pass is made N times, the variants in turn in each (pass p
  starting at the p-th variant; a fresh worker every time), and each variant's alone calls of
  all passes are pooled: a host whose speed drifts during the alone pass (seen: the same
  encoder 8.3 ms in one variant's alone run, 10.2-10.4 ms in the next three's;
  benchmarks/results/e2e_fusion_onnx_step_drift.md) then drifts under every variant alike.
- **Ratios** are computed from the interleaved medians, measured side by side (the alone ones
  are taken at different times, so drift is not shared).

A worker that raises (while loading or in a call) sends the error back and the parent raises
``WorkerError`` naming the variant; a worker that dies is reported with the tail of its stderr.
Every worker is ended (exit request, then kill) before ``run_isolated`` returns or raises.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOLERANCE = 0.15  # interleaved vs alone median, relative to alone


# -- the pure parts ----------------------------------------------------------------------------


def relative_difference(interleaved_median: float, alone_median: float) -> float:
    """(interleaved - alone) / alone."""
    return interleaved_median / alone_median - 1.0


def differs(interleaved_median: float, alone_median: float, tolerance: float = TOLERANCE) -> bool:
    """True when the interleaved median is more than ``tolerance`` (relative) off the alone one."""
    return abs(relative_difference(interleaved_median, alone_median)) > tolerance


class Fields(dict):
    """What a measure's call may return: ``{name: number}`` measured inside the call (a stage's
    time, a count), recorded beside the call's own time (``fields`` in the summaries: one list
    of values per name, in call order). Any other return value is ignored."""


def summary(times_ms: list[float], fields: list[dict] | None = None) -> dict:
    a = np.asarray(times_ms, dtype=np.float64)
    if not len(a):
        out = {"n": 0, "median_ms": float("nan"), "p95_ms": float("nan"), "times_ms": []}
    else:
        out = {
            "n": int(len(a)),
            "median_ms": float(np.median(a)),
            "p95_ms": float(np.percentile(a, 95)),
            "min_ms": float(a.min()),
            "times_ms": [round(float(t), 4) for t in a],
        }
    if fields:
        out["fields"] = {
            k: [f.get(k, float("nan")) for f in fields] for k in dict.fromkeys(k for f in fields for k in f)
        }
    return out


def field_median(entry: dict, name: str) -> float:
    """The median of one ``Fields`` entry over a summary's calls (NaN where none)."""
    values = entry.get("fields", {}).get(name, [])
    return float(np.median(values)) if len(values) else float("nan")


# -- the worker side -----------------------------------------------------------------------------


def _load_factory(spec: str, paths: list[str]):
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def worker_main() -> None:
    """Serve requests from stdin until "exit" or end of input (the parent gone)."""
    # this file runs as __main__ here: let the tasks' `import _isolated` (for ``Fields``) get
    # this very module, not a second copy with classes of its own
    sys.modules.setdefault("_isolated", sys.modules[__name__])
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    for p in (str(REPO), str(BENCH_DIR)):  # this checkout's edgecap and benchmark modules
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    task = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "setup":
                task = _load_factory(request["factory"], request.get("paths", []))(
                    **request.get("kwargs", {})
                )
                reply = {
                    "pid": os.getpid(),
                    "info": getattr(task, "info", {}) or {},
                    "measures": sorted(task.measures),
                }
            elif op == "run":
                fn = task.measures[request["measure"]]
                times, fields = [], []
                cpu0 = time.process_time()
                for _ in range(int(request["n"])):
                    t0 = time.perf_counter()
                    out = fn()
                    times.append((time.perf_counter() - t0) * 1e3)
                    if isinstance(out, Fields):
                        fields.append({k: float(v) for k, v in out.items()})
                reply = {"times_ms": times, "cpu_ms": (time.process_time() - cpu0) * 1e3}
                if fields:
                    reply["fields"] = fields
            elif op == "idle":
                # CPU time of the whole process (every thread) over consecutive windows of
                # idleness, right after a call: what spinning threads burn between calls
                if request.get("after_call"):
                    task.measures[request["after_call"]]()
                reply = {"windows_s": [], "cpu_ms": []}
                for seconds in request["windows"]:
                    cpu0 = time.process_time()
                    time.sleep(float(seconds))
                    reply["windows_s"].append(float(seconds))
                    reply["cpu_ms"].append((time.process_time() - cpu0) * 1e3)
            elif op == "pid":
                reply = {"pid": os.getpid()}
            elif op == "exit":
                reply = {}
            else:
                raise ValueError(f"unknown request {op!r}")
            reply["ok"] = True
        except BaseException as exc:  # report it; the parent decides
            reply = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        replies.write(json.dumps(reply) + "\n")
        if op == "exit":
            break


# -- the parent side -------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    def __init__(self, variant: str, message: str):
        super().__init__(f"{variant}: {message}")
        self.variant = variant


@dataclass
class Spec:
    """A variant: ``factory`` ("module:function", importable in the worker with ``paths`` and
    benchmarks/ on its path) called with ``kwargs`` (JSON values) returns its task."""

    name: str
    factory: str
    kwargs: dict = field(default_factory=dict)
    paths: list = field(default_factory=list)
    env: dict = field(default_factory=dict)  # extra environment variables for the worker


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc; None where
    there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """One variant's worker process. ``request`` sends one request and returns the reply,
    raising ``WorkerError`` when the worker reports an error or dies."""

    def __init__(self, spec: Spec, timeout_s: float | None = None):
        self.spec, self.timeout_s = spec, timeout_s
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, **spec.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )
        self.pid = self.proc.pid
        try:
            reply = self.request(
                op="setup", factory=spec.factory, kwargs=spec.kwargs, paths=[str(p) for p in spec.paths]
            )
        except BaseException:
            self.close()
            raise
        self.info, self.measures = reply["info"], reply["measures"]

    def request(self, **request) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self.spec.name, self._died()) from None
        if self.timeout_s is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
            if not ready:
                raise WorkerError(self.spec.name, f"no reply to {request.get('op')!r} in {self.timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(self.spec.name, self._died())
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise WorkerError(self.spec.name, f"{reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def _died(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-15:]
        return f"worker exited (code {code}):\n" + "\n".join(tail)

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._stderr.close()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _close_all(workers) -> None:
    for w in workers:
        w.close()


def _measure_rounds(
    workers: dict[str, Worker], measures: list[str], rounds: int, per_round: int, settle_s: float, log
) -> tuple[dict, dict]:
    """Rounds over the workers (first one rotating), ``settle_s`` of nothing before each turn
    (so the threads of the worker before have stopped spinning). -> (times[name][measure],
    bystander CPU {name: {"cpu_ms", "wall_ms"}}: what the other workers used during that
    variant's turns, fields[name][measure]: the calls' ``Fields``)."""
    names = list(workers)
    times = {n: {m: [] for m in measures} for n in names}
    fields = {n: {m: [] for m in measures} for n in names}
    bystander = {n: {"cpu_ms": 0.0, "wall_ms": 0.0, "known": True} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            time.sleep(settle_s)
            others = [w for n, w in workers.items() if n != name]
            before = [w.cpu_s() for w in others]
            t0 = time.perf_counter()
            for m in measures:
                reply = workers[name].request(op="run", measure=m, n=per_round)
                times[name][m] += reply["times_ms"]
                fields[name][m] += reply.get("fields", [])
            wall = time.perf_counter() - t0
            after = [w.cpu_s() for w in others]
            if any(v is None for v in before + after):
                bystander[name]["known"] = False
            else:
                bystander[name]["cpu_ms"] += 1e3 * sum(a - b for a, b in zip(after, before))
            bystander[name]["wall_ms"] += wall * 1e3
        log(f"[isolated] round {r + 1}/{rounds}")
    return times, bystander, fields


def _warm(worker: Worker, measures: list[str], warmup: int) -> None:
    for m in measures:
        if warmup:
            worker.request(op="run", measure=m, n=warmup)


def run_isolated(
    specs: list[Spec],
    measures: list[str] | None = None,
    rounds: int = 10,
    per_round: int = 4,
    warmup: int = 3,
    alone: bool = True,
    alone_passes: int = 1,
    idle_windows_s: tuple = (0.2, 1.0),
    settle_s: float = 0.25,
    tolerance: float = TOLERANCE,
    baseline: str | None = None,
    timeout_s: float | None = None,
    log=_log,
) -> dict:
    """Time every spec's measures interleaved (``rounds`` x ``per_round`` calls each, after
    ``warmup``), then (``alone``) each in a fresh worker alone; see the module docstring.
    ``settle_s``: a pause before each turn, not timed, longer than onnxruntime's spinning tail
    (~0.2 s measured after a call); ``idle_windows_s``: consecutive windows after a call over
    which each worker's own CPU time is read.

    Returns a JSON-able dict: ``variants`` (per variant: worker PIDs, the task's info, the CPU
    ms its worker burned in each idle window after a call, interleaved and alone, and the bystander CPU
    during its turns), ``measures`` (per measure and variant: interleaved / alone summaries, the
    relative difference and the flag; a summary holds ``fields`` where the calls returned
    ``Fields``), ``ratios`` (per measure: baseline median / variant median,
    both interleaved) and ``flags`` (one line per flagged variant and measure)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    if alone_passes < 1:
        raise ValueError(f"alone_passes must be at least 1, got {alone_passes}")
    baseline = baseline or names[0]
    result = {
        "settings": {
            "rounds": rounds,
            "per_round": per_round,
            "warmup": warmup,
            "alone": alone,
            "alone_passes": alone_passes if alone else 0,
            "idle_windows_s": list(idle_windows_s),
            "settle_s": settle_s,
            "tolerance": tolerance,
            "baseline": baseline,
            "order": "interleaved, then each alone",
        },
        "variants": {n: {} for n in names},
        "measures": {},
        "ratios": {},
        "flags": [],
    }

    # interleaved: every worker alive, one driven at a time
    workers: dict[str, Worker] = {}
    try:
        for spec in specs:
            log(f"[isolated] starting {spec.name}")
            workers[spec.name] = Worker(spec, timeout_s)
        if measures is None:
            measures = list(workers[names[0]].measures)
        for name, w in workers.items():
            missing = set(measures) - set(w.measures)
            if missing:
                raise WorkerError(name, f"has no measure {sorted(missing)}")
            _warm(w, measures, warmup)
            result["variants"][name].update(pid_interleaved=w.pid, info=w.info)
        for name, w in workers.items():  # each worker idle after a call, the others idle too
            result["variants"][name]["idle_interleaved"] = w.request(
                op="idle", windows=list(idle_windows_s), after_call=measures[0]
            )
        inter, bystander, inter_fields = _measure_rounds(workers, measures, rounds, per_round, settle_s, log)
    finally:
        _close_all(workers.values())
    for name in names:
        b = bystander[name]
        result["variants"][name]["bystander_cpu"] = {
            "cpu_ms": b["cpu_ms"] if b["known"] else None,
            "wall_ms": b["wall_ms"],
            "share_of_one_core": (b["cpu_ms"] / b["wall_ms"]) if b["known"] and b["wall_ms"] else None,
        }

    # alone: one worker at a time, nothing else of ours alive
    alone_times: dict = {}
    alone_fields: dict = {}
    for alone_pass in range(alone_passes if alone else 0):
        first = alone_pass % len(specs)  # each pass starts at the next variant, as the rounds do
        for spec in specs[first:] + specs[:first]:
            log(f"[isolated] {spec.name} alone" + (f" (pass {alone_pass + 1})" if alone_passes > 1 else ""))
            w = Worker(spec, timeout_s)
            try:
                _warm(w, measures, warmup)
                variant = result["variants"][spec.name]
                variant.setdefault("pids_alone", []).append(w.pid)
                variant["pid_alone"] = variant["pids_alone"][0]
                if alone_pass == 0:
                    variant["idle_alone"] = w.request(
                        op="idle", windows=list(idle_windows_s), after_call=measures[0]
                    )
                t, _, f = _measure_rounds(
                    {spec.name: w}, measures, rounds, per_round, settle_s, lambda _m: None
                )
                times, fields = alone_times.setdefault(spec.name, {}), alone_fields.setdefault(spec.name, {})
                for m in measures:
                    times.setdefault(m, []).extend(t[spec.name][m])
                    fields.setdefault(m, []).extend(f[spec.name][m])
            finally:
                w.close()

    for m in measures:
        per_variant = {}
        for name in names:
            entry = {"interleaved": summary(inter[name][m], inter_fields[name][m])}
            if name in alone_times:
                entry["alone"] = summary(alone_times[name][m], alone_fields[name][m])
                i_med, a_med = entry["interleaved"]["median_ms"], entry["alone"]["median_ms"]
                entry["interleaved_vs_alone"] = relative_difference(i_med, a_med)
                entry["flagged"] = differs(i_med, a_med, tolerance)
                if entry["flagged"]:
                    result["flags"].append(
                        f"{name} {m}: interleaved median {i_med:.2f} ms is "
                        f"{100 * entry['interleaved_vs_alone']:+.0f}% off its alone median "
                        f"{a_med:.2f} ms (tolerance {100 * tolerance:.0f}%)"
                    )
            per_variant[name] = entry
        result["measures"][m] = per_variant
        base = per_variant[baseline]["interleaved"]["median_ms"]
        result["ratios"][m] = {name: base / e["interleaved"]["median_ms"] for name, e in per_variant.items()}
    return result


HOW_IT_RAN = (
    "Each variant in its own worker process (model loading not timed). Interleaved: all workers "
    "alive, {rounds} rounds x {per_round} calls per measure, the variants in turn (first one "
    "rotating), only one worker running at a time, after {warmup} warm-up calls each. Alone: "
    "each variant again in a fresh worker with no other worker alive, the same calls. Flag: "
    "interleaved median more than {tolerance_percent:.0f}% off the alone median. Ratios: "
    "{baseline}'s interleaved median / the variant's, measured side by side."
)


def report_markdown(result: dict) -> str:
    """The tables of a ``run_isolated`` result."""
    from _common import markdown_table

    s = result["settings"]
    how = HOW_IT_RAN.format(tolerance_percent=100 * s["tolerance"], **s)
    if s.get("alone_passes", 1) > 1:
        how = how.replace(
            "the same calls.",
            f"the same calls, in {s['alone_passes']} passes (the variants in turn in each, the first "
            "one rotating, a fresh worker every time; each variant's alone figures pool its "
            "passes' calls; pid alone: its first pass's worker).",
        )
    lines = [how, ""]
    rows = []
    for m, per_variant in result["measures"].items():
        for name, e in per_variant.items():
            i, a = e["interleaved"], e.get("alone", {})
            rows.append(
                [
                    name,
                    m,
                    i["median_ms"],
                    i["p95_ms"],
                    a.get("median_ms", float("nan")),
                    a.get("p95_ms", float("nan")),
                    (f"{100 * e['interleaved_vs_alone']:+.0f}%" if "interleaved_vs_alone" in e else "-"),
                    "FLAG" if e.get("flagged") else "",
                    f"{result['ratios'][m][name]:.2f}x",
                ]
            )
    lines.append(
        markdown_table(
            [
                "variant",
                "measure",
                "interleaved p50 ms",
                "p95 ms",
                "alone p50 ms",
                "p95 ms",
                "interleaved vs alone",
                "",
                f"speed vs {s['baseline']}",
            ],
            rows,
        )
    )
    return "\n".join(lines + ["", flags_and_idleness(result)])


def flags_and_idleness(result: dict) -> str:
    """The flags of a ``run_isolated`` result and its idleness table (idle CPU, bystander CPU,
    pids): the part of its report that does not depend on what was timed."""
    from _common import markdown_table

    s = result["settings"]
    lines = [
        "Flags: "
        + (
            "; ".join(result["flags"])
            if result["flags"]
            else "none (every interleaved median within tolerance of its alone one)"
        ),
        "",
    ]

    def idle(v, key):
        cpu = v.get(key, {}).get("cpu_ms")
        return " / ".join(f"{c:.1f}" for c in cpu) if cpu else "-"

    windows = " / ".join(f"{1e3 * w:.0f} ms" for w in s["idle_windows_s"])
    rows = []
    for name, v in result["variants"].items():
        b = v.get("bystander_cpu", {})
        share = b.get("share_of_one_core")
        rows.append(
            [
                name,
                idle(v, "idle_interleaved"),
                idle(v, "idle_alone"),
                float("nan") if b.get("cpu_ms") is None else b["cpu_ms"],
                b.get("wall_ms", float("nan")),
                "-" if share is None else f"{100 * share:.1f}%",
                v.get("pid_interleaved", "-"),
                v.get("pid_alone", "-"),
            ]
        )
    lines += [
        f"Idleness: CPU ms a worker burns (all its threads together) while it sits idle "
        f"after a call, in consecutive windows of {windows}; bystander CPU: what all the "
        "other workers used during this variant's interleaved turns (/proc, 10 ms ticks), "
        f"as a share of one core; {1e3 * s['settle_s']:.0f} ms pause before each turn.",
        "",
        markdown_table(
            [
                "variant",
                "idle CPU ms (interleaved)",
                "idle CPU ms (alone)",
                "bystander CPU ms",
                "turns wall ms",
                "bystander share",
                "pid",
                "pid alone",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        sys.exit("usage: python benchmarks/_isolated.py --worker (started by run_isolated)")
