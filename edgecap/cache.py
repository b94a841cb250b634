"""Where edgecap keeps what it builds on a machine (TensorRT engines, timing caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGECAP_CACHE``, else ``$XDG_CACHE_HOME/edgecap``, else ``~/.cache/edgecap``. A
    relative ``$XDG_CACHE_HOME`` is ignored, as the XDG Base Directory specification says (it
    would put the engines under whatever folder a program is started from). With no home folder
    (HOME unset and the user without an entry in the password database: a container's arbitrary
    uid) a ``BackendError`` says to set ``EDGECAP_CACHE`` (``Path.home`` raised RuntimeError)."""
    if os.environ.get("EDGECAP_CACHE"):
        return Path(os.environ["EDGECAP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "edgecap"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):  # no HOME and no password entry for this uid
        from edgecap.errors import BackendError

        raise BackendError(
            "no folder for edgecap's cache: HOME is not set and this user (uid "
            f"{os.getuid() if hasattr(os, 'getuid') else '?'}) has no home folder; set EDGECAP_CACHE "
            "(or XDG_CACHE_HOME) to a writable folder"
        ) from None
    return home / ".cache" / "edgecap"
