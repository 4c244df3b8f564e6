"""Pieces shared by the captioner's parts: masks, the feature checks, the decoding state, init helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DecodingState", "check_features", "lengths_to_mask", "uniform_", "xavier_bound"]


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """Boolean mask (B, max_length), True on the first ``lengths[b]`` positions of row ``b``."""
    positions = torch.arange(max_length, device=lengths.device)  # (T,)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def check_features(features: Tensor, feature_lengths: Tensor, input_dim: int | None = None) -> None:
    """Raise a ValueError naming the argument when features (B, T, D) / lengths (B,) are malformed.

    Shared by the captioner's encoder and the decoding functions (:mod:`aac_lightning.nn.decoding`).
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor of shape (batch, frames, dim), got {shape}")
    if input_dim is not None and features.shape[-1] != input_dim:
        raise ValueError(f"features have dimension {features.shape[-1]}, the encoder expects {input_dim}")
    if not isinstance(feature_lengths, Tensor) or feature_lengths.dim() != 1:
        raise ValueError("feature_lengths must be a 1-d tensor with one length per clip")
    if feature_lengths.shape[0] != features.shape[0]:
        raise ValueError(
            f"feature_lengths has {feature_lengths.shape[0]} entries for a batch of {features.shape[0]} clips"
        )
    if feature_lengths.numel() > 0:
        low, high = int(feature_lengths.min()), int(feature_lengths.max())
        if low < 1 or high > features.shape[1]:
            raise ValueError(
                f"feature_lengths must lie in [1, {features.shape[1]}] (the padded frame count), "
                f"got values in [{low}, {high}]"
            )


# --------------------------------------------------------------------------------------------------
# Decoding state
# --------------------------------------------------------------------------------------------------


@dataclass
class DecodingState:
    """Everything a decoder needs to predict the next word for N rows (clips, beams or samples).

    Attributes:
        clip: tensors that depend only on the audio clip of a row (memory, its mask, projections
            of the memory). Each has the row dimension first: (N, ...).
        cache: tensors that summarise the token prefix already processed (self-attention keys and
            values, recurrent hidden state). Each has the row dimension first: (N, ...).
        num_tokens: how many prefix tokens ``cache`` covers.
    """

    clip: dict[str, Tensor]
    cache: dict[str, Tensor] = field(default_factory=dict)
    num_tokens: int = 0

    @property
    def batch_size(self) -> int:
        """Number of rows N."""
        return next(iter(self.clip.values())).shape[0]

    def index_select(self, indices: Tensor) -> DecodingState:
        """New state whose row ``i`` is row ``indices[i]`` of this one (clip and cache tensors)."""
        return DecodingState(
            clip={name: t.index_select(0, indices) for name, t in self.clip.items()},
            cache={name: t.index_select(0, indices) for name, t in self.cache.items()},
            num_tokens=self.num_tokens,
        )

    def reorder_cache(self, indices: Tensor) -> DecodingState:
        """Like :meth:`index_select` but only moves the cache.

        Valid when every ``indices[i]`` points to a row of the same clip as row ``i`` (beam
        re-ordering inside each clip's group of beams): the clip tensors of those rows are equal,
        so copying them every step would be wasted memory traffic.
        """
        return DecodingState(
            clip=self.clip,
            cache={name: t.index_select(0, indices) for name, t in self.cache.items()},
            num_tokens=self.num_tokens,
        )

    def repeat_interleave(self, repeats: int) -> DecodingState:
        """Each row repeated ``repeats`` times in a row: rows (a, b) -> (a, a, b, b) for 2."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        device = next(iter(self.clip.values())).device
        indices = torch.arange(self.batch_size, device=device).repeat_interleave(repeats)
        return self.index_select(indices)

    def without_cache(self) -> DecodingState:
        """The same rows with an empty cache (as returned by ``encode``)."""
        return DecodingState(clip=self.clip, cache={}, num_tokens=0)


def uniform_(weight: Tensor, bound: float) -> None:
    """Fill ``weight`` from U(-bound, bound) in place, without recording gradients."""
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Bound ``sqrt(6 / (fan_in + fan_out))`` of Xavier-uniform initialisation."""
    return math.sqrt(6.0 / (fan_in + fan_out))

