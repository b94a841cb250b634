"""Where edgecap keeps what it builds on a machine (TensorRT engines, timing caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGECAP_CACHE``, else ``$XDG_CACHE_HOME/edgecap``, else ``~/.cache/edgecap``. A
    relative ``$XDG_CACHE_HOME`` is ignored, as the XDG Base Directory specification says (it
    would put the engines under whatever folder a program is started from)."""
    if os.environ.get("EDGECAP_CACHE"):
        return Path(os.environ["EDGECAP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "edgecap"
