"""Frame-level similarity: where in a recording a text query fits.

Each output frame of a bi-encoder's audio encoder is mapped into the clip-embedding space by the
encoder's own :meth:`~aac_lightning.nn.audio_encoders.AudioEncoder.frame_embeddings`, then through
the bi-encoder's audio projection, and compared with the query's text embedding. This is the usual
frame-level relevance approximation: the model was trained on clip embeddings only, so frame scores
are comparable with each other rather than calibrated like clip scores. Frame centres come from the
encoder's :meth:`~aac_lightning.nn.audio_encoders.AudioEncoder.frame_times`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aac_lightning.nn.audio_encoders import encode_clips
from aac_lightning.nn.bi_encoder import BiEncoder

__all__ = ["frame_embeddings", "frame_scores", "frame_times"]


def frame_embeddings(model: BiEncoder, waveform: Tensor) -> Tensor:
    """Unit-norm embeddings ``(T', E)`` of the valid frames of one mono waveform ``(T,)``."""
    encoder = model.audio_encoder
    waveform = waveform.reshape(1, -1)  # (1, T)
    lengths = torch.tensor([waveform.shape[1]], device=waveform.device)
    out = encode_clips(encoder, waveform, lengths)  # the one encoding rule
    frames = out["frames"][0, : int(out["frame_lengths"][0])]  # (T', D)
    return F.normalize(model.audio_projection(encoder.frame_embeddings(frames)), dim=-1)  # (T', E)


def frame_times(model: BiEncoder, num_frames: int, num_samples: int) -> np.ndarray:
    """Centre time (s) of each of the first ``num_frames`` frames of a clip of ``num_samples`` samples."""
    return model.audio_encoder.frame_times(num_frames, num_samples).numpy()


@torch.inference_mode()
def frame_scores(model: BiEncoder, waveform: Tensor, query: str) -> tuple[np.ndarray, np.ndarray]:
    """``(times_s (T',), scores (T',))``: cosine of the query with each frame of ``waveform`` ``(T,)``."""
    frames = frame_embeddings(model, waveform)  # (T', E)
    text = model.encode_text([query])  # (1, E)
    scores = (frames @ text[0]).float().cpu().numpy()  # (T',)
    return frame_times(model, len(scores), waveform.shape[-1]), scores
