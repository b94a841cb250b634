"""The tasks tests/test_bench_isolated.py times through benchmarks/_isolated.py, built in its
worker processes (imported there by name, ``isolated_tasks:recording_task``): a module of their
own, importing neither pytest nor the test module, so each worker starts in the time of Python
and numpy alone (about a quarter of a second less per worker than importing the tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _isolated as I


def _worker_siblings() -> int:
    """Other live harness workers with the same parent as this process."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getppid() and b"--worker" in cmdline and state != "Z":
            count += 1
    return count


class RecordingTask:
    """Appends one JSON line per call (variant, measure, pid, live sibling workers) to ``log``."""

    def __init__(self, name: str, log: str):
        self.name, self.log = name, log
        self.info = {"pid": os.getpid()}
        self.measures = {"a": lambda: self._record("a"), "b": lambda: self._record("b")}

    def _record(self, measure: str) -> None:
        with open(self.log, "a") as f:
            f.write(
                json.dumps(
                    {
                        "variant": self.name,
                        "measure": measure,
                        "pid": os.getpid(),
                        "siblings": _worker_siblings(),
                    }
                )
                + "\n"
            )


def recording_task(name: str, log: str) -> RecordingTask:
    return RecordingTask(name, log)


def failing_setup(**_):
    raise ValueError("broken on purpose")


class _Failing:
    info: dict = {}

    def __init__(self, how: str):
        def call():
            if how == "raise":
                raise RuntimeError("call broken on purpose")
            os._exit(3)  # the worker dies without a reply

        self.measures = {"a": call}


def failing_call(how: str) -> _Failing:
    return _Failing(how)


class _FieldsTask:
    info: dict = {}

    def __init__(self):
        self.calls = 0

        def counted():
            self.calls += 1
            return I.Fields(call=self.calls, twice=2 * self.calls)

        self.measures = {"a": counted, "b": lambda: {"plain": "dict, not Fields"}}


def fields_task() -> _FieldsTask:
    return _FieldsTask()
