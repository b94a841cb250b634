""".ci/mutants.py, the mutation check of the tests (docs/getting-started.md): which tokens it
mutates, and that a mutant the tests fail is caught and one they pass survives, run in a scratch
clone that leaves the checkout as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))

import mutants  # noqa: E402

SNIPPET = '''def f(a, *, b=2):
    """a < b in a docstring"""
    # a + b in a comment
    if a < b and not a:
        return -a + b * 3
    return "x - y" if a is not b else min(a, b)
'''


def test_the_mutants_of_a_snippet_are_its_operators_and_small_numbers():
    """Every comparison, binary operator, boolean, ``min`` and small integer once, a ``not``
    dropped; the unary minus, the signature's ``*``, ``is not``, the docstring, the comment and
    the string left alone."""
    got = [(m.line, m.old, m.new) for m in mutants.mutants(SNIPPET)]
    assert got == [
        (1, "2", "3"),
        (4, "<", "<="),
        (4, "and", "or"),
        (4, "not ", ""),
        (5, "+", "-"),
        (5, "*", "/"),
        (5, "3", "4"),
        (6, "min", "max"),
    ]
    mutant = mutants.mutants(SNIPPET)[1]
    assert mutant.applied(SNIPPET).splitlines()[3] == "    if a <= b and not a:"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


MODULE = "def double(x):\n    return x * 2\n\n\ndef positive(x):\n    return x > 0\n"


def _calc_repo(tmp_path: Path, tests: str) -> Path:
    """A git repository whose one commit holds ``pkg/calc.py`` (``MODULE``) and ``tests``
    as tests/test_calc.py."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "pkg" / "calc.py").write_text(MODULE)
    (repo / "tests" / "test_calc.py").write_text(tests)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "calc")
    return repo


def test_a_mutant_the_tests_fail_is_caught_and_one_they_pass_survives(tmp_path, capsys):
    """A module of two functions, its test pinning one of them: the mutants of the tested one are
    caught, those of the other survive and are listed; the checkout is left as it was."""
    repo = _calc_repo(
        tmp_path, "from pkg.calc import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    )
    out = tmp_path / "mutants.json"
    assert mutants.main(["pkg/calc.py", "tests/test_calc.py", "--json", str(out)], root=repo) == 0
    outcome = {(m["line"], m["old"], m["new"]): m["caught"] for m in json.loads(out.read_text())}
    assert outcome == {(2, "*", "/"): True, (2, "2", "3"): True, (6, ">", ">="): False, (6, "0", "1"): False}
    printed = capsys.readouterr().out
    assert "survived pkg/calc.py:6: '>' -> '>=': return x > 0" in printed
    assert "2 of 4 caught, 2 survived" in printed
    assert (repo / "pkg" / "calc.py").read_text() == MODULE


def test_the_survivors_run_again_against_the_slow_tests_and_only_they(tmp_path, capsys):
    """``--survivors`` runs only an earlier run's survivors, ``--slow`` adds the tests marked slow:
    a slow test pinning the function whose mutants survived the quick tests catches them, and the
    mutants caught before are not run again; a survivor whose line has changed since is refused."""
    repo = _calc_repo(
        tmp_path,
        "import pytest\n\nfrom pkg.calc import double, positive\n\n\n"
        "def test_double():\n    assert double(3) == 6\n\n\n"
        "@pytest.mark.slow\ndef test_positive():\n    assert not positive(0) and positive(1)\n",
    )
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert mutants.main(["pkg/calc.py", "tests/test_calc.py", "--json", str(first)], root=repo) == 0
    assert [(m["line"], m["old"]) for m in json.loads(first.read_text()) if not m["caught"]] == [
        (6, ">"),
        (6, "0"),
    ]
    capsys.readouterr()
    args = ["pkg/calc.py", "tests/test_calc.py", "--survivors", str(first), "--json", str(second)]
    assert mutants.main([*args, "--slow"], root=repo) == 0
    rerun = {(m["line"], m["old"]): m["caught"] for m in json.loads(second.read_text())}
    assert rerun == {(6, ">"): True, (6, "0"): True}
    assert "2 of 2 caught, 0 survived" in capsys.readouterr().out
    assert mutants.main(args, root=repo) == 0  # without --slow they survive again
    assert "0 of 2 caught, 2 survived" in capsys.readouterr().out
    (repo / "pkg" / "calc.py").write_text(MODULE.replace("x > 0", "x > 1"))
    with pytest.raises(SystemExit, match="line 6 no longer holds the earlier survivor '>'"):
        mutants.main(args, root=repo)
