"""Statistics for comparing two measured variants (benchmarks only)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, n_resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean difference mean(b) - mean(a) of paired per-image scores, with a 95% interval from
    resampling the images (the same resample for both) and the share of resamples where b
    does not beat a."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores of the same images are needed, got {a.shape} and {b.shape}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_resamples, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "difference": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "p_not_better": float((means <= 0).mean()),
    }
