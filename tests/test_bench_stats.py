"""benchmarks/_stats.py: the paired bootstrap behind ``benchmarks/compare_results.py`` (and that
script's figures); the percentiles and medians of ``benchmarks/_common.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _stats import paired_bootstrap  # noqa: E402


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 500)
    clear = paired_bootstrap(a, a + 0.05 + rng.normal(0, 0.05, 500), 2000)
    assert 0 < clear["low"] < clear["difference"] < clear["high"]
    assert clear["p_not_better"] == 0.0
    noise = paired_bootstrap(a, a + rng.normal(0, 0.3, 500), 2000)
    assert noise["low"] < 0 < noise["high"] and 0.05 < noise["p_not_better"] < 0.95
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap(a, a[:10])


def test_paired_bootstrap_resamples_the_images_for_both_and_reports_a_95_percent_interval():
    """Worked from the definition, not from the code: a constant per-image gain of 0.01 is
    0.01 in every resample of the images when both runs are resampled together (unpaired, the
    spread of the scores themselves, uniform on [0, 1], would widen the interval to about
    +-0.036); per-image differences of mean 0 and standard deviation 1 over 200 images have a
    standard error of 1/sqrt(200), so a 95% interval of about +-1.96/sqrt(200) = +-0.139 (a 90%
    one would be +-0.116); equal scores never beat each other: p_not_better is 1."""
    a = np.random.default_rng(2).uniform(0, 1, 400)
    paired = paired_bootstrap(a, a + 0.01, 2000)
    assert paired["difference"] == pytest.approx(0.01, abs=1e-12)
    assert paired["low"] == pytest.approx(0.01, abs=1e-9) and paired["high"] == pytest.approx(0.01, abs=1e-9)
    assert paired["p_not_better"] == 0.0
    diff = np.random.default_rng(3).normal(0, 1, 200)
    diff = (diff - diff.mean()) / diff.std()
    spread = paired_bootstrap(np.zeros(200), diff, 4000)
    assert spread["difference"] == pytest.approx(0.0, abs=1e-12)
    assert -0.15 < spread["low"] < -0.128 and 0.128 < spread["high"] < 0.15
    assert paired_bootstrap(a, a.copy(), 100)["p_not_better"] == 1.0


def test_paired_bootstrap_of_two_photos_draws_both_with_replacement():
    """Worked from the definition: per-photo differences 0 and 1, resampled two at a time with
    replacement, give the four equally likely resamples (0, 0), (0, 1), (1, 0), (1, 1), means
    0, 0.5, 0.5, 1: B is not better in one of four (0.25); the 2.5th and 97.5th percentiles of
    the means are 0 and 1. A resample one photo short (means 0 or 1: 0.5) or one never drawing
    the last photo (always 0: 1.0) is not the bootstrap the intervals in docs/quality.md are."""
    got = paired_bootstrap([0.0, 0.0], [0.0, 1.0], 10000)
    assert got["difference"] == 0.5
    assert got["p_not_better"] == pytest.approx(0.25, abs=0.015)
    assert (got["low"], got["high"]) == (0.0, 1.0)


def test_percentile_and_median_interpolate_between_the_sorted_values():
    """The benchmarks' p50 / p95 (``_common.percentile``, ``median``) are the textbook linear
    interpolation (Hyndman and Fan's type 7, numpy's and R's default): the q-th percentile of n
    sorted values sits at 0-based rank (n - 1) q / 100. Of 1..100 the 95th is at rank 94.05:
    95.05; of 10, 20, 30, 40, 50 the 25th is 20 and the 90th 46; the median of an even count is
    the mean of the middle two, of 1, 2, 100 it is 2 (the mean would be 34.3); none: NaN."""
    import _common as C

    assert C.percentile([float(v) for v in range(100, 0, -1)], 95) == pytest.approx(95.05)
    assert C.percentile([50, 10, 40, 20, 30], 25) == pytest.approx(20.0)
    assert C.percentile([50, 10, 40, 20, 30], 90) == pytest.approx(46.0)
    assert C.median([4.0, 1.0, 3.0, 2.0]) == pytest.approx(2.5)
    assert C.median([1.0, 100.0, 2.0]) == pytest.approx(2.0)
    assert np.isnan(C.median([])) and np.isnan(C.percentile([], 95))


def test_table_cells_keep_three_significant_digits_and_the_harness_columns():
    """The results tables' numbers (``number_text``, as its docstring says: 3 significant digits
    under 10, one decimal under 1000, none above, NaN "-"), and the harness columns of a variant
    (``harness_cells``): its alone median times ``scale`` (80 ms for a batch of 8: 10 ms a
    photo), the interleaved median's difference from it in percent, and the flag."""
    import _common as C

    assert [C.number_text(v) for v in (1.33333, 0.0123456, 29.6543, 999.94, 12345.6)] == [
        "1.33",
        "0.0123",
        "29.7",
        "999.9",
        "12346",
    ]
    assert C.number_text(float("nan")) == "-"
    flagged = {"alone": {"median_ms": 80.0}, "interleaved_vs_alone": 0.2, "flagged": True}
    assert C.harness_cells(flagged, scale=1 / 8) == [10.0, "+20%", "FLAG"]
    quiet = {"alone": {"median_ms": 30.1}, "interleaved_vs_alone": -0.0133, "flagged": False}
    assert C.harness_cells(quiet) == [30.1, "-1%", ""]
    cells = C.harness_cells({})  # no alone pass
    assert cells[0] != cells[0] and cells[1:] == ["-", ""]
    assert C.markdown_table(["p50"], [[29.6543]]).splitlines()[-1] == "| 29.7 |"


def test_a_report_says_whether_its_cpu_has_vnni():
    """The result files name the CPU's instruction sets that change the figures: "AMD EPYC" is
    one with AVX-512 VNNI (int8 dot products) and one without, whose int8 speed-ups differ
    (1.21x against 1.42x); the docs' "with VNNI" could not be checked from a result file."""
    from _machine import _cpu_features, machine_markdown

    with_vnni = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    without = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n"
    assert _cpu_features(with_vnni) == ["avx2", "avx512f", "avx512_vnni"]
    assert _cpu_features(without) == ["avx2"] and _cpu_features("model name : ?\n") == []
    info = {
        "cpu": "AMD EPYC",
        "logical_cores": 2,
        "physical_cores": 2,
        "usable_cores": 2,
        "os": "Linux",
        "python": "3.11",
        "packages": {},
    }
    line = machine_markdown({**info, "cpu_features": _cpu_features(with_vnni)}).splitlines()[0]
    assert (
        line == "- CPU: AMD EPYC (2 logical, 2 physical, 2 usable by this process; with VNNI; "
        "avx2 avx512f avx512_vnni)"
    )
    line = machine_markdown({**info, "cpu_features": ["avx2"]}).splitlines()[0]
    assert line.endswith("; without VNNI; avx2)")
    # a report's info from before the features were recorded: as it was
    assert (
        machine_markdown(info).splitlines()[0]
        == "- CPU: AMD EPYC (2 logical, 2 physical, 2 usable by this process)"
    )


def test_compare_results_reports_b_minus_a_over_the_same_photos(tmp_path, capsys):
    """``compare_results.py A B``: CIDEr-D worked by hand. The three photos' references share no
    word, so every n-gram weighs log(3 / 1): a caption that is its photo's reference has cosine 1
    at every order, CIDEr-D 10; one sharing no word with it, 0. A says photo 1's reference, B
    photos 1's and 2's: per photo B - A is 0, 10, 0, the difference 10 / 3, and B is not better
    only in the resamples without photo 2, (2 / 3) ** 3 = 8 / 27 of them; the interval spans 0
    (8 / 27 of the resamples) to 10 (photo 2 three times: 1 / 27, over 2.5%)."""
    pytest.importorskip("pycocoevalcap")
    import compare_results
    from helpers import coco_json

    said = {1: "a cat sits on a red mat", 2: "two dogs run in the park", 3: "an old man reads"}
    refs = coco_json(
        tmp_path / "refs.json", {f"{k}.jpg": [c] for k, c in said.items()}, ids={f"{k}.jpg": k for k in said}
    )
    wrong = {1: "three birds fly", 2: "blue sky", 3: "green trees"}
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    for path, right in ((a, (1,)), (b, (1, 2))):
        captions = {k: said[k] if k in right else wrong[k] for k in said}
        path.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in captions.items()]))
    compare_results.main([str(a), str(b), "--references", str(refs), "--out", str(tmp_path / "out")])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["n_images"] == 3
    figures = (got["CIDEr A"], got["CIDEr B"], got["difference"])
    assert figures == pytest.approx((10 / 3, 20 / 3, 10 / 3), abs=1e-4)
    assert got["p_not_better"] == pytest.approx(8 / 27, abs=0.015)
    assert (got["low"], got["high"]) == pytest.approx((0.0, 10.0), abs=1e-4)
