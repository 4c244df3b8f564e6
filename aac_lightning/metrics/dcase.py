"""DCASE 2022 task 6b (language-based audio retrieval) submission files.

A submission is a CSV with one row per text query: ``caption,fname_1,...,fname_10``, the ten best
audio files, best first. (Task 6a captioning files: :mod:`aac_lightning.metrics.captioning`.)
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DCASE_NUM_RANKED", "check_texts", "read_dcase_retrieval_csv", "write_dcase_retrieval_csv"]

DCASE_NUM_RANKED = 10  # audio files per query in a task 6b submission


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
