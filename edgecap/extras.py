"""What to run to install one of edgecap's extras, for error messages.

edgecap is not on PyPI: pip, asked for ``edgecap[video]`` by name, would fetch another package
of that name or nothing. A hint names the extra's own requirements, which pip installs into any
environment (edgecap installed from a clone or from a wheel), then the form for a clone, on one
line:

    pip install 'opencv-python-headless>=4.8' (edgecap's video extra; from a clone of edgecap:
    pip install '.[video]')

The requirements come from the installed package's metadata, which pip writes from
pyproject.toml at install time (an editable install's metadata is refreshed by installing it
again), so hints and pyproject.toml are not kept in step by hand. Without that metadata (edgecap
run from a source tree that was not installed) the hint names the extra and pyproject.toml.
"""

from __future__ import annotations

import re

DISTRIBUTION = "edgecap"


def _normalize(extra: str) -> str:
    """An extra's name as metadata writes it (PEP 685): lower case, runs of ``-_.`` one ``-``."""
    return re.sub(r"[-_.]+", "-", extra).lower()


def extra_requirements(extra: str) -> list[str] | None:
    """The requirement strings of ``extra`` in the installed metadata, in order, without
    duplicates; an extra that names edgecap's own extras (``edgecap[cpu,train]``) has theirs.
    None when edgecap's metadata is not installed or has no such extra."""
    from importlib import metadata

    try:
        entries = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    by_extra: dict[str, list[str]] = {}
    for entry in entries:  # 'onnxruntime>=1.16; extra == "cpu"'
        requirement, _, marker = entry.partition(";")
        found = re.search(r"""\bextra\s*==\s*(["'])([^"']+)\1""", marker)
        if found:
            # the rest of the marker stays with it ('triton>=3.2; sys_platform == "linux"'),
            # so that the hint installs nothing the extra would not on this platform
            rest = (marker[: found.start()] + marker[found.end() :]).strip()
            rest = re.sub(r"^and\s+|\s+and$", "", rest).strip()
            requirement = requirement.strip() + (f"; {rest}" if rest else "")
            by_extra.setdefault(_normalize(found.group(2)), []).append(requirement)

    def expand(name: str, seen: frozenset[str]) -> list[str]:
        out = []
        for requirement in by_extra.get(name, []):
            own = re.fullmatch(rf"{DISTRIBUTION}\s*\[([^\]]*)\]", requirement, flags=re.IGNORECASE)
            if not own:
                out.append(requirement)
                continue
            for inner in own.group(1).split(","):
                inner = _normalize(inner.strip())
                if inner and inner not in seen:
                    out.extend(expand(inner, seen | {inner}))
        return out

    name = _normalize(extra)
    if name not in by_extra:
        return None
    return list(dict.fromkeys(expand(name, frozenset({name}))))


def _quoted(requirement: str) -> str:
    if "'" in requirement:
        import shlex

        return shlex.quote(requirement)
    return f"'{requirement}'"


def install_hint(extra: str) -> str:
    """One line saying how to install ``extra`` (``"video"``, ``"train"``, ...) into this
    environment; see the module's docstring."""
    requirements = extra_requirements(extra)
    if requirements is None:
        return (
            f"pip install '.[{extra}]' in a clone of edgecap (the {extra} extra; its packages "
            "are listed in pyproject.toml)"
        )
    packages = " ".join(_quoted(r) for r in requirements)
    clone = f"pip install '.[{extra}]'"
    return f"pip install {packages} (edgecap's {extra} extra; from a clone of edgecap: {clone})"
