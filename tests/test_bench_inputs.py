"""The benchmark scripts' inputs: a cached converted model is the one its options ask for, a
cache of other settings is not measured as if it were of these, and an input that is not there
is one line naming it, not a traceback."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402


def test_the_static_int8_model_is_converted_again_for_other_calibration_photos(tmp_path, monkeypatch):
    """``--calibration DIR`` after a run that calibrated on other photos (the example photos,
    where Flickr8k is absent): a model calibrated on DIR, not the cached one of the other photos."""
    from edgecap.build import convert

    calls = []

    def fake_convert(source, out, precision, calibration=None, force=False):
        calls.append(calibration)
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(C, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(convert, "convert_model_dir", fake_convert)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"x" * 10)
    first = C.converted(C.DEFAULT_MODEL, "ort-int8-static", C.EXAMPLES)
    second = C.converted(C.DEFAULT_MODEL, "ort-int8-static", mine)
    assert calls == [C.EXAMPLES, mine] and first != second
    # the same photos again: the cached copy, not another conversion
    assert C.converted(C.DEFAULT_MODEL, "ort-int8-static", mine) == second and len(calls) == 2
    (mine / "b.jpg").write_bytes(b"y")  # a photo more: another calibration
    assert C.converted(C.DEFAULT_MODEL, "ort-int8-static", mine) != second and len(calls) == 3
    # the dynamic int8 model takes no photos: one copy whatever --calibration says
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", mine) == C.converted(C.DEFAULT_MODEL, "ort-int8", None)
    with pytest.raises(SystemExit, match="no such folder"):
        C.converted(C.DEFAULT_MODEL, "ort-int8-static", tmp_path / "absent")


def test_a_cached_conversion_made_by_other_code_or_libraries_is_made_again(tmp_path, monkeypatch):
    """A cached int8 copy is measured only while the conversion code and onnx/onnxruntime that
    made it are the ones installed: after either changes (or a conversion was cut short, leaving
    no record of what made it), the copy is converted again, not measured as if it were new."""
    from edgecap.build import convert

    calls = []

    def fake_convert(source, out, precision, calibration=None, force=False):
        calls.append(precision)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(C, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(convert, "convert_model_dir", fake_convert)
    made = C.converted(C.DEFAULT_MODEL, "ort-int8", None)
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 1
    # the conversion code changed (a checksum of edgecap/build/convert.py, as the stamp takes it)
    real = C.conversion_stamp()
    assert (
        real["code"]
        == hashlib.sha256(
            b"".join((REPO / "edgecap" / f).read_bytes() for f in ("build/convert.py", "models/config.py"))
        ).hexdigest()[:16]
    )
    assert real["onnxruntime"] == importlib.metadata.version("onnxruntime")
    monkeypatch.setattr(C, "conversion_stamp", lambda: {**real, "code": "0" * 16})
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 2
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 2
    monkeypatch.setattr(C, "conversion_stamp", lambda: {**real, "code": "0" * 16, "onnxruntime": "0.1"})
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 3
    # a copy with a manifest but no record of what made it (cut short, or older than the record)
    next(made.parent.glob("*.made-by.json")).unlink()
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 4
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 4

    # a conversion by other code cut short over the copy (its manifest written, the graphs not
    # yet), then the code that made the copy back: the half-made copy is not taken for it
    def interrupted(source, out, precision, calibration=None, force=False):
        (out / "manifest.json").write_text("{}")
        raise KeyboardInterrupt

    before = C.conversion_stamp()
    monkeypatch.setattr(C, "conversion_stamp", lambda: {**real, "onnx": "0.2"})
    monkeypatch.setattr(convert, "convert_model_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.converted(C.DEFAULT_MODEL, "ort-int8", None)
    monkeypatch.setattr(C, "conversion_stamp", lambda: before)
    monkeypatch.setattr(convert, "convert_model_dir", fake_convert)
    assert C.converted(C.DEFAULT_MODEL, "ort-int8", None) == made and len(calls) == 5


def _tiny_shard_cache(folder: Path) -> None:
    """A cache of 3 images in shards of 2, as feature_stream.py writes one."""
    import numpy as np

    from edgecap.training.shards import extract_shards

    extract_shards(
        [f"img-{i}.jpg" for i in range(3)],
        folder,
        load=lambda path: np.zeros(1, np.float32),
        encode=lambda x: np.zeros((len(x), 49, 1280), np.float32),
        shard_size=2,
        batch_size=4,
        log=lambda *a: None,
    )


def test_feature_stream_refuses_a_cache_of_other_settings(tmp_path):
    """A DIR holding a cache written with other --images / --shard-size is refused in one line:
    it had been measured and reported as a cache of the images asked for."""
    import feature_stream

    _tiny_shard_cache(tmp_path / "cache")
    with pytest.raises(SystemExit) as stop:
        feature_stream.main(["--images", "30000", "--dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    said = str(stop.value.code)
    assert "holds a cache of 3 images in shards of 2, not --images 30,000 --shard-size 1024" in said
    assert "\n" not in said and not (tmp_path / "feature_stream.json").exists()


@pytest.mark.parametrize(
    "script, argv, named",
    [
        ("quality_speed", ["--data", "{absent}"], "{absent}/Flickr8k.token.txt: no such file"),
        (
            "consensus_rules",
            ["--data", "{absent}"],
            "{absent}/coco-ood-dev/captions_cocofmt.json: no such file",
        ),
        (
            "compare_results",
            ["{absent}/a.json", "{absent}/b.json", "--references", "{refs}"],
            "{absent}/a.json",
        ),
        ("file_rate", ["--images", "{absent}"], "{absent}: no such file or folder"),
        ("throughput", ["--images", "{refs}"], "{refs}: not a folder"),
    ],
)
def test_an_input_that_is_not_there_is_one_line_naming_it(tmp_path, script, argv, named):
    """Research data, result files or a photo folder that are not there: one line on stderr
    naming the script and the path, exit 1 (had been a traceback)."""
    refs = tmp_path / "refs.json"
    photo = {"id": 1, "file_name": "p.jpg"}
    refs.write_text(
        json.dumps({"images": [photo], "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]})
    )
    where = {"absent": str(tmp_path / "absent"), "refs": str(refs)}
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / f"{script}.py"),
            *(a.format(**where) for a in argv),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith(f"{script}: ") and named.format(**where) in done.stderr


def test_latency_holds_each_split_int8_variant_against_fp32_at_its_own_split():
    """``--threads 1,2``: ort-int8/t2 against ort-fp32/t2, not against the first FP32 (t1), and
    with the dev CIDEr of ort-int8 (the captions do not depend on the thread count)."""
    import latency

    times = {"ort-fp32/t1": (40.0, 1.2), "ort-fp32/t2": (30.0, 0.9), "ort-int8/t1": (20.0, 0.6)}
    times["ort-int8/t2"] = (15.0, 0.3)
    rows = [
        {"variant": v, "beam": 3, "batch": 1, "e2e_p50_ms": e2e, "step_ms": step, "encoder_ms": 10.0}
        | {"decode_ms": 5.0}
        for v, (e2e, step) in times.items()
    ]
    quality = {"source": "q.json", "cider": {"ort-fp32": 0.50, "ort-int8": 0.485}}
    t = latency.targets(rows, [3], [1], quality)
    assert t["int8"]["ort-int8/t2"]["against"] == "ort-fp32/t2"
    assert t["int8"]["ort-int8/t2"]["e2e"] == pytest.approx(2.0)  # 30 / 15, not 40 / 15
    assert t["int8"]["ort-int8/t2"]["step"] == pytest.approx(3.0)  # 0.9 / 0.3
    assert t["int8"]["ort-int8/t1"]["e2e"] == pytest.approx(2.0)  # 40 / 20
    for name in ("ort-int8/t1", "ort-int8/t2"):
        assert t["int8"][name]["cider_delta"] == pytest.approx(-0.015)


@pytest.mark.parametrize(
    "script, argv, said",
    [
        ("malloc", ["--cases", "torch:8,foo"], "--cases takes BACKEND:BATCH pairs"),
        ("malloc", ["--cases", "torch:x"], "got 'torch:x'"),
        ("threads", ["--threads", "1,x"], "--threads takes default or thread counts"),
        ("threads", ["--threads", "0"], "got '0'"),
    ],
)
def test_a_malformed_setting_is_refused_in_one_line_before_any_process_starts(tmp_path, script, argv, said):
    """A --cases item without a batch, or a --threads count that is not one: one line (had been
    a ValueError traceback, or the worker's traceback after the first variant's process)."""
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.main([*argv, "--out", str(tmp_path)])
    assert said in str(stop.value.code) and "\n" not in str(stop.value.code)
    assert not list(tmp_path.iterdir())


def test_gpu_check_leaves_out_a_dev_photo_the_copy_missed(tmp_path):
    """``--flickr8k`` a copy of the dev photos with one missing (README step 1 cut short): the
    others captioned and the missing one named in the skips, not a FileNotFoundError before the
    first mode (a GPU run lost)."""
    import gpu_check
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    (tmp_path / "Flickr_8k.devImages.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\nb.jpg#0\ta cat\nc.jpg#0\ta car\n")
    report = gpu_check.Report(300.0)
    ids, frames, refs, source = gpu_check.photos(3, report, tmp_path)
    assert ids == ["a.jpg", "c.jpg"] and len(frames) == 2 and sorted(refs) == ["a.jpg", "c.jpg"]
    assert "first 2" in source
    [skip] = report.data["skipped"]
    assert skip["item"] == "1 of the first 3 dev photos" and "b.jpg" in skip["reason"]
    (tmp_path / "images" / "a.jpg").unlink()
    (tmp_path / "images" / "c.jpg").unlink()
    with pytest.raises(SystemExit, match="none of its dev photos"):
        gpu_check.photos(3, gpu_check.Report(300.0), tmp_path)


def test_feature_stream_says_in_one_line_why_a_reading_process_failed(tmp_path):
    """--memory-limit-mb too small for the reading process's imports: one line naming the path
    and the limit, with the process's last word (had been a CalledProcessError traceback)."""
    import feature_stream

    _tiny_shard_cache(tmp_path / "cache")
    argv = ["--images", "3", "--shard-size", "2", "--dir", str(tmp_path / "cache"), "--memory-limit-mb", "20"]
    with pytest.raises(SystemExit) as stop:
        feature_stream.main([*argv, "--out", str(tmp_path)])
    said = str(stop.value.code)
    assert said.startswith("the new path's reading process failed under --memory-limit-mb 20 (exit ")
    assert "\n" not in said and not (tmp_path / "feature_stream.json").exists()


@pytest.mark.parametrize(
    "script, argv, option",
    [
        ("latency", ["--rounds", "0"], "--rounds"),
        ("latency", ["--per-round", "0"], "--per-round"),
        ("latency", ["--warmup", "-1"], "--warmup"),
        ("latency", ["--settle", "-1"], "--settle"),
        ("throughput", ["--rounds", "0"], "--rounds"),
        ("e2e", ["--per-round", "0"], "--per-round"),
        ("step_compare", [str(C.DEFAULT_MODEL)] * 2 + ["--rounds", "0"], "--rounds"),
        ("threads", ["--rounds", "0"], "--rounds"),
        ("threads", ["--calls", "0"], "--calls"),
        ("serve_load", ["--clients", "1", "0"], "--clients"),
        ("serve_load", ["--seconds", "0"], "--seconds"),
        ("serve_load", ["--rounds", "0"], "--rounds"),
    ],
)
def test_a_count_that_runs_nothing_is_a_usage_error(tmp_path, capsys, script, argv, option):
    """--rounds 0, --per-round 0, --calls 0, --clients 0, --seconds 0: had run nothing and
    written a report of NaNs with exit 0; a negative --settle had been a traceback. Each is
    refused as the arguments are read: exit 2, its last line naming the option and the value."""
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"error: argument {option}: takes " in err.splitlines()[-1]
    assert repr(argv[-1]) in err.splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_a_zero_warmup_and_settle_are_still_taken():
    """0 means none for --warmup and --settle (a smoke run uses --warmup 0)."""
    import latency

    args = latency.parse_args(["--warmup", "0", "--settle", "0", "--rounds", "1", "--per-round", "1"])
    assert (args.warmup, args.settle, args.rounds, args.per_round) == (0, 0.0, 1, 1)


@pytest.mark.parametrize(
    "script, argv, said",
    [
        ("latency", ["--beams", "0"], "argument --beams: takes whole numbers of 1 or more"),
        ("latency", ["--beams", "x"], "got 'x' in 'x'"),
        ("latency", ["--beams", "1,,3"], "got '' in '1,,3'"),
        ("latency", ["--batches", "0"], "argument --batches: takes whole numbers from 1 to 64"),
        ("latency", ["--batches", "8,65"], "got '65' in '8,65'"),
        ("latency", ["--max-length", "0"], "argument --max-length: takes a whole number of 1 or more"),
        ("latency", ["--threads", "abc"], "argument --threads: takes whole numbers of 1 or more"),
        ("latency", ["--threads", "0"], "got '0' in '0'"),
        ("throughput", ["--batch", "0"], "argument --batch: takes a whole number from 1 to 64; got '0'"),
        ("throughput", ["--beam", "0"], "argument --beam: takes a whole number of 1 or more; got '0'"),
        ("throughput", ["--limit", "-1"], "argument --limit: takes a whole number of 0 or more; got '-1'"),
        ("e2e", ["--beam", "0"], "argument --beam: takes a whole number of 1 or more; got '0'"),
        ("e2e", ["--batch", "100"], "argument --batch: takes a whole number from 1 to 64; got '100'"),
        ("file_rate", ["--n", "0"], "argument --n: takes a whole number of 1 or more; got '0'"),
        ("file_rate", ["--rounds", "0"], "argument --rounds: takes a whole number of 1 or more"),
        ("file_rate", ["--workers", "x"], "argument --workers: takes default or counts of 0 or more"),
        ("file_rate", ["--backend", "nosuch"], "argument --backend: takes backends from onnxruntime,"),
        ("file_rate", ["--device", "gpu"], "argument --device: takes cpu, cuda or cuda:N; got 'gpu'"),
        ("threads", ["--backends", "onnxruntime,nosuch"], "argument --backends: takes backends from"),
    ],
)
def test_a_bad_list_or_number_is_a_usage_error_as_the_arguments_are_read(capsys, script, argv, said):
    """Beams, batches, lengths, thread counts, backends and devices the Captioner cannot take:
    each had been a traceback (ValueError parsing the list, or the Captioner's once the model
    loaded, a batch over its 64). Now exit 2 as the arguments are read, the last line naming it."""
    module = __import__(script)
    parse = getattr(module, "parse_args", None) or module.build_parser().parse_args
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert said in err.splitlines()[-1]


def test_good_lists_and_numbers_are_still_taken():
    import file_rate
    import latency

    args = latency.parse_args(["--beams", "1,5", "--batches", "1,64", "--threads", "1,2"])
    assert (args.beams, args.batches, args.threads) == ([1, 5], [1, 64], [1, 2])
    assert latency.parse_args([]).beams == [1, 3, 5] and latency.parse_args([]).batches == [1, 8]
    args = file_rate.parse_args(["--workers", "default,0,2", "--device", "cuda:1", "--backend", "torch"])
    assert (args.workers, args.device, args.backend, args.batches) == (
        [None, 0, 2],
        "cuda:1",
        "torch",
        [1, 8, 64],
    )


def test_throughput_limit_0_captions_every_photo_there(tmp_path, monkeypatch):
    """--limit 0 is every photo (as its --help says), not none; a folder of 3 photos at --limit 2
    is its first 2 in name order (a negative limit had silently dropped the last photo)."""
    import throughput

    for name in ("c.png", "a.jpg", "b.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in C.image_files(tmp_path, 0)] == ["a.jpg", "b.jpeg", "c.png"]
    assert [p.name for p in C.image_files(tmp_path, 2)] == ["a.jpg", "b.jpeg"]
    assert "(0: every photo there)" in throughput.build_parser().format_help().replace("\n", " ")
    # the default photos, the Flickr8k dev list's: --limit 0 is all of them too
    (tmp_path / "dev.txt").write_text("c.png\na.jpg\nb.jpeg\n")
    monkeypatch.setattr(throughput, "DEV_LIST", tmp_path / "dev.txt")
    monkeypatch.setattr(throughput, "FULLRES", tmp_path)
    assert [p.name for p in throughput.default_photos(0)[0]] == ["c.png", "a.jpg", "b.jpeg"]
    assert [p.name for p in throughput.default_photos(2)[0]] == ["c.png", "a.jpg"]


@pytest.mark.parametrize(
    "which, folder, said",
    [
        ("b", "{absent}", "argument b: {absent}: no such folder"),
        ("a", "{empty}", "argument a: {empty}: no encoder.onnx or decoder_step.onnx"),
    ],
)
def test_step_compare_checks_both_model_folders_before_any_worker_starts(
    tmp_path, capsys, which, folder, said
):
    """A model folder that is not there or holds no model: exit 2 in one line naming it, as the
    arguments are read (had been a 34-line onnxruntime traceback from the worker)."""
    import step_compare

    where = {"absent": str(tmp_path / "absent"), "empty": str(tmp_path)}
    models = {"a": str(C.DEFAULT_MODEL), "b": str(C.DEFAULT_MODEL), which: folder.format(**where)}
    with pytest.raises(SystemExit) as stop:
        step_compare.main([models["a"], models["b"], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert said.format(**where) in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, said",
    [
        (None, "{q}: no such file"),
        ("{{not json", "{q}: not quality_speed.py's JSON (JSONDecodeError: "),
        ('{"benchmark": "latency", "targets": {}}', "{q}: not quality_speed.py's JSON (KeyError: 'images')"),
        ("[1, 2]", "{q}: not quality_speed.py's JSON (AttributeError: "),
    ],
)
def test_latency_refuses_a_quality_file_named_that_cannot_be_read(tmp_path, capsys, text, said):
    """--quality FILE missing or not quality_speed.py's JSON: exit 2 in one line naming it, before
    the run (had been ignored: the int8 target reported without its CIDEr, exit 0)."""
    import latency

    q = tmp_path / "q.json"
    if text is not None:
        q.write_text(text)
    with pytest.raises(SystemExit) as stop:
        latency.parse_args(["--quality", str(q)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"error: argument --quality: {said.format(q=q)}" in err.splitlines()[-1]


def test_latency_takes_a_good_quality_file_and_none(tmp_path):
    import latency

    q = tmp_path / "q.json"
    q.write_text(json.dumps({"date": "d", "images": 2, "results": [{"variant": "ort-fp32", "CIDEr": 0.5}]}))
    assert latency.parse_args(["--quality", str(q)]).quality == q
    assert latency.quality(q) == {"source": f"{q} (d, 2 photos)", "cider": {"ort-fp32": 0.5}}
    assert latency.parse_args([]).quality is None  # the committed figures, where readable
    assert latency.quality(tmp_path / "absent.json") == {}  # not named: none


@pytest.mark.parametrize(
    "a_text, said",
    [
        (
            '{"image_id": 1, "caption": "a dog"}',
            'not edgecap eval --output results (a JSON list of {"image_id"',
        ),
        ("[1, 2]", "not edgecap eval --output results"),
        ("[{", "not JSON ("),
        (
            '[{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}]',
            "two captions of image_id 1",
        ),
    ],
)
def test_compare_results_refuses_results_it_cannot_pair_in_one_line(tmp_path, a_text, said):
    """A results file that is a JSON object (had been a TypeError traceback), not JSON, or with two
    captions of one photo (the last had silently been kept): one line naming the file and what
    is wrong, before any score."""
    import compare_results
    from edgecap.errors import DataError

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(a_text)
    b.write_text(json.dumps([{"image_id": 1, "caption": "a dog"}]))
    with pytest.raises(DataError) as error:
        compare_results.read_results(a)
    assert str(error.value) == f"{a}: {said}" or str(error.value).startswith(f"{a}: {said}")
    assert "\n" not in str(error.value)
    assert compare_results.read_results(b) == {1: "a dog"}


def test_compare_results_refuses_zero_resamples(capsys):
    """--resamples 0 had been an IndexError traceback after scoring both files."""
    import compare_results

    with pytest.raises(SystemExit) as stop:
        compare_results.build_parser().parse_args(["a.json", "b.json", "--resamples", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "argument --resamples: takes a whole number of 1 or more; got '0'" in err.splitlines()[-1]


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"benchmark": "throughput", "results": []}', "not latency.py's results (no targets and results)"),
        ("[1]", "not latency.py's results"),
        ("{", "not JSON ("),
    ],
)
def test_chart_refuses_a_file_that_is_not_latency_results_in_one_line(tmp_path, text, said):
    """chart.py --json of another script's results had been a KeyError 'targets' traceback."""
    import chart

    given = tmp_path / "other.json"
    given.write_text(text)
    with pytest.raises(SystemExit) as stop:
        chart.main(["--json", str(given), "--out", str(tmp_path / "out")])
    assert str(stop.value.code).startswith(f"{given}: {said}") and "\n" not in str(stop.value.code)
    assert not (tmp_path / "out").exists()
