"""Vectorised CIDEr-D (Vedantam et al., 2015) for evaluation and SCST rewards.

The score is the one computed by the COCO caption evaluation code (``pycocoevalcap``) and by
aac-metrics' ``cider_d``, to the last digits: for a candidate ``c`` with references ``r_1..r_m``

    CIDEr-D(c) = scale / m * sum_j mean_{k=1..n} gauss(l_c - l_j) * <min(g_k(c), g_k(r_j)), g_k(r_j)>
                                                                  / (|g_k(c)| |g_k(r_j)|)

where ``g_k(s)`` is the tf-idf vector of the k-grams of ``s`` (term count times
``log(N) - log(max(1, df))``), the minimum is taken element-wise (the "clipping" of CIDEr-D),
``gauss(d) = exp(-d^2 / (2 sigma^2))`` and ``l_s`` is, as in the reference implementations, the
number of *bigrams* of ``s`` (one less than its number of words). A norm of zero leaves the dot
product undivided (it is zero then anyway).

Two ways to get the document frequencies ``df`` and the number of documents ``N``:

- default: from the references given with the call, one document per candidate (so a reference
  set repeated for 5 sampled captions counts 5 times), as aac-metrics and pycocoevalcap do;
- corpus mode: fixed once from the training references with
  :meth:`CiderDocumentFrequency.from_references` (one document per clip), the usual practice
  for SCST rewards; :class:`CiderD` keeps it for repeated calls.

How it is fast: Python only splits each distinct sentence once and maps its words to ids (a
reference set repeated for several candidates is processed once). From there on everything is
array code over the whole batch: n-grams become int64 ids by compacting (parent n-gram id, last
token id) pairs order by order (exact, no hashing collisions), per-sentence n-gram counts come
from one sort of (sentence, n-gram) keys, and the clipped dot products are evaluated only where a
candidate n-gram also occurs in its reference set, with one ``np.searchsorted`` and one
``np.bincount`` for all candidates. No Python loop runs over candidates' n-grams or per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CiderD", "CiderDocumentFrequency", "cider_d"]


# ---------------------------------------------------------------------------------------------
# n-gram extraction


@dataclass
class _Ngrams:
    """The n-grams of a list of sentences, as ids.

    Global n-gram ids are ordered by order: ids ``[offsets[k], offsets[k+1])`` are the
    (k+1)-grams. Entries list each distinct (sentence, n-gram) pair once, sorted by sentence then
    n-gram id, with its count.
    """

    n: int
    vocab_size: int
    order_keys: list[np.ndarray]  # per order k >= 2: sorted keys parent_id * vocab_size + last_token
    offsets: np.ndarray  # (n + 1,) first global id of each order
    ngram_order: np.ndarray  # (G,) order index 0..n-1 of each global id
    entry_sentence: np.ndarray  # (E,)
    entry_ngram: np.ndarray  # (E,) global ids
    entry_count: np.ndarray  # (E,) how many times the n-gram occurs in the sentence
    sentence_ptr: np.ndarray  # (S + 1,) entries of sentence s are [ptr[s], ptr[s+1])
    lengths: np.ndarray  # (S,) number of words

    @property
    def num_ngrams(self) -> int:
        return int(self.offsets[-1])


def _tokenise(sentences: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Split on white space; returns (vocabulary words, flat token ids (T,), lengths (S,))."""
    split = [s.split() for s in sentences]
    lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
    flat = list(chain.from_iterable(split))
    words = list(dict.fromkeys(flat))  # first-occurrence order, C-speed dedup
    index = {w: i for i, w in enumerate(words)}
    tokens = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
    return words, tokens, lengths


def _extract_ngrams(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, n: int) -> _Ngrams:
    """Ids and per-sentence counts of all 1..n-grams of the sentences given as flat token ids."""
    num_sentences = len(lengths)
    num_tokens = len(tokens)
    starts = np.cumsum(lengths) - lengths  # (S,)
    sentence_of_token = np.repeat(np.arange(num_sentences, dtype=np.int64), lengths)  # (T,)
    # words left in the sentence from each position on, this one included
    remaining = lengths[sentence_of_token] - (np.arange(num_tokens) - starts[sentence_of_token])

    positions = np.arange(num_tokens, dtype=np.int64)  # start positions of the current k-grams
    ids = tokens  # their id within the order
    order_keys: list[np.ndarray] = []
    sizes = [vocab_size]
    sentence_parts = [sentence_of_token]
    ngram_parts = [tokens]
    for k in range(2, n + 1):
        keep = remaining[positions] >= k
        positions, ids = positions[keep], ids[keep]
        # a k-gram is its (k-1)-gram prefix plus one token: exact key, compacted to 0..count-1
        keys = ids * vocab_size + tokens[positions + (k - 1)]
        uniq, ids = _unique_inverse(keys)
        order_keys.append(uniq)
        ngram_parts.append(ids + sum(sizes))
        sentence_parts.append(sentence_of_token[positions])
        sizes.append(len(uniq))

    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    num_ngrams = int(offsets[-1])
    ngram_order = np.repeat(np.arange(n, dtype=np.int64), sizes)

    pair_keys = np.concatenate(sentence_parts) * max(num_ngrams, 1) + np.concatenate(ngram_parts)
    pairs, counts = _unique_counts(pair_keys)
    entry_sentence = pairs // max(num_ngrams, 1)
    entry_ngram = pairs % max(num_ngrams, 1)
    sentence_ptr = np.zeros(num_sentences + 1, dtype=np.int64)
    np.cumsum(np.bincount(entry_sentence, minlength=num_sentences), out=sentence_ptr[1:])
    return _Ngrams(
        n=n,
        vocab_size=vocab_size,
        order_keys=order_keys,
        offsets=offsets,
        ngram_order=ngram_order,
        entry_sentence=entry_sentence,
        entry_ngram=entry_ngram,
        entry_count=counts.astype(np.float64),
        sentence_ptr=sentence_ptr,
        lengths=lengths,
    )


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` with one argsort (about twice as fast)."""
    order = np.argsort(keys)
    ordered = keys[order]
    is_new = np.empty(len(keys), dtype=bool)
    is_new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_new[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(is_new) - 1
    return ordered[is_new], inverse


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_counts=True)`` with one sort."""
    ordered = np.sort(keys)
    is_new = np.empty(len(keys), dtype=bool)
    is_new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_new[1:])
    starts = np.flatnonzero(is_new)
    return ordered[starts], np.diff(starts, append=len(keys))


def _search(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``np.searchsorted(table, queries)`` for unordered queries: sorting them first is faster
    (binary searches of increasing keys reuse the cache)."""
    order = np.argsort(queries)
    positions = np.empty(len(queries), dtype=np.int64)
    positions[order] = np.searchsorted(table, queries[order])
    return positions


def _expand_rows(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row r of ``rows``, the range ``ptr[r]:ptr[r+1]``; returns (row index, item)."""
    begin = ptr[rows]
    counts = ptr[rows + 1] - begin  # (R,)
    total = int(counts.sum())
    row_of_item = np.repeat(np.arange(len(rows), dtype=np.int64), counts)  # (total,)
    first = np.cumsum(counts) - counts
    items = np.arange(total, dtype=np.int64) - first[row_of_item] + begin[row_of_item]
    return row_of_item, items


def _union_per_document(ngrams: _Ngrams, doc_of_member: np.ndarray, sentence_of_member: np.ndarray):
    """Distinct (document, n-gram) pairs over the member sentences of each document.

    Returns (sorted keys ``doc * G + ngram``, for each expanded member entry its key index,
    member index of each expanded entry, entry index of each expanded entry).
    """
    g = max(ngrams.num_ngrams, 1)
    member_of_item, entry_of_item = _expand_rows(ngrams.sentence_ptr, sentence_of_member)
    keys = doc_of_member[member_of_item] * g + ngrams.entry_ngram[entry_of_item]
    uniq, inverse = _unique_inverse(keys)
    return uniq, inverse, member_of_item, entry_of_item


# ---------------------------------------------------------------------------------------------
# document frequencies


def _take_or_zero(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``values[ids]`` where ``ids >= 0``, 0 elsewhere."""
    out = np.zeros(len(ids))
    known = ids >= 0
    out[known] = values[ids[known]]
    return out


@dataclass
class CiderDocumentFrequency:
    """Fixed CIDEr-D document frequencies, e.g. of a training set's references.

    Build it with :meth:`from_references`. ``num_documents`` is the number of reference sets
    (clips) it was computed from; ``log(num_documents)`` plays the role of ``log(N)``.
    """

    n: int
    num_documents: int
    words: list[str]
    order_keys: list[np.ndarray]  # per order k >= 2: sorted keys parent_id * vocab + last token
    frequencies: list[np.ndarray]  # per order k >= 1: document frequency of each k-gram id
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {w: i for i, w in enumerate(self.words)}
        if len(self.frequencies) != self.n or len(self.order_keys) != self.n - 1:
            raise ValueError(f"expected tables for n={self.n} orders, got {len(self.frequencies)}")

    @property
    def log_num_documents(self) -> float:
        return math.log(float(self.num_documents))

    @classmethod
    def from_references(cls, references: Sequence[Sequence[str]], *, n: int = 4) -> "CiderDocumentFrequency":
        """Document frequencies over ``references``: one document per entry (per clip).

        An n-gram's frequency is the number of entries with at least one reference containing
        it. Sentences are split on white space (normalise them first).
        """
        _check_n(n)
        _check_references(references, "references")
        if len(references) == 0:
            raise ValueError("references: need at least one reference set to count documents")
        sentence_index: dict[str, int] = {}
        doc_of_member, sentence_of_member = [], []
        for doc, refs in enumerate(references):
            for ref in refs:
                if not isinstance(ref, str):
                    raise ValueError(f"references[{doc}] must contain str, got {type(ref).__name__}")
                doc_of_member.append(doc)
                sentence_of_member.append(sentence_index.setdefault(ref, len(sentence_index)))
        words, tokens, lengths = _tokenise(list(sentence_index))
        ngrams = _extract_ngrams(tokens, lengths, len(words), n)
        uniq, _, _, _ = _union_per_document(
            ngrams, np.asarray(doc_of_member, dtype=np.int64), np.asarray(sentence_of_member, dtype=np.int64)
        )
        df = np.bincount(uniq % max(ngrams.num_ngrams, 1), minlength=ngrams.num_ngrams)  # (G,)
        frequencies = [df[ngrams.offsets[k] : ngrams.offsets[k + 1]].astype(np.float64) for k in range(n)]
        return cls(n=n, num_documents=len(references), words=words, order_keys=ngrams.order_keys,
                   frequencies=frequencies)

    def lookup(self, words: list[str], ngrams: _Ngrams) -> np.ndarray:
        """Document frequency (G,) of each n-gram of a call, given the call's vocabulary."""
        if ngrams.n > self.n:
            raise ValueError(f"document frequencies were computed for n={self.n}, cannot score n={ngrams.n}")
        vocab = len(self.words)
        # the call's token ids -> this table's token ids (-1: never seen in the corpus)
        token_map = np.fromiter((self._index.get(w, -1) for w in words), dtype=np.int64, count=len(words))
        ids = token_map  # ids in this table of the call's k-grams, order by order (-1: unseen)
        out = [_take_or_zero(self.frequencies[0], ids)]
        for k in range(2, ngrams.n + 1):
            call_keys = ngrams.order_keys[k - 2]
            parent = ids[call_keys // max(ngrams.vocab_size, 1)]
            last = token_map[call_keys % max(ngrams.vocab_size, 1)]
            keys = parent * vocab + last
            table = self.order_keys[k - 2]
            pos = _search(table, keys)
            found = (parent >= 0) & (last >= 0) & (pos < len(table))
            found[found] = table[pos[found]] == keys[found]
            ids = np.where(found, pos, -1)
            out.append(_take_or_zero(self.frequencies[k - 1], ids))
        return np.concatenate(out)

    def save(self, path: str) -> None:
        """Write the tables to a ``.npz`` file (reload with :meth:`load`)."""
        arrays = {f"keys_{k}": a for k, a in enumerate(self.order_keys)}
        arrays.update({f"df_{k}": a for k, a in enumerate(self.frequencies)})
        np.savez(path, n=self.n, num_documents=self.num_documents, words=np.array(self.words, dtype=np.str_), **arrays)

    @classmethod
    def load(cls, path: str) -> "CiderDocumentFrequency":
        """Read tables written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            n = int(data["n"])
            return cls(
                n=n,
                num_documents=int(data["num_documents"]),
                words=[str(w) for w in data["words"]],
                order_keys=[data[f"keys_{k}"] for k in range(n - 1)],
                frequencies=[data[f"df_{k}"] for k in range(n)],
            )


# ---------------------------------------------------------------------------------------------
# scoring


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def _check_references(references: Sequence[Sequence[str]], name: str) -> None:
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(f"{name} must be a list of lists of str, got {type(references).__name__}")
    if all(type(refs) in (list, tuple) for refs in references):  # fast path for the usual input
        return
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"{name}[{i}] must be a list of str, got {type(refs).__name__}")


def _cider_d_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    n: int,
    sigma: float,
    scale: float,
    document_frequency: CiderDocumentFrequency | None,
) -> np.ndarray:
    """Per-candidate CIDEr-D scores (Nc,) as float64."""
    _check_n(n)
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise ValueError(f"candidates must be a list of str, got {type(candidates).__name__}")
    _check_references(references, "references")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates and references must have the same length, got {len(candidates)} and {len(references)}"
        )
    num_candidates = len(candidates)
    if document_frequency is None and num_candidates < 2:
        # with one document every idf is log(1) - log(1) = 0: the score would be 0 whatever the text
        raise ValueError(
            "CIDEr-D with document frequencies from the references needs at least 2 candidates "
            f"(got {num_candidates}); pass document_frequency= to score fewer"
        )
    if num_candidates == 0:
        return np.zeros(0)

    # --- distinct reference sets and sentences (the SCST batch repeats each set per sample);
    # dict.fromkeys / map keep these loops in C
    refset_keys = list(map(tuple, references))
    try:
        refset_index = {key: i for i, key in enumerate(dict.fromkeys(refset_keys))}
        sentences = list(dict.fromkeys(chain(candidates, chain.from_iterable(refset_index))))
    except TypeError as err:  # unhashable entries: not strings
        raise ValueError(f"candidates and references must contain str ({err})") from None
    refsets = list(refset_index)
    cand_refset = np.fromiter(map(refset_index.__getitem__, refset_keys), dtype=np.int64, count=num_candidates)
    refs_per_set = np.fromiter(map(len, refsets), dtype=np.int64, count=len(refsets))  # (U,)
    if (refs_per_set == 0).any():
        bad = int(np.nonzero(refs_per_set[cand_refset] == 0)[0][0])
        raise ValueError(f"references[{bad}] is empty: every candidate needs at least one reference")
    flat_refs = list(chain.from_iterable(refsets))  # (M,) the members of the distinct sets
    if not all(type(sentence) is str for sentence in sentences):
        for name, values in (("candidates", candidates), ("references", flat_refs)):
            bad = next((v for v in values if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"{name} must contain str, got {type(bad).__name__}")
    sentence_index = {sentence: i for i, sentence in enumerate(sentences)}
    cand_sentence = np.fromiter(map(sentence_index.__getitem__, candidates), dtype=np.int64, count=num_candidates)
    member_sentence = np.fromiter(map(sentence_index.__getitem__, flat_refs), dtype=np.int64, count=len(flat_refs))
    member_set = np.repeat(np.arange(len(refsets), dtype=np.int64), refs_per_set)  # (M,)
    member_slot = np.arange(len(member_set)) - np.repeat(np.cumsum(refs_per_set) - refs_per_set, refs_per_set)

    words, tokens, lengths = _tokenise(sentences)
    ngrams = _extract_ngrams(tokens, lengths, len(words), n)
    num_ngrams = max(ngrams.num_ngrams, 1)

    # --- (reference set, n-gram) slots: where a candidate n-gram can meet a reference n-gram
    slots, slot_of_item, member_of_item, entry_of_item = _union_per_document(ngrams, member_set, member_sentence)

    # --- document frequencies and idf
    if document_frequency is None:
        uses = np.bincount(cand_refset, minlength=len(refsets)).astype(np.float64)  # (U,) candidates per set
        df = np.bincount(slots % num_ngrams, weights=uses[slots // num_ngrams], minlength=ngrams.num_ngrams)
        log_n = math.log(float(num_candidates))
    else:
        df = document_frequency.lookup(words, ngrams)
        log_n = document_frequency.log_num_documents
    idf = log_n - np.log(np.maximum(df, 1.0))  # (G,)
    tfidf = ngrams.entry_count * idf[ngrams.entry_ngram]  # (E,)

    num_sentences = len(lengths)
    norms = np.sqrt(
        np.bincount(
            ngrams.entry_sentence * n + ngrams.ngram_order[ngrams.entry_ngram],
            weights=tfidf * tfidf,
            minlength=num_sentences * n,
        )
    ).reshape(num_sentences, n)  # (S, n)
    # the reference implementations measure length in bigrams (their "length" sums 2-gram counts)
    bigram_lengths = np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)  # (S,)

    max_refs = int(refs_per_set.max())
    ref_values = np.zeros((len(slots), max_refs))  # (slots, J) tf-idf of each reference at each slot
    ref_values[slot_of_item, member_slot[member_of_item]] = tfidf[entry_of_item]

    # --- candidate n-grams that meet a slot of their reference set
    cand_of_item, cand_entry = _expand_rows(ngrams.sentence_ptr, cand_sentence)
    keys = cand_refset[cand_of_item] * num_ngrams + ngrams.entry_ngram[cand_entry]
    if len(slots):
        pos = np.minimum(np.searchsorted(slots, keys), len(slots) - 1)
        found = slots[pos] == keys
    else:
        pos, found = np.zeros_like(keys), np.zeros(len(keys), dtype=bool)
    hit_cand = cand_of_item[found]
    hit_order = ngrams.ngram_order[ngrams.entry_ngram[cand_entry[found]]]
    hit_value = tfidf[cand_entry[found]][:, None]  # (F, 1)
    hit_refs = ref_values[pos[found]]  # (F, J)
    clipped = np.minimum(hit_value, hit_refs) * hit_refs  # (F, J)
    bins = ((hit_cand * n + hit_order)[:, None] * max_refs + np.arange(max_refs)).reshape(-1)
    dots = np.bincount(bins, weights=clipped.reshape(-1), minlength=num_candidates * n * max_refs)
    dots = dots.reshape(num_candidates, n, max_refs)  # (Nc, n, J)

    # --- per reference: cosine, length penalty, mean over orders, mean over references
    member_norms = np.zeros((len(refsets), max_refs, n))  # (U, J, n)
    member_norms[member_set, member_slot] = norms[member_sentence]
    member_lengths = np.zeros((len(refsets), max_refs))  # (U, J)
    member_lengths[member_set, member_slot] = bigram_lengths[member_sentence]
    member_mask = np.zeros((len(refsets), max_refs))  # (U, J) 1 for real references
    member_mask[member_set, member_slot] = 1.0

    cand_norms = norms[cand_sentence][:, :, None]  # (Nc, n, 1)
    ref_norms = member_norms[cand_refset].transpose(0, 2, 1)  # (Nc, n, J)
    nonzero = (cand_norms != 0) & (ref_norms != 0)
    cosine = np.where(nonzero, dots / np.where(nonzero, cand_norms * ref_norms, 1.0), dots)
    delta = bigram_lengths[cand_sentence][:, None] - member_lengths[cand_refset]  # (Nc, J)
    penalty = np.exp(-(delta * delta) / (2.0 * sigma * sigma)) * member_mask[cand_refset]  # (Nc, J)
    per_order = (cosine * penalty[:, None, :]).sum(axis=2)  # (Nc, n)
    return per_order.mean(axis=1) / refs_per_set[cand_refset] * scale


def cider_d(
    candidates: list[str],
    references: list[list[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    scale: float = 10.0,
    document_frequency: CiderDocumentFrequency | None = None,
) -> tuple[float, Tensor]:
    """CIDEr-D of each candidate against its references.

    Args:
        candidates: the sentences to score, already normalised (split on white space).
        references: for each candidate, its reference sentences (at least one).
        n: largest n-gram order.
        sigma: standard deviation of the gaussian length penalty.
        scale: factor applied to the scores (10 in the reference implementations).
        document_frequency: fixed corpus document frequencies; ``None`` computes them from
            ``references`` (one document per candidate, needs >= 2 candidates).

    Returns:
        ``(corpus_score, per_candidate_scores)``: the mean score and a float64 tensor (Nc,).
    """
    scores = _cider_d_scores(
        candidates, references, n=n, sigma=sigma, scale=scale, document_frequency=document_frequency
    )
    corpus = float(scores.mean()) if len(scores) else 0.0
    return corpus, torch.from_numpy(scores)


class CiderD:
    """CIDEr-D scorer holding its settings and (optionally) fixed document frequencies.

    Meant for repeated calls, e.g. SCST rewards: ``CiderD(document_frequency=df)(samples, refs)``
    where ``refs`` lists the references of each sample (the same list may be repeated for the
    samples of one clip: repeated reference sets are processed once).
    """

    def __init__(
        self,
        *,
        n: int = 4,
        sigma: float = 6.0,
        scale: float = 10.0,
        document_frequency: CiderDocumentFrequency | None = None,
    ) -> None:
        _check_n(n)
        if document_frequency is not None and document_frequency.n < n:
            raise ValueError(f"document_frequency has n={document_frequency.n} < n={n}")
        self.n = n
        self.sigma = sigma
        self.scale = scale
        self.document_frequency = document_frequency

    @classmethod
    def from_references(cls, references: Sequence[Sequence[str]], **kwargs) -> "CiderD":
        """A scorer with document frequencies fixed from ``references`` (one document per entry)."""
        n = kwargs.get("n", 4)
        return cls(document_frequency=CiderDocumentFrequency.from_references(references, n=n), **kwargs)

    def __call__(self, candidates: list[str], references: list[list[str]]) -> tuple[float, Tensor]:
        """``(corpus_score, per_candidate_scores)``, see :func:`cider_d`."""
        return cider_d(
            candidates, references, n=self.n, sigma=self.sigma, scale=self.scale,
            document_frequency=self.document_frequency,
        )
