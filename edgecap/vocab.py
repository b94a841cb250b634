"""Vocabulary: words <-> ids, with the special tokens the decoder and the search rely on."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # always the first four words, so their ids are fixed
PAD_ID, START_ID, END_ID, UNK_ID = range(len(SPECIALS))

# What a caption can never hold, written once: the step graph, the search, the dev check during
# training and SCST sampling follow these rules.
NEVER_GENERATED_IDS = (PAD_ID, START_ID, UNK_ID)  # words the decoder never outputs
NEVER_FIRST_IDS = (END_ID,)  # never the first word: no empty caption

# Letters and digits of any script (``[^\W_]``); on ASCII text the words of ``[a-z0-9]`` exactly
# (the 89,758 Flickr8k and COCO captions tokenise alike). A typographic apostrophe (what a phone
# or a word processor types) is read as "'": "dog’s" is one word, not "dog" and "s".
_WORD = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?")  # after an apostrophe letters only, as before
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def tokenize(caption: str) -> list[str]:
    """Lower-case words with punctuation stripped ("A dog's toy." -> ["a", "dog's", "toy"]),
    accented letters kept ("Un café" -> ["un", "café"], composed or not)."""
    return _WORD.findall(unicodedata.normalize("NFC", caption).lower().translate(_APOSTROPHES))


class Vocabulary:
    def __init__(self, words: list[str]):
        if not isinstance(words, (list, tuple)):
            raise ValueError(f"vocabulary must be a list of words, got {type(words).__name__}")
        bad = next((w for w in words if not isinstance(w, str) or not w), None)
        if bad is not None:
            raise ValueError(f"vocabulary words must be non-empty strings, got {bad!r}")
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.start, self.end, self.unk = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def encode(self, caption: str) -> list[int]:
        """Caption -> ids with <start> and <end>."""
        return [self.start] + [self.index.get(w, self.unk) for w in tokenize(caption)] + [self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at <end> and dropping <pad> and <start> (an <unk> is kept: the
        search never says one, and a caption that did would show it)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, indent=0))

    @classmethod
    def load(cls, path: Path, max_bytes: int | None = None) -> Vocabulary:
        """Read ``vocab.json`` (a regular file of at most ``max_bytes``, bounded nesting);
        ``ValueError`` / ``KeyError`` / ``TypeError`` for anything else (``max_bytes`` None:
        ``files.MAX_VOCAB_BYTES``)."""
        from edgecap.files import MAX_VOCAB_BYTES, FileProblem, read_json

        max_bytes = MAX_VOCAB_BYTES if max_bytes is None else max_bytes
        try:
            data = read_json(path, max_bytes)
        except FileProblem as exc:
            raise ValueError(str(exc)) from None
        return cls(data["words"])
