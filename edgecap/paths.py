"""Command-line PATHs -> the image files they name: files, folders searched recursively and
globs, each folder searched and each file yielded once (by device and inode), with link loops,
broken links, links that cannot be followed and unreadable folders reported as ``InputError``
pairs, with the system's reason, instead of followed, passed over or raised. Hidden files and
folders (a name that starts with a dot: ``.git``, ``.thumbnails``, the ``._IMG_0001.JPG`` that
macOS leaves on other disks) are left out of folders and globs alike, as a shell's glob leaves
them; a hidden file named itself is captioned. What ``edgecap
caption`` captions (the files themselves are read by ``edgecap.files``)."""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgecap.commands.output import utf8_name

# .mpo: a 3D or multi-picture camera's JPEG (Fujifilm, Nintendo 3DS), its first picture read
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".mpo", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class Note:
    """What a PATH's expansion says that is no input and no failure (``edgecap caption``: one
    line ``edgecap: note: PATH: text`` on stderr, no record, no change to the exit status)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Note({self.text!r})"


# what ``_Seen.take`` gives for a file captioned already under this very name: left out, no record
_REPEAT = object()


def expand_all(args: Iterable[str]) -> Iterator[tuple[str, object]]:
    """Command-line PATHs -> (name, input) pairs, in order: a file (even a missing one: the
    captioner reports it), a folder's image files (searched recursively, sorted), or a glob's
    image files (sorted; ``**`` for any depth; a folder it matches searched as a folder is: the
    files the shell's expansion of the glob would give). Symbolic links to folders are followed, but each
    folder is searched once and each file (by device and inode) captioned once over the whole
    run; everything skipped comes as a (name, InputError) pair that says why: a link loop, a
    folder or file already seen under another name, a broken link or one that cannot be
    followed, an unreadable folder (the system's reason: permission denied, a path too long), an
    empty PATH, a folder or glob with no images (not said of one that could not be read
    whole: a folder below it unreadable). A file captioned already under the very same name
    (``a.jpg a.jpg``, ``photos photos/a.jpg``) is left out without a pair: a second record
    under the captioned one's name would be mistaken for it; each PATH that repeats names
    comes with one (PATH, ``Note``) pair after its own."""
    state = _Seen()
    for arg in args:
        repeats = 0
        for name, item in _expand_one(arg, state):
            if item is _REPEAT:
                repeats += 1
            else:
                yield name, item
        if repeats:
            yield arg, Note(_repeats_note(arg, repeats))


def _repeats_note(arg: str, repeats: int) -> str:
    searched = os.path.isdir(arg) or (glob.has_magic(arg) and not os.path.lexists(arg))  # as _expand_one
    if repeats == 1 and not searched:
        return "given before, captioned once"
    from edgecap.errors import counted

    return f"{counted(repeats, 'file')} given before under the same name, captioned once"


class _Seen:
    """What the run has already captioned: (st_dev, st_ino) -> the first name."""

    def __init__(self):
        self.files: dict[tuple[int, int], str] = {}

    def seen_as(self, st: os.stat_result) -> str | None:
        """The name this file was captioned under already, or None. A name that no longer leads
        to the file (deleted or replaced since, as a camera's frames are) does not count: the
        file system gives a freed inode to the next new file (ext4 at once), so its device and
        inode alone would take a new photo for the one captioned before."""
        first = self.files.get(_key(st))
        if first is None:
            return None
        try:
            return first if _key(os.stat(first)) == _key(st) else None
        except (OSError, ValueError):
            return None

    def take(self, name: str, st: os.stat_result) -> object:
        """What to caption for the file ``name`` (``st``): the name, recorded as captioned, or,
        for a regular file captioned already, ``_REPEAT`` under this very name, the
        ``InputError`` saying so under another (a link's: its record's path is not the first's)."""
        if not stat.S_ISREG(st.st_mode):
            return name  # a special file: the captioner says what it is
        first = self.seen_as(st)
        if first == name:
            return _REPEAT
        if first is not None:
            from edgecap.errors import InputError

            return InputError(name, f"skipped: the same file as {utf8_name(first)}, already captioned")
        self.files[_key(st)] = name
        return name


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _expand_one(arg: str, state: _Seen) -> Iterator[tuple[str, object]]:
    from edgecap.errors import InputError

    if arg == "":
        yield (
            arg,
            InputError(arg, "empty PATH argument (an unset shell variable?); write . for the current folder"),
        )
        return
    if arg == "-" and not os.path.lexists(arg):
        problem = "no such file (edgecap caption reads no image from standard input: name its file)"
        yield arg, InputError(arg, problem)
        return
    path = Path(arg)
    literal = glob.has_magic(arg) and not os.path.lexists(arg)
    # os.path.isdir, not Path.is_dir: a name the system refuses (ENAMETOOLONG: over 255 bytes)
    # is not a folder, and the captioner then names its problem; Path.is_dir raised it
    if not literal and os.path.isdir(path):
        found, hidden = False, []
        undecodable: dict[tuple[str, ...], str] = {}  # HEIC photos: their kinds

        def want_file(rel: tuple[str, ...]) -> bool:
            if not _shown(rel):
                if _has_image_suffix(rel[-1]):
                    hidden.append(rel)  # .photo.jpg: left out, and said so if nothing else is found
                return False
            return _image_file(rel, undecodable)

        for name, item in _walk(path, want_file, _shown, state):
            found = found or _is_match(item) or _unread(item)
            yield name, item
        if undecodable:
            yield arg, _left_out(arg, undecodable, found, "folder holds no image files but")
        elif not found:
            problem = f"folder holds no image files ({', '.join(image_extensions())})"
            if hidden:
                problem = (
                    "folder holds no image files but hidden ones (a name that starts with a dot: "
                    f"{utf8_name(os.path.join(*hidden[0]))}), which are left out: name one to caption it"
                )
            elif os.path.isfile(path / "metadata.yaml"):  # a ROS 2 bag folder
                problem += "; a ROS 2 bag (metadata.yaml): caption its image topics with --bag FOLDER"
            yield arg, InputError(arg, problem)
    elif not literal:
        yield from _checked_file(arg, state)
    else:
        yield from _expand_glob(arg, state)


def _checked_file(name: str, state: _Seen) -> Iterator[tuple[str, object]]:
    """A file to caption, or why it is skipped (the same file as one already captioned)."""
    try:
        st = os.stat(name)
    except (OSError, ValueError):
        yield name, name  # the captioner says what is wrong with it
        return
    yield name, state.take(name, st)


def _expand_glob(pattern: str, state: _Seen) -> Iterator[tuple[str, object]]:
    """A quoted glob's image files: those the pattern matches and, as if its shell expansion
    were the PATHs, every image file below a folder it matches (a trailing slash: folders only),
    that folder's hidden files and folders left out as a folder PATH's are. One walk: each
    folder searched once, in the shell's order."""
    from edgecap.errors import InputError

    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    base = Path(*parts[:fixed]) if fixed else Path()
    rest = parts[fixed:]
    # photos/2024-*/: folders only, as the shell reads a trailing slash
    folders_only = pattern.endswith(("/", os.sep))
    # the folders the pattern matched (searched whole, as a folder PATH is): () is base, for **
    matched: set[tuple[str, ...]] = {()} if _match(rest, ()) else set()

    def in_matched(rel: tuple[str, ...]) -> bool:
        """Below a matched folder, and not hidden below it (as a folder PATH's walk takes)."""
        return bool(matched) and any(rel[:i] in matched and not hidden(rel[i:]) for i in range(len(rel)))

    undecodable: dict[tuple[str, ...], str] = {}  # HEIC photos it matches: their kinds

    def want_file(rel: tuple[str, ...]) -> bool:
        if not (_has_image_suffix(rel[-1]) or _undecodable_kind(rel[-1])):
            return False
        if not ((not folders_only and _match(rest, rel)) or in_matched(rel)):
            return False
        return _image_file(rel, undecodable)

    def want_dir(rel: tuple[str, ...]) -> bool:
        if _match(rest, rel):
            matched.add(rel)
            return True
        return _may_descend(rest, rel) or in_matched(rel)

    found = False
    if base == Path() or os.path.isdir(base):
        for name, item in _walk(base, want_file, want_dir, state):
            found = found or _is_match(item) or _unread(item)
            yield name, item
    if undecodable:
        yield pattern, _left_out(pattern, undecodable, found, "the pattern matches no image files but")
    elif not found:
        # photo[2].jpg that is not there: a file's name more likely than a pattern of one
        sole = not any(c in pattern for c in "*?")
        problem = "no such file (nor, read as a pattern, does it match an image file)" if sole else None
        yield pattern, InputError(pattern, problem or "the pattern matches no image files")


def _match_part(pattern: str, name: str) -> bool:
    # as glob: a wildcard does not match a leading dot
    return fnmatch.fnmatch(name, pattern) and (not name.startswith(".") or pattern.startswith("."))


def _match(pattern: tuple[str, ...], rel: tuple[str, ...]) -> bool:
    """Whether the relative path ``rel`` matches the pattern's parts (``**``: any folders)."""
    if not pattern:
        return not rel
    if pattern[0] == "**":
        return any(
            _match(pattern[1:], rel[i:])
            for i in range(len(rel) + 1)
            if all(not part.startswith(".") for part in rel[:i])
        )
    return bool(rel) and _match_part(pattern[0], rel[0]) and _match(pattern[1:], rel[1:])


def _may_descend(pattern: tuple[str, ...], rel: tuple[str, ...]) -> bool:
    """Whether a folder at ``rel`` may hold matches: its parts match the pattern's leading parts
    (up to a ``**``) and the pattern is deep enough. A ``**`` descends (a last one too:
    ``photos/**`` is every image below photos, as in ``glob``), but not into hidden folders."""
    for i, part in enumerate(rel):
        if i < len(pattern) and pattern[i] == "**":
            return all(not p.startswith(".") for p in rel[i:])
        if i >= len(pattern) - 1:
            return False
        if not _match_part(pattern[i], part):
            return False
    return True


def _walk(top: Path, want_file, want_dir, state: _Seen) -> Iterator[tuple[str, object]]:
    """Depth first, each folder's entries sorted by name: (name, name) for each file that
    ``want_file(relative parts)`` takes, (name, InputError) for each entry skipped. Folders
    (and links to folders) are entered when ``want_dir(relative parts)``; never twice, and a
    link back to a folder being searched is reported as a loop. A link that leads nowhere is
    reported when ``want_file`` takes its name, or when ``want_dir`` does and the name is not a
    file's (``_file_like``: it may have been a folder); one named as another kind of file
    (``notes.txt``) is passed over, as that file would be. An entry listed but out of
    reach is reported as ``_unreachable`` says. Iterative: any depth."""
    from edgecap.errors import InputError

    try:
        top_stat = os.stat(top)
    except OSError as exc:
        yield str(top), InputError(str(top), f"cannot read the folder ({exc.strerror or exc})")
        return
    folders = {_key(top_stat): str(top)}  # this walk's: a glob may search a folder again
    # each frame: (folder path, its relative parts, its key, the sorted entries left: name, is
    # a link, is a folder as the listing says)
    stack: list[tuple[Path, tuple[str, ...], tuple[int, int], Iterator[tuple[str, bool, bool | None]] | None]]
    stack = [(top, (), _key(top_stat), None)]
    while stack:
        folder, rel, key, entries = stack[-1]
        if entries is None:
            try:
                with os.scandir(folder) as it:
                    entries = iter(sorted((e.name, e.is_symlink(), _is_dir_entry(e)) for e in it))
            except OSError as exc:
                stack.pop()
                problem = f"skipped: cannot read the folder ({_reason(exc)})"
                yield str(folder), InputError(str(folder), problem)
                continue
            stack[-1] = (folder, rel, key, entries)
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, is_link, is_dir = entry
        path, parts = folder / name, (*rel, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            yield from _unreachable(path, parts, is_link, is_dir, exc, want_file, want_dir)
            continue
        if stat.S_ISDIR(st.st_mode):
            if not want_dir(parts):
                continue
            ancestors = {frame[2]: frame[0] for frame in stack}
            if _key(st) in ancestors:
                back = utf8_name(str(ancestors[_key(st)]))
                problem = f"skipped: a symbolic link loop (it leads back to {back})"
                yield str(path), InputError(str(path), problem)
                continue
            if _key(st) in folders:
                problem = f"skipped: the same folder as {utf8_name(folders[_key(st)])}, already searched"
                yield str(path), InputError(str(path), problem)
                continue
            folders[_key(st)] = str(path)
            stack.append((path, parts, _key(st), None))
        elif want_file(parts):
            yield str(path), state.take(str(path), st)


def _unreachable(
    path: Path, parts: tuple[str, ...], is_link: bool, is_dir: bool | None, exc: OSError, want_file, want_dir
) -> Iterator[tuple[str, object]]:
    """What ``_walk`` reports of an entry its folder lists but ``os.stat`` refuses: a link's
    target gone (broken), in a loop or out of reach (a folder it may not enter), or the entry
    itself out of reach (in a folder listed but not entered: chmod 644; a path over the
    system's 4096-byte limit). A file is passed on for the captioner to say why, a folder is
    reported as one that cannot be read; one that vanished since it was listed is no more."""
    from edgecap.errors import InputError

    name, code = parts[-1], getattr(exc, "errno", None)
    if is_link and _lexists(path):
        if not (want_file(parts) or (want_dir(parts) and not _file_like(name))):
            return
        target = utf8_name(_readlink(path))
        if code == errno.ELOOP:
            yield str(path), InputError(str(path), f"skipped: a loop of symbolic links (to {target})")
        elif code in (errno.ENOENT, errno.ENOTDIR):
            yield str(path), InputError(str(path), f"skipped: broken symbolic link (to {target})")
        else:
            problem = f"skipped: cannot follow the symbolic link to {target} ({_reason(exc)})"
            yield str(path), InputError(str(path), problem)
        return
    if is_link:
        is_dir = None  # the link itself out of reach: where it leads is not known
    if code == errno.ENOENT or is_dir is False or (is_dir is None and want_file(parts)):
        if want_file(parts):
            yield str(path), str(path)  # vanished or out of reach: the captioner says why
    elif want_dir(parts) and (is_dir or not _file_like(name)):
        yield str(path), InputError(str(path), f"skipped: cannot read the folder ({_reason(exc)})")


def _is_dir_entry(entry: os.DirEntry) -> bool | None:
    """Whether a listed entry is a folder (not following a link), as its folder's listing says
    (no ``stat`` on most file systems), or None where that could not be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return None


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _reason(exc: OSError) -> str:
    """The system's reason, as a skip names it: ``permission denied``, ``File name too long``."""
    return "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _is_match(item: object) -> bool:
    """An image the walk found: one to caption, or one already captioned under another name."""
    from edgecap.errors import InputError

    return not isinstance(item, InputError) or item.problem.startswith("skipped: the same file")


def _file_like(name: str) -> bool:
    """Whether ``name`` ends as a file's name does, with a short extension of letters and
    digits (``notes.txt``, ``lib.so``, ``model.onnx``), and not a folder's may (``2024.06.01
    Paris``, ``Photos.library``, ``album``)."""
    return re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,4}", Path(name).suffix) is not None


def _shown(rel: tuple[str, ...]) -> bool:
    """Whether a folder walk takes the entry at ``rel``: not a hidden one (a name that starts
    with a dot; the folders above it were taken)."""
    return not rel[-1].startswith(".")


def hidden(rel: tuple[str, ...]) -> bool:
    """Whether the entry at ``rel`` (its parts below the folder named) is one a folder walk
    leaves out: it, or a folder above it, is hidden (``_shown``)."""
    return not all(_shown(rel[: i + 1]) for i in range(len(rel)))


def _unread(item: object) -> bool:
    """A folder the walk could not read, or a link it could not follow (whether it holds
    images is not known)."""
    from edgecap.errors import InputError

    return isinstance(item, InputError) and item.problem.startswith(
        ("skipped: cannot read the folder", "skipped: cannot follow the symbolic link")
    )


def _has_image_suffix(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or (suffix == ".avif" and _avif_read())


def _avif_read() -> bool:
    """Whether this Pillow decodes AVIF, so that edgecap reads it (``edgecap.images``)."""
    from edgecap.images import ACCEPTED_FORMATS

    return "AVIF" in ACCEPTED_FORMATS


def image_extensions() -> tuple[str, ...]:
    """The extensions of the files a folder or glob takes: ``IMAGE_EXTENSIONS``, and ``.avif``
    where this Pillow decodes AVIF."""
    return IMAGE_EXTENSIONS + ((".avif",) if _avif_read() else ())


def _undecodable_kind(name: str) -> str | None:
    """The kind of photo, "HEIC/HEIF" or "AVIF", that ``name`` is named as where this Pillow
    cannot decode it (a folder leaves it out and says so), else None."""
    suffix = Path(name).suffix.lower()
    if suffix in (".heic", ".heif"):
        return "HEIC/HEIF"
    return "AVIF" if suffix == ".avif" and not _avif_read() else None


def _image_file(rel: tuple[str, ...], undecodable: dict[tuple[str, ...], str]) -> bool:
    """Whether a walk takes the file at ``rel`` (one it would take by name and place): an image
    file's name; a photo this Pillow cannot decode is noted in ``undecodable`` instead."""
    kind = _undecodable_kind(rel[-1])
    if kind is not None:
        undecodable[rel] = kind
        return False
    return _has_image_suffix(rel[-1])


def _left_out(arg: str, undecodable: dict[tuple[str, ...], str], found: bool, none_but: str) -> object:
    """What a folder or glob says of the photos it left out as this Pillow cannot decode them:
    a ``Note`` after its captions, or, where it found nothing else, the ``InputError``
    ``none_but`` (``folder holds no image files but``) that names them."""
    from edgecap.errors import InputError, counted
    from edgecap.images import UNDECODABLE

    counts: dict[str, int] = {}
    for kind in undecodable.values():
        counts[kind] = counts.get(kind, 0) + 1
    one = len(undecodable) == 1
    files = " and ".join(
        f"{counted(n, kind + ' file')}, {UNDECODABLE[kind]}" for kind, n in sorted(counts.items())
    )
    what = f"{files}: convert {'it' if one else 'them'} to JPEG or PNG"
    return Note(f"left out {what}") if found else InputError(arg, f"{none_but} {what}")
