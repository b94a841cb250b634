#!/usr/bin/env python3
"""Check the tests the hard way: one-point mutants of a module, each run against the tests that
should catch it; the mutants no test fails are listed (survivors).

    python .ci/mutants.py MODULE.py TESTS... [--timeout S] [--start N] [--limit N] [--json OUT]
                          [--survivors EARLIER.json] [--slow]

Each mutant changes one token of ``MODULE.py`` (a comparison flipped or made strict, ``+`` and
``-`` or ``*`` and ``/`` swapped, ``and`` and ``or``, ``True`` and ``False``, ``min`` and ``max``,
an integer below 100 plus one, a ``not`` dropped; strings, comments and docstrings untouched).
They run in a scratch clone of the checkout's last commit (with this checkout's uncommitted
changes to the tests copied in), never in the checkout itself: ``python -m pytest -q -x -n 0
-m "not slow" TESTS`` with the clone first on ``PYTHONPATH``, a mutant that runs past
``--timeout`` seconds (a loop made endless) counted as caught. A survivor is a lead, not a
verdict: many are equivalent (a bound no input reaches, a default no caller uses, a
performance knob); the others are behaviour no test pins. Expect about 10-30 s a mutant on a
2-core CPU with a file's own tests.

``--survivors EARLIER.json`` runs only the mutants an earlier run's ``--json`` lists as survived
(the same line, column and tokens; the module's lines must not have moved since), against the
tests given now: wider tests, ``--slow`` ones (which adds the tests marked slow) or the tests
written for them. pytest's own options go after ``--``: ``--slow ... -- -m slow TESTS...`` runs
the slow tests alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWAPS = {
    "<": "<=",
    "<=": "<",
    ">": ">=",
    ">=": ">",
    "==": "!=",
    "!=": "==",
    "+": "-",
    "-": "+",
    "*": "/",
    "/": "*",
    "//": "/",
    "+=": "-=",
    "-=": "+=",
    "and": "or",
    "or": "and",
    "True": "False",
    "False": "True",
    "min": "max",
    "max": "min",
}
# an operator after these is unary, or a signature's marker (``*,``, ``/,``): not mutated
UNARY_AFTER = {
    "(",
    "[",
    "{",
    ",",
    "=",
    ":",
    "return",
    "==",
    "<",
    ">",
    "<=",
    ">=",
    "*",
    "/",
    "**",
    "+",
    "-",
    "in",
}


@dataclass
class Mutant:
    line: int  # 1-based
    column: int
    old: str
    new: str
    text: str = ""  # the line as written
    caught: bool | None = None
    seconds: float = 0.0

    def applied(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        line = lines[self.line - 1]
        if line[self.column : self.column + len(self.old)] != self.old:
            raise ValueError(f"line {self.line} does not hold {self.old!r} at column {self.column}")
        lines[self.line - 1] = line[: self.column] + self.new + line[self.column + len(self.old) :]
        return "".join(lines)


def mutants(source: str) -> list[Mutant]:
    """Every one-token mutant of ``source``, in the order of the file."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines()
    found = []
    for i, tok in enumerate(tokens):
        before = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        (row, column), text = tok.start, tok.string
        if tok.type in (tokenize.OP, tokenize.NAME) and text in SWAPS:
            if text in ("+", "-", "*", "/") and (before in UNARY_AFTER or after in (",", ")")):
                continue
            found.append(Mutant(row, column, text, SWAPS[text]))
        elif tok.type == tokenize.NUMBER and text.isdigit() and int(text) < 100:
            found.append(Mutant(row, column, text, str(int(text) + 1)))
        elif (
            text == "not" and after != "in" and before != "is" and lines[row - 1][column:].startswith("not ")
        ):
            found.append(Mutant(row, column, "not ", ""))
    for mutant in found:
        mutant.text = lines[mutant.line - 1].strip()
    return found


def scratch_clone(where: Path, root: Path = ROOT) -> Path:
    """A clone of the checkout ``root``'s last commit under ``where``, with the checkout's
    uncommitted changes to tests/ copied in (the tests being written are the ones to try)."""
    clone = where / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(root), str(clone)], check=True)
    changed = subprocess.run(
        ["git", "-C", str(root), "diff", "--name-only", "HEAD", "--", "tests"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in changed:
        if (root / name).is_file():
            (clone / name).write_bytes((root / name).read_bytes())
    return clone


def survivors(chosen: list[Mutant], earlier: list[dict]) -> list[Mutant]:
    """The mutants of ``chosen`` that ``earlier`` (a ``--json`` file's list) records as survived;
    an earlier survivor that is no longer a mutant of the module (its line changed) is an error."""
    key = {(m.line, m.column, m.old, m.new): m for m in chosen}
    kept = []
    for old in earlier:
        if old.get("caught") is False:
            found = key.get((old["line"], old["column"], old["old"], old["new"]))
            if found is None or found.text != old["text"]:
                raise SystemExit(
                    f"line {old['line']} no longer holds the earlier survivor {old['old']!r} -> "
                    f"{old['new']!r} ({old['text']}): run the whole module again"
                )
            kept.append(found)
    return kept


def run(
    mutant: Mutant, clone: Path, module: str, tests: list[str], timeout: float, slow: bool = False
) -> None:
    path = clone / module
    source = path.read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(clone), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
    ] + ([] if slow else ["-m", "not slow"])
    start = time.perf_counter()
    try:
        path.write_text(mutant.applied(source), encoding="utf-8")
        try:
            done = subprocess.run(command + tests, cwd=clone, env=env, capture_output=True, timeout=timeout)
            mutant.caught = done.returncode != 0
        except subprocess.TimeoutExpired:
            mutant.caught = True
    finally:
        path.write_text(source, encoding="utf-8")
        mutant.seconds = round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("module", help="the file to mutate, relative to the checkout (edgecap/...py)")
    parser.add_argument("tests", nargs="+", help="pytest arguments: the test files that should catch them")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a mutant may run (default: 300)")
    parser.add_argument("--start", type=int, default=0, help="skip the first N mutants (default: 0)")
    parser.add_argument("--limit", type=int, default=None, help="run at most N mutants")
    parser.add_argument("--json", type=Path, help="also write every mutant and its outcome here")
    parser.add_argument("--survivors", type=Path, help="only the survivors of an earlier run's --json")
    parser.add_argument("--slow", action="store_true", help="run the tests marked slow too")
    args = parser.parse_args(argv)
    source = (root / args.module).read_text(encoding="utf-8")
    chosen = mutants(source)
    if args.survivors:
        chosen = survivors(chosen, json.loads(args.survivors.read_text(encoding="utf-8")))
    chosen = chosen[args.start :][: args.limit]
    print(f"{args.module}: {len(chosen)} mutants", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgecap-mutants-") as where:
        clone = scratch_clone(Path(where), root)
        for mutant in chosen:
            run(mutant, clone, args.module, args.tests, args.timeout, args.slow)
            if not mutant.caught:
                print(
                    f"survived {args.module}:{mutant.line}: {mutant.old!r} -> {mutant.new!r}: {mutant.text}",
                    flush=True,
                )
            if args.json:
                args.json.write_text(json.dumps([asdict(m) for m in chosen], indent=1) + "\n")
    caught = sum(bool(m.caught) for m in chosen)
    print(f"{caught} of {len(chosen)} caught, {len(chosen) - caught} survived", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
