"""Retrieval metrics of DCASE 2022 task 6b (language-based audio retrieval), both directions.

Text-to-audio (the challenge's direction): every text query has exactly one relevant audio clip,
``targets[q]``. Its rank is ``r = 1 + #{other candidates scoring >= the target}``, and

- ``R@k``   = fraction of queries with ``r <= k``,
- ``mAP@10`` = mean over queries of ``AP@10 = 1 / r if r <= 10 else 0``.

Audio-to-text: every audio query has several relevant captions (5 in Clotho). Sorting the
candidates by score, the i-th best relevant caption sits at position
``p_i = i + #{irrelevant candidates scoring >= it}``, and

- ``R@k``   = fraction of queries whose best relevant caption has ``p_1 <= k``,
- ``mAP@10`` = mean over queries of ``AP@10 = (1 / m) * sum_{i : p_i <= 10} i / p_i`` with ``m``
  the number of relevant captions of the query (the standard average precision, cut at 10).

Ties are broken pessimistically: a candidate scoring exactly as much as a relevant one is ranked
ahead of it. Why: the optimistic rule gives a collapsed model (every similarity equal) a perfect
score, and equal scores come up in practice (half precision, saturated or constant embeddings);
with the pessimistic rule a model only gets credit for scoring the relevant item strictly higher.
Among the relevant items themselves the order does not change AP, so no rule is needed there. On
continuous scores without ties, both rules agree with sorting by score.

Everything works chunk by chunk over the queries, so a (100k x 20k) similarity matrix never has to
exist: :func:`retrieval_metrics_from_embeddings` computes it one block of queries at a time, and
:class:`RetrievalRanks` accumulates per-query results over batches and DDP ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "RetrievalRanks",
    "audio_to_text_metrics",
    "average_similarities",
    "metrics_from_ranks",
    "query_results",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "retrieval_ranks",
    "top_k_candidates",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10)
MAP_K: int = 10


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_similarities(sim: Tensor, name: str = "sim") -> None:
    if not isinstance(sim, Tensor) or sim.ndim != 2:
        shape = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{name} must be a 2-D tensor (queries, candidates), got {shape}")
    if sim.shape[1] == 0:
        raise ValueError(f"{name} has no candidates (shape {tuple(sim.shape)})")
    if sim.is_complex() or not sim.is_floating_point():
        raise ValueError(f"{name} must be a real floating point tensor, got {sim.dtype}")


def _check_no_nan(chunk: Tensor, name: str) -> None:
    if torch.isnan(chunk).any():
        raise ValueError(f"{name} contains NaN: scores must be comparable to rank candidates")


def _check_targets(targets: Tensor, num_queries: int, num_candidates: int) -> Tensor:
    """Validate single-relevant targets (Q,) and return them as int64."""
    if not isinstance(targets, Tensor) or targets.ndim != 1 or targets.is_floating_point():
        desc = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-D integer tensor of candidate indices, got {desc}")
    if len(targets) != num_queries:
        raise ValueError(f"targets has {len(targets)} entries for {num_queries} queries")
    if num_queries and (targets.min() < 0 or targets.max() >= num_candidates):
        raise ValueError(f"targets must lie in [0, {num_candidates}), got [{int(targets.min())}, {int(targets.max())}]")
    return targets.long()


# ---------------------------------------------------------------------------------------------
# per-query results of one block of queries


def _single_relevant_ranks(sim: Tensor, targets: Tensor) -> Tensor:
    """Pessimistic rank (B,) of each query's target: number of candidates scoring >= it."""
    target_scores = sim.gather(1, targets[:, None])  # (B, 1)
    return (sim >= target_scores).sum(dim=1)  # (B,) the target counts itself: 1 + others


def _multi_relevant_positions(sim: Tensor, relevant: Tensor) -> tuple[Tensor, Tensor]:
    """Positions ``p_i`` (B, m) of the relevant items, best first, and their validity (B, m)."""
    num_relevant = relevant.sum(dim=1)  # (B,)
    m = int(num_relevant.max())
    # best-scored relevant items first; padding (invalid) slots come last
    masked = torch.where(relevant, sim, torch.full_like(sim, float("-inf")))
    rel_scores = masked.topk(m, dim=1).values  # (B, m) descending
    valid = torch.arange(m, device=sim.device)[None, :] < num_relevant[:, None]  # (B, m)
    # candidates of any kind scoring >= each relevant score, then remove the relevant ones
    all_ge = (sim[:, None, :] >= rel_scores[:, :, None]).sum(dim=2)  # (B, m)
    rel_ge = ((rel_scores[:, None, :] >= rel_scores[:, :, None]) & valid[:, None, :]).sum(dim=2)  # (B, m)
    irrelevant_ge = all_ge - rel_ge
    positions = torch.arange(1, m + 1, device=sim.device)[None, :] + irrelevant_ge  # (B, m)
    return positions, valid


def query_results(sim: Tensor, targets: Tensor, *, map_k: int = MAP_K) -> tuple[Tensor, Tensor]:
    """Per-query ``(best_rank (B,) int64, AP@map_k (B,) float64)`` for one block of queries.

    ``targets`` is either the index of the single relevant candidate of each query (B,) or a
    boolean relevance mask (B, C) with at least one relevant candidate per query.
    """
    _check_similarities(sim)
    _check_no_nan(sim, "sim")
    if isinstance(targets, Tensor) and targets.ndim == 2:
        if targets.shape != sim.shape or targets.dtype != torch.bool:
            raise ValueError(
                f"a relevance mask must be bool of shape {tuple(sim.shape)}, got {targets.dtype} {tuple(targets.shape)}"
            )
        if len(sim) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        if not bool(targets.any(dim=1).all()):
            bad = int((~targets.any(dim=1)).nonzero()[0])
            raise ValueError(f"query {bad} has no relevant candidate in the relevance mask")
        positions, valid = _multi_relevant_positions(sim, targets)
        order = torch.arange(1, positions.shape[1] + 1, device=sim.device, dtype=torch.float64)[None, :]
        hits = valid & (positions <= map_k)
        precision = torch.where(hits, order / positions.double(), torch.zeros_like(order))  # (B, m)
        ap = precision.sum(dim=1) / valid.sum(dim=1).double()
        return positions[:, 0].long(), ap
    targets = _check_targets(targets, len(sim), sim.shape[1]).to(sim.device)
    ranks = _single_relevant_ranks(sim, targets)
    ap = torch.where(ranks <= map_k, 1.0 / ranks.double(), torch.zeros((), dtype=torch.float64, device=sim.device))
    return ranks, ap


def _summarise(ranks: Tensor, average_precisions: Tensor, recall_ks: Sequence[int], map_k: int) -> dict[str, float]:
    if len(ranks) == 0:
        raise ValueError("no queries to compute retrieval metrics from")
    out = {f"R@{k}": float((ranks <= k).double().mean()) for k in recall_ks}
    out[f"mAP@{map_k}"] = float(average_precisions.double().mean())
    return out


# ---------------------------------------------------------------------------------------------
# public functions


def retrieval_ranks(sim: Tensor, targets: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Pessimistic rank (Q,) int64 of each query's single relevant candidate ``targets[q]``.

    ``sim`` is (queries, candidates); rank 1 means no other candidate scores as high.
    """
    _check_chunk_size(chunk_size)
    _check_similarities(sim)
    targets = _check_targets(targets, len(sim), sim.shape[1]).to(sim.device)
    ranks = []
    for start in range(0, len(sim), chunk_size):
        chunk = sim[start : start + chunk_size]  # (B, C)
        _check_no_nan(chunk, "sim")
        ranks.append(_single_relevant_ranks(chunk, targets[start : start + chunk_size]))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=sim.device)


def metrics_from_ranks(ranks: Tensor, *, recall_ks: Sequence[int] = RECALL_KS, map_k: int = MAP_K) -> dict[str, float]:
    """``R@k`` and ``mAP@map_k`` from single-relevant ranks (Q,) (1 = best)."""
    ranks = torch.as_tensor(ranks)
    if ranks.ndim != 1 or (len(ranks) and int(ranks.min()) < 1):
        raise ValueError("ranks must be a 1-D tensor of ranks >= 1")
    ap = torch.where(ranks <= map_k, 1.0 / ranks.double(), torch.zeros((), dtype=torch.float64))
    return _summarise(ranks, ap, recall_ks, map_k)


def retrieval_metrics(sim: Tensor, targets: Tensor, *, chunk_size: int = 1024) -> dict[str, float]:
    """``R@1, R@5, R@10, mAP@10`` of queries with one relevant candidate each.

    Args:
        sim: (queries, candidates) scores, higher is more similar.
        targets: (queries,) index of each query's relevant candidate.
        chunk_size: queries compared at a time (bounds the temporary memory).
    """
    return metrics_from_ranks(retrieval_ranks(sim, targets, chunk_size=chunk_size))


def retrieval_ranks_from_embeddings(
    query_emb: Tensor, cand_emb: Tensor, targets: Tensor, *, chunk_size: int = 1024
) -> Tensor:
    """:func:`retrieval_ranks` of ``sim = query_emb @ cand_emb.T``, computed block by block.

    Callers normalise the embeddings (cosine similarity) themselves.
    """
    _check_chunk_size(chunk_size)
    if query_emb.ndim != 2 or cand_emb.ndim != 2 or query_emb.shape[1] != cand_emb.shape[1]:
        raise ValueError(
            "query_emb (Q, D) and cand_emb (C, D) must share D, "
            f"got {tuple(query_emb.shape)} and {tuple(cand_emb.shape)}"
        )
    if len(cand_emb) == 0:
        raise ValueError("cand_emb has no candidates")
    targets = _check_targets(targets, len(query_emb), len(cand_emb)).to(query_emb.device)
    cand_t = cand_emb.T  # (D, C)
    ranks = []
    for start in range(0, len(query_emb), chunk_size):
        chunk = query_emb[start : start + chunk_size] @ cand_t  # (B, C)
        _check_no_nan(chunk, "the similarities of query_emb and cand_emb")
        ranks.append(_single_relevant_ranks(chunk, targets[start : start + chunk_size]))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics_from_embeddings(
    query_emb: Tensor, cand_emb: Tensor, targets: Tensor, *, chunk_size: int = 1024
) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``query_emb (Q, D) @ cand_emb (C, D).T`` without the full matrix."""
    return metrics_from_ranks(retrieval_ranks_from_embeddings(query_emb, cand_emb, targets, chunk_size=chunk_size))


def audio_to_text_metrics(sim_a2t: Tensor, caption_to_audio: Tensor, *, chunk_size: int = 256) -> dict[str, float]:
    """``R@1, R@5, R@10, mAP@10`` of audio queries, each with all its captions as relevant.

    Args:
        sim_a2t: (audios, captions) scores.
        caption_to_audio: (captions,) index of the audio (row of ``sim_a2t``) each caption describes.
        chunk_size: audio queries processed at a time (temporary memory ~ chunk x captions x
            captions-per-audio booleans).

    R@k counts a query as found when its best-ranked relevant caption is within the top k;
    mAP@10 is the mean over queries of the average precision over the relevant captions (see the
    module docstring), divided by the number of relevant captions of the query.
    """
    _check_chunk_size(chunk_size)
    _check_similarities(sim_a2t, "sim_a2t")
    num_audio, num_captions = sim_a2t.shape
    if not isinstance(caption_to_audio, Tensor) or caption_to_audio.ndim != 1 or caption_to_audio.is_floating_point():
        raise ValueError("caption_to_audio must be a 1-D integer tensor (captions,)")
    if len(caption_to_audio) != num_captions:
        raise ValueError(f"caption_to_audio has {len(caption_to_audio)} entries for {num_captions} captions")
    caption_to_audio = caption_to_audio.long().to(sim_a2t.device)
    if caption_to_audio.min() < 0 or caption_to_audio.max() >= num_audio:
        raise ValueError(f"caption_to_audio must lie in [0, {num_audio})")
    captions_per_audio = torch.bincount(caption_to_audio, minlength=num_audio)
    if (captions_per_audio == 0).any():
        bad = int((captions_per_audio == 0).nonzero()[0])
        raise ValueError(f"audio {bad} has no caption in caption_to_audio: it cannot be a query")
    ranks, aps = [], []
    for start in range(0, num_audio, chunk_size):
        chunk = sim_a2t[start : start + chunk_size]  # (B, C)
        audio_ids = torch.arange(start, start + len(chunk), device=sim_a2t.device)
        relevant = caption_to_audio[None, :] == audio_ids[:, None]  # (B, C)
        r, ap = query_results(chunk, relevant)
        ranks.append(r)
        aps.append(ap)
    return _summarise(torch.cat(ranks), torch.cat(aps), RECALL_KS, MAP_K)


def average_similarities(sims: Sequence[Tensor]) -> Tensor:
    """Mean of the similarity matrices of an ensemble of models (the paper's retrieval ensemble)."""
    sims = list(sims)
    if not sims:
        raise ValueError("sims is empty: need at least one similarity matrix to average")
    shape = sims[0].shape
    for i, sim in enumerate(sims):
        if sim.shape != shape:
            raise ValueError(f"sims[{i}] has shape {tuple(sim.shape)}, expected {tuple(shape)} like sims[0]")
    dtype = torch.promote_types(sims[0].dtype, torch.float32)
    total = sims[0].to(dtype=dtype, copy=True)
    for sim in sims[1:]:
        total += sim.to(device=total.device, dtype=dtype)  # in place: one matrix of memory at a time
    return total / len(sims)


def top_k_candidates(sim: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
    """``(scores, indices)`` (Q, min(k, C)) of each query's best candidates, best first."""
    _check_similarities(sim)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    result = sim.topk(min(k, sim.shape[1]), dim=1, largest=True, sorted=True)
    return result.values, result.indices


# ---------------------------------------------------------------------------------------------
# accumulation over batches and DDP ranks


class RetrievalRanks(Metric):
    """Accumulates each query's best rank and AP@10 over batches and processes.

    ``update(sim, targets)`` takes the scores of a block of queries against *all* candidates
    (B, C) and either their relevant candidate index (B,) (text-to-audio) or a boolean relevance
    mask (B, C) (audio-to-text). ``compute()`` returns ``R@1, R@5, R@10, mAP@10`` as tensors over
    every query seen by every process (states are concatenated across DDP ranks).

    Each query must be added once over all processes: a sampler that pads the last batch with
    repeated queries (``DistributedSampler``) counts those twice.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, *, chunk_size: int = 1024, recall_ks: Sequence[int] = RECALL_KS, map_k: int = MAP_K, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.recall_ks = tuple(recall_ks)
        self.map_k = map_k
        self.add_state("ranks", default=[], dist_reduce_fx="cat")
        self.add_state("average_precisions", default=[], dist_reduce_fx="cat")

    def update(self, sim: Tensor, targets: Tensor) -> None:
        """Add a block of queries: ``sim`` (B, C), ``targets`` (B,) indices or (B, C) bool mask."""
        _check_similarities(sim)
        for start in range(0, len(sim), self.chunk_size):
            r, ap = query_results(sim[start : start + self.chunk_size], targets[start : start + self.chunk_size],
                                  map_k=self.map_k)
            self.ranks.append(r)
            self.average_precisions.append(ap)

    def compute(self) -> dict[str, Tensor]:
        """Metrics over all queries added so far (on all processes)."""
        if isinstance(self.ranks, list) and not self.ranks:
            raise ValueError("RetrievalRanks has no queries: call update() before compute()")
        ranks = dim_zero_cat(self.ranks)
        aps = dim_zero_cat(self.average_precisions)
        values = _summarise(ranks, aps, self.recall_ks, self.map_k)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}
