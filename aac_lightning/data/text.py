"""Caption text: normalisation, word vocabulary, and the tokenizer path of the text encoders."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

HYPHEN_MODES = ("keep", "split")

# PTB-style clitics kept as their own tokens ("it's" -> "it 's"), as the Stanford PTB tokenizer does.
_CLITIC = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m|n't)\b")
# Everything that is not a letter, digit, apostrophe or white space is punctuation to drop.
_PUNCT = re.compile(r"[^\w\s']|_")
# The same, but hyphens survive (word-internal ones are kept below).
_PUNCT_BUT_HYPHEN = re.compile(r"[^\w\s'\-]|_")
# A hyphen that does not join two letters or digits ("x - y", "a--b", "high- pitched").
_LOOSE_HYPHEN = re.compile(r"(?<![^\W_])-|-(?![^\W_])")
# Unicode hyphen and non-breaking hyphen written as "-"; dashes (en, em) stay punctuation.
_HYPHEN_CHARS = str.maketrans({"\u2010": "-", "\u2011": "-"})
_SPACES = re.compile(r"\s+")


def check_hyphens(hyphens: str) -> str:
    """Validate a hyphen mode (``"keep"`` or ``"split"``) and return it."""
    if hyphens not in HYPHEN_MODES:
        raise ValueError(f"hyphens must be 'keep' (PTB tokenisation) or 'split', got {hyphens!r}")
    return hyphens


def normalize_caption(caption: str, hyphens: str = "keep") -> str:
    """Lower-case, PTB-like normalisation: clitics split off, punctuation removed, spaces collapsed.

    Letters outside ASCII are kept (NFKC-normalised); quotes that do not belong to a clitic are dropped.

    ``hyphens``: ``"keep"`` (default) keeps a hyphen that joins two letters or digits, so
    "high-pitched" and "10-year-old" stay one word, as the Stanford PTB tokenizer does (the
    authors built their captioning vocabulary with pycocoevalcap's ``PTBTokenizer``, which also
    drops "-" and "--" tokens, so loose hyphens are removed); ``"split"`` turns every hyphen into a
    space ("high pitched"), this package's earlier behaviour.

    >>> normalize_caption('A dog barks, then "it\\'s" quiet.')
    "a dog barks then it 's quiet"
    >>> normalize_caption("A high-pitched beep - twice"), normalize_caption("high-pitched", hyphens="split")
    ('a high-pitched beep twice', 'high pitched')
    """
    check_hyphens(hyphens)
    text = unicodedata.normalize("NFKC", caption).lower()
    text = text.replace("\u2019", "'").replace("`", "'").translate(_HYPHEN_CHARS)
    # A clitic ends a token ("dog's-life" -> "dog 's -life"), so it never joins a hyphenated word.
    text = _CLITIC.sub(r" \1 ", text)
    if hyphens == "keep":
        text = _LOOSE_HYPHEN.sub(" ", _PUNCT_BUT_HYPHEN.sub(" ", text))
    else:
        text = _PUNCT.sub(" ", text)
    # Apostrophes that survive only as clitic starts ("'s"); drop stray ones.
    tokens = [tok.strip("'") if not _is_clitic(tok) else tok for tok in _SPACES.split(text)]
    return " ".join(tok for tok in tokens if tok)


def _is_clitic(token: str) -> bool:
    return token in ("'s", "'re", "'ve", "'ll", "'d", "'m", "n't")


def tokenize_caption(caption: str, hyphens: str = "keep") -> list[str]:
    """Normalised words of a caption (see :func:`normalize_caption` for ``hyphens``)."""
    return normalize_caption(caption, hyphens).split()


class Vocabulary:
    """Word vocabulary with the special tokens `<pad>=0, <bos>=1, <eos>=2, <unk>=3`.

    Built from training captions with a minimum count; stored in checkpoints as `to_dict()`.

    `hyphens` is how captions are cut into words (see `normalize_caption`): `"keep"` (the authors'
    PTB tokenisation, "high-pitched" is one word) or `"split"` ("high pitched"). It belongs to the
    vocabulary: `build` and `encode` use it, `to_dict` stores it, and two vocabularies are equal only
    if their words and their hyphen modes are. A saved vocabulary without the entry predates the
    option and was built with `"split"`, which `from_dict` / `load` give it.
    """

    def __init__(self, words: Sequence[str], hyphens: str = "keep"):
        self.hyphens = check_hyphens(hyphens)
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}, got {words[:4]}")
        if len(set(words)) != len(words):
            dup = [w for w, c in Counter(words).items() if c > 1][:5]
            raise ValueError(f"vocabulary has duplicate words: {dup}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, hyphens: str = "keep") -> "Vocabulary":
        """Vocabulary of the normalised words seen at least `min_count` times, most frequent first."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        check_hyphens(hyphens)
        counts = Counter(word for caption in captions for word in tokenize_caption(caption, hyphens))
        # Sort by count then word so the vocabulary is the same whatever the caption order.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept, hyphens=hyphens)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words and self.hyphens == other.hyphens

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, hyphens={self.hyphens!r})"

    def encode(self, caption: str, add_bos_eos: bool = True) -> list[int]:
        """Word ids of a caption (normalised first), unknown words mapped to `<unk>`."""
        ids = [self.index.get(word, self.unk_id) for word in tokenize_caption(caption, self.hyphens)]
        return [self.bos_id, *ids, self.eos_id] if add_bos_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Caption text of a sequence of ids: stops at `<eos>`, skips `<pad>` and `<bos>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """Captions of a `(B, L)` tensor of ids."""
        return [self.decode(row) for row in ids.tolist()]

    def to_dict(self) -> dict:
        return {"words": list(self.words), "hyphens": self.hyphens}

    @classmethod
    def from_dict(cls, state: dict) -> "Vocabulary":
        if "words" not in state:
            raise ValueError("vocabulary state has no 'words' key")
        # Saved before the option existed: hyphens were always split then.
        return cls(state["words"], hyphens=state.get("hyphens", "split"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read vocabulary file '{path}': {err}") from err


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int = Vocabulary.pad_id) -> torch.Tensor:
    """Right-pad id sequences into a `(B, L_max)` long tensor."""
    max_len = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out
