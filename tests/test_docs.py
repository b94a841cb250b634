"""The README and the docs pages: links that resolve, a README that stays a front page linking
every page, commands that are the ones CI runs, and a quick-subset list that names real tests.

The docs site itself is built by ``.ci/run`` (``mkdocs build --strict``), not here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))

import check_links  # noqa: E402

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def fenced_commands(path: Path) -> list[str]:
    """The lines of a Markdown file's ```sh blocks."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```sh"
            continue
        if inside and line.strip():
            lines.append(line.split("#")[0].strip())
    return lines


def test_every_relative_link_of_the_readme_and_the_docs_resolves(capsys):
    files = check_links.default_files()
    assert README in files and DOCS / "index.md" in files
    assert check_links.main([]) == 0, capsys.readouterr().out


def test_the_link_check_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Part one\n\n## Java for `edgecap eval`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n"
        "[fine](other.md) [fine](other.md#part-one) [fine](other.md#java-for-edgecap-eval) "
        "[fine](#a-page) [fine](https://example.invalid/x) `[in code](gone.md)`\n"
        "[gone](gone.md)\n"
        "[no anchor](other.md#part-two)\n"
        "```\n[in a code block](gone.md)\n```\n"
    )
    problems = check_links.check(page, {}, root=tmp_path)
    assert problems == [
        "page.md:3: gone.md: no such file or folder",
        "page.md:4: other.md#part-two: no heading with anchor #part-two in other.md",
    ]


def test_a_link_out_of_the_repository_is_reported(tmp_path):
    inside = tmp_path / "repo"
    inside.mkdir()
    (tmp_path / "outside.md").write_text("# Out\n")
    page = inside / "page.md"
    page.write_text("[out](../outside.md)\n")
    assert check_links.check(page, {}, root=inside) == [
        "page.md:1: ../outside.md: points outside the repository"
    ]


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    linked = {Path(target).name for target in re.findall(r"\]\(docs/([^)#]+)", text)}
    pages = {page.name for page in DOCS.glob("*.md")}
    assert pages - linked == set(), "docs pages the README does not link"


def test_the_readmes_setup_and_test_commands_are_the_ones_ci_runs():
    ci_lines = [
        line.split("  #")[0].rstrip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ]
    commands = fenced_commands(README)
    install = [c for c in commands if c.startswith(".venv/bin/pip install")]
    test = [c for c in commands if "pytest" in c and "slow" not in c]  # not the quick subset
    assert install and test
    for command in install + test:  # the whole command, at the end of a line of .ci/run
        assert any(line.endswith(" " + command) for line in ci_lines), (
            f"the README's {command!r} is not what .ci/run runs"
        )


def test_each_test_listed_as_slow_exists():
    from conftest import slow_test_ids

    missing = []
    for test_id in sorted(slow_test_ids()):
        file, _, name = test_id.partition("::")
        path = ROOT / file
        if not path.is_file() or not re.search(
            rf"^\s*def {re.escape(name)}\(", path.read_text(encoding="utf-8"), re.M
        ):
            missing.append(test_id)
    assert missing == [], "tests/slow_tests.txt names tests that do not exist"


@pytest.mark.parametrize("line", ["[x](gone.md)", "![x](gone.png)"])
def test_images_and_links_are_both_checked(tmp_path, line):
    page = tmp_path / "page.md"
    page.write_text(line + "\n")
    assert len(check_links.check(page, {}, root=tmp_path)) == 1


def test_a_link_whose_text_runs_over_two_lines_is_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\nSee [the other\npage](gone.md) and [this one](#page).\n")
    assert check_links.check(page, {}, root=tmp_path) == ["page.md:3: gone.md: no such file or folder"]
