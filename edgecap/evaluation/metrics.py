"""Caption metrics as coco-caption defines them (PyPI ``pycocoevalcap``; the ``eval`` extra).

``score`` returns fractions, as coco-caption reports them. With ``tokenizer="ptb"`` the text is
tokenised by coco-caption's PTB tokenizer (Java), as the papers did; ``"simple"`` lower-cases and
strips punctuation in Python (no Java), which is what training uses for its per-epoch check.
METEOR needs Java too and is skipped, with a warning, where Java is absent.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings

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


@functools.cache
def _java_starts(java: str) -> bool:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _tokenize(refs, hyps, tokenizer):
    if tokenizer == "ptb" and not java_available():
        warnings.warn(
            "Java not found: using the simple tokenizer instead of PTB; "
            "install a JRE for coco-caption-exact numbers",
            stacklevel=3,
        )
        tokenizer = "simple"
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        lines = _LINE_BREAKS
        refs_t = _ptb(tok, {k: [{"caption": c.translate(lines)} for c in v] for k, v in refs.items()})
        hyps_t = _ptb(tok, {k: [{"caption": hyps[k].translate(lines)}] for k in refs})
        return refs_t, hyps_t
    if tokenizer == "simple":
        return (
            {k: [" ".join(tokenize(c)) for c in v] for k, v in refs.items()},
            {k: [" ".join(tokenize(hyps[k]))] for k in refs},
        )
    raise ValueError(f"unknown tokenizer {tokenizer!r}: use 'ptb' or 'simple'")


def _ptb(tok, captions: dict) -> dict:
    """``captions`` through coco-caption's PTB tokenizer, every caption given back or
    ``JavaFailed``: it reads Java's output lines without checking how Java ended, so a Java that
    cannot run the tokenizer (too old for its jar, the jar missing) gave no lines, and the scorers
    then failed on empty input ("max() arg is an empty sequence") or scored what came back."""
    try:
        out = tok.tokenize(captions)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.filename != "java":  # Java's own name: it did not start
            # the temporary file it writes beside its jar: a read-only install (root's, run by
            # another user), a full disk; no fault of Java's
            from pycocoevalcap.tokenizer import ptbtokenizer

            folder = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
            raise JavaFailed(
                f"coco-caption's PTB tokenizer cannot write its temporary file in {folder} "
                f"({exc.strerror or exc})"
            ) from exc
        raise JavaFailed(f"coco-caption's PTB tokenizer (Java) failed: {exc}: {_NEEDS_JAVA}") from exc
    given = {k: len(v) for k, v in captions.items()}
    back = sum(1 for v in out.values() for w in v if w.strip())
    # every caption back, and not all of them empty when some had a word (Java's one empty line)
    words = any(ch.isalnum() for v in captions.values() for c in v for ch in c["caption"])
    if {k: len(v) for k, v in out.items()} != given or (words and not back):
        raise JavaFailed(
            f"coco-caption's PTB tokenizer (Java) gave back {back} of {sum(given.values())} captions "
            f"(its errors are on stderr above): {_NEEDS_JAVA}"
        )
    return out


def score(
    refs: dict, hyps: dict, tokenizer: str = "ptb", metrics: tuple[str, ...] = METRIC_KEYS
) -> dict[str, float]:
    """refs {id: [reference captions]}, hyps {id: caption} -> {metric: value} (fractions), the
    ``metrics`` asked for (names of ``METRIC_KEYS``; another is a ``ValueError``). The four
    BLEU orders come from one scorer run: asking for any gives all four."""
    return scores(refs, hyps, tokenizer, metrics)[0]


def scores(
    refs: dict, hyps: dict, tokenizer: str = "ptb", metrics: tuple[str, ...] = METRIC_KEYS
) -> tuple[dict[str, float], dict[str, dict]]:
    """``score`` and, from the same tokenisation and scorer runs, each image's METEOR and CIDEr-D
    among ``metrics`` -> ({metric: value}, {metric: {id: value}}). METEOR is skipped (with a
    warning) without Java; its corpus value comes from the pooled statistics, not the mean of
    the images' values."""
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
        raise ValueError(f"{len(missing)} images have references but no caption, e.g. {missing[:3]}")
    if not refs:
        raise ValueError("nothing to score: no references")
    refs_t, hyps_t = _tokenize(refs, hyps, tokenizer)
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
                raise JavaFailed(f"METEOR (Java) failed while scoring: {exc!r}: {_NEEDS_JAVA}") from exc
            finally:
                _close_meteor(meteor)
            out["METEOR"] = float(corpus)
            per_image["METEOR"] = {k: float(v) for k, v in zip(refs_t, each)}
        else:
            warnings.warn("Java not found: METEOR skipped", stacklevel=2)
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
    except Exception:  # pragma: no cover - best effort cleanup
        pass
    if meteor.lock.locked():
        meteor.lock.release()
