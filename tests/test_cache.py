"""``edgecap.cache.cache_root``: where TensorRT engines and timing caches are kept
(``edgecap build``'s default ``--out``): ``$EDGECAP_CACHE``, else ``$XDG_CACHE_HOME/edgecap``,
else ``~/.cache/edgecap``. The expected folders are written out here from that rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecap.cache import cache_root


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("EDGECAP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path


def test_edgecap_cache_comes_first_and_a_tilde_is_the_home_folder(home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    monkeypatch.setenv("EDGECAP_CACHE", "~/engines-here")
    assert cache_root() == home / "engines-here"


def test_xdg_cache_home_next_then_the_home_folders_cache(home, monkeypatch):
    assert cache_root() == home / ".cache" / "edgecap"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    assert cache_root() == home / "xdg" / "edgecap"
    monkeypatch.setenv("EDGECAP_CACHE", "")  # set but empty: as if unset
    assert cache_root() == home / "xdg" / "edgecap"


@pytest.mark.parametrize("relative", ["cache", "./cache", "~/cache"])
def test_a_relative_xdg_cache_home_is_ignored(home, monkeypatch, relative):
    """The XDG Base Directory specification: "If an implementation encounters a relative path in
    any of these variables it should consider the path invalid and ignore it." A relative one
    had put the engines under the folder a program was started from (each its own, rebuilt for
    minutes); the shell expands a ~ itself, so one left in is relative too."""
    monkeypatch.setenv("XDG_CACHE_HOME", relative)
    assert cache_root() == home / ".cache" / "edgecap"


def test_no_home_folder_is_one_error_naming_edgecap_cache(monkeypatch):
    """HOME unset and a uid without a password entry (a container's arbitrary uid): Path.home
    raised RuntimeError('Could not determine home directory.'), a traceback from `edgecap build`
    and from the TensorRT execution provider's options; now a BackendError saying what to set."""
    import pwd

    from edgecap.errors import BackendError

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("EDGECAP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(BackendError, match="set EDGECAP_CACHE"):
        cache_root()
    monkeypatch.setenv("EDGECAP_CACHE", "/somewhere/cache")
    assert cache_root() == Path("/somewhere/cache")
