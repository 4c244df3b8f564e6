"""DCASE language-based audio retrieval submission files, and reading submissions back.

2022-2024 (task 6b, then task 8): a CSV with one row per text query, ``caption,fname_1,...,fname_10``,
the ten best audio files, best first. 2025 (task 6): the whole score matrix, ``index,<file>,...``
then one row of scores per query. The captioning files (``file_name,caption_predicted``, the same
from 2022 to 2024) are in :mod:`aac_lightning.metrics.captioning`; both kinds are read back and
checked by :func:`check_retrieval_submission` / :func:`check_captioning_submission`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "DCASE_NUM_RANKED",
    "RETRIEVAL_PROTOCOLS",
    "check_captioning_submission",
    "check_retrieval_submission",
    "check_texts",
    "read_dcase2025_retrieval_csv",
    "read_dcase_retrieval_csv",
    "write_dcase2025_retrieval_csv",
    "write_dcase_retrieval_csv",
]

DCASE_NUM_RANKED = 10  # audio files per query in a task 6b submission
RETRIEVAL_PROTOCOLS = ("dcase2022", "dcase2024", "dcase2025")  # 2022 and 2024 share the top-10 file


def check_texts(texts: Sequence[str], argument: str) -> list[str]:
    """``texts`` as a list after checking it is a non-empty sequence of non-empty strings."""
    if isinstance(texts, str):
        raise ValueError(f"{argument} must be a sequence of strings, got a single str")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{argument} is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{argument}[{i}] must be a non-empty string, got {text!r}")
    return texts


def write_dcase_retrieval_csv(
    path: str | os.PathLike, captions: Sequence[str], ranked_fnames: Sequence[Sequence[str]]
) -> Path:
    """Write a DCASE task 6b submission: header ``caption,fname_1,...,fname_N``, one row per query.

    ``N`` is the length of the ranked lists (the same for every query; the challenge asks for 10).
    Fields are CSV-quoted where needed: captions and Clotho file names contain commas and quotes.
    """
    captions = check_texts(captions, "captions")
    ranked = [list(row) for row in ranked_fnames]
    if len(ranked) != len(captions):
        raise ValueError(f"captions and ranked_fnames must have the same length, got {len(captions)} and {len(ranked)}")
    num_ranked = len(ranked[0])
    if num_ranked == 0:
        raise ValueError("ranked_fnames[0] is empty: each query needs at least one ranked file name")
    for i, row in enumerate(ranked):
        if len(row) != num_ranked:
            raise ValueError(f"ranked_fnames[{i}] has {len(row)} names, ranked_fnames[0] has {num_ranked}")
        if len(set(row)) != len(row):
            raise ValueError(f"ranked_fnames[{i}] names a file twice: {row}")
        for name in row:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ranked_fnames[{i}] holds {name!r}: file names must be non-empty strings")
    if num_ranked != DCASE_NUM_RANKED:
        log.warning("writing %d ranked files per query; a DCASE task 6b submission has %d", num_ranked, DCASE_NUM_RANKED)
    for i, text in enumerate(captions):
        # the challenge's scoring reads one query per line
        if "\n" in text or "\r" in text or any("\n" in n or "\r" in n for n in ranked[i]):
            raise ValueError(f"line breaks are not allowed in a submission row (query {i}: {text!r})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["caption"] + [f"fname_{j}" for j in range(1, num_ranked + 1)])
        writer.writerows([caption, *row] for caption, row in zip(captions, ranked))
    return path


def read_dcase_retrieval_csv(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Read a file written by :func:`write_dcase_retrieval_csv`: ``(captions, ranked_fnames)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no submission file at '{path}'")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"'{path}' is empty: expected the header 'caption,fname_1,...'")
    header = rows[0]
    expected = ["caption"] + [f"fname_{j}" for j in range(1, len(header))]
    if len(header) < 2 or header != expected:
        raise ValueError(f"'{path}': expected the header 'caption,fname_1,...,fname_N', got {header}")
    captions, ranked = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"'{path}' line {line_no}: {len(row)} fields, the header has {len(header)}")
        captions.append(row[0])
        ranked.append(row[1:])
    return captions, ranked


# ---------------------------------------------------------------------------------------------
# DCASE 2025 task 6 retrieval submissions: the whole score matrix


def write_dcase2025_retrieval_csv(
    path: str | os.PathLike, queries: Sequence[str], fnames: Sequence[str], scores
) -> Path:
    """Write a DCASE 2025 task 6 retrieval submission: every query's score for every audio file.

    The layout of the task's baseline predictions (``d25_t6/predict.py``): header ``index`` then the
    audio file names, one row per query (its caption, then one score per file, higher = more
    relevant); the organisers rank the files themselves (mAP@16).
    """
    import torch

    queries = check_texts(queries, "queries")
    fnames = check_texts(fnames, "fnames")
    if len(set(fnames)) != len(fnames):
        raise ValueError(f"fnames must be unique, repeated: {sorted({f for f in fnames if fnames.count(f) > 1})[:5]}")
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    if scores.shape != (len(queries), len(fnames)):
        raise ValueError(f"scores must be ({len(queries)} queries, {len(fnames)} files), got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores hold NaN or infinite values: the files could not be ranked")
    for text in (*queries, *fnames):
        if "\n" in text or "\r" in text:
            raise ValueError(f"line breaks are not allowed in a submission field: {text!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", *fnames])
        writer.writerows([query, *(repr(v) for v in row)] for query, row in zip(queries, scores.tolist()))
    return path


def read_dcase2025_retrieval_csv(path: str | os.PathLike):
    """Read a file written by :func:`write_dcase2025_retrieval_csv`: ``(queries, fnames, scores (Q, A) float64)``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no submission file at '{path}'")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2 or rows[0][0] != "index":
        raise ValueError(f"'{path}': expected the header 'index,<audio file>,...', got {rows[:1]}")
    fnames, queries, values = rows[0][1:], [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            raise ValueError(f"'{path}' line {line_no}: {len(row)} fields, the header has {len(rows[0])}")
        try:
            values.append([float(v) for v in row[1:]])
        except ValueError:
            raise ValueError(f"'{path}' line {line_no}: scores must be numbers, got {row[1:4]}...") from None
        queries.append(row[0])
    return queries, fnames, torch.tensor(values, dtype=torch.float64).reshape(len(queries), len(fnames))


# ---------------------------------------------------------------------------------------------
# reading a written submission back


def check_retrieval_submission(path: str | os.PathLike, queries: Sequence[str], fnames: Sequence[str], protocol: str) -> None:
    """Read a retrieval submission back and check it holds every query, in order, over ``fnames``.

    ``protocol``: ``dcase2022`` / ``dcase2024`` (top-10 names per query) or ``dcase2025`` (scores).
    Raises ValueError naming the file and the first difference.
    """
    queries, fnames = list(queries), list(fnames)
    if protocol == "dcase2025":
        read_queries, read_fnames, scores = read_dcase2025_retrieval_csv(path)
        if read_fnames != fnames:
            raise ValueError(f"'{path}' read back: its audio columns differ from the {len(fnames)} files ranked")
        if not bool(scores.isfinite().all()):
            raise ValueError(f"'{path}' read back: scores are not all finite")
    else:
        read_queries, ranked = read_dcase_retrieval_csv(path)
        known, width = set(fnames), min(DCASE_NUM_RANKED, len(fnames))
        for i, row in enumerate(ranked):
            if len(row) != width or len(set(row)) != width or not set(row) <= known:
                raise ValueError(f"'{path}' read back: query {i} ranks {row}, not {width} distinct files of the folder")
    if read_queries != queries:
        first = next((i for i, (a, b) in enumerate(zip(read_queries, queries)) if a != b), min(len(read_queries), len(queries)))
        raise ValueError(f"'{path}' read back: {len(read_queries)} queries for {len(queries)}, first difference at query {first}")


def check_captioning_submission(path: str | os.PathLike, fnames: Sequence[str]) -> None:
    """Read a captioning submission back and check it captions every file of ``fnames``, in order, with text."""
    from aac_lightning.metrics.captioning import read_dcase_captioning_csv

    read_fnames, captions = read_dcase_captioning_csv(path)
    if read_fnames != list(fnames):
        raise ValueError(f"'{path}' read back: {len(read_fnames)} files for {len(fnames)} captioned, or in another order")
    empty = [name for name, caption in zip(read_fnames, captions) if not caption.strip()]
    if empty:
        raise ValueError(f"'{path}' read back: {len(empty)} empty caption(s), first for '{empty[0]}'")
