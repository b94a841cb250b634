"""benchmarks/_stats.py: the paired bootstrap behind ``benchmarks/compare_results.py``."""

from __future__ import annotations

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
