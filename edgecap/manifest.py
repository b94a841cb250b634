"""The model directory's ``manifest.json``: everything a runtime needs to use the ONNX files.

A model directory holds ``manifest.json``, ``encoder.onnx``, ``decoder_step.onnx``,
``vocab.json`` and ``classes.json``. The manifest records dimensions, preprocessing, special
tokens, the precision, file hashes, and where the model came from (training data, dev metrics).
It also names the optional files the model has (``contract.OPTIONAL_FILES``: ``fusion.json``,
the fused language models, and ``confidence.json``, the confidence model), so that a copy of
the folder that left one behind is refused rather than captioning differently without a word;
a manifest that names none of them (an older edgecap's) loads those that are there. Only the
four core files have checksums here: the optional ones are rewritten where they are (a language
model install, a confidence fit), and ``fusion.json`` checksums the language models' files.

What a model directory may make edgecap open: only the files of the known roles
(``contract.FILE_ROLES`` and ``contract.OPTIONAL_FILES``), each named by a relative path inside
the directory (no absolute path, no ``..``); a role the manifest names beyond those is ignored
and never opened or hashed. A model file may be a symbolic link (a shared model store, a
download cache) if it resolves to a regular file, wherever that is: the link was put in the
directory by whoever made it. A link to a device, a pipe, a socket or a folder is refused, and
so is anything else that is not a regular file. The JSON files are read with a size and nesting
bound (``MAX_MANIFEST_BYTES``, ``files.MAX_VOCAB_BYTES``, ``files.MAX_JSON_DEPTH``). Each refusal
is a ``ModelError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from edgecap.contract import CONFIDENCE, FILE_ROLES, FUSION, OPTIONAL_FILES, ModelDimensions
from edgecap.errors import ModelError
from edgecap.files import FileProblem, check_regular, open_regular, read_json, write_whole
from edgecap.preprocess import Preprocessing

FORMAT = "edgecap-model/2"  # 2: the encoder's class_probs, the step's word_bias
MODEL_PRECISIONS = ("fp32", "fp16", "int8")  # a model directory's weights: as trained, or `edgecap convert`'s
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # the shipped one is 2 KB
KNOWN_ROLES = (*FILE_ROLES, *OPTIONAL_FILES)  # what a manifest's files may name; the rest is ignored
# what to do about a copy of a model folder that left a file behind (the messages that refuse it)
WHOLE_COPY = "copy the whole model directory, not only some of its files"
# what each optional file is, for the message that refuses a folder without it
OPTIONAL_WHAT = {
    FUSION: "the language models its captions are fused with (and the lm_*.npz files it names)",
    CONFIDENCE: "the confidence model that rates its captions",
}


@dataclass(frozen=True)
class Manifest:
    directory: Path
    files: dict[str, str]  # role (encoder, decoder_step, vocab, classes; fusion, confidence) -> file name
    dims: ModelDimensions
    tokens: dict[str, int]  # pad, start, end, unk
    preprocessing: Preprocessing
    precision: str = "fp32"  # MODEL_PRECISIONS
    sha256: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # training data, metrics, provenance

    def path(self, role: str) -> Path:
        if role not in KNOWN_ROLES:  # the manifest's other entries are never opened
            raise KeyError(f"unknown model file role {role!r} (known: {', '.join(KNOWN_ROLES)})")
        return self.directory / self.files[role]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "files": self.files,
            "dims": self.dims.to_dict(),
            "tokens": self.tokens,
            "preprocessing": self.preprocessing.to_dict(),
            "precision": self.precision,
            "sha256": self.sha256,
            **self.info,
        }

    def save(self) -> None:
        """Write ``manifest.json`` whole or not at all (``files.write_whole``)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_whole(self.directory / MANIFEST, lambda f: f.write(text.encode("utf-8")))

    def with_optional_files(self, directory: Path | None = None) -> Manifest:
        """This manifest naming exactly the optional files (``OPTIONAL_FILES``) that are in
        ``directory`` (default: its own): what a command that writes, copies or removes them
        saves, so that the manifest and the folder agree."""
        where = Path(directory if directory is not None else self.directory)
        files = {role: name for role, name in self.files.items() if role not in OPTIONAL_FILES}
        files.update({role: name for role, name in OPTIONAL_FILES.items() if (where / name).is_file()})
        return replace(self, files=files)


def file_sha256(path: Path) -> str:
    """The file's SHA-256; only a regular file is opened (``OSError`` otherwise)."""
    h = hashlib.sha256()
    try:
        f = open_regular(path, None)
    except FileProblem as exc:
        raise OSError(str(exc)) from None
    with f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_source(path: Path) -> str | bytes:
    """What ``onnxruntime.InferenceSession`` is given to open the graph file ``path``: its name,
    or the file's bytes where the name is not UTF-8 (a folder named in another encoding), which
    onnxruntime's binding cannot take (a ``TypeError``). A graph of edgecap's keeps its weights
    inside it: there is no external data to find beside it."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            f = open_regular(path, None)
        except FileProblem as exc:
            raise OSError(str(exc)) from None
        with f:
            return f.read()
    return name


def load_manifest(directory: str | Path, *, optional_files: bool = True) -> Manifest:
    """Read and check a model directory; raise ``ModelError`` saying what to do when it is wrong.
    ``optional_files=False``: an optional file the manifest names need not be there (what
    replaces or rewrites the model's files, not what captions with it)."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        is_dir = directory.is_dir()
    except OSError as exc:  # a folder above it that this user may not search, a name too long
        raise ModelError(
            f"{directory}: cannot reach the model directory ({exc.strerror or exc}); check the "
            "path and the permissions of the folders above it"
        ) from None
    if not is_dir:
        if os.path.exists(directory):  # a photo given as the model: it is there, but no folder
            raise ModelError(
                f"{directory}: not a folder; a model directory is one (`edgecap export` writes it)"
            )
        raise ModelError(f"model directory not found: {directory}")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelError(
            f"{directory}: not an edgecap model directory (no {MANIFEST}); create one with `edgecap export`"
        ) from None
    except OSError as exc:  # a folder this user may not read or search: it may well hold one
        raise ModelError(
            f"{directory}: cannot look into the folder ({exc.strerror or exc}); check its permissions"
        ) from None
    try:
        data = read_json(path, MAX_MANIFEST_BYTES)
    except FileProblem as exc:
        problem = str(exc)
        if problem.startswith(("permission denied", "cannot read", "no such")) or "regular" in problem:
            raise ModelError(
                f"{path}: cannot read it ({problem}); check the model directory's "
                "permissions or copy it again"
            ) from None
        if problem.startswith("not valid JSON"):
            raise ModelError(f"{path}: {problem}; re-export the model") from None
        raise ModelError(f"{path}: unusable manifest ({problem}); re-export the model") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == "edgecap-model/1":
        raise ModelError(
            f"{path}: unknown manifest format {fmt!r} (an older edgecap's, without "
            f"object tags); this edgecap reads {FORMAT}: re-export the model, or "
            "upgrade the directory with `python export/upgrade_model.py`"
        )
    if fmt != FORMAT:
        raise ModelError(
            f"{path}: unknown manifest format {fmt!r}; this edgecap reads {FORMAT}. "
            "Upgrade edgecap or re-export the model with this version"
        )
    try:
        dims = ModelDimensions.from_dict(data.get("dims"))
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}; re-export the model") from exc
    try:
        known = {"format", "files", "dims", "tokens", "preprocessing", "precision", "sha256"}
        files = {
            role: name for role, name in dict(data["files"]).items() if role in KNOWN_ROLES
        }  # other roles: ignored, never opened
        # the core files' only: the optional ones are rewritten in place (see the module doc)
        sha256 = {role: digest for role, digest in dict(data.get("sha256", {})).items() if role in FILE_ROLES}
        manifest = Manifest(
            directory=directory,
            files=files,
            dims=dims,
            tokens=dict(data["tokens"]),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            precision=data.get("precision", "fp32"),
            sha256=sha256,
            info={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: incomplete manifest ({exc!r}); re-export the model") from exc
    field_problem = _field_problem(manifest)
    if field_problem:
        raise ModelError(f"{path}: {field_problem}; re-export the model")
    for role in FILE_ROLES:
        if role not in manifest.files:
            raise ModelError(f"{path}: the manifest names no {role} file; re-export the model")
        name = manifest.files[role]
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(
                f"{path}: the {role} file {name!r} is not a file name inside the "
                "model directory; re-export the model"
            )
        try:
            present = manifest.path(role).exists()
        except OSError as exc:  # a folder on the way that may not be searched, a name too long
            raise ModelError(
                f"{manifest.path(role)}: cannot reach the {role} file ({exc.strerror or exc}); "
                "check the model directory's permissions or re-export the model"
            ) from None
        if not present:
            raise ModelError(
                f"{manifest.path(role)}: missing from the model directory; "
                "copy the whole directory or re-export the model"
            )
        try:
            check_regular(manifest.path(role))  # a link may lead anywhere, to a regular file
        except FileProblem as exc:
            raise ModelError(
                f"{manifest.path(role)}: the {role} file {exc}; re-copy the model directory or re-export it"
            ) from None
    for role, name in OPTIONAL_FILES.items():
        if optional_files and role in manifest.files:
            _check_optional_file(manifest, role, name)
    return manifest


def _check_optional_file(manifest: Manifest, role: str, name: str) -> None:
    """An optional file the manifest names (``OPTIONAL_FILES``) must be there: a copy of the
    folder without it would caption otherwise without a word."""
    path = manifest.directory / MANIFEST
    if manifest.files[role] != name:
        raise ModelError(
            f"{path}: the {role} file must be {name!r}, the manifest names "
            f"{manifest.files[role]!r}; re-export the model"
        )
    try:
        # a link to nothing is missing too; a link to a device or a folder is refused below
        present = os.path.exists(manifest.path(role))
    except (OSError, ValueError):
        present = False
    if not present:
        raise ModelError(
            f"{manifest.directory}: {name} is missing: {OPTIONAL_WHAT[role]}, which its "
            f'{MANIFEST} names; {WHOLE_COPY} (to use the model without it, take "{role}" out '
            f"of the files {MANIFEST} names)"
        )
    try:
        check_regular(manifest.path(role))
    except FileProblem as exc:
        raise ModelError(
            f"{manifest.path(role)}: the {role} file {exc}; re-copy the whole model directory"
        ) from None


def name_optional_file(directory: str | Path, role: str) -> None:
    """Make ``directory``'s manifest name its optional file of ``role`` (``OPTIONAL_FILES``),
    which has just been written there; the manifest is otherwise kept as it is (roles this
    edgecap does not know included) and written whole. Nothing where the folder has no manifest,
    or where it names the file already."""
    path = Path(directory) / MANIFEST
    if not os.path.lexists(path):
        return
    try:
        data = read_json(path, MAX_MANIFEST_BYTES)
    except FileProblem as exc:
        raise ModelError(f"{path}: cannot name {OPTIONAL_FILES[role]} in it ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ModelError(f"{path}: cannot name {OPTIONAL_FILES[role]} in it (it names no files)")
    if data["files"].get(role) == OPTIONAL_FILES[role]:
        return
    data["files"][role] = OPTIONAL_FILES[role]
    text = json.dumps(data, indent=2) + "\n"
    # a link into another model's folder (a folder of links to a model store, ``cp -rs``) is
    # replaced: this folder gets a manifest of its own; the other's is not rewritten to name a
    # file that it does not have (that model would then be refused)
    write_whole(path, lambda f: f.write(text.encode("utf-8")), replace_link=True)


def _field_problem(manifest: Manifest) -> str | None:
    """What is wrong with the fields every runtime reads (None: nothing), so that a damaged
    manifest fails here, once, rather than on every image."""
    pre = manifest.preprocessing
    numbers = (int, float)
    if len(pre.size) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pre.size
    ):
        return f"preprocessing.size must be [height, width], got {list(pre.size)}"
    if (
        len(pre.mean) != 3
        or len(pre.std) != 3
        # JSON's true is an int to Python, and Python's json reads NaN and Infinity
        or not all(isinstance(v, numbers) and not isinstance(v, bool) for v in pre.mean + pre.std)
        or not all(math.isfinite(v) for v in pre.mean + pre.std)
        or not all(v > 0 for v in pre.std)
    ):
        return (
            f"preprocessing.mean and .std must be 3 numbers each (finite, std > 0), got "
            f"{list(pre.mean)} and {list(pre.std)}"
        )
    if not isinstance(pre.resample, str) or not hasattr(Image.Resampling, pre.resample.upper()):
        return f"preprocessing.resample must name a Pillow filter such as 'bilinear', got {pre.resample!r}"
    if manifest.precision not in MODEL_PRECISIONS:
        return f"precision must be one of {', '.join(MODEL_PRECISIONS)}, got {manifest.precision!r}"
    return None


def verify_files(manifest: Manifest) -> None:
    """Compare the files' SHA-256 with the manifest (a truncated or swapped file fails here)."""
    for role, expected in manifest.sha256.items():
        if role not in FILE_ROLES or role not in manifest.files:
            continue  # a checksum of a file this edgecap does not use: never opened
        try:
            actual = file_sha256(manifest.path(role))
        except OSError as exc:
            raise ModelError(
                f"{manifest.path(role)}: cannot read it ({exc.strerror or exc}); "
                "re-copy the model directory or re-export it"
            ) from exc
        if actual != expected:
            raise ModelError(
                f"{manifest.path(role)}: checksum mismatch (file corrupt, truncated or "
                "replaced); re-copy the model directory or re-export it"
            )
