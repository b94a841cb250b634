"""``edgecap.files.write_whole``, how every output file is written (captions, figures, models,
language models): whole or not at all, through a link to its target, an earlier file's
permissions kept, and the error of a failed write as it was raised, naming the output."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from edgecap.files import write_whole

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX links and permissions")


def _fails_part_way(f):
    f.write(b"half of it")
    raise KeyboardInterrupt  # Ctrl-C while the file is written


def test_a_write_stopped_part_way_leaves_the_earlier_file_and_no_other(tmp_path):
    """Ctrl-C while an output is written: the earlier file is whole under its name, and nothing
    else is left in the folder; for a new output, no file at all (not a truncated one)."""
    earlier = tmp_path / "captions.tsv"
    earlier.write_bytes(b"the earlier captions\n")
    with pytest.raises(KeyboardInterrupt):
        write_whole(earlier, _fails_part_way)
    assert earlier.read_bytes() == b"the earlier captions\n"
    new = tmp_path / "new.tsv"
    with pytest.raises(KeyboardInterrupt):
        write_whole(new, _fails_part_way)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.tsv"]
    write_whole(new, lambda f: f.write(b"whole"))
    assert new.read_bytes() == b"whole"


def test_through_a_link_its_target_is_replaced_or_with_replace_link_the_link(tmp_path):
    """An output named by a link writes its target (the link stays a link to it); with
    ``replace_link`` the link itself becomes the file and its target is left alone."""
    target = tmp_path / "target.json"
    target.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    write_whole(link, lambda f: f.write(b"through the link"))
    assert link.is_symlink() and target.read_bytes() == b"through the link"
    write_whole(link, lambda f: f.write(b"the link replaced"), replace_link=True)
    assert not link.is_symlink() and link.read_bytes() == b"the link replaced"
    assert target.read_bytes() == b"through the link"


def test_an_earlier_files_permissions_are_kept(tmp_path):
    """A file made private (0600) stays private once written again (a new file would be made
    with the umask's permissions, readable by others)."""
    private = tmp_path / "private.json"
    private.write_bytes(b"old")
    private.chmod(0o600)
    write_whole(private, lambda f: f.write(b"new"))
    assert private.read_bytes() == b"new"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_the_error_of_a_failed_write_is_raised_as_it_was_naming_the_output(tmp_path):
    """A full disk while writing (an OSError about the hidden file) names the output asked for;
    an OSError about another file keeps its name; any other exception comes as it was raised."""
    out = tmp_path / "out.json"

    def disk_full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    with pytest.raises(OSError) as raised:
        write_whole(out, disk_full)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, os.fspath(out))

    def other_file(f):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/elsewhere/input.json")

    with pytest.raises(FileNotFoundError) as raised:
        write_whole(out, other_file)
    assert raised.value.filename == "/elsewhere/input.json"

    def bad_value(f):
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        write_whole(out, bad_value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"format": "edgecap-fusion/2"}, True),
        ({"format": "edgecap-fusion/10"}, True),  # a number, not text: "10" > "1"
        ({"format": "edgecap-fusion/1"}, False),  # the version read here
        ({"format": "edgecap-fusion/0"}, False),  # an older one: judged as before
        ({"format": "edgecap-fusion/2b"}, False),  # no version number
        ({"format": "edgecap-fusion/²"}, False),  # a digit to Unicode, no number to int()
        ({"format": "edgecap-fusion/"}, False),
        ({"format": "edgecap-confidence/2"}, False),  # another kind of file
        ({"format": 2}, False),
        ({}, False),
        (["edgecap-fusion/2"], False),
    ],
)
def test_a_file_of_a_later_format_version_is_said_to_come_from_a_newer_edgecap(data, said):
    """``newer_format``: a JSON file whose format is this kind's at a later version number is
    "made by a newer edgecap ... upgrade edgecap"; anything else is left to the caller (None)."""
    from edgecap.files import newer_format

    got = newer_format(data, "edgecap-fusion/1")
    if said:
        assert got == (
            f"made by a newer edgecap (format {data['format']!r}; this edgecap reads edgecap-fusion/1); "
            "upgrade edgecap"
        )
    else:
        assert got is None


def test_same_file_and_the_nearest_existing_folder(tmp_path):
    """``same_file``: links and hard links to one file are the same file; a missing path (a new
    output) is no file's. ``nearest_existing``: the path itself where it exists, else the
    nearest folder above it that does (a link counts, even a broken one)."""
    from edgecap.files import nearest_existing, same_file

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    (tmp_path / "other.jpg").write_bytes(b"x")
    assert same_file(photo, tmp_path / "link.jpg") and same_file(photo, tmp_path / "hard.jpg")
    assert not same_file(photo, tmp_path / "other.jpg")
    assert not same_file(photo, tmp_path / "new.tsv") and not same_file(tmp_path / "new.tsv", photo)
    assert nearest_existing(photo) == photo
    assert nearest_existing(tmp_path / "a" / "b" / "out.tsv") == tmp_path
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    assert nearest_existing(tmp_path / "broken" / "out.tsv") == tmp_path / "broken"
