"""benchmarks/_isolated.py: every variant in its own worker process, interleaved rounds with one
worker running at a time, each variant alone with no other worker alive, nothing left running
afterwards, errors reported instead of hangs, and the alone / interleaved flag. No timing is
asserted anywhere: the tasks here do nothing measurable, only record who ran when."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _isolated as I  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)  # where the workers find isolated_tasks (their tasks)


# -- helpers -------------------------------------------------------------------------------------


def _spec(name: str, log: Path) -> I.Spec:
    return I.Spec(name, "isolated_tasks:recording_task", {"name": name, "log": str(log)}, paths=[TESTS])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _my_workers() -> list[int]:
    """Live (not zombie) children of this process started as harness workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and b"--worker" in cmdline and fields[0] != "Z":
            found.append(int(entry))
    return found


def _run(tmp_path, names=("x", "y", "z"), **kwargs):
    log = tmp_path / "calls.jsonl"
    settings = dict(
        measures=["a", "b"],
        rounds=3,
        per_round=2,
        warmup=1,
        idle_windows_s=(0.01,),
        settle_s=0.0,
        log=lambda _m: None,
    )
    settings.update(kwargs)
    result = I.run_isolated([_spec(n, log) for n in names], **settings)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return result, calls


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# -- tests -----------------------------------------------------------------------------------------


def test_each_variant_runs_in_its_own_process_and_none_is_left(tmp_path):
    result, calls = _run(tmp_path)
    variants = result["variants"]
    interleaved = [variants[n]["pid_interleaved"] for n in "xyz"]
    alone = [variants[n]["pid_alone"] for n in "xyz"]
    assert len(set(interleaved + alone + [os.getpid()])) == 7
    assert [variants[n]["info"]["pid"] for n in "xyz"] == interleaved  # the task ran there
    for call in calls:  # every call ran in its own variant's worker
        pids = (variants[call["variant"]]["pid_interleaved"], variants[call["variant"]]["pid_alone"])
        assert call["pid"] in pids
    assert not any(_alive(pid) for pid in interleaved + alone)
    assert _my_workers() == []


def test_rounds_interleave_and_alone_means_no_other_worker(tmp_path):
    result, calls = _run(tmp_path)
    variants = result["variants"]
    inter = [c for c in calls if c["pid"] == variants[c["variant"]]["pid_interleaved"]]
    alone = [c for c in calls if c["pid"] == variants[c["variant"]]["pid_alone"]]
    # warm-up (1 call per measure) worker by worker, then each worker's idle check (1 call)
    warm = 3 * (2 + 1)
    assert [c["variant"] for c in inter[:warm]] == list("xxyyzz" + "xyz")
    turns = [inter[warm + 4 * i : warm + 4 * (i + 1)] for i in range(9)]
    order = [t[0]["variant"] for t in turns]
    assert order == list("xyz" + "yzx" + "zxy")  # round r starts at the r-th variant
    for turn in turns:  # per_round calls of each measure, one variant per turn
        assert len({c["variant"] for c in turn}) == 1
        assert [c["measure"] for c in turn] == ["a", "a", "b", "b"]
    assert all(c["siblings"] == 2 for c in inter)  # the other workers alive (and waiting)
    assert all(c["siblings"] == 0 for c in alone)  # alone: no other worker alive
    assert len(alone) == 3 * (3 + 3 * 2 * 2)
    for m in ("a", "b"):
        for n in "xyz":
            entry = result["measures"][m][n]
            assert entry["interleaved"]["n"] == entry["alone"]["n"] == 6
            assert "flagged" in entry
        assert set(result["ratios"][m]) == set("xyz") and result["ratios"][m]["x"] == 1.0


def test_alone_passes_take_the_variants_in_turn_and_pool_their_calls(tmp_path):
    """--alone-passes 2: the alone pass twice, x y then y x (each pass starts at the next
    variant), each time a fresh worker with no other alive, the idle check in the first pass
    only, and each variant's alone figures made of both passes' calls."""
    result, calls = _run(tmp_path, names=("x", "y"), alone_passes=2, rounds=2, per_round=1, warmup=0)
    variants = result["variants"]
    alone_pids = {n: variants[n]["pids_alone"] for n in "xy"}
    assert all(len(set(p)) == 2 for p in alone_pids.values())
    assert all(variants[n]["pid_alone"] == alone_pids[n][0] for n in "xy")  # the first pass's
    alone = [c for c in calls if c["pid"] in alone_pids[c["variant"]]]
    workers_in_order: list[int] = []
    for c in alone:
        if not workers_in_order or workers_in_order[-1] != c["pid"]:
            workers_in_order.append(c["pid"])
    assert workers_in_order == [
        alone_pids["x"][0],
        alone_pids["y"][0],
        alone_pids["y"][1],
        alone_pids["x"][1],
    ]
    # each worker: 2 rounds x 1 call x 2 measures, and in the first pass 1 call more (its idle check)
    per_worker = {pid: sum(c["pid"] == pid for c in alone) for pid in workers_in_order}
    assert [per_worker[alone_pids[n][k]] for k in (0, 1) for n in "xy"] == [5, 5, 4, 4]
    assert all(c["siblings"] == 0 for c in alone)
    for m in ("a", "b"):
        for n in "xy":
            assert result["measures"][m][n]["alone"]["n"] == 2 * 2  # both passes pooled
            assert result["measures"][m][n]["interleaved"]["n"] == 2
    assert result["settings"]["alone_passes"] == 2
    assert "in 2 passes" in I.report_markdown(result)
    assert _my_workers() == []
    with pytest.raises(ValueError, match="alone_passes"):
        _run(tmp_path, names=("x",), alone_passes=0)


def test_without_alone_pass_there_is_no_flag(tmp_path):
    result, calls = _run(tmp_path, names=("x", "y"), alone=False, rounds=1, warmup=0)
    assert all(
        "alone" not in e and "flagged" not in e for per in result["measures"].values() for e in per.values()
    )
    assert result["flags"] == []
    assert _my_workers() == []


def test_flag_marks_20_percent_not_5():
    assert I.differs(120.0, 100.0) and I.differs(80.0, 100.0)
    assert not I.differs(105.0, 100.0) and not I.differs(95.0, 100.0)
    assert not I.differs(114.0, 100.0) and I.differs(116.0, 100.0)
    assert I.differs(105.0, 100.0, tolerance=0.04)
    assert I.relative_difference(120.0, 100.0) == pytest.approx(0.2)


def test_summary_median_and_p95():
    s = I.summary([float(v) for v in range(1, 101)])
    assert s["n"] == 100 and s["median_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05) and s["min_ms"] == 1.0
    assert I.summary([])["n"] == 0
    # a median, not a mean: one slow call of three does not move it
    assert I.summary([1.0, 100.0, 2.0])["median_ms"] == 2.0
    assert I.field_median({"fields": {"t": [1.0, 100.0, 2.0]}}, "t") == 2.0


def test_ratios_are_the_baselines_interleaved_median_over_each_variants(tmp_path, monkeypatch):
    """The calls' times set here (the workers' own are whatever the machine gives): x takes
    10 ms a call interleaved, y 20 ms with one call of 200 (median 20, mean 50), and both
    three times that alone. The ratio the tables print as "0.50x" is x's interleaved median
    over y's, 10 / 20 (a variant twice as slow as the baseline: 0.5x; README: ratios come from
    the interleaved medians, the alone ones are the check)."""
    real = I._measure_rounds
    passes = []

    def fixed_times(workers, measures, *args):
        times, bystander, fields = real(workers, measures, *args)
        scale = 1.0 if len(workers) > 1 else 3.0  # the alone pass drives one worker at a time
        passes.append(scale)
        for name, per_measure in times.items():
            for m, t in per_measure.items():
                base = {"x": [10.0] * len(t), "y": [20.0] * (len(t) - 1) + [200.0]}[name]
                per_measure[m] = [scale * v for v in base]
        return times, bystander, fields

    monkeypatch.setattr(I, "_measure_rounds", fixed_times)
    result, _ = _run(tmp_path, names=("x", "y"), rounds=2)
    assert passes == [1.0, 3.0, 3.0]
    for m in ("a", "b"):
        assert result["ratios"][m] == {"x": 1.0, "y": 0.5}
        assert result["measures"][m]["y"]["interleaved"]["median_ms"] == 20.0
        assert result["measures"][m]["y"]["alone"]["median_ms"] == 60.0
        assert result["measures"][m]["y"]["interleaved_vs_alone"] == pytest.approx(20 / 60 - 1)


def test_a_worker_that_raises_while_loading_reports_it(tmp_path):
    specs = [
        _spec("fine", tmp_path / "log"),
        I.Spec("broken", "isolated_tasks:failing_setup", {}, paths=[TESTS]),
    ]
    with pytest.raises(I.WorkerError, match="broken: ValueError: broken on purpose"):
        I.run_isolated(
            specs,
            ["a"],
            rounds=1,
            per_round=1,
            warmup=0,
            idle_windows_s=(0.01,),
            settle_s=0.0,
            log=lambda _m: None,
        )
    assert _my_workers() == []  # the worker started before it was ended too


def test_a_worker_that_raises_in_a_call_reports_it(tmp_path):
    spec = I.Spec("bad-call", "isolated_tasks:failing_call", {"how": "raise"}, paths=[TESTS])
    with pytest.raises(I.WorkerError, match="RuntimeError: call broken on purpose"):
        I.run_isolated(
            [_spec("fine", tmp_path / "log"), spec],
            ["a"],
            rounds=1,
            per_round=1,
            warmup=0,
            idle_windows_s=(0.01,),
            settle_s=0.0,
            log=lambda _m: None,
        )
    assert _my_workers() == []


def test_a_worker_that_dies_is_reported_with_its_exit_code():
    spec = I.Spec("dies", "isolated_tasks:failing_call", {"how": "exit"}, paths=[TESTS])
    worker = I.Worker(spec)
    try:
        with pytest.raises(I.WorkerError, match=r"dies: worker exited \(code 3\)"):
            worker.request(op="run", measure="a", n=1)
    finally:
        worker.close()
    assert not worker.alive() and _my_workers() == []


def test_unknown_factory_is_an_error_not_a_hang():
    with pytest.raises(I.WorkerError, match="ModuleNotFoundError"):
        I.Worker(I.Spec("nowhere", "no_such_module_here:make", {}))
    assert _my_workers() == []


def test_idle_request_reads_the_workers_own_cpu_time(tmp_path):
    worker = I.Worker(_spec("x", tmp_path / "log"))
    try:
        reply = worker.request(op="idle", windows=[0.01, 0.01], after_call="a")
        assert reply["windows_s"] == [0.01, 0.01] and len(reply["cpu_ms"]) == 2
        assert all(c >= 0 for c in reply["cpu_ms"])
        assert worker.cpu_s() is not None
    finally:
        worker.close()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
@pytest.mark.parametrize("spin, expected", [("off", "0"), ("on", "1")])
def test_e2e_worker_gets_the_spinning_setting(spin, expected):
    import e2e

    args = e2e.parse_args([])
    spec = e2e.variant_spec(f"ort-fp32/spin-{spin}", args)
    worker = I.Worker(spec)
    try:
        assert worker.info["allow_spinning"] == expected  # read back from the live session
        assert set(worker.measures) == {"e2e", "encoder"}
        worker.request(op="run", measure="e2e", n=1)
        worker.request(op="run", measure="encoder", n=1)
    finally:
        worker.close()
    assert _my_workers() == []


def test_e2e_variants_map_to_captioner_settings(tmp_path):
    import e2e

    args = e2e.parse_args(["--beam", "5", "--model-b", str(e2e.C.DEFAULT_MODEL)])
    torch_spec = e2e.variant_spec("torch-eager", args)
    assert torch_spec.kwargs["backend"] == "torch" and torch_spec.kwargs["session_config"] == {}
    noguide = e2e.variant_spec("ort-fp32-noguide", args)
    assert noguide.kwargs["caption_options"] == {"guidance_bonus": 0.0}
    assert noguide.kwargs["beam"] == 5
    assert e2e.variant_spec("ort-fp32-b", args).kwargs["model"] == str(e2e.C.DEFAULT_MODEL)
    with pytest.raises(SystemExit):
        e2e.variant_spec("torch-eager/spin-off", args)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_step_compare_worker_runs_the_current_model_format():
    from _common import DEFAULT_MODEL

    worker = I.Worker(I.Spec("A", "step_compare:make_task", {"model": str(DEFAULT_MODEL), "threads": 1}))
    try:
        assert set(worker.measures) == {"step", "encoder"}
        assert len(worker.request(op="run", measure="step", n=2)["times_ms"]) == 2
        assert len(worker.request(op="run", measure="encoder", n=1)["times_ms"]) == 1
    finally:
        worker.close()
    assert _my_workers() == []


# -- fields and threads ----------------------------------------------------------------------------


def test_fields_a_call_returns_are_kept_beside_its_time():
    spec = I.Spec("f", "isolated_tasks:fields_task", {}, paths=[TESTS])
    result = I.run_isolated(
        [spec],
        ["a", "b"],
        rounds=2,
        per_round=2,
        warmup=1,
        idle_windows_s=(0.01,),
        settle_s=0.0,
        log=lambda _m: None,
    )
    a = result["measures"]["a"]["f"]
    # warm-up call 1 and the idle check's call 2 are not kept; then calls 3..6 (each worker anew)
    assert a["interleaved"]["fields"] == {"call": [3.0, 4.0, 5.0, 6.0], "twice": [6.0, 8.0, 10.0, 12.0]}
    assert a["alone"]["fields"]["call"] == [3.0, 4.0, 5.0, 6.0]
    assert I.field_median(a["interleaved"], "twice") == 9.0
    assert "fields" not in result["measures"]["b"]["f"]["interleaved"]  # not Fields: ignored
    assert I.field_median(result["measures"]["b"]["f"]["interleaved"], "call") != I.field_median(
        result["measures"]["b"]["f"]["interleaved"], "call"
    )  # NaN


def _os_threads() -> set[str]:
    """This process's OS threads (their ids): a thread another test left may end meanwhile, so
    the check is that none was started, not that the count is unchanged."""
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_a_variants_runner_leaves_no_thread_pool_in_the_parent():
    """onnxruntime variants timed through the harness: their intra-op pools live and die in
    their workers; this process has no more threads afterwards than before, and no worker is
    left."""
    import e2e

    args = e2e.parse_args(["--max-length", "3"])
    specs = [e2e.variant_spec(v, args) for v in ("ort-fp32/spin-on", "ort-fp32/spin-off")]
    before = _os_threads()
    result = I.run_isolated(
        specs,
        ["encoder"],
        rounds=1,
        per_round=1,
        warmup=0,
        idle_windows_s=(0.01,),
        settle_s=0.0,
        log=lambda _m: None,
    )
    assert _os_threads() <= before  # no thread started here (none left running)
    assert _my_workers() == []
    pids = [v[k] for v in result["variants"].values() for k in ("pid_interleaved", "pid_alone")]
    assert not any(
        _alive(p) and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" for p in pids
    )
