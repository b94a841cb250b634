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
