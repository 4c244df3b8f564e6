"""The captioner's audio encoder: a multi-layer bidirectional GRU over the extractor's frames."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from aac_lightning.nn.captioning.common import check_features

__all__ = ["BiGRUEncoder", "EncoderOutput"]


class EncoderOutput(NamedTuple):
    """Output of :class:`BiGRUEncoder`."""

    memory: Tensor  # (B, T, 2 * hidden), zeros after each clip's length
    lengths: Tensor  # (B,)
    clip_vector: Tensor  # (B, 2 * hidden), mean of the valid memory frames


class BiGRUEncoder(nn.Module):
    """Multi-layer bidirectional GRU over the frames of a frozen audio extractor.

    Padded frames are skipped with packed sequences, so a clip's memory does not depend on how much
    padding its batch has. Parameters for ``input_dim=2048``, ``hidden_size=256``, 3 layers:
    layer 1 ``2 * 3 * 256 * (2048 + 256 + 2) = 3,542,016``, layers 2-3
    ``2 * 2 * 3 * 256 * (512 + 256 + 2) = 2,365,440``; total 5,907,456.

    Two dropouts, both active in training mode only:

    * ``input_dropout`` on the extractor's frame features. The SJTU code (``Cnn14Encoder.forward`` in
      ``captioning/models/encoder.py``) drops the last CNN14 block's output with p=0.2 while training,
      and that output is what its RNN encoder reads. Here the extractor is frozen and its frames may
      come from an on-disk cache of eval-mode features, so that dropout lives in the captioner.
      (The authors drop the (time, frequency) map before averaging its 2 frequency bins; dropping the
      averaged frame keeps the mean and is as close as cached averaged frames allow.)
    * ``dropout`` between stacked GRU layers (``nn.GRU``'s own dropout; none on the output), which is
      where the authors' ``RnnEncoder`` applies its 0.5.

    Args:
        input_dim: feature dimension D of the audio extractor (2048 for CNN14).
        hidden_size: GRU hidden size per direction; the memory has ``2 * hidden_size`` channels.
        num_layers: number of stacked bidirectional layers.
        dropout: dropout between GRU layers (not after the last one). Authors 0.5; before 0.2.
        input_dropout: dropout on the input frame features. Authors 0.2; 0.0 disables it (the
            behaviour before this option existed).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 256,
        num_layers: int = 3,
        dropout: float = 0.5,
        input_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if input_dim < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"input_dim, hidden_size and num_layers must be >= 1, got {input_dim}, {hidden_size}, {num_layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must lie in [0, 1), got {input_dropout}")
        self.input_dim = input_dim
        self.hidden_size = hidden_size
        self.output_dim = 2 * hidden_size
        self.input_dropout = nn.Dropout(input_dropout)  # no parameters: state dicts are unchanged
        self.gru = nn.GRU(
            input_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, features: Tensor, feature_lengths: Tensor) -> EncoderOutput:
        """Encode ``features`` (B, T, D) whose clip ``b`` has ``feature_lengths[b]`` valid frames."""
        check_features(features, feature_lengths, self.input_dim)
        num_frames = features.shape[1]
        features = self.input_dropout(features)  # identity in eval mode
        # pack_padded_sequence wants the lengths on the CPU.
        packed = pack_padded_sequence(features, feature_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, _ = self.gru(packed)
        memory, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=num_frames)  # (B, T, 2H)
        lengths = feature_lengths.to(memory.device)
        # Padded positions come back as zeros, so the sum over all frames is the sum over valid ones.
        clip_vector = memory.sum(dim=1) / lengths.unsqueeze(1).to(memory.dtype)  # (B, 2H)
        return EncoderOutput(memory, lengths, clip_vector)
