#!/usr/bin/env python3
"""Check the relative links of the README and the docs pages, offline.

    python .ci/check_links.py [FILE.md ...]     # default: README.md, docs/*.md, */README.md

Every ``[text](target)`` and ``![alt](target)`` outside code is checked: a relative target must
name a file or folder of the checkout, and a ``#anchor`` (alone or after a Markdown file) must
name a heading of that file, slugged as GitHub or mkdocs would (either is accepted). External
links (``http:``, ``https:``, ``mailto:``) are not fetched: CI has no network. Exit status 1 with
one line per broken link, ``FILE:LINE: target: why``.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def default_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    files += sorted(p for p in ROOT.glob("*/README.md") if not p.parts[-2].startswith("."))
    return [p for p in files if p.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slugs(heading: str) -> set[str]:
    """The anchors GitHub and mkdocs (python-markdown's toc) give a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    github = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    mkdocs = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", plain).strip().lower())
    return {github, mkdocs}


def anchors(path: Path, cache: dict[Path, set[str]]) -> set[str]:
    if path not in cache:
        found: set[str] = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            match = HEADING.match(line)
            if match:
                found |= slugs(match.group(2))
        cache[path] = found
    return cache[path]


def check(path: Path, cache: dict[Path, set[str]], root: Path = ROOT) -> list[str]:
    """One line per broken link of the Markdown file ``path`` (links must stay inside ``root``)."""
    problems = []
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    # the prose as one text (a link's words may run over two lines), fenced code blanked out
    lines = dict(prose_lines(path.read_text(encoding="utf-8")))
    text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
    text = re.sub(r"`[^`\n]*`", "``", text)  # a link inside inline code is not a link
    for match in LINK.finditer(text):
        number = text.count("\n", 0, match.start()) + 1
        target = match.group(1)
        if target.startswith(EXTERNAL):
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            problems.append(f"{rel}:{number}: {target}: unknown link scheme")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if file_part.startswith("/"):
            problems.append(f"{rel}:{number}: {target}: absolute path; use a relative link")
            continue
        if not dest.exists():
            problems.append(f"{rel}:{number}: {target}: no such file or folder")
            continue
        if not dest.is_relative_to(root):
            problems.append(f"{rel}:{number}: {target}: points outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{rel}:{number}: {target}: an anchor into a non-Markdown file")
            elif anchor not in anchors(dest, cache):
                problems.append(
                    f"{rel}:{number}: {target}: no heading with anchor #{anchor} in {dest.relative_to(root)}"
                )
    return problems


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv] or default_files()
    cache: dict[Path, set[str]] = {}
    problems = [p for f in files for p in check(f, cache)]
    for problem in problems:
        print(problem)
    print(f"check_links: {len(files)} files, {len(problems)} broken links", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
