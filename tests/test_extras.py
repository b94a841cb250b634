"""Install hints for the extras (``edgecap.extras``): edgecap is not on PyPI, so a hint is a
command that works without it (the extra's own requirements, or ``pip install '.[x]'`` in a
clone), never ``pip install 'edgecap[x]'``. Expected values come from pyproject.toml itself and
from metadata that setuptools writes from it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency there
    import tomli as tomllib

from edgecap.extras import install_hint

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def pyproject_requirements(extra: str) -> set[str]:
    """pyproject.toml's requirement strings of ``extra``, edgecap's own extras
    (``edgecap[cpu,train]``) replaced by theirs."""
    out: set[str] = set()
    for requirement in EXTRAS[extra]:
        own = re.fullmatch(r"edgecap\[(.*)\]", requirement)
        if own:
            for inner in own.group(1).split(","):
                out |= pyproject_requirements(inner.strip())
        else:
            out.add(requirement)
    return out


def _canonical(requirement: str) -> str:
    """A requirement with its environment marker as setuptools' metadata writes it (the
    marker's quotes)."""
    name, _, marker = requirement.partition(";")
    return name.strip() + (f"; {Marker(marker)}" if marker.strip() else "")


def hinted_requirements(hint: str) -> list[str]:
    """The arguments of the hint's leading ``pip install`` command, as a shell reads them."""
    assert hint.startswith("pip install "), hint
    command = hint.split(" (", 1)[0]
    return shlex.split(command)[2:]


@pytest.fixture(scope="module")
def fresh_requires(tmp_path_factory):
    """``Requires-Dist`` as setuptools writes it from this checkout's pyproject.toml now (the
    installed metadata may predate an edit of pyproject.toml until edgecap is reinstalled);
    without setuptools (a Python 3.12 venv), the installed metadata. A setuptools that cannot
    build it (pyproject.toml's build requirements: setuptools>=77 and wheel's bdist_wheel, in
    setuptools itself from 70.1) skips: a plain venv's setuptools 65 without wheel."""
    if importlib.util.find_spec("setuptools") is None:
        return importlib.metadata.requires("edgecap")
    return importlib.metadata.PathDistribution(built_metadata(tmp_path_factory)).requires


def built_metadata(tmp_path_factory, deprecations_fail: bool = False) -> Path:
    """The .dist-info folder setuptools writes from this checkout's pyproject.toml (with
    ``deprecations_fail``, every setuptools deprecation an error); skips where setuptools cannot
    build it (see above)."""
    setuptools = pytest.importorskip("setuptools")

    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    bdist_wheel = any(importlib.util.find_spec(name) for name in ("setuptools.command.bdist_wheel", "wheel"))
    if version < (77,) or not bdist_wheel:
        pytest.skip(
            "writing edgecap's metadata needs setuptools>=77 and wheel (pyproject.toml's "
            f"build requirements); here: setuptools {setuptools.__version__}"
            + ("" if bdist_wheel else ", no wheel")
        )
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    (source / "edgecap").mkdir()
    (source / "edgecap" / "__init__.py").write_text("")
    out = tmp_path_factory.mktemp("metadata")
    code = (
        "import sys, warnings\nfrom setuptools import build_meta\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        + ("warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n" if deprecations_fail else "")
        + "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    dist_info = out / run.stdout.strip().splitlines()[-1]
    assert importlib.metadata.PathDistribution(dist_info).requires, "setuptools wrote no Requires-Dist"
    return dist_info


def test_the_package_builds_without_a_setuptools_deprecation(tmp_path_factory):
    """A deprecated pyproject.toml form builds until setuptools drops it (the license as a table
    { text = ... }: "By 2027-Feb-18 ... your builds will no longer be supported"), and then
    `pip wheel .` and `pip install '.[cpu]'` (docs/getting-started.md) fail with the newest
    setuptools, which they fetch. The metadata says the licence as an SPDX expression."""
    dist_info = built_metadata(tmp_path_factory, deprecations_fail=True)
    metadata = importlib.metadata.PathDistribution(dist_info).metadata
    assert metadata["License-Expression"] == "Apache-2.0"


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extras_hint_installs_exactly_its_requirements(extra, fresh_requires, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: fresh_requires)
    hint = install_hint(extra)
    assert "\n" not in hint
    names = hinted_requirements(hint)
    assert sorted(set(names)) == sorted(names), "a requirement named twice"
    want = {_canonical(r) for r in pyproject_requirements(extra)}
    assert {_canonical(r) for r in names} == want, "(a stale install? pip install -e . again)"
    assert hint.endswith(f"from a clone of edgecap: pip install '.[{extra}]')")


def test_the_installed_metadata_gives_the_same_form():
    """The real lookup (no stand-in): edgecap is installed in the test environment."""
    hint = install_hint("video")
    assert hinted_requirements(hint) == EXTRAS["video"]


def test_without_metadata_the_hint_names_the_extra_and_pyproject(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    hint = install_hint("ros")
    assert hint.startswith("pip install '.[ros]' in a clone of edgecap")
    assert "pyproject.toml" in hint and "ros extra" in hint and "\n" not in hint


def test_a_requirement_for_some_platforms_keeps_its_marker(monkeypatch):
    """The dev extra's triton is for Linux only: the hint says so, as the extra does, so that
    following it elsewhere does not try to install it."""
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: [
            'triton>=3.2; sys_platform == "linux" and extra == "dev"',
            'pytest>=7; extra == "dev"',
            'aiohttp>=3.10; extra == "serve"',
        ],
    )
    assert hinted_requirements(install_hint("dev")) == ['triton>=3.2; sys_platform == "linux"', "pytest>=7"]


def test_an_extra_the_metadata_lacks_falls_back(monkeypatch):
    """An install from before an extra was added to pyproject.toml."""
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ['onnxruntime>=1.16; extra == "cpu"'])
    assert install_hint("serve").startswith("pip install '.[serve]' in a clone of edgecap")


def _sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_no_message_tells_the_user_to_install_edgecap_from_pypi():
    """A grep: ``pip install 'edgecap[x]'`` or ``'edgecap[x]'`` as a pip argument asks PyPI."""
    from_pypi = re.compile(r"""pip install\s+['"]?edgecap\[|(['"])edgecap\[[^\]'"]*\]\1""")
    docs = [ROOT / "README.md", ROOT / "engines" / "README.md", ROOT / "benchmarks" / "README.md"]
    docs += [ROOT / "benchmarks" / "requirements.txt", *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources("edgecap", "benchmarks") + docs
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if from_pypi.search(line)
    ]
    assert found == []


def test_every_extra_the_code_names_is_in_pyproject():
    named = {
        extra
        for path in _sources("edgecap", "benchmarks")
        for extra in re.findall(r"""install_hint\(\s*['"]([^'"]+)['"]""", path.read_text(encoding="utf-8"))
    }
    assert {"video", "ros", "serve", "eval", "train"} <= named  # the scan finds the call sites
    assert named - set(EXTRAS) == set()
    from edgecap.backends import EXTRA_FOR

    assert set(EXTRA_FOR.values()) - set(EXTRAS) == set()


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
@pytest.mark.parametrize("extra", ["video", "eval", "dev"])
def test_the_hint_pasted_into_a_shell_installs_its_requirements(extra, fresh_requires, tmp_path, monkeypatch):
    """The hint is pasted into a shell: '>=' unquoted would be a redirection (pip given the
    bare name, a file named '=4.8' written). A shell function stands in for pip and prints the
    arguments it gets; a requirement holding a quote (a URL, in video and so in dev) survives too."""
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: [*fresh_requires, "odd @ https://example.org/it's.whl ; extra == 'video'"],
    )
    command = install_hint(extra).split(" (", 1)[0]
    pip = 'pip() { for a in "$@"; do printf "%s\\n" "$a"; done; }; '
    run = subprocess.run(
        ["sh", "-c", pip + command], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    wanted = pyproject_requirements(extra) | (
        {"odd @ https://example.org/it's.whl"} if extra != "eval" else set()
    )
    assert run.stdout.splitlines()[0] == "install"
    assert {_canonical(r) for r in run.stdout.splitlines()[1:]} == {_canonical(r) for r in wanted}
    assert list(tmp_path.iterdir()) == []


def test_extras_that_name_each_other_are_each_expanded_once(monkeypatch):
    """Metadata in which two extras include each other (``a`` = ``edgecap[b]`` + x, ``b`` =
    ``edgecap[a]`` + y): the hint names x and y once each, not a RecursionError."""
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: [
            'edgecap[b]; extra == "a"',
            'x>=1; extra == "a"',
            'edgecap[a]; extra == "b"',
            'y>=2; extra == "b"',
        ],
    )
    assert hinted_requirements(install_hint("a")) == ["y>=2", "x>=1"]
    assert hinted_requirements(install_hint("b")) == ["x>=1", "y>=2"]


def _names(extra: str) -> set[str]:
    """The distribution names an extra installs (``'onnx>=1.17'`` -> ``onnx``)."""
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in pyproject_requirements(extra)}


def test_the_train_extra_installs_what_each_epochs_dev_scores_import():
    """Training scores the dev split after every epoch with pycocoevalcap's BLEU and CIDEr
    (edgecap.evaluation.metrics); with only the docs' ``[cpu,train]`` installed, the first epoch
    ended in a ModuleNotFoundError and its work was lost (the dev extra, which has eval, hid it)."""
    assert "pycocoevalcap" in _names("train")


def test_train_without_pycocoevalcap_says_so_before_any_work(tmp_path, monkeypatch, capsys):
    """An older install of the train extra, without pycocoevalcap: exit 2 at once, one line
    naming it and the train extra's hint, nothing written (before: a traceback after the first
    epoch, its checkpoint never saved)."""
    from edgecap.cli import main

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # import fails: ImportError
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    says = "training needs pycocoevalcap for each epoch's dev scores"
    expected = f"edgecap train: error: {says}: {install_hint('train')} ("
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("missing", "says"),
    [
        ("safetensors", "export needs onnx and safetensors: "),
        ("onnx", "export needs onnx and safetensors: "),
        (
            "onnxruntime",
            "export checks the exported graphs on onnxruntime, which is not installed: for the CPU ",
        ),
    ],
)
def test_export_without_a_package_it_needs_says_which_before_any_work(
    missing, says, tmp_path, monkeypatch, capsys
):
    """``edgecap[export]`` alone (no runtime), or an install missing onnx or safetensors: exit 2,
    one line naming the package and how to install it, nothing written (before: a
    ModuleNotFoundError or torch's OnnxExporterError traceback, exit 1)."""
    from edgecap.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # import fails; find_spec gives None
    out = tmp_path / "model"
    assert main(["export", str(tmp_path / "checkpoint"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgecap export: error: {says}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
