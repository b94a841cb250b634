"""Path expansion in ``edgecap caption`` (issue 16, class 3): link loops end, each file is
captioned once, every skipped entry is reported (exit 1), an empty PATH is an error.

Every folder and link is built here, in tmp_path.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgecap
from edgecap.paths import Note, expand_all
from edgecap.errors import InputError

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(edgecap.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX symbolic links")


def _photo(path: Path, shade: int = 90) -> Path:
    Image.fromarray(np.full((24, 32, 3), shade, np.uint8)).save(path)
    return path


def _split(pairs):
    good = [name for name, item in pairs if not isinstance(item, InputError)]
    skipped = {name: item.problem for name, item in pairs if isinstance(item, InputError)}
    return good, skipped


def run_cli(*args, model, cwd=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecap",
            "caption",
            *map(str, args),
            "--model",
            str(model),
            "--max-length",
            "4",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
    )


def test_folder_with_two_links_to_itself_ends_and_captions_once(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    _photo(root / "a.png")
    (root / "loop1").symlink_to(".")
    (root / "loop2").symlink_to(root)
    good, skipped = _split(list(expand_all([str(root)])))
    assert good == [str(root / "a.png")]
    assert set(skipped) == {str(root / "loop1"), str(root / "loop2")}
    assert all("symbolic link loop" in problem and str(root) in problem for problem in skipped.values())


def test_glob_through_a_loop_ends_and_matches_once(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _photo(root / "sub" / "b.png")
    (root / "sub" / "up").symlink_to("..")
    (root / "again").symlink_to("sub")
    good, skipped = _split(list(expand_all([f"{root}/**/*.png"])))
    assert good == [str(root / "again" / "b.png")]  # "again" sorts first: sub is reached there
    assert "already searched" in skipped[str(root / "sub")]
    assert "symbolic link loop" in skipped[str(root / "again" / "up")]


def test_link_to_a_sibling_folder_captions_each_photo_once(tmp_path):
    root = tmp_path / "photos"
    (root / "real").mkdir(parents=True)
    _photo(root / "real" / "a.png")
    (root / "alias").symlink_to("real")
    os.link(root / "real" / "a.png", root / "real" / "hard.png")
    good, skipped = _split(list(expand_all([str(root), str(root / "real" / "a.png")])))
    assert good == [str(root / "alias" / "a.png")]
    assert skipped[str(root / "real")].startswith("skipped: the same folder as")
    assert skipped[str(root / "alias" / "hard.png")].startswith("skipped: the same file as")
    assert "already captioned" in skipped[str(root / "real" / "a.png")]


def test_the_same_folder_twice_and_a_glob_over_it(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    _photo(root / "a.png")
    pattern = f"{root}/**/*.png"
    pairs = list(expand_all([str(root), pattern, str(root / "a.png"), str(root)]))
    # given again under the same name: no second record (it had been a skip with the same path,
    # exit 1), one note for each PATH that gave it again
    assert pairs[0] == (str(root / "a.png"), str(root / "a.png"))
    assert [(name, type(item)) for name, item in pairs[1:]] == [
        (pattern, Note),
        (str(root / "a.png"), Note),
        (str(root), Note),
    ]
    assert pairs[1][1].text == "1 file given before under the same name, captioned once"
    assert pairs[2][1].text == "given before, captioned once"


def test_broken_links_and_unreadable_folders_are_reported(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    _photo(root / "a.png")
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "gone").symlink_to("nowhere")
    (root / "self.jpg").symlink_to("self.jpg")
    real_scandir = os.scandir

    def scandir(path):  # root ignores permissions: refuse like chmod 000 would
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    good, skipped = _split(list(expand_all([str(root)])))
    assert good == [str(root / "a.png")]
    assert "broken symbolic link (to nowhere.jpg)" in skipped[str(root / "gone.jpg")]
    assert "broken symbolic link (to nowhere)" in skipped[str(root / "gone")]
    assert "a loop of symbolic links" in skipped[str(root / "self.jpg")]
    assert "cannot read the folder (permission denied)" in skipped[str(root / "locked")]


def test_a_very_deep_folder_is_no_recursion_error(tmp_path, monkeypatch):
    folder = tmp_path / "deep"
    folder.mkdir()
    # relative steps keep each path short; monkeypatch puts the first working folder back after
    # the test (the tests after it in this process read paths relative to the checkout)
    monkeypatch.chdir(folder)
    try:
        for _ in range(1200):
            os.mkdir("d")
            os.chdir("d")
        _photo(Path("bottom.png"))
    finally:
        os.chdir(tmp_path)
    try:
        good, skipped = _split(list(expand_all(["deep"])))
    finally:  # pytest's own clean-up recurses: take the tree down here, level by level
        os.chdir(folder)
        for _ in range(1200):
            os.chdir("d")
        os.remove("bottom.png")
        for _ in range(1200):
            os.chdir("..")
            os.rmdir("d")
        os.chdir(tmp_path)
    assert len(good) == 1 and good[0].endswith("/d/bottom.png") and not skipped


def test_empty_path_is_an_error_not_the_current_folder(tmp_path):
    _photo(tmp_path / "here.png")
    pairs = list(expand_all([""]))
    assert len(pairs) == 1 and isinstance(pairs[0][1], InputError)
    assert "empty PATH" in pairs[0][1].problem


def test_standard_input_and_a_bag_folder_say_what_reads_them(tmp_path, monkeypatch):
    """``cat photo.jpg | edgecap caption -`` had been "-: no such file", and a ROS 2 bag folder
    given as a PATH "folder holds no image files (.jpg, ...)", saying nothing of ``--bag``."""
    monkeypatch.chdir(tmp_path)
    ((name, err),) = expand_all(["-"])
    assert (name, err.problem) == (
        "-",
        "no such file (edgecap caption reads no image from standard input: name its file)",
    )
    (tmp_path / "-").write_bytes(b"x")  # a file named - is that file
    assert list(expand_all(["-"])) == [("-", "-")]
    bag = tmp_path / "run_0412"
    bag.mkdir()
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    (bag / "run_0412_0.mcap").write_bytes(b"\x89MCAP0\r\n")
    ((name, err),) = expand_all([str(bag)])
    assert err.problem.startswith("folder holds no image files (")
    assert err.problem.endswith("; a ROS 2 bag (metadata.yaml): caption its image topics with --bag FOLDER")
    (bag / "metadata.yaml").unlink()  # a folder of other files only: as before
    ((name, err),) = expand_all([str(bag)])
    assert err.problem == f"folder holds no image files ({', '.join(edgecap.paths.image_extensions())})"


def test_a_name_too_long_for_the_file_system_is_passed_on_not_raised(tmp_path):
    """A PATH over the file system's 255-byte name limit (ENAMETOOLONG, which Path.is_dir
    raised: edgecap caption stopped with a traceback, the other photos uncaptioned) is no folder:
    the file is passed on for the captioner to name its problem, and a glob under such a folder
    matches nothing."""
    photo = _photo(tmp_path / "a.png")
    long_name = str(tmp_path / ("x" * 300 + ".jpg"))
    long_glob = str(tmp_path / ("y" * 300) / "*.jpg")
    pairs = list(expand_all([long_name, str(photo), long_glob]))
    assert [name for name, _ in pairs] == [long_name, str(photo), long_glob]
    assert pairs[0][1] == long_name and pairs[1][1] == str(photo)
    assert isinstance(pairs[2][1], InputError) and "matches no image files" in pairs[2][1].problem


def _shell_expansion(pattern: str) -> list[str]:
    """The image files ``edgecap caption`` takes from the paths a shell expands ``pattern`` to
    (``glob.glob``, ``**`` as bash's globstar): a file as it is, a folder every image file below
    it that is not hidden below it (os.walk, as a folder PATH is searched)."""
    import glob

    files = []
    for name in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(name):
            for folder, dirs, names in os.walk(name):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [os.path.join(folder, n) for n in names if not n.startswith(".")]
        else:
            files.append(name)
    suffixes = (".png", ".jpg")
    return sorted({os.path.normpath(f) for f in files if f.lower().endswith(suffixes)})


def test_globs_match_the_image_files_the_shells_expansion_gives(tmp_path, monkeypatch):
    """A quoted glob gives the image files its unquoted form (the shell's expansion) would:
    ``*`` and ``**`` skip hidden files and folders unless the pattern names the dot, ``**``
    alone means every file at any depth, an upper-case suffix (a camera's .JPG) is an image
    suffix, and a folder the pattern matches (a trailing slash: folders only) is searched as a
    folder PATH is, each file once; a pattern relative to the current folder may start with a
    wildcard."""
    monkeypatch.chdir(tmp_path)
    names = ("r/a.png", "r/IMG_1.JPG", "r/b.Png", "r/.c.png", "r/sub/d.png", "r/.hid/e.png")
    names += ("r/sub/deep/f.jpg", "r/sub/.g.png", "r/old.png/h.jpg", "r/sub/deep/.x/i.png")
    for name in names:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        _photo(Path(name))
    Path("r/notes.txt").write_text("not an image")
    patterns = ("r/*", "r/**", "r/**/*", "r/**/*.png", "r/.*", "r/*/*", "r/.hid/*", "r/*.JPG", "r/**/deep/*")
    patterns += ("r/**/.*", "r/s*", "r/*/", "r/**/", "r/*.png", "r/sub/de?p", "r/*/deep/")
    patterns += ("*", "*/*.png", "?/sub/*", "**/deep/*")  # a wildcard in the first part
    for pattern in patterns:
        good, skipped = _split(list(expand_all([pattern])))
        assert sorted(good) == _shell_expansion(pattern) and not skipped, pattern
        assert len(good) == len(set(good)), pattern  # each file once
    assert len(_split(list(expand_all(["r/**"])))[0]) == 6  # all but the hidden ones
    assert _split(list(expand_all(["r/*/"])))[0] == ["r/old.png/h.jpg", "r/sub/d.png", "r/sub/deep/f.jpg"]


def test_a_glob_of_folders_searches_each_as_a_folder_path(tiny_model_dir, tmp_path):
    """'g/2024-*' (g/2024-01/a.png, g/2024-02/b.jpg) said "the pattern matches no image files"
    (exit 1) while the shell's g/2024-* captioned both: a folder its last part matches is now
    searched as a folder PATH is (hidden files left out, each file once), in the shell's order;
    a trailing slash takes only folders."""
    g = tmp_path / "g"
    for folder in ("2024-01", "2024-02/trip", "2024-02/.thumbs", "2023-12"):
        (g / folder).mkdir(parents=True)
    a, b = _photo(g / "2024-01" / "a.png"), _photo(g / "2024-02" / "b.jpg")
    c, d = _photo(g / "2024-02" / "trip" / "c.png"), _photo(g / "2024-03.png")
    _photo(g / "2024-02" / ".hidden.png")
    _photo(g / "2024-02" / ".thumbs" / "b.png")
    _photo(g / "2023-12" / "old.png")
    (g / "2024-09").symlink_to("2024-01")  # a second name of a folder matched
    pairs = list(expand_all([f"{g}/2024-*"]))
    good, skipped = _split(pairs)
    assert good == [str(a), str(b), str(c), str(d)]
    assert skipped == {str(g / "2024-09"): f"skipped: the same folder as {g / '2024-01'}, already searched"}
    assert _split(list(expand_all([f"{g}/2024-*/"])))[0] == [str(a), str(b), str(c)]
    quoted = run_cli(f"{g}/2024-*", model=tiny_model_dir, cwd=tmp_path)
    shell = run_cli(*sorted(g.glob("2024-*")), model=tiny_model_dir, cwd=tmp_path)
    assert quoted.returncode == shell.returncode == 1, quoted.stderr  # 2024-09: searched already
    assert quoted.stdout == shell.stdout and len(quoted.stdout.splitlines()) == 4


def test_a_glob_does_not_search_folders_it_cannot_match_in(tmp_path):
    """photos/*.png never looks inside photos/sub, so a link loop there is no skip (exit 1)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _photo(root / "a.png")
    (root / "sub" / "up").symlink_to("..")
    assert list(expand_all([f"{root}/*.png"])) == [(str(root / "a.png"), str(root / "a.png"))]
    _, skipped = _split(list(expand_all([f"{root}/**/*.png"])))  # ** does search it
    assert "symbolic link loop" in skipped[str(root / "sub" / "up")]


def test_a_glob_searches_neither_hidden_folders_nor_folders_it_cannot_match(tmp_path, monkeypatch):
    """``photos/*.png`` reads photos, and a folder called old.png there only because the
    pattern matches it (the shell would give it: searched as a folder PATH), not sub;
    ``photos/**/*.png`` goes into every folder below but not into hidden ones (.git, .cache),
    as ``glob`` does. Folders read are recorded at os.scandir."""
    root = tmp_path / "photos"
    for folder in ("old.png", ".cache", "sub"):
        (root / folder).mkdir(parents=True)
    a, b = _photo(root / "a.png"), _photo(root / "sub" / "b.png")
    _photo(root / "old.png" / "c.png")
    _photo(root / ".cache" / "d.png")
    real_scandir, read = os.scandir, []

    def scandir(path):
        read.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    c = root / "old.png" / "c.png"
    assert list(expand_all([f"{root}/*.png"])) == [(str(p), str(p)) for p in (a, c)]
    assert read == [root, root / "old.png"]
    read.clear()
    # ** takes any folder, old.png too
    assert list(expand_all([f"{root}/**/*.png"])) == [(str(p), str(p)) for p in (a, c, b)]
    assert sorted(read) == [root, root / "old.png", root / "sub"]
    read.clear()
    # photos/s*/*.png reads photos/sub alone: not old.png, nor .cache, whose names s* does not match
    assert list(expand_all([f"{root}/s*/*.png"])) == [(str(b), str(b))]
    assert sorted(read) == [root, root / "sub"]


def test_a_glob_says_nothing_of_broken_links_it_does_not_match(tmp_path):
    """``photos/*.png`` next to a broken link notes.txt: the link is nothing the pattern
    names, so no skip (exit 0); a broken link.png is one (it names a photo that is gone)."""
    root = tmp_path / "photos"
    root.mkdir()
    a = _photo(root / "a.png")
    (root / "notes.txt").symlink_to("nowhere.txt")
    assert list(expand_all([f"{root}/*.png"])) == [(str(a), str(a))]
    (root / "link.png").symlink_to("nowhere.png")
    good, skipped = _split(list(expand_all([f"{root}/*.png"])))
    assert good == [str(a)] and list(skipped) == [str(root / "link.png")]


def test_a_photo_that_vanishes_during_the_search_is_passed_on(tmp_path, monkeypatch):
    """A file listed in its folder but gone when it is looked at (deleted meanwhile) is not
    silently left out: it is passed on, and the captioner says "no such file"."""
    root = tmp_path / "photos"
    root.mkdir()
    a, b = _photo(root / "a.png"), _photo(root / "b.png")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if Path(path) == b:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert list(expand_all([str(root)])) == [(str(a), str(a)), (str(b), str(b))]


def test_a_photo_named_twice_is_captioned_once(tmp_path):
    """The same file under another name (a link's) is a skip that names the first (exit 1),
    not a second caption; under the same name again (named twice, or in a folder given after
    it) it is left out without a record, with a note."""
    root = tmp_path / "photos"
    root.mkdir()
    a = _photo(root / "a.png")
    (root / "b.png").symlink_to("a.png")
    same = f"skipped: the same file as {a}, already captioned"
    pairs = list(expand_all([str(a), str(a), str(root / "b.png"), str(root)]))
    assert [name for name, _ in pairs] == [
        str(a),
        str(a),
        str(root / "b.png"),
        str(root / "b.png"),
        str(root),
    ]
    assert pairs[0][1] == str(a)
    assert isinstance(pairs[1][1], Note) and isinstance(pairs[4][1], Note)
    assert all(isinstance(item, InputError) and item.problem == same for _, item in pairs[2:4])


def test_a_path_given_again_under_the_same_name_has_one_record_and_exit_0(tiny_model_dir, tmp_path):
    """``edgecap caption --json dup dup/a.png``, ``a.png a.png``: the repeat had been a second
    record with the same "path" and a null caption (exit 1), which replaced the caption in a
    reader's ``{r["path"]: r for r in records}``. Now one record per name, exit 0, one note on
    stderr per PATH that repeats; a link to a captioned photo is still a skip record, under the
    link's own name, naming the first."""
    root = tmp_path / "dup"
    root.mkdir()
    a, b = _photo(root / "a.png"), _photo(root / "b.png", 30)
    out = run_cli("--json", root, a, a, root, model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(a), str(b)]
    assert all(r["caption"] for r in records)
    assert out.stderr.splitlines() == [
        f"edgecap: note: {a}: given before, captioned once",
        f"edgecap: note: {a}: given before, captioned once",
        f"edgecap: note: {root}: 2 files given before under the same name, captioned once",
    ]
    (root / "link.png").symlink_to("a.png")
    out = run_cli("--json", a, root / "link.png", model=tiny_model_dir)
    assert out.returncode == 1
    first, skip = (json.loads(line) for line in out.stdout.splitlines())
    assert first["path"] == str(a) and first["caption"]
    assert skip["path"] == str(root / "link.png") != first["path"] and skip["caption"] is None
    assert skip["error"] == f"skipped: the same file as {a}, already captioned"


def _reusing_inode_of(monkeypatch, gone: Path, new: Path) -> None:
    """From now on ``new`` has the device and inode ``gone`` had, and ``gone`` is deleted: what
    ext4 does when a camera deletes or replaces a frame and writes the next one (a freed inode
    is given to the next new file at once)."""
    st = os.stat(gone)
    gone.unlink()
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if Path(path) == new:
            fields = list(result)
            fields[1], fields[2] = st.st_ino, st.st_dev
            return os.stat_result(fields)
        return result

    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("as_folder", [True, False])
def test_a_new_photo_given_a_deleted_ones_inode_is_captioned(tmp_path, monkeypatch, as_folder):
    """A photo written while the run goes on, on the inode of one captioned and deleted since
    (a camera's ring of frames rewritten in place), is a photo of its own: captioned, not
    skipped as "the same file" as a name that no longer leads to it."""
    root = tmp_path / "frames"
    root.mkdir()
    a, b = _photo(root / "a.png"), _photo(root / "b.png", shade=30)
    pairs = expand_all([str(root)] if as_folder else [str(a), str(b)])
    assert next(pairs) == (str(a), str(a))
    _reusing_inode_of(monkeypatch, a, b)
    assert list(pairs) == [(str(b), str(b))]


@pytest.mark.parametrize("as_folders", [True, False])
def test_photos_on_two_disks_with_the_same_inode_number_are_each_captioned(tmp_path, monkeypatch, as_folders):
    """A file is known by its device and inode together: the photos of two cards (FAT file
    systems number their files alike) that share an inode number are two photos, each
    captioned, not the second skipped as "the same file" as the first."""
    cards = [tmp_path / "card1", tmp_path / "card2"]
    photos = []
    for card in cards:
        card.mkdir()
        photos.append(_photo(card / "IMG_0001.JPG"))
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if Path(path).parent in cards:  # each card a device of its own, its first file inode 5
            fields = list(result)
            fields[1], fields[2] = 5, 1000 + cards.index(Path(path).parent)
            return os.stat_result(fields)
        return result

    monkeypatch.setattr(os, "stat", stat)
    pairs = list(expand_all(map(str, cards if as_folders else photos)))
    assert pairs == [(str(p), str(p)) for p in photos]


def test_a_link_to_a_folder_is_searched_and_a_special_file_is_passed_on(tmp_path):
    """A PATH that is a link to a folder is searched like the folder; a named pipe called
    *.jpg in it is passed on for the captioner to refuse (edgecap.files), not dropped."""
    real = tmp_path / "real"
    real.mkdir()
    _photo(real / "a.png")
    os.mkfifo(real / "pipe.jpg")
    (tmp_path / "link").symlink_to("real")
    link = tmp_path / "link"
    want = [str(link / "a.png"), str(link / "pipe.jpg")]
    assert list(expand_all([str(link)])) == [(name, name) for name in want]


def test_a_file_named_like_a_glob_is_that_file(tmp_path):
    """x[1].png that is there is that file, not the pattern; named twice, it is a file given
    before (one caption), not a pattern whose files were."""
    literal = _photo(tmp_path / "x[1].png")
    _photo(tmp_path / "x1.png")  # what the pattern x[1].png would match
    assert list(expand_all([str(literal)])) == [(str(literal), str(literal))]
    pairs = list(expand_all([str(literal), str(literal)]))
    assert pairs[0] == (str(literal), str(literal)) and len(pairs) == 2
    assert pairs[1][0] == str(literal) and pairs[1][1].text == "given before, captioned once"


def test_a_missing_file_named_with_brackets_is_said_to_be_missing(tmp_path):
    """photo[2].jpg that is not there (and that as a pattern matches nothing): "no such file",
    as for any missing file, not only "the pattern matches no image files", which a name
    with * or ? still gets."""
    _photo(tmp_path / "a.png")
    _, skipped = _split(list(expand_all([f"{tmp_path}/photo[2].jpg", f"{tmp_path}/*.jpg"])))
    assert skipped == {
        f"{tmp_path}/photo[2].jpg": "no such file (nor, read as a pattern, does it match an image file)",
        f"{tmp_path}/*.jpg": "the pattern matches no image files",
    }


def test_a_folder_holding_only_a_link_loop_is_said_to_hold_no_images(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "loop").symlink_to(".")
    _, skipped = _split(list(expand_all([str(root)])))
    assert "symbolic link loop" in skipped[str(root / "loop")]
    assert skipped[str(root)].startswith("folder holds no image files")


def test_cli_reports_every_skip_and_captions_the_rest(tiny_model_dir, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    _photo(root / "a.png")
    _photo(tmp_path / "cwd_photo.png", 30)
    (root / "loop").symlink_to(".")
    (root / "gone.png").symlink_to("nowhere.png")
    out = run_cli(root, "", "z" * 300 + ".jpg", model=tiny_model_dir, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [str(root / "a.png")]
    errors = out.stderr.splitlines()
    assert errors[0].startswith(f"edgecap: {root / 'gone.png'}: skipped: broken symbolic link")
    assert errors[1].startswith(f"edgecap: {root / 'loop'}: skipped: a symbolic link loop")
    assert errors[2].startswith("edgecap: : empty PATH argument")
    assert errors[3] == f"edgecap: {'z' * 300}.jpg: cannot read the file (File name too long)"
    assert "Traceback" not in out.stderr and "cwd_photo" not in out.stdout


def test_a_folder_leaves_out_hidden_files_and_folders_as_a_glob_does(tmp_path):
    """The ``._a.jpg`` macOS writes beside each photo on another disk (not an image), a
    ``.thumbnails`` folder of small copies, an editor's ``.#notes.txt`` lock link: none is a
    photo to caption or an error to report; named itself, a hidden photo is captioned."""
    root = tmp_path / "photos"
    (root / ".thumbnails").mkdir(parents=True)
    (root / "sub").mkdir()
    a, b = _photo(root / "a.jpg"), _photo(root / "sub" / "b.png")
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _photo(root / ".thumbnails" / "a.png")
    _photo(root / ".hidden.png")
    (root / ".#notes.txt").symlink_to("root@host.1234:1733400000")
    expected = [(str(p), str(p)) for p in (a, b)]
    assert list(expand_all([str(root)])) == expected
    assert list(expand_all([f"{root}/**"])) == expected
    hidden = str(root / ".hidden.png")
    assert list(expand_all([hidden])) == [(hidden, hidden)]


def test_a_folder_of_hidden_photos_only_says_they_are_left_out(tmp_path):
    """A folder holding only .photo.jpg (and .thumbs/a.png): no image to caption, and the
    message says the hidden ones were left out and how to caption one, not only that the
    folder holds none."""
    root = tmp_path / "photos"
    (root / ".thumbs").mkdir(parents=True)
    _photo(root / ".photo.jpg")
    _photo(root / ".thumbs" / "a.png")
    _, skipped = _split(list(expand_all([str(root)])))
    assert skipped == {
        str(root): "folder holds no image files but hidden ones (a name that starts with a dot: "
        ".photo.jpg), which are left out: name one to caption it"
    }


def test_a_broken_link_named_as_another_kind_of_file_is_passed_over_like_that_file(tmp_path):
    """notes.txt -> a file that is gone is no more a photo than notes.txt itself: no skip to
    report (exit 0 for the folder); gone.jpg (a photo that is gone) and links that may have
    been folders (album, 2024.06.01, 2024.06.01 Paris, Photos.library: no file's short
    extension, which starts with a letter) are reported."""
    root = tmp_path / "photos"
    root.mkdir()
    a = _photo(root / "a.png")
    (root / "notes.txt").symlink_to("nowhere.txt")
    (root / "libfoo.so").symlink_to("/nonexistent/libfoo.so")
    (root / "model.onnx").symlink_to("/nonexistent/model.onnx")
    assert list(expand_all([str(root)])) == [(str(a), str(a))]
    gone = ["2024.06.01", "2024.06.01 Paris", "Photos.library", "album", "gone.jpg"]
    for name in gone:
        (root / name).symlink_to(f"/nonexistent/{name}")
    good, skipped = _split(list(expand_all([str(root)])))
    assert good == [str(a)]
    assert list(skipped) == [str(root / name) for name in gone]


def test_an_unreadable_folder_is_not_also_said_to_hold_no_images(tmp_path, monkeypatch):
    """A folder that cannot be read (chmod 000), named or below the one named, or searched by
    a glob: one skip that says so, no second record claiming it holds no image files."""
    root = tmp_path / "outer"
    (root / "inner").mkdir(parents=True)
    _photo(root / "inner" / "a.png")
    real_scandir = os.scandir

    def scandir(path):  # root ignores permissions: refuse like chmod 000 would
        if Path(path) in (root / "inner", tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "scandir", scandir)
    for arg, unread in (
        (root, root / "inner"),
        (tmp_path / "locked", tmp_path / "locked"),
        (f"{tmp_path}/locked/*.png", tmp_path / "locked"),
    ):
        good, skipped = _split(list(expand_all([str(arg)])))
        assert good == [] and list(skipped) == [str(unread)], arg
        assert skipped[str(unread)] == "skipped: cannot read the folder (permission denied)"
    # a folder that was read whole and holds nothing is still said to
    (tmp_path / "empty").mkdir()
    _, skipped = _split(list(expand_all([str(tmp_path / "empty")])))
    assert skipped[str(tmp_path / "empty")].startswith("folder holds no image files")


def test_entries_that_cannot_be_reached_are_each_reported_with_the_systems_reason(tmp_path, monkeypatch):
    """A folder listed but not entered (chmod 644: its names read, each one's stat refused) and
    links whose targets are refused (a folder or photo in another user's 700 folder): each
    entry reported once, with the system's reason, not passed over (exit 0) nor called a
    broken link. Root ignores permissions: os.stat refuses as it would for another user."""
    root = tmp_path / "photos"
    (root / "sub" / "inner").mkdir(parents=True)
    (tmp_path / "secret" / "d").mkdir(parents=True)
    a = _photo(root / "a.png")
    b = _photo(root / "sub" / "b.png")
    _photo(root / "sub" / "inner" / "c.png")
    _photo(tmp_path / "secret" / "d" / "s.jpg")
    (root / "far").symlink_to(tmp_path / "secret" / "d")
    (root / "far.jpg").symlink_to(tmp_path / "secret" / "d" / "s.jpg")
    (root / "gone").symlink_to("nowhere")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        p = Path(path)
        if root / "sub" in p.parents or p in (root / "far", root / "far.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    pairs = list(expand_all([str(root)]))
    good, skipped = _split(pairs)
    # b.png is passed on: the captioner says it cannot read it
    assert good == [str(a), str(b)]
    assert skipped == {
        str(root / "far"): (
            f"skipped: cannot follow the symbolic link to {tmp_path}/secret/d (permission denied)"
        ),
        str(root / "far.jpg"): (
            f"skipped: cannot follow the symbolic link to {tmp_path}/secret/d/s.jpg (permission denied)"
        ),
        str(root / "gone"): "skipped: broken symbolic link (to nowhere)",
        str(root / "sub" / "inner"): "skipped: cannot read the folder (permission denied)",
    }
    assert len(pairs) == 6  # each once
    # the refused folder alone: it is reported, not also said to hold no images
    good, skipped = _split(list(expand_all([str(root / "sub")])))
    assert good == [str(b)] and list(skipped) == [str(root / "sub" / "inner")]
    (root / "sub" / "b.png").unlink()
    good, skipped = _split(list(expand_all([str(root / "sub")])))
    assert good == [] and list(skipped) == [str(root / "sub" / "inner")]


def test_a_folder_listed_but_not_entered_reports_what_its_listing_says_are_folders(tmp_path, monkeypatch):
    """In a folder whose names can be read but none of them reached (chmod 644: os.stat and
    os.lstat refused for each entry), the listing still says what each entry is: a folder is
    reported as one that cannot be read, whatever its name (album.jpg, notes.v2), unless
    hidden; a link whose target cannot be known is passed on where named as a photo, reported
    as a folder that cannot be read where its name may be a folder's, and passed over where
    named as another kind of file (readme.txt); the system's reason as it gives it."""
    root = tmp_path / "photos"
    sub = root / "sub"
    for folder in ("album.jpg", ".cache", "notes.v2", "long"):
        (sub / folder).mkdir(parents=True)
        _photo(sub / folder / "c.png")
    (tmp_path / "elsewhere").mkdir()
    a = _photo(root / "a.png")
    b = _photo(sub / "b.png")
    _photo(tmp_path / "elsewhere" / "e.png")
    (sub / "more").symlink_to(tmp_path / "elsewhere")
    (sub / "pic.jpg").symlink_to(tmp_path / "elsewhere" / "e.png")
    (sub / "readme.txt").symlink_to(tmp_path / "elsewhere" / "e.png")
    real_stat, real_lstat = os.stat, os.lstat

    def refused(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == sub:
                if Path(path).name == "long":  # as a path past the system's limit is refused
                    raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", refused(real_stat))
    monkeypatch.setattr(os, "lstat", refused(real_lstat))
    good, skipped = _split(list(expand_all([str(root)])))
    assert good == [str(a), str(b), str(sub / "pic.jpg")]
    cannot = "skipped: cannot read the folder (permission denied)"
    assert skipped == {
        str(sub / "album.jpg"): cannot,
        str(sub / "long"): "skipped: cannot read the folder (File name too long)",
        str(sub / "more"): cannot,
        str(sub / "notes.v2"): cannot,
    }


@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root ignores permissions")
def test_a_folder_without_search_permission_is_reported(tiny_model_dir, tmp_path):
    """chmod 644 on a folder: its names can be read but none of them reached."""
    root = tmp_path / "album"
    (root / "sub" / "inner").mkdir(parents=True)
    _photo(root / "top.png")
    _photo(root / "sub" / "inner" / "b.png")
    (root / "sub").chmod(0o644)
    try:
        out = run_cli(root, model=tiny_model_dir, cwd=tmp_path)
    finally:
        (root / "sub").chmod(0o755)
    assert out.returncode == 1, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [str(root / "top.png")]
    assert out.stderr.splitlines() == [
        f"edgecap: {root / 'sub' / 'inner'}: skipped: cannot read the folder (permission denied)"
    ]


def test_a_folder_past_the_systems_path_limit_is_reported(tiny_model_dir, tmp_path, monkeypatch):
    """22 nested folders of 200-character names: past the 4096-byte limit on a path
    (ENAMETOOLONG), the first one too deep is reported, with exit 1, and a folder holding only
    that branch is not said to hold no image files."""
    long_name = "d" * 200
    root = tmp_path / "deep"
    root.mkdir()
    monkeypatch.chdir(root)  # relative steps: each path short while the tree is made
    for _ in range(22):
        os.mkdir(long_name)
        os.chdir(long_name)
    os.chdir(tmp_path)
    depth = next(i for i in range(1, 23) if len(os.fsencode(str(root / "/".join([long_name] * i)))) >= 4096)
    too_long = str(root / "/".join([long_name] * depth))
    good, skipped = _split(list(expand_all([str(root)])))
    assert good == [] and skipped == {too_long: "skipped: cannot read the folder (File name too long)"}
    _photo(root / "top.png")
    out = run_cli(root, model=tiny_model_dir, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [str(root / "top.png")]
    problem = "skipped: cannot read the folder (File name too long)"
    assert out.stderr.splitlines() == [f"edgecap: {too_long}: {problem}"]


def test_a_jfif_file_is_a_jpeg_a_folder_holds(tmp_path):
    photo = tmp_path / "saved.jfif"
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(photo, format="JPEG")
    assert list(expand_all([str(tmp_path)])) == [(str(photo), str(photo))]
    assert list(expand_all([f"{tmp_path}/*.jfif"])) == [(str(photo), str(photo))]


def test_an_mpo_file_is_a_photo_a_folder_holds(tmp_path):
    """A 3D camera's .MPO (JPEG pictures in one file; the first read): a folder of them is not
    "holds no image files"."""
    photo = tmp_path / "DSCF0001.MPO"
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(photo, format="JPEG")
    assert list(expand_all([str(tmp_path)])) == [(str(photo), str(photo))]


HEIF_NOTE = (
    "HEIC/HEIF files, which this Pillow cannot decode (only with the pillow-heif plugin, which "
    "edgecap does not load): convert them to JPEG or PNG"
)


def test_a_folder_says_once_that_it_left_out_heic_photos(tmp_path):
    """An iPhone's folder: its HEIC photos had been left out without a word (exit 0), and a
    folder of them alone was "folder holds no image files (.jpg, ...)"."""
    root = tmp_path / "iphone"
    root.mkdir()
    a = _photo(root / "IMG_0001.JPG")
    for name in ("IMG_0002.HEIC", "IMG_0003.heif", ".IMG_0004.HEIC"):  # a hidden one: left out silently
        (root / name).write_bytes(b"\0\0\0\x18ftypheic")
    pairs = list(expand_all([str(root)]))
    assert [(name, type(item)) for name, item in pairs] == [(str(a), str), (str(root), Note)]
    assert pairs[1][1].text == f"left out 2 {HEIF_NOTE}"
    a.unlink()
    ((name, err),) = expand_all([str(root)])
    assert (name, err.problem) == (str(root), f"folder holds no image files but 2 {HEIF_NOTE}")
    ((name, err),) = expand_all([f"{root}/IMG_*"])
    assert err.problem == f"the pattern matches no image files but 2 {HEIF_NOTE}"


def test_avif_photos_are_taken_where_this_pillow_decodes_avif_and_said_left_out_where_not(
    tmp_path, monkeypatch
):
    from PIL import features

    from edgecap import paths

    root = tmp_path / "album"
    root.mkdir()
    a, b = _photo(root / "a.avif"), _photo(root / "b.png")
    if "avif" in features.modules and features.check("avif"):
        assert list(expand_all([str(root)])) == [(str(a), str(a)), (str(b), str(b))]
    monkeypatch.setattr(paths, "_avif_read", lambda: False)
    pairs = list(expand_all([str(root)]))
    assert pairs[0] == (str(b), str(b)) and pairs[1][0] == str(root)
    assert pairs[1][1].text == (
        "left out 1 AVIF file, which this Pillow cannot decode (it was built without AVIF support): "
        "convert it to JPEG or PNG"
    )


def test_cli_says_which_photos_this_pillow_cannot_decode(tiny_model_dir, tmp_path):
    root = tmp_path / "iphone"
    root.mkdir()
    a = _photo(root / "IMG_0001.JPG")
    (root / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    named = tmp_path / "IMG_0005.HEIC"
    named.write_bytes((root / "IMG_0002.HEIC").read_bytes())
    out = run_cli(root, named, model=tiny_model_dir)
    assert out.returncode == 1, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [str(a)]
    assert out.stderr.splitlines() == [
        f"edgecap: note: {root}: left out 1 HEIC/HEIF file, which this Pillow cannot decode (only with "
        "the pillow-heif plugin, which edgecap does not load): convert it to JPEG or PNG",
        f"edgecap: {named}: a HEIC/HEIF image, which this Pillow cannot decode (only with the "
        "pillow-heif plugin, which edgecap does not load): convert it to JPEG or PNG",
    ]


def test_a_folder_gives_its_files_in_code_point_order_depth_first(tmp_path):
    """docs/cli.md: code-point order of the names (not natural or locale order), depth first,
    each subfolder where its own name falls among the files; the expected order written out."""
    root = tmp_path / "r"
    (root / "img_5").mkdir(parents=True)
    for rel in ("img_1.png", "img_1001.png", "IMG_10.png", "IMG_9.png", "img_5/a.png", "img_50.png", "b.png"):
        _photo(root / rel)
    names = [os.path.relpath(name, root) for name, _ in expand_all([str(root)])]
    assert names == [
        "IMG_10.png",
        "IMG_9.png",
        "b.png",
        "img_1.png",
        "img_1001.png",
        "img_5/a.png",
        "img_50.png",
    ]
