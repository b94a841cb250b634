"""Caption metrics as coco-caption defines them (PyPI ``pycocoevalcap``; the ``eval`` extra).

``score`` returns fractions, as coco-caption reports them. With ``tokenizer="ptb"`` the text is
tokenised by coco-caption's PTB tokenizer (Java), as the papers did; ``"simple"`` lower-cases and
strips punctuation in Python (no Java), which is what training uses for its per-epoch check.
METEOR needs Java too and is skipped, with a warning, where Java is absent.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

from edgecap.errors import counted
from edgecap.extras import install_hint
from edgecap.vocab import tokenize

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# Java's PTBTokenizer (-preserveLines) ends a line at these as well as at "\n", which alone
# pycocoevalcap replaces with a space: a caption holding one became two lines, and every later
# caption was paired with the wrong image. Spaces here, as "\n" is there.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\x0b\x0c\u2028\u2029", " "))


class JavaFailed(RuntimeError):
    """coco-caption's Java (the PTB tokenizer, METEOR) started but failed while working: the
    message says which, and what it gave back (and that it needs Java 8 or newer where Java
    failed, not where the tokenizer could not write its temporary file)."""


_NEEDS_JAVA = "coco-caption needs Java 8 or newer (java -version)"


def java_available() -> bool:
    """A ``java`` on PATH that starts: macOS without a Java runtime has a /usr/bin/java that only
    says so and fails, which coco-caption's PTB tokenizer read as no lines (scores over the
    first image alone) and its METEOR as a broken pipe (a traceback, then a hang at exit)."""
    java = shutil.which("java")
    return java is not None and _java_starts(java)


def java_problem() -> str | None:
    """Why coco-caption cannot use Java, or None: 'not found' (no ``java`` on PATH), or 'JAVA does
    not start (what java -version said)': a macOS stub, or a memory limit (the JVM reserves its
    heap and class space as it starts: ulimit -v under about 4 GiB on a 128 GiB machine)."""
    java = shutil.which("java")
    if java is None:
        return "not found"
    if _java_starts(java):
        return None
    return f"{java} does not start ({_JAVA_FAILED.get(java, 'java -version failed')})"


def _why_no_java() -> str:
    """``java_problem()`` where ``java_available()`` said no: 'not found', or which java does not
    start and why (a Java that starts again since is 'not found' too)."""
    return java_problem() or "not found"


_JAVA_FAILED: dict[str, str] = {}  # java -> what ``java -version`` said when it failed


@functools.cache
def _java_starts(java: str) -> bool:
    try:
        # in Java's own folder: Java does not start in a working folder since removed
        where = os.path.dirname(java)
        done = subprocess.run(
            [java, "-version"], capture_output=True, stdin=subprocess.DEVNULL, timeout=60, cwd=where
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _JAVA_FAILED[java] = f"java -version: {exc}"
        return False
    if done.returncode != 0:  # the JVM's cause (on stdout) first, without its [time][warning] logs
        said = [line.strip() for line in (done.stdout + done.stderr).decode(errors="replace").splitlines()]
        said = [line for line in said if line and not line.startswith("[")]
        _JAVA_FAILED[java] = f"java -version: exit {done.returncode}" + "".join(f"; {s}" for s in said[:2])
    return done.returncode == 0


def _tokenize(refs, hyps, tokenizer, stacklevel: int = 3):
    """``stacklevel``: the warning's, as ``warnings.warn`` counts it from here (3: the caller of
    the function that called this one)."""
    if tokenizer == "ptb" and not java_available():
        why = _why_no_java()
        remedy = "install a JRE" if why == "not found" else "make it start"  # one installed
        warnings.warn(
            f"Java {why}: using the simple tokenizer instead of PTB; {remedy} for coco-caption-exact numbers",
            stacklevel=stacklevel,
        )
        tokenizer = "simple"
    if tokenizer == "ptb":
        lines = _LINE_BREAKS
        refs_t = _ptb({k: [c.translate(lines) for c in v] for k, v in refs.items()})
        hyps_t = _ptb({k: [hyps[k].translate(lines)] for k in refs})
        return refs_t, hyps_t
    if tokenizer == "simple":
        return (
            {k: [" ".join(tokenize(c)) for c in v] for k, v in refs.items()},
            {k: [" ".join(tokenize(hyps[k]))] for k in refs},
        )
    raise ValueError(f"unknown tokenizer {tokenizer!r}: use 'ptb' or 'simple'")


_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# what the tokenizer prints on stderr when it is done: "PTBTokenizer tokenized 17 tokens at 267.37
# tokens per second." (twice an edgecap eval: references, captions)
_PTB_DONE = re.compile(r"PTBTokenizer tokenized \d+ tokens at [\d.,]+ tokens per second\.")


def _ptb(captions: dict) -> dict:
    """``captions`` ({image: [caption, ...]}) tokenised by coco-caption's PTB tokenizer, every
    caption given back, or ``JavaFailed``. Java runs pycocoevalcap's jar with its ``PTBTokenizer``'s
    arguments on one caption a line, and its output loses the same punctuation tokens
    (``PUNCTUATIONS``), so the tokens are coco-caption's; but unlike ``PTBTokenizer.tokenize``:

    - the captions' file is written in the system's temporary folder, not beside the jar (in
      pycocoevalcap's installed folder: read-only where root installed it and another user runs
      edgecap eval, a container's user);
    - how Java ended is checked (a Java too old for the jar, or a missing jar, gave no lines,
      which the scorers then failed on: 'max() arg is an empty sequence', or scored);
    - its report on stderr when it is done is dropped; anything else it says is passed on.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    folder = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    jar = os.path.join(folder, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    images = [image for image, texts in captions.items() for _ in texts]
    text = "\n".join(caption.replace("\n", " ") for texts in captions.values() for caption in texts)
    try:
        with tempfile.TemporaryDirectory(prefix="edgecap-ptb-") as scratch:
            path = os.path.join(scratch, "captions.txt")
            with open(path, "wb") as f:
                # a lone surrogate (half an emoji, cut by a tool counting UTF-16 units) as "?",
                # punctuation the tokens leave out: UTF-8 cannot write it
                f.write(text.encode(errors="replace"))
            command = ["java", "-cp", jar, _PTB_CLASS, "-preserveLines", "-lowerCase", path]
            # run in its own folder: Java cannot start in a working folder since removed
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, cwd=scratch)
    except OSError as exc:
        if exc.filename == "java":  # it did not start
            raise JavaFailed(f"coco-caption's PTB tokenizer (Java) failed: {exc}: {_NEEDS_JAVA}") from exc
        # the captions' file: a full disk, a temporary folder one cannot write; tempfile.tempdir
        # is None where no folder was usable (gettempdir() would raise again)
        where = f" in {tempfile.tempdir}" if tempfile.tempdir else ": set TMPDIR to a writable folder"
        raise JavaFailed(
            f"coco-caption's PTB tokenizer cannot write its temporary file{where} ({exc.strerror or exc})"
        ) from exc
    said = [
        line for line in done.stderr.decode(errors="replace").splitlines() if not _PTB_DONE.fullmatch(line)
    ]
    if any(line.strip() for line in said):
        print("\n".join(said), file=sys.stderr)
        errors = "its errors are on stderr above"
    else:  # not a word to stderr: saying its errors are above would send one looking for none
        errors = "it wrote no error"
    if done.returncode != 0:
        raise JavaFailed(
            f"coco-caption's PTB tokenizer (Java) failed, exit {done.returncode} ({errors}): {_NEEDS_JAVA}"
        )
    try:
        lines = done.stdout.decode().split("\n")
    except UnicodeDecodeError as exc:
        raise JavaFailed(f"coco-caption's PTB tokenizer (Java) failed: {exc}: {_NEEDS_JAVA}") from exc
    out: dict = {}
    for image, line in zip(images, lines):
        words = (word for word in line.rstrip().split(" ") if word not in ptbtokenizer.PUNCTUATIONS)
        out.setdefault(image, []).append(" ".join(words))
    given = {k: len(v) for k, v in captions.items()}
    back = sum(1 for v in out.values() for w in v if w.strip())
    # every caption back, and not all of them empty when some had a word (Java's one empty line)
    words_given = any(ch.isalnum() for texts in captions.values() for c in texts for ch in c)
    if {k: len(v) for k, v in out.items()} != given or (words_given and not back):
        raise JavaFailed(
            f"coco-caption's PTB tokenizer (Java) gave back {back} of {sum(given.values())} captions "
            f"({errors}): {_NEEDS_JAVA}"
        )
    return out


def score(
    refs: dict, hyps: dict, tokenizer: str = "ptb", metrics: tuple[str, ...] = METRIC_KEYS
) -> dict[str, float]:
    """refs {id: [reference captions]}, hyps {id: caption} -> {metric: value} (fractions), the
    ``metrics`` asked for (names of ``METRIC_KEYS``; another is a ``ValueError``). The four
    BLEU orders come from one scorer run: asking for any gives all four."""
    return _scores(refs, hyps, tokenizer, metrics)[0]


def scores(
    refs: dict, hyps: dict, tokenizer: str = "ptb", metrics: tuple[str, ...] = METRIC_KEYS
) -> tuple[dict[str, float], dict[str, dict]]:
    """``score`` and, from the same tokenisation and scorer runs, each image's METEOR and CIDEr-D
    among ``metrics`` -> ({metric: value}, {metric: {id: value}}). METEOR is skipped (with a
    warning) without Java; its corpus value comes from the pooled statistics, not the mean of
    the images' values."""
    return _scores(refs, hyps, tokenizer, metrics)


def _scores(refs: dict, hyps: dict, tokenizer: str, metrics: tuple[str, ...]):
    """``scores``, called by ``score`` and ``scores`` alike, so that its warnings name their
    caller's line (stacklevel 3 here, 4 in ``_tokenize``)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise ImportError(f"caption metrics need pycocoevalcap: {install_hint('eval')}") from exc
    unknown = [m for m in metrics if m not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {list(METRIC_KEYS)}")
    missing = [k for k in refs if k not in hyps]
    if missing:
        raise ValueError(
            f"{counted(len(missing), 'image has', 'images have')} references but no caption, "
            f"e.g. {missing[:3]}"
        )
    if not refs:
        raise ValueError("nothing to score: no references")
    refs_t, hyps_t = _tokenize(refs, hyps, tokenizer, stacklevel=4)
    # a reference with no word ("", "...": a blank cell beside an image's real captions) is none:
    # scored as one, it lowered CIDEr-D (10 -> 7.5 for captions equal to their references) and
    # BLEU's brevity without a word; an image with none but blanks keeps them (scored 0)
    refs_t = {k: [r for r in v if r.strip()] or v for k, v in refs_t.items()}
    out: dict[str, float] = {}
    per_image: dict[str, dict] = {}
    if any(m.startswith("BLEU") for m in metrics):
        bleu, _ = Bleu(4).compute_score(refs_t, hyps_t, verbose=0)
        out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    if "METEOR" in metrics:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                corpus, each = meteor.compute_score(refs_t, hyps_t)
            except (OSError, ValueError) as exc:  # Java gone: a broken pipe, an empty reply
                why = _why_meteor_failed(meteor)
                raise JavaFailed(f"METEOR (Java) failed while scoring: {exc!r}: {why}") from exc
            finally:
                _close_meteor(meteor)
            out["METEOR"] = float(corpus)
            per_image["METEOR"] = {k: float(v) for k, v in zip(refs_t, each)}
        else:
            warnings.warn(f"Java {_why_no_java()}: METEOR skipped", stacklevel=3)
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = float(Rouge().compute_score(refs_t, hyps_t)[0])
    if "CIDEr" in metrics:
        corpus, each = Cider().compute_score(refs_t, hyps_t)
        out["CIDEr"] = float(corpus)
        per_image["CIDEr"] = {k: float(v) for k, v in zip(refs_t, each)}
    return {k: out[k] for k in METRIC_KEYS if k in out}, per_image


def per_image_cider(refs: dict, hyps: dict, tokenizer: str = "ptb") -> dict:
    """CIDEr-D of each image ({id: score}); their mean is ``score(...)["CIDEr"]`` (the document
    frequencies come from all of ``refs``, as in the corpus score)."""
    from pycocoevalcap.cider.cider import Cider

    refs_t, hyps_t = _tokenize(refs, hyps, tokenizer)
    _, per_image = Cider().compute_score(refs_t, hyps_t)
    return {k: float(v) for k, v in zip(refs_t, per_image)}


def _why_meteor_failed(meteor) -> str:
    """What METEOR's Java said as it failed (its stderr, which pycocoevalcap keeps and never
    reads): out of memory (a caption or reference thousands of words long), or its last line;
    with nothing said, that coco-caption needs Java 8 or newer (a Java that does not start)."""
    said = ""
    try:
        process = meteor.meteor_p
        process.wait(timeout=5)  # it has ended, or is ending: what it wrote is all there
        said = process.stderr.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 (still running, no process: nothing more to say)
        pass
    if "OutOfMemoryError" in said:
        return (
            "its Java ran out of memory (java.lang.OutOfMemoryError): a caption or reference "
            "too long for METEOR (thousands of words)"
        )
    last = next((line.strip() for line in reversed(said.splitlines()) if line.strip()), "")
    return f"its Java said: {last[:300]}" if last else _NEEDS_JAVA


def _close_meteor(meteor) -> None:
    # pycocoevalcap's Meteor keeps a Java subprocess; end it now rather than at interpreter exit.
    # Its compute_score takes its lock and, failing (Java gone: a broken pipe or an empty reply;
    # Ctrl-C), keeps it, and its __del__ waits for the lock: the interpreter hung at exit. So the
    # process is ended here without the lock, and the lock is left free.
    try:
        try:
            meteor.meteor_p.stdin.close()
        except OSError:  # Java already gone: the pipe is broken
            pass
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        meteor.meteor_p.stdout.close()  # its pipes too (unclosed: a ResourceWarning under -X dev)
        meteor.meteor_p.stderr.close()
    except Exception:  # pragma: no cover - best effort cleanup
        pass
    if meteor.lock.locked():
        meteor.lock.release()
