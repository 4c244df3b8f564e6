"""The captioners' frozen audio encoder."""

from __future__ import annotations

import torch
from torch import nn

from aac_lightning.nn.audio_encoders.base import AudioEncoder, encode_clips

__all__ = ["FrozenExtractor"]


class FrozenExtractor(nn.Module):
    """An audio encoder frozen for real: no gradients, and always in eval mode (BatchNorm, dropout).

    The encoder is held as ``encoder`` (checkpoint keys ``extractor.encoder.*`` in the captioners).
    :meth:`forward` encodes with :func:`~aac_lightning.nn.audio_encoders.encode_clips`: each clip's
    features are those of the clip alone, whatever batch it sits in.
    """

    def __init__(self, encoder: AudioEncoder):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    @property
    def frame_dim(self) -> int:
        return self.encoder.frame_dim

    def train(self, mode: bool = True) -> FrozenExtractor:
        # Lightning switches the whole module to training mode each epoch; the extractor stays in eval.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``audio`` (B, T), ``lengths`` (B,) | None -> ``clip`` (B, clip_dim), ``frames`` (B, T', D)
        zero beyond ``frame_lengths`` (B,)."""
        return encode_clips(self.encoder, audio, lengths)
