"""Hostile image files (issue 16, classes 1, 2 and 6): special files and oversized files are
refused before they are read, only the accepted formats are parsed, decoding work is bounded from
the headers, and every failure of one input lands in that input's slot.

Every hostile file is built here, in tmp_path.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import edgecap
from edgecap import Caption, Captioner, InputError
from edgecap import images
from helpers import in_forked_child, needs_pillow

PACKAGE = Path(edgecap.__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner(tiny_model_dir, backend="onnxruntime", max_length=4)


def _photo(size=(64, 48)) -> Image.Image:
    x = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(x.astype(np.uint8))


def _refused(path_or_bytes, *words) -> InputError:
    with pytest.raises(InputError) as info:
        images.load_rgb(path_or_bytes)
    err = info.value
    assert "\n" not in str(err)
    for word in words:
        assert word in err.problem, (word, err.problem)
    return err


# -- class 1: what is read ---------------------------------------------------------------------
@POSIX
def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    err = _refused(fifo, "named pipe", "not a regular file")
    assert err.source == str(fifo)


@POSIX
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_character_device_behind_a_link_is_refused(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")  # read whole, it never ends
    _refused(link, "character device", "not a regular file")


def test_huge_sparse_file_is_refused_before_reading(tmp_path):
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(images.max_file_bytes() + 1)  # sparse: no disk used
    _refused(
        big,
        "134,217,729 bytes",
        "over the limit of 134,217,728",
        images.MAX_FILE_BYTES_ENV,
        "set_max_file_bytes",
    )


def test_file_size_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    _photo().save(path)
    size = path.stat().st_size
    monkeypatch.setattr(images, "_max_file_bytes_override", None)
    monkeypatch.setenv(images.MAX_FILE_BYTES_ENV, str(size - 1))
    _refused(path, "over the limit")
    monkeypatch.setenv(images.MAX_FILE_BYTES_ENV, str(size))
    assert images.load_rgb(path).size == (64, 48)
    images.set_max_file_bytes(10)
    _refused(path, "over the limit of 10")
    images.set_max_file_bytes(None)
    assert images.load_rgb(path).size == (64, 48)
    monkeypatch.setenv(images.MAX_FILE_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=images.MAX_FILE_BYTES_ENV):
        images.max_file_bytes()
    with pytest.raises(ValueError):
        images.set_max_file_bytes(0)


@pytest.mark.parametrize(
    ("setter", "getter", "env", "override"),
    [
        ("set_max_pixels", "max_pixels", "MAX_PIXELS_ENV", "_max_pixels_override"),
        ("set_max_file_bytes", "max_file_bytes", "MAX_FILE_BYTES_ENV", "_max_file_bytes_override"),
    ],
)
def test_a_limit_is_a_positive_integer_from_1(monkeypatch, setter, getter, env, override):
    """``set_max_pixels`` / ``set_max_file_bytes`` (docs/reliability.md): a limit is a positive
    integer or None. 1 is the least taken, in code and in the environment; 0, a bool (an int to
    Python: True would be a limit of 1), a float and a numeric string are refused by the
    setter, naming the value."""
    monkeypatch.setattr(images, override, None)
    monkeypatch.delenv(getattr(images, env), raising=False)
    getattr(images, setter)(1)
    assert getattr(images, getter)() == 1
    getattr(images, setter)(None)
    for bad in (0, True, False, 2.5, "10"):
        with pytest.raises(ValueError, match=f"positive integer or None, got {bad!r}"):
            getattr(images, setter)(bad)
    monkeypatch.setenv(getattr(images, env), "1")
    assert getattr(images, getter)() == 1


@pytest.mark.parametrize(
    "sizes, reads",
    [
        # size 0 at the open and at the read (as /proc files report): a byte, then to a byte past
        ((0, 0), [1, 1000]),
        # 999 bytes, a byte under the limit: its size and a byte more gives 1,000, the limit
        # itself, so it may have grown: one byte more, which is past the limit
        ((999, 999), [1000, 1]),
        # under the limit at the open's check, 100,004 bytes at the read: no more than a byte past
        ((999, 100_004), [1001]),
    ],
)
def test_a_file_that_grows_is_read_no_further_than_the_limit(tmp_path, monkeypatch, sizes, reads):
    """The size check happens before the read; a file that grows after it (or reports size 0,
    as /proc files do) is still read at most one byte past the limit, and refused, not read
    short. The file is 100,004 bytes; ``sizes``: what fstat says at the open, then at the read."""
    from edgecap import files

    path = tmp_path / "growing.png"
    path.write_bytes(b"\x89PNG" + b"\0" * 100_000)
    real_fstat, real_fdopen, asked = os.fstat, os.fdopen, []
    said = dict(zip(("open_regular", "read_regular"), sizes))

    def fstat(fd):  # os.fstat as files' two callers see it (os's own: anyone else's calls too)
        real = real_fstat(fd)
        size = said.get(sys._getframe(1).f_code.co_name, real.st_size)
        return os.stat_result((*real[:6], size, *real[7:]))

    monkeypatch.setattr(files.os, "fstat", fstat)

    class Recorder:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Recorder(real_fdopen(fd, mode)))
    images.set_max_file_bytes(1000)
    try:
        # and says how to raise the limit, as a file over it before reading does
        _refused(path, "grew past the limit of 1,000 bytes", "set_max_file_bytes", images.MAX_FILE_BYTES_ENV)
    finally:
        images.set_max_file_bytes(None)
    assert asked == reads


def test_folder_is_refused(tmp_path):
    _refused(tmp_path, "directory")


@POSIX
def test_a_path_swapped_for_a_folder_or_a_pipe_after_its_check_is_still_refused(tmp_path, monkeypatch):
    """The module's promise: the path may be swapped between the ``stat`` check and the open,
    so the opened file is checked again (``fstat``). The swap is played by skipping the first
    check: a folder and a named pipe are still refused as what they are, and the pipe is not
    read (it would read as an empty file)."""
    from edgecap import files

    monkeypatch.setattr(files, "check_regular", lambda path: None)
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    for path, kind in ((tmp_path, "a directory"), (pipe, "a named pipe (FIFO)")):
        with pytest.raises(files.FileProblem, match=re.escape(f"is {kind}, not a regular file")):
            files.read_regular(path, 1000)


def test_why_a_file_cannot_be_read_is_said_in_words(tmp_path, monkeypatch):
    """A missing photo, one the user may not read (root ignores chmod: the open is refused
    as the kernel would) and a path with a NUL byte each say why in a few words."""
    from edgecap import files

    photo = tmp_path / "photo.png"
    _photo().save(photo)
    _refused(tmp_path / "missing.png", "no such file")
    _refused(str(tmp_path / "a\0b.png"), "the path contains a NUL byte")

    def refuse(path, flags, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files.os, "open", refuse)
    _refused(photo, "permission denied")


def test_an_empty_path_is_named_in_its_error():
    """caption("") (a path from an unset variable or an empty config field) is an InputError
    that says it is an empty path, not ": no such file", which names nothing."""
    err = _refused("", "no such file")
    assert str(err) == "<empty path>: no such file"


def test_the_message_is_one_printable_line_whatever_the_file_name(tmp_path):
    """str(InputError) of a file named with a newline, or with a byte that is not UTF-8 (as
    os.listdir gives it: a lone surrogate, which print() to a UTF-8 terminal cannot encode), is
    one line escaped as edgecap caption escapes names (--help: \\n, \\xHH for such a byte);
    ``source`` keeps the name as given."""
    for name, shown in (("new\nline.png", "new\\nline.png"), ("bad\udcff.png", "bad\\xff.png")):
        path = str(tmp_path / name)
        err = _refused(path, "no such file")
        assert err.source == path
        assert str(err) == f"{tmp_path}/{shown}: no such file"
        str(err).encode("utf-8")  # printable on a UTF-8 terminal


def test_json_that_is_not_utf8_says_where(tmp_path):
    from edgecap.files import FileProblem, read_json

    path = tmp_path / "vocab.json"
    path.write_bytes(b'{"a": "\xff"}')  # the byte after {"a": " (7 bytes) is no UTF-8
    with pytest.raises(FileProblem, match=re.escape("not UTF-8 text (invalid start byte at byte 7)")):
        read_json(path, 1000)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd")
def test_refused_files_leave_no_file_open(tmp_path):
    """A folder of many oversized photos is refused one by one without running out of file
    descriptors: each refused file is closed."""
    from edgecap.files import FileProblem, open_regular

    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 100)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(FileProblem, match="over the limit of 10"):
            open_regular(path, 10)
    assert len(os.listdir("/proc/self/fd")) == before


def test_json_nesting_limit_counts_brackets_outside_strings_only(tmp_path):
    """read_json: nested at most 32 deep ({ and 31 [ : accepted; one more: refused); brackets
    inside strings (an escaped quote included) are text, not nesting."""
    from edgecap.files import FileProblem, read_json

    path = tmp_path / "x.json"
    path.write_text('{"a": ' + "[" * 31 + "]" * 31 + "}")
    nested: list = []
    for _ in range(30):
        nested = [nested]
    assert read_json(path, 1000) == {"a": nested}  # 31 lists, one inside the other
    path.write_text('{"a": ' + "[" * 32 + "]" * 32 + "}")
    with pytest.raises(FileProblem, match="JSON nested 33 deep, over the limit of 32"):
        read_json(path, 1000)
    words = ["[" * 40, "{" * 40, 'say "' + "[" * 40 + '"']
    path.write_text('{"words": ["' + "[" * 40 + '", "' + "{" * 40 + '", "say \\"' + "[" * 40 + '\\""]}')
    assert read_json(path, 1000) == {"words": words}


def test_json_with_a_string_that_never_ends_is_refused_at_once(tmp_path):
    """read_json: invalid JSON, a quote and then 300,000 escaped quotes (600 KB, under the
    limit), is "not valid JSON" in a fraction of a second. The nesting check's string pattern
    once took quadratic time on it: tried from every one of those quotes against the rest of the
    text (measured 4.5 s for 40 KB, about 10 s for 60 KB, some 15 minutes for these 600 KB).
    Read in a forked child that an alarm ends after 60 s: that fails the quadratic pattern and
    no load of the machine, where a limit of 1 s on this process's clock could (no timing)."""
    from edgecap.files import FileProblem, read_json

    path = tmp_path / "x.json"
    path.write_text('{"a": "' + '\\"' * 300_000)

    def refused() -> str:
        try:
            read_json(path, 1 << 20)
        except FileProblem as exc:
            return str(exc)
        return "read"

    code, said = in_forked_child(refused, alarm_s=60)
    assert code == 0 and "not valid JSON" in said, (code, said)


# -- class 2: what is parsed and how much work decoding may take -------------------------------
def test_icon_wrapping_a_png_is_not_parsed(tmp_path):
    ico = tmp_path / "icon.jpg"
    _photo((256, 256)).save(ico, format="ICO", sizes=[(256, 256)])
    assert Image.open(ico).format == "ICO"  # Pillow would read it
    _refused(ico, "not an image in an accepted format", "JPEG, PNG")


def test_a_broken_file_of_an_accepted_format_says_what_is_broken():
    """A PNG whose header checksum is wrong is a broken PNG (the reason Pillow's PNG reader
    gives, which ``Image.open`` keeps only as a warning), and a file cut inside its header is
    that format cut short, not "not an image in an accepted format"."""
    buf = io.BytesIO()
    _photo((16, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[29] ^= 0xFF  # a byte of the IHDR chunk's CRC (8 signature + 4 length + 4 type + 13 data)
    _refused(bytes(png), "corrupt PNG header (broken PNG file (bad header checksum in b'IHDR'))")
    # cut before a reader could say more than that it ran out of bytes: "cut short", not its
    # internals ("unpack_from requires a buffer ...", "not identified by this driver")
    jpeg = io.BytesIO()
    _photo((16, 8)).save(jpeg, format="JPEG")
    cuts = [(b"GIF89a\x10", "GIF"), (buf.getvalue()[:8], "PNG"), (buf.getvalue()[:30], "PNG")]
    for data, name in [*cuts, (jpeg.getvalue()[:3], "JPEG"), (jpeg.getvalue()[:20], "JPEG")]:
        err = _refused(data, f"corrupt {name} header (cut short)")
        assert err.problem == f"corrupt {name} header (cut short)"


def _bmff(major: bytes, *compatible: bytes) -> bytes:
    """The start of an ISO-BMFF photo (HEIC, AVIF): its ftyp box (major brand, minor version,
    compatible brands), then bytes no decoder reads."""
    body = major + b"\0\0\0\0" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\0" * 64


HEIF_WORDS = (
    "a HEIC/HEIF image, which this Pillow cannot decode (only with the pillow-heif plugin, "
    "which edgecap does not load): convert it to JPEG or PNG"
)


def test_a_heic_photo_is_said_to_be_one_that_this_pillow_cannot_decode():
    """An iPhone's photo (HEIC: major brand heic; other cameras' HEIF: mif1, which Pillow's AVIF
    reader also tries) had been "not an image in an accepted format (JPEG, ...)"."""
    for data in (
        _bmff(b"heic", b"mif1", b"heic"),
        _bmff(b"mif1", b"mif1", b"heic"),
        _bmff(b"heix", b"mif1", b"heix"),
        _bmff(b"msf1", b"msf1", b"hevc"),
    ):
        assert _refused(data).problem == HEIF_WORDS


def test_an_avif_photo_is_said_to_be_undecodable_where_this_pillow_has_no_avif(monkeypatch):
    monkeypatch.setattr(images, "ACCEPTED_FORMATS", ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"))
    assert _refused(_bmff(b"avif", b"avif", b"mif1", b"miaf")).problem == (
        "an AVIF image, which this Pillow cannot decode (it was built without AVIF support): "
        "convert it to JPEG or PNG"
    )


AVIF_WORDS = (
    "an AVIF image, which this Pillow cannot decode (it was built without AVIF support): "
    "convert it to JPEG or PNG"
)


def test_an_avif_photo_is_told_by_any_of_its_compatible_brands(monkeypatch):
    """The ftyp box's brands after its major one count too (ISO/IEC 14496-12: the compatible
    brands, 4 bytes each after the minor version): a file whose major brand is HEIF's generic
    mif1 (msf1 for a sequence) and whose later brands say AVIF (among them or the last of them)
    is an AVIF photo, not a HEIC; only the ftyp box's own brands count (its declared size), not
    the same letters in the box after it."""
    monkeypatch.setattr(images, "ACCEPTED_FORMATS", ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"))
    assert _refused(_bmff(b"mif1", b"mif1", b"avif", b"miaf")).problem == AVIF_WORDS
    assert _refused(_bmff(b"msf1", b"msf1", b"iso8", b"miaf", b"avis")).problem == AVIF_WORDS
    assert _refused(_bmff(b"avif", b"mif1", b"miaf")).problem == AVIF_WORDS  # the major brand alone
    ftyp = _bmff(b"mif1", b"mif1")[:20]  # its 20 bytes: size, "ftyp", major, minor, one brand
    next_box = struct.pack(">I", 16) + b"free" + b"avif" + b"\0" * 4 + b"\0" * 64
    assert _refused(ftyp + next_box).problem == HEIF_WORDS


VIDEO_WORDS = "not a photo: caption its frames with edgecap caption --video FILE"
RECORDING_WORDS = "not a photo: caption its image topics with edgecap caption --bag FILE"


def test_a_video_or_a_recording_given_as_a_photo_says_which_option_captions_it(tmp_path, monkeypatch):
    """``edgecap caption clip.mp4`` (without ``--video``) had said "not an image in an accepted
    format (JPEG, ...)", and a video over the file-size limit, as most are, to raise the limit."""
    mp4 = _bmff(b"isom", b"isom", b"iso2", b"mp41")
    for data, problem in (
        (mp4, f"an MP4 / QuickTime video, {VIDEO_WORDS}"),
        (_bmff(b"qt  ", b"qt  "), f"an MP4 / QuickTime video, {VIDEO_WORDS}"),
        (b"RIFF\0\x10\0\0AVI LIST" + b"\0" * 64, f"an AVI video, {VIDEO_WORDS}"),
        (b"\x1aE\xdf\xa3" + b"\0" * 64, f"a Matroska / WebM video, {VIDEO_WORDS}"),
        (b"\x89MCAP0\r\n" + b"\0" * 64, f"an MCAP recording, {RECORDING_WORDS}"),
        (b"#ROSBAG V2.0\n" + b"\0" * 64, f"a ROS 1 bag, {RECORDING_WORDS}"),
    ):
        assert _refused(data).problem == problem
    # sound alone (an M4A, a WAV) and a Canon raw photo (CR3: ISO media too) are no video
    no_video = (
        _bmff(b"M4A ", b"M4A ", b"mp42"),
        b"RIFF\0\x10\0\0WAVEfmt " + b"\0" * 64,
        _bmff(b"crx ", b"crx ", b"isom"),
    )
    for data in no_video:
        assert _refused(data).problem.startswith("not an image in an accepted format")
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4 + b"\0" * 4096)
    monkeypatch.setattr(images, "_max_file_bytes_override", 1024)
    assert _refused(path).problem == f"an MP4 / QuickTime video, {VIDEO_WORDS}"
    path.write_bytes(b"\0" * 4096)  # another file over the limit is told how to raise it
    _refused(path, "over the limit of 1,024", "set_max_file_bytes")


AVIF = pytest.mark.skipif(
    "avif" not in features.modules or not features.check("avif"), reason="this Pillow decodes no AVIF"
)


@AVIF
def test_an_avif_photo_is_read_upright_where_this_pillow_decodes_avif():
    """Pillow 13 decodes AVIF; edgecap had refused it ("not an image in an accepted format").
    Its EXIF orientation (Pillow writes it as the irot box) is applied as for a JPEG."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # the left half white: the top half once turned upright (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="AVIF", quality=100, exif=exif.tobytes())
    rgb = np.asarray(images.load_rgb(buf.getvalue()), np.float32)
    assert rgb.shape == (40, 20, 3)
    assert rgb[:20].mean() > 240 and rgb[20:].mean() < 15


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "SGI"])
def test_formats_outside_the_list_are_refused(fmt):
    buf = io.BytesIO()
    _photo().save(buf, format=fmt)
    _refused(buf.getvalue(), "accepted format")


@pytest.mark.parametrize("fmt", images.ACCEPTED_FORMATS)
def test_every_accepted_format_is_read(fmt):
    buf = io.BytesIO()
    _photo().save(buf, format=fmt)
    assert images.load_rgb(buf.getvalue()).size == (64, 48)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; an SOS segment includes its entropy-coded data."""
    out, pos = [], 2
    while data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        out.append((marker, pos, end))
        pos = end
    return out


def _jpeg_with_scans(n: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``n`` scans."""
    buf = io.BytesIO()
    _photo((96, 96)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    scans = [s for s in _jpeg_segments(data) if s[0] == 0xDA]
    _, start, end = scans[-1]
    assert len(scans) < n
    return data[:end] + data[start:end] * (n - len(scans)) + data[end:]


def test_jpeg_scans_are_bounded_before_decoding():
    """docs/reliability.md: at most 64 JPEG scans, counted from the markers: 65 are refused
    (which Pillow would decode, every scan), 64 are decoded."""
    bomb = _jpeg_with_scans(65)
    assert images.jpeg_scans(bomb, images.MAX_JPEG_SCANS) == 65
    with Image.open(io.BytesIO(bomb)) as im:
        im.load()  # Pillow decodes it, every scan
    _refused(bomb, "JPEG with more than 64 scans")
    assert images.load_rgb(_jpeg_with_scans(64)).size == (96, 96)


def test_a_scan_bomb_cannot_hide_its_scans_behind_odd_markers():
    """The scan count is not thrown off by what comes between the scans (the bomb above, 65
    scans, which Pillow decodes in full): a TEM marker (FF 01, which has no length field)
    before the second scan, or 4,097 empty comment segments (FF FE 00 02) there, over the
    64 x 64 = 4,096 segments the count walks. Taking TEM's next two bytes (FF DA) as a length
    skips past the scans; stopping the walk there with the scans so far (1) lets all 65
    through. Both are refused as having more than 64 scans."""
    bomb = _jpeg_with_scans(images.MAX_JPEG_SCANS + 1)
    second_scan = [start for marker, start, _ in _jpeg_segments(bomb) if marker == 0xDA][1]
    for odd in (b"\xff\x01", b"\xff\xfe\x00\x02" * (64 * images.MAX_JPEG_SCANS + 1)):
        data = bomb[:second_scan] + odd + bomb[second_scan:]
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # Pillow decodes it, every scan
        _refused(data, f"more than {images.MAX_JPEG_SCANS} scans")


def test_a_flood_of_segments_before_a_jpegs_image_data_is_refused_before_pillow_parses_it():
    """Pillow reads a JPEG's segments before its first scan in Python and keeps every APPn and
    comment: a 16 MiB file (the service's body limit) of empty APP5 segments (FF E5 00 02, 4
    bytes each) cost about 560 MB and 4 s to open, a 128 MiB one (the file limit) 4.6 GB and
    31 s, for a 16 x 16 image. More than MAX_JPEG_HEADER_SEGMENTS (4,096; photos have 10-30)
    are refused from the markers before Pillow sees the bytes; 4,096 are still read."""
    photo = io.BytesIO()
    _photo().save(photo, "JPEG")
    data = photo.getvalue()
    header = [marker for marker, _, _ in _jpeg_segments(data)].index(0xDA)  # segments before SOS
    assert 2 <= header <= 30
    spare = 4096 - header  # MAX_JPEG_HEADER_SEGMENTS
    at_limit = data[:2] + b"\xff\xe5\x00\x02" * spare + data[2:]
    assert images.load_rgb(at_limit).size == (64, 48)
    flood = data[:2] + b"\xff\xe5\x00\x02" * (4 * 1024 * 1024) + data[2:]
    opened = []
    real_open = Image.open
    walked = []  # the markers the walks read, each refusal's
    real_markers = images._jpeg_markers

    def recording_open(*args, **kwargs):
        opened.append(args)
        return real_open(*args, **kwargs)

    def counted_markers(data):
        for marker in real_markers(data):
            walked[-1] += 1
            yield marker

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "open", recording_open)
        mp.setattr(images, "_jpeg_markers", counted_markers)
        walked.append(0)
        _refused(flood, "JPEG with more than 4,096 segments before its image data")
        walked.append(0)
        _refused(at_limit[:2] + b"\xff\xfe\x00\x02" + at_limit[2:], "more than 4,096 segments")
    assert opened == []
    # refused at once: the walk stops past the limit, not after the flood's 4,194,304 segments
    # (counted, not timed: a limit on the clock fails on a loaded machine)
    assert len(walked) == 2 and max(walked) <= images.MAX_JPEG_HEADER_SEGMENTS + 2, walked


def test_scan_count_reads_markers_not_bytes():
    """SOS-like bytes inside an APP segment (metadata) are not scans."""
    buf = io.BytesIO()
    _photo().save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    payload = b"\xff\xda" * 200
    app = b"\xff\xe9" + struct.pack(">H", len(payload) + 2) + payload
    tricky = data[:2] + app + data[2:]
    assert images.jpeg_scans(tricky, images.MAX_JPEG_SCANS) == images.jpeg_scans(data, 1000)
    assert images.load_rgb(tricky).size == (64, 48)


def test_tiff_codecs_outside_the_list_are_refused(tmp_path):
    path = tmp_path / "photo.tif"
    _photo().save(path, compression="jpeg")
    _refused(path, "TIFF compression 'jpeg' is not accepted")
    _photo().save(path, compression="tiff_lzw")
    assert images.load_rgb(path).size == (64, 48)


@pytest.mark.parametrize("compression", ["group3", "group4", "tiff_ccitt", "jpeg", "lzma", "zstd"])
def test_every_tiff_codec_outside_the_documented_list_is_refused(compression):
    """Only the codecs the module docstring lists (raw, packbits, LZW, deflate) are decoded;
    each other one Pillow can write here (the fax codecs on a 1-bit image) is refused by name
    before any pixel is decoded, whichever it is."""
    image = _photo().convert("1") if compression in ("group3", "group4", "tiff_ccitt") else _photo()
    buf = io.BytesIO()
    try:
        image.save(buf, "TIFF", compression=compression)
    except OSError:  # a libtiff built without this codec
        pytest.skip(f"this Pillow cannot write TIFF compression {compression!r}")
    _refused(buf.getvalue(), f"TIFF compression {compression!r} is not accepted")


def _bmp_rle8(width: int, height: int, grey: bool = True) -> bytes:
    """An RLE8 bitmap, every row ``width`` pixels of entry 7; a grey palette (Pillow opens it as
    L) or a coloured one (P)."""
    rows = b"".join(bytes([width, 7, 0, 0]) for _ in range(height)) + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0] if grey else [i, 255 - i, i // 2, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


@pytest.mark.parametrize("grey", [True, False], ids=["grey", "colour"])
def test_bmp_rle_is_refused(grey):
    if grey:
        needs_pillow("9.2", "reading a grey-palette RLE8 BMP")  # 9.1: "unknown raw mode"
    data = _bmp_rle8(20, 10, grey)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a valid RLE8 bitmap: Pillow reads it (in Python)
        assert im.mode == ("L" if grey else "P")
    _refused(data, "RLE")


def test_pixel_limit_survives_pillow_guard_set_to_none(tmp_path):
    """A program that turns Pillow's guard off before importing edgecap keeps edgecap's."""
    good = tmp_path / "good.png"
    _photo().save(good)
    code = (
        "import PIL.Image\nPIL.Image.MAX_IMAGE_PIXELS = None\n"
        "from edgecap import images, InputError\n"
        f"print(images.load_rgb({str(good)!r}).size)\n"
        "images.set_max_pixels(100)\n"
        "try:\n"
        f"    images.load_rgb({str(good)!r})\n"
        "except InputError as exc:\n"
        "    print('refused', exc.problem)\n"
        "images.set_max_pixels(None)\n"
        "print(images.max_pixels())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "(64, 48)"
    assert lines[1].startswith("refused image is 64x48") and "limit of 100" in lines[1]
    assert lines[2] == "89478485"


# -- class 6: every per-input failure in its own slot ------------------------------------------
def test_every_path_failure_lands_in_its_slot(captioner, tmp_path):
    good = tmp_path / "good.png"
    _photo().save(good)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(images.max_file_bytes() + 1)
    hostile = {
        "nul": (str(tmp_path / "a\0b.png"), "NUL byte"),
        "unencodable": (str(tmp_path) + "/\ud800.png", "cannot be encoded"),
        "oversized": (big, "over the limit"),
        "bytes_path": (b"", "0 bytes"),
        "other_type": (12345, "unsupported input type"),
    }
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        hostile["fifo"] = (tmp_path / "pipe.png", "named pipe")
    batch = [good]
    for item, _ in hostile.values():
        batch += [item, good]
    results = captioner.caption_batch(batch, on_error="return")
    assert len(results) == len(batch)
    alone = captioner.caption(good)
    for i, (item, words) in enumerate(hostile.values()):
        slot = results[2 * i + 1]
        assert isinstance(slot, InputError), (item, slot)
        assert words in slot.problem, (words, slot.problem)
    for good_slot in results[::2]:
        assert isinstance(good_slot, Caption) and good_slot.text == alone.text


def test_unexpected_failure_of_one_input_is_still_its_own(captioner, tmp_path, monkeypatch):
    """The mechanism, not the examples: anything one input raises while loading is an
    InputError in its slot (here a MemoryError from the reader)."""
    good = tmp_path / "good.png"
    _photo().save(good)
    real = images.read_regular

    def flaky(path, *args):
        if str(path).endswith("bad.png"):
            raise MemoryError()
        return real(path, *args)

    monkeypatch.setattr(images, "read_regular", flaky)
    results = captioner.caption_batch([good, tmp_path / "bad.png", good], on_error="return")
    assert isinstance(results[1], InputError) and "MemoryError" in results[1].problem
    assert all(isinstance(r, Caption) for r in (results[0], results[2]))
    with pytest.raises(InputError):
        captioner.caption(tmp_path / "bad.png")


def test_a_ctrl_c_inside_a_decoder_is_not_an_input_error(tmp_path, monkeypatch):
    """The safety net above must not turn Ctrl-C (surfacing as another exception from a lazy
    plugin import) into a per-input error."""

    def interrupted(path, *args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__") from exc

    monkeypatch.setattr(images, "read_regular", interrupted)
    with pytest.raises(KeyboardInterrupt):
        images.load_rgb(tmp_path / "photo.png")


def test_pillows_warnings_about_a_files_metadata_are_not_printed(tmp_path, tiny_model_dir, capfd):
    """An EXIF entry that points past the file's end (a photo still being written; a camera's
    broken EXIF) and a TIFF cut short made Pillow warn in two lines of its own source that name
    no file ("Tag data larger than file", "Truncated File Read"): the first photo is captioned
    without a word, the second refused in its own one line."""
    from helpers import run_edgecap

    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHII", 0x010F, 2, 40, 0xFFF0) + bytes(4)
    exif = tmp_path / "exif.jpg"
    _photo().save(exif, "JPEG", exif=b"Exif\x00\x00" + tiff)
    tif = io.BytesIO()
    _photo().save(tif, "TIFF")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(tif.getvalue()[:1000])
    done = run_edgecap(capfd, "caption", "--model", tiny_model_dir, exif, cut)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{exif}\t")
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"edgecap: {cut}: truncated or corrupt image data")


def test_a_format_this_pillow_cannot_read_says_so(tmp_path, tiny_model_dir, capfd, monkeypatch):
    """A Pillow built without WebP support (libwebp missing where it was built) says so only in
    a warning, which edgecap caption does not print (Pillow's warnings name no file): the
    photo's own line says it, not that a WEBP file is not in a format that lists WEBP."""
    from PIL import WebPImagePlugin

    from edgecap.cli import main

    photo = tmp_path / "photo.webp"
    _photo().save(photo, "WEBP")
    monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)
    assert main(["caption", "--model", str(tiny_model_dir), str(photo)]) == 1
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith(f"edgecap: {photo}: a WEBP image, which this Pillow cannot read (")
    assert "WEBP support not installed" in line
