"""DCASE 2025 task 6 (language-based audio retrieval): mAP@16 against several relevant clips per query.

From 2025 the challenge ranks text-to-audio retrieval on the Clotho evaluation captions with
additional relevance annotations: annotators graded how well other clips match each caption, and
the published file lists, per query caption, the clips judged relevant (the caption's own clip is
not always among them). Its format (``metadata_eval.csv`` of the task's baseline repository)::

    query,audio_filenames
    A baby cries and no one does anything.,['Voice 036.wav']
    "A bag of pebbles is being placed into a container","['fallingbeans.wav', 'SeaShell_02.wav']"

``query`` is a caption text of the evaluated subset, ``audio_filenames`` a Python-style list of
its relevant clips' file names.

The metric (the baseline's definition, cut at k = 16): sort all clips of the subset by score; the
i-th relevant clip of a query sits at position ``p_i`` (1 = best), and

    AP@16 = (1 / m) * sum_{i : p_i <= 16} i / p_i,      mAP@16 = mean over the file's queries,

with ``m`` the number of relevant clips of the query (all of them, even beyond 16). Ties with an
irrelevant clip are broken pessimistically, as for the 2022 metrics (see
:mod:`aac_lightning.metrics.retrieval`). Next to it, ``R@k`` is the fraction of queries with at
least one relevant clip among the first k.
"""

from __future__ import annotations

import ast
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aac_lightning.metrics.retrieval import RECALL_KS, query_results

__all__ = ["DCASE2025_MAP_K", "RelevanceFile", "dcase2025_metrics", "multi_relevant_metrics", "read_relevance_file", "relevance_targets"]

DCASE2025_MAP_K = 16
_COLUMNS = ("query", "audio_filenames")
_SHOWN = 5  # unknown ids listed in an error message


@dataclass(frozen=True)
class RelevanceFile:
    """A relevance file: each query caption with the file names of its relevant clips."""

    path: Path
    queries: list[str]
    relevant: list[list[str]]


def _parse_names(text: str, where: str) -> list[str]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: audio_filenames must be a list of file names like ['a.wav', 'b.wav'], got {text!r}") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: audio_filenames must be a non-empty list of file names, got {text!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: audio_filenames names a file twice: {list(value)}")
    return list(value)


def read_relevance_file(path: str | os.PathLike) -> RelevanceFile:
    """Read a DCASE 2025 relevance file (columns ``query,audio_filenames``); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relevance file '{path}' not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"relevance file '{path}': missing column(s) {missing}; expected the header 'query,audio_filenames', got {reader.fieldnames}")
        queries: list[str] = []
        relevant: list[list[str]] = []
        first_line: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
            where = f"relevance file '{path}' line {line_no}"
            query = (row.get("query") or "").strip()
            if not query:
                raise ValueError(f"{where}: the query is empty")
            if query in first_line:
                raise ValueError(f"{where}: query {query!r} already given on line {first_line[query]}")
            first_line[query] = line_no
            queries.append(query)
            relevant.append(_parse_names(row.get("audio_filenames") or "", where))
    if not queries:
        raise ValueError(f"relevance file '{path}' holds no queries")
    return RelevanceFile(path, queries, relevant)


def _unknown(kind: str, names: Sequence[str], relevance: RelevanceFile, subset: str) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    return f"relevance file '{relevance.path}': {len(names)} {kind} not in {subset}: {shown}"


def relevance_targets(
    relevance: RelevanceFile, captions: Sequence[str], fnames: Sequence[str], subset: str = "the evaluated captions and clips"
) -> tuple[Tensor, Tensor]:
    """``(rows (Q,), mask (Q, A))``: each query's row among ``captions`` and its relevant clips among ``fnames``.

    A query caption given several times in ``captions`` (Clotho has a few) takes its first row: the
    rows are the same text, so they score alike. Raises ValueError naming every unknown query
    (``query`` column) and clip (``audio_filenames`` column), with the file.
    """
    row_of: dict[str, int] = {}
    for i, caption in enumerate(captions):
        row_of.setdefault(caption.strip(), i)
    column_of = {name: j for j, name in enumerate(fnames)}
    unknown_queries = [q for q in relevance.queries if q not in row_of]
    unknown_clips = sorted({n for names in relevance.relevant for n in names if n not in column_of})
    problems = []
    if unknown_queries:
        problems.append(_unknown("queries (column 'query') are", unknown_queries, relevance, f"the captions of {subset}"))
    if unknown_clips:
        problems.append(_unknown("clips (column 'audio_filenames') are", unknown_clips, relevance, f"the audio files of {subset}"))
    if problems:
        raise ValueError("; ".join(problems))
    rows = torch.tensor([row_of[q] for q in relevance.queries], dtype=torch.long)
    mask = torch.zeros(len(relevance.queries), len(fnames), dtype=torch.bool)
    for q, names in enumerate(relevance.relevant):
        mask[q, [column_of[n] for n in names]] = True
    return rows, mask


def multi_relevant_metrics(
    sim: Tensor, relevant: Tensor, *, map_k: int = DCASE2025_MAP_K, recall_ks: Sequence[int] = RECALL_KS, chunk_size: int = 1024
) -> dict[str, float]:
    """``mAP@map_k`` and ``R@k`` of queries ``sim`` (Q, A) with a boolean relevance mask (Q, A) (see the module docstring)."""
    if not isinstance(relevant, Tensor) or relevant.dtype != torch.bool or relevant.shape != sim.shape:
        raise ValueError(f"relevant must be a bool mask of shape {tuple(sim.shape)}")
    if len(sim) == 0:
        raise ValueError("no queries to compute retrieval metrics from")
    ranks, aps = [], []
    for start in range(0, len(sim), chunk_size):
        r, ap = query_results(sim[start : start + chunk_size], relevant[start : start + chunk_size].to(sim.device), map_k=map_k)
        ranks.append(r)
        aps.append(ap)
    best, ap = torch.cat(ranks), torch.cat(aps)
    out = {f"mAP@{map_k}": float(ap.mean())}
    out.update({f"R@{k}": float((best <= k).double().mean()) for k in recall_ks})
    return out


def dcase2025_metrics(
    sim: Tensor, captions: Sequence[str], fnames: Sequence[str], relevance: RelevanceFile | str | os.PathLike,
    subset: str = "the evaluated captions and clips",
) -> dict[str, float]:
    """The DCASE 2025 metrics of a (captions, clips) similarity: ``mAP@16``, ``R@1``, ``R@5``, ``R@10``.

    ``sim`` rows follow ``captions``, columns ``fnames``; only the relevance file's queries count.
    """
    if not isinstance(relevance, RelevanceFile):
        relevance = read_relevance_file(relevance)
    if sim.ndim != 2 or sim.shape != (len(captions), len(fnames)):
        raise ValueError(f"sim must be ({len(captions)} captions, {len(fnames)} clips), got {tuple(sim.shape)}")
    rows, mask = relevance_targets(relevance, captions, fnames, subset)
    return multi_relevant_metrics(sim[rows.to(sim.device)], mask)
