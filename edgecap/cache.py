"""Where edgecap keeps what it builds on a machine (TensorRT engines, timing caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGECAP_CACHE``, else ``$XDG_CACHE_HOME/edgecap``, else ``~/.cache/edgecap``."""
    if os.environ.get("EDGECAP_CACHE"):
        return Path(os.environ["EDGECAP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edgecap"
