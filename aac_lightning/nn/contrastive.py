"""Symmetric InfoNCE loss of the bi-encoder (report eq. 6), single-process and DDP.

For a batch of N audio-text pairs with similarity ``s(i, j)`` and temperature ``tau``::

    L_i^{A->T} = -log( exp(s(i,i)/tau) / sum_j exp(s(i,j)/tau) )     audio i against all texts
    L_i^{T->A} = -log( exp(s(i,i)/tau) / sum_j exp(s(j,i)/tau) )     text i against all audios
    L          = (1/N) * sum_i ( L_i^{A->T} + L_i^{T->A} )

The two directions are *summed* (not averaged) before the mean over pairs, exactly as in eq. 6;
the value is therefore twice CLIP's usual ``(CE_a2t + CE_t2a) / 2``. The authors' released code
(``models/loss.py`` of wsntxxn/DCASE2022T6_CLAP, ``InfoNceLoss``) averages the two directions
instead: ``direction_reduction="mean"`` gives that, half of eq. 6. Under Adam the factor of two
barely changes training (Adam is invariant to a constant scale of the loss, up to its epsilon); it
changes the logged loss value and anything that acts on raw gradient sizes (gradient clipping).

Same-clip pairs. Retrieval training draws one (audio, caption) pair per item, so two items of one
clip (two of its captions) can meet in a batch. Caption j of clip c is then a correct match for
audio i of clip c, and treating it as a negative would push apart what should be pulled together.
Given ``clip_ids``, every off-diagonal logit ``(i, j)`` with ``clip_ids[i] == clip_ids[j]`` is set
to ``-inf`` before the softmax, in both directions: it leaves the denominators (so it is neither a
negative nor an extra positive) and receives no gradient. The positive of row i stays ``(i, i)``.
This is an addition of this package: the report (eq. 6) and the authors' code use plain diagonal
targets, so same-clip captions are negatives there (pass no ``clip_ids`` for that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Literal

from aac_lightning.utils.distributed import (
    all_gather_sizes,
    all_gather_tensor,
    all_gather_with_grad,
    get_rank,
    is_distributed,
)

DirectionReduction = Literal["sum", "mean"]
DIRECTION_REDUCTIONS = ("sum", "mean")


def _check_direction_reduction(direction_reduction: str) -> None:
    if direction_reduction not in DIRECTION_REDUCTIONS:
        raise ValueError(
            f"direction_reduction must be 'sum' (report eq. 6) or 'mean' (the authors' code), got {direction_reduction!r}"
        )


def _check_inputs(
    audio_emb: torch.Tensor,
    text_emb: torch.Tensor,
    clip_ids: torch.Tensor | None,
) -> None:
    if audio_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"audio_emb and text_emb must be 2-D (N, E), got shapes {tuple(audio_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    if audio_emb.shape != text_emb.shape:
        raise ValueError(
            f"audio_emb {tuple(audio_emb.shape)} and text_emb {tuple(text_emb.shape)} must have the "
            "same shape: row i of each is one matching pair"
        )
    if audio_emb.shape[0] == 0:
        raise ValueError("audio_emb and text_emb are empty: need at least one pair")
    if clip_ids is not None:
        if clip_ids.shape != (audio_emb.shape[0],):
            raise ValueError(
                f"clip_ids must have shape (N,) = ({audio_emb.shape[0]},), got {tuple(clip_ids.shape)}"
            )
        if clip_ids.is_floating_point() or clip_ids.is_complex() or clip_ids.dtype == torch.bool:
            raise ValueError(f"clip_ids must be an integer tensor, got dtype {clip_ids.dtype}")


def _info_nce_rows(
    audio_rows: torch.Tensor,
    text_rows: torch.Tensor,
    audio_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    row_offset: int,
    clip_ids_rows: torch.Tensor | None,
    clip_ids_all: torch.Tensor | None,
    normaliser: float,
    direction_reduction: str = "sum",
) -> torch.Tensor:
    """Sum of eq. 6's per-pair terms for the rows ``row_offset .. row_offset + n`` of the global
    ``N x N`` problem, divided by ``normaliser``.

    Rows are this process's pairs; columns are all ``N`` pairs (the negatives).
    """
    n_rows = audio_rows.shape[0]
    # (n,): global column of each row's positive
    targets = torch.arange(n_rows, device=audio_rows.device) + row_offset
    logits_a2t = logit_scale * audio_rows @ text_all.T  # (n, N): s(i, j) / tau, audio i vs text j
    logits_t2a = logit_scale * text_rows @ audio_all.T  # (n, N): s(j, i) / tau, text i vs audio j
    if clip_ids_rows is not None and clip_ids_all is not None:
        # "same clip" is symmetric, so one mask serves both directions
        same_clip = clip_ids_rows[:, None] == clip_ids_all[None, :]  # (n, N)
        same_clip[torch.arange(n_rows, device=same_clip.device), targets] = False  # keep positives
        logits_a2t = logits_a2t.masked_fill(same_clip, float("-inf"))
        logits_t2a = logits_t2a.masked_fill(same_clip, float("-inf"))
    loss_a2t = F.cross_entropy(logits_a2t, targets, reduction="sum")
    loss_t2a = F.cross_entropy(logits_t2a, targets, reduction="sum")
    directions = loss_a2t + loss_t2a
    if direction_reduction == "mean":
        directions = directions / 2
    return directions / normaliser


def info_nce_loss(
    audio_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    clip_ids: torch.Tensor | None = None,
    direction_reduction: DirectionReduction = "sum",
) -> torch.Tensor:
    """Eq. 6 of the report on one batch: ``(1/N) sum_i (L_i^{A->T} + L_i^{T->A})``.

    Args:
        audio_emb: ``(N, E)`` L2-normalised audio embeddings (as :meth:`BiEncoder.encode_audio`
            returns); their dot product with ``text_emb`` is the cosine similarity ``s(i, j)``.
        text_emb: ``(N, E)`` L2-normalised text embeddings; row i is the caption paired with audio i.
        logit_scale: ``1 / tau`` (scalar tensor or float).
        clip_ids: optional ``(N,)`` integer id of the clip of each pair; off-diagonal pairs of the
            same clip are taken out of the softmax (see module docstring).
        direction_reduction: ``"sum"`` adds the two directions (eq. 6); ``"mean"`` averages them
            (the authors' code), i.e. half the value.

    Returns:
        Scalar loss.
    """
    _check_inputs(audio_emb, text_emb, clip_ids)
    _check_direction_reduction(direction_reduction)
    return _info_nce_rows(
        audio_emb,
        text_emb,
        audio_emb,
        text_emb,
        logit_scale,
        row_offset=0,
        clip_ids_rows=clip_ids,
        clip_ids_all=clip_ids,
        normaliser=float(audio_emb.shape[0]),
        direction_reduction=direction_reduction,
    )


class ContrastiveLoss(nn.Module):
    """Eq. 6 with the global batch as negatives under ``torch.distributed``.

    Single process (or ``gather=False``): plain :func:`info_nce_loss` on the given batch.

    Distributed with ``gather=True``: rank r holds ``n_r`` pairs (global ``N = sum_r n_r``, ``W``
    ranks). Embeddings (with gradient, :func:`all_gather_with_grad`) and clip ids are gathered so
    every column of the global ``N x N`` similarity is available. Rank r computes only its own rows,
    in both directions (its audios against all N texts for A->T, its texts against all N audios for
    T->A), and returns::

        loss_r = (W / N) * sum_{i in rank r} (L_i^{A->T} + L_i^{T->A})

    Scaling, so that DDP trains exactly like one process on the global batch:

    * value: ``(1/W) sum_r loss_r = L`` (eq. 6 on the global batch), so the rank mean that
      ``self.log(..., sync_dist=True)`` reports is the global loss. With equal shards
      (``n_r = N / W``, what ``DistributedSampler`` gives) ``loss_r`` is simply the local mean.
    * embedding gradients: the gather's backward all-reduces (sums) the gradient of every rank's
      ``loss_r`` with respect to all gathered rows, so each rank's local embeddings receive
      ``d(sum_r loss_r)/d(own rows)``; each rank's parameter gradient is the part of
      ``d(sum_r loss_r)/d theta`` that flows through its own samples, and DDP's mean over ranks
      adds those parts and divides by W: ``(1/W) d(sum_r loss_r)/d theta = dL/d theta``.
    * replicated scalars such as the logit scale get ``d loss_r / d s`` on each rank; DDP's mean
      gives ``(1/W) sum_r d loss_r / d s = dL/ds``.

    Every rank must call the loss at each step (it runs collectives), with ``clip_ids`` given on
    all ranks or on none. Clip ids must identify clips globally (e.g. the dataset index of the
    clip), not per rank.

    ``direction_reduction`` as in :func:`info_nce_loss` (``"sum"``: eq. 6, ``"mean"``: the authors'
    code); the scaling above holds for both.
    """

    def __init__(self, gather: bool = True, direction_reduction: DirectionReduction = "sum") -> None:
        super().__init__()
        _check_direction_reduction(direction_reduction)
        self.gather = gather
        self.direction_reduction = direction_reduction

    def forward(
        self,
        audio_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor | float,
        clip_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of this rank; see the class docstring for its scaling. Shapes as :func:`info_nce_loss`."""
        if not (self.gather and is_distributed()):
            return info_nce_loss(
                audio_emb, text_emb, logit_scale, clip_ids=clip_ids, direction_reduction=self.direction_reduction
            )
        _check_inputs(audio_emb, text_emb, clip_ids)
        sizes = all_gather_sizes(audio_emb.shape[0], audio_emb.device)
        world_size = len(sizes)
        n_global = sum(sizes)
        row_offset = sum(sizes[: get_rank()])
        audio_all = all_gather_with_grad(audio_emb, sizes)  # (N, E)
        text_all = all_gather_with_grad(text_emb, sizes)  # (N, E)
        clip_ids_all = all_gather_tensor(clip_ids, sizes) if clip_ids is not None else None  # (N,)
        return _info_nce_rows(
            audio_emb,
            text_emb,
            audio_all,
            text_all,
            logit_scale,
            row_offset=row_offset,
            clip_ids_rows=clip_ids,
            clip_ids_all=clip_ids_all,
            normaliser=n_global / world_size,
            direction_reduction=self.direction_reduction,
        )

    def extra_repr(self) -> str:
        return f"gather={self.gather}, direction_reduction={self.direction_reduction!r}"
