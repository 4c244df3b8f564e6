"""Captioning model: BiGRU audio encoder, Transformer / attentional-GRU word decoders.

The captioner reads the frame features of a frozen audio extractor (``features`` (B, T, D) with
``feature_lengths`` (B,)), encodes them with a 3-layer bidirectional GRU into a memory
(B, T, 2 * hidden), and a decoder predicts the next word from the previous words and the memory.

Incremental decoding goes through :class:`DecodingState`: :meth:`CaptionModel.encode` builds it
from the audio, :meth:`CaptionModel.step` consumes a token prefix and returns the next-word
log-probabilities together with an updated state that caches what the prefix already cost, so that
the next call only processes the new token. Every tensor of a state is batch-first, hence rows can
be repeated (beams, samples) or selected (beam re-ordering) with one ``index_select``.

Parameter counts for a 4368-word vocabulary and 2048-d input features (the report's Table 1):

========================================  ==========  ===========
configuration                             parameters  report
========================================  ==========  ===========
BiGRU(256)x3 + Transformer(256)x2         10,386,960  10.4M
BiGRU(256)x3 + Transformer(256)x4         12,493,840  12.5M
BiGRU(256)x3 + GRU(512)x1 with attention  14,584,080  14.6M
========================================  ==========  ===========

(The Transformer counts include the 512 parameters of the memory projection's LayerNorm of the
authors' decoder; with ``memory_projection="linear"`` they are 10,386,448 and 12,493,328.)

The defaults follow the SJTU authors' released code (github.com/wsntxxn/AudioCaption,
``configs/dcase2022/waveform/cnn14rnn_2trm.yaml`` and ``captioning/models``); each departure of this
package's earlier model from it is a named option whose old value is listed in
:func:`build_caption_model`, so that checkpoints of the earlier model still load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "BiGRUEncoder",
    "CaptionModel",
    "DecodingState",
    "EncoderOutput",
    "GRUAttentionDecoder",
    "TransformerCaptionDecoder",
    "TransformerDecoderBlock",
    "build_caption_model",
    "lengths_to_mask",
    "random_positional_table",
    "sinusoidal_positional_encoding",
]


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """Boolean mask (B, max_length), True on the first ``lengths[b]`` positions of row ``b``."""
    positions = torch.arange(max_length, device=lengths.device)  # (T,)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def _check_features(features: Tensor, feature_lengths: Tensor, input_dim: int | None = None) -> None:
    """Raise a ValueError naming the argument when features / lengths are malformed."""
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


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


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
        _check_features(features, feature_lengths, self.input_dim)
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


# --------------------------------------------------------------------------------------------------
# Transformer decoder
# --------------------------------------------------------------------------------------------------


def sinusoidal_positional_encoding(max_length: int, d_model: int) -> Tensor:
    """Sinusoidal position table (max_length, d_model) of Vaswani et al. (2017).

    ``pe[p, 2i] = sin(p / 10000^(2i/d))``, ``pe[p, 2i+1] = cos(p / 10000^(2i/d))``.
    """
    if d_model % 2 != 0:
        raise ValueError(f"d_model must be even for the sinusoidal encoding, got {d_model}")
    positions = torch.arange(max_length, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = positions * frequencies  # (P, D/2)
    table = torch.zeros(max_length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class TransformerDecoderBlock(nn.Module):
    """Post-norm Transformer decoder layer (causal self-attention, cross-attention, feed-forward).

    Computes the same function as ``torch.nn.TransformerDecoderLayer`` (ReLU, ``norm_first=False``)
    but can run on a few new positions at a time with the previous positions' keys and values cached,
    and takes the memory's keys and values pre-projected (they are computed once per clip).
    Parameters: ``4 * (d^2 + d)`` per attention, ``2 * d * f + d + f`` feed-forward, ``6 * d`` norms;
    1,053,440 for ``d=256, f=1024``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.self_qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.cross_query = nn.Linear(d_model, d_model)
        self.cross_key_value = nn.Linear(d_model, 2 * d_model)
        self.cross_out = nn.Linear(d_model, d_model)
        self.feedforward_in = nn.Linear(d_model, dim_feedforward)
        self.feedforward_out = nn.Linear(dim_feedforward, d_model)
        self.norm_self = nn.LayerNorm(d_model)
        self.norm_cross = nn.LayerNorm(d_model)
        self.norm_feedforward = nn.LayerNorm(d_model)
        self.residual_dropout = nn.Dropout(dropout)
        self.feedforward_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.nhead, self.head_dim).transpose(1, 2)  # (N, h, L, hd)

    def _merge_heads(self, x: Tensor) -> Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.d_model)  # (N, L, D)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (N, h, T, hd) of a memory (N, T, D)."""
        keys, values = self.cross_key_value(memory).chunk(2, dim=-1)
        return self._split_heads(keys), self._split_heads(values)

    def forward(
        self,
        x: Tensor,
        memory_keys: Tensor,
        memory_values: Tensor,
        memory_mask: Tensor,
        past_keys: Tensor | None = None,
        past_values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer on ``n`` new positions.

        Args:
            x: inputs of the new positions (N, n, D).
            memory_keys, memory_values: from :meth:`project_memory`, (N, h, T, hd).
            memory_mask: (N, T), True on valid frames.
            past_keys, past_values: self-attention keys / values of the ``c`` earlier positions
                (N, h, c, hd), or None when there are none.

        Returns:
            outputs (N, n, D) and the self-attention keys / values of all ``c + n`` positions.
        """
        dropout_p = self.dropout if self.training else 0.0
        num_new = x.shape[1]
        query, keys, values = (self._split_heads(t) for t in self.self_qkv(x).chunk(3, dim=-1))
        if past_keys is not None:
            keys = torch.cat([past_keys, keys], dim=2)  # (N, h, c + n, hd)
            values = torch.cat([past_values, values], dim=2)
        num_past = keys.shape[2] - num_new
        if num_new == 1:
            causal_mask = None  # one new position may look at every earlier one
        else:
            key_positions = torch.arange(num_past + num_new, device=x.device)
            query_positions = torch.arange(num_new, device=x.device) + num_past
            causal_mask = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)  # (n, c + n)
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_mask, dropout_p=dropout_p)
        x = self.norm_self(x + self.residual_dropout(self.self_out(self._merge_heads(attended))))

        cross_query = self._split_heads(self.cross_query(x))
        cross_mask = memory_mask[:, None, None, :]  # (N, 1, 1, T), broadcast over heads and queries
        attended = F.scaled_dot_product_attention(
            cross_query, memory_keys, memory_values, attn_mask=cross_mask, dropout_p=dropout_p
        )
        x = self.norm_cross(x + self.residual_dropout(self.cross_out(self._merge_heads(attended))))

        hidden = self.feedforward_dropout(F.relu(self.feedforward_in(x)))
        x = self.norm_feedforward(x + self.residual_dropout(self.feedforward_out(hidden)))
        return x, keys, values


def random_positional_table(max_length: int, d_model: int, generator: torch.Generator | None = None) -> Tensor:
    """Fixed random position table (max_length, d_model) of the SJTU Transformer decoder as trained.

    The authors' ``PositionalEncoding`` (``captioning/models/utils.py``) stores its sinusoidal table as
    a parameter of shape (max_length, 1, d_model) with ``requires_grad=False``, and
    ``TransformerDecoder.init_params`` (``captioning/models/decoder.py``) then applies
    ``xavier_uniform_`` to every parameter with more than one dimension, that table included. The
    decoder they trained therefore adds a frozen table drawn from U(-a, a) with
    ``a = sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (d_model + max_length * d_model))`` (0.0152 for
    d_model=256, max_length=100) instead of the sinusoids.
    """
    bound = math.sqrt(6.0 / (d_model * (1 + max_length)))
    table = torch.empty(max_length, d_model)
    return table.uniform_(-bound, bound, generator=generator)


def _uniform_(weight: Tensor, bound: float) -> None:
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


class TransformerCaptionDecoder(nn.Module):
    """Transformer word decoder: embedding + positions, causal post-norm decoder layers, classifier.

    Parameters with ``vocab_size=4368``, ``d_model=256``, ``dim_feedforward=1024``, ``memory_dim=512``:
    embedding ``4368 * 256 = 1,118,208``, memory projection ``512 * 256 + 256 = 131,328`` (plus a
    LayerNorm ``2 * 256 = 512`` with ``memory_projection="relu_norm"``), 1,053,440 per layer,
    classifier ``256 * 4368 + 4368 = 1,122,576``; with 2 layers 4,479,504 (10,386,960 with the BiGRU
    encoder; 4,478,992 / 10,386,448 with ``"linear"``) and with 4 layers 6,586,384 (12,493,840;
    6,585,872 / 12,493,328 with ``"linear"``).

    The defaults follow the SJTU ``TransformerDecoder`` (``captioning/models/decoder.py``, config
    ``configs/dcase2022/waveform/cnn14rnn_2trm.yaml``): 4 heads (``d_model // 64``), feed-forward
    ``4 * d_model``, ReLU, post-norm layers, dropout 0.2, an untied classifier, no clip-level vector.
    These options switch its remaining details; the values in brackets rebuild this class as it was
    before they existed (same state-dict keys, same function):

    Args:
        vocab_size: number of words, special tokens included.
        d_model: model width.
        num_layers: number of decoder layers.
        nhead: attention heads.
        dim_feedforward: inner width of the feed-forward blocks.
        dropout: dropout on embeddings, attention weights, residual branches (and inside the memory
            projection with ``"relu_norm"``).
        memory_dim: channels of the encoder memory.
        max_length: longest token sequence (bos included) the positional table covers.
        memory_projection: ``"relu_norm"`` (authors): ``LayerNorm(Dropout(ReLU(Linear(memory))))``;
            the LayerNorm adds the state-dict keys ``memory_norm.weight`` / ``.bias``.
            [``"linear"``: a single Linear.]
        scale_embedding: multiply the word embeddings by ``sqrt(d_model)`` before adding the positions
            (authors). [False]
        double_embedding_dropout: apply ``dropout`` to the word embeddings and again to their sum with
            the positions (authors: ``in_dropout`` then ``PositionalEncoding``'s dropout). [False:
            once, on the sum.]
        positional_encoding: ``"random"`` (authors, as their code actually ran: see
            :func:`random_positional_table`; a persistent buffer, saved in checkpoints under
            ``positional_encoding``) or [``"sinusoidal"``: Vaswani et al., recomputed, not saved].
        weight_init: ``"xavier"`` (authors: ``xavier_uniform_`` on every weight matrix, embedding and
            classifier included, each attention's fused (3 d, d) input projection treated as one
            matrix; attention biases zero as in ``nn.MultiheadAttention``; other biases and the
            LayerNorms at PyTorch's defaults). [``"pytorch"``: PyTorch's default initialisation.]
    """

    MEMORY_PROJECTIONS = ("relu_norm", "linear")
    POSITIONAL_ENCODINGS = ("random", "sinusoidal")
    WEIGHT_INITS = ("xavier", "pytorch")

    # Scheduled sampling in CaptionModel's "batch" mode: the SJTU Transformer re-reads its whole
    # prefix at every step, which is either the reference prefix or the model's own greedy one.
    scheduled_sampling_unit = "prefix"

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        num_layers: int = 2,
        nhead: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.2,
        memory_dim: int = 512,
        max_length: int = 100,
        memory_projection: str = "relu_norm",
        scale_embedding: bool = True,
        double_embedding_dropout: bool = True,
        positional_encoding: str = "random",
        weight_init: str = "xavier",
    ) -> None:
        super().__init__()
        for name, value in [
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("nhead", nhead),
            ("dim_feedforward", dim_feedforward),
            ("memory_dim", memory_dim),
            ("max_length", max_length),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        for name, value, allowed in [
            ("memory_projection", memory_projection, self.MEMORY_PROJECTIONS),
            ("positional_encoding", positional_encoding, self.POSITIONAL_ENCODINGS),
            ("weight_init", weight_init, self.WEIGHT_INITS),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_length = max_length
        self.memory_projection_kind = memory_projection
        self.embedding_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.double_embedding_dropout = bool(double_embedding_dropout)
        self.word_embedding = nn.Embedding(vocab_size, d_model)
        if positional_encoding == "sinusoidal":
            # Not saved in checkpoints: a function of (max_length, d_model) only.
            self.register_buffer(
                "positional_encoding", sinusoidal_positional_encoding(max_length, d_model), persistent=False
            )
        else:
            # Random: saved with the weights, or a reloaded model would read other positions.
            self.register_buffer("positional_encoding", random_positional_table(max_length, d_model))
        self.memory_projection = nn.Linear(memory_dim, d_model)
        self.memory_norm = nn.LayerNorm(d_model) if memory_projection == "relu_norm" else None
        self.memory_dropout = nn.Dropout(dropout)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerDecoderBlock(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.classifier = nn.Linear(d_model, vocab_size)
        if weight_init == "xavier":
            self._xavier_init()

    def _xavier_init(self) -> None:
        """The authors' ``init_params``: xavier-uniform weight matrices, see the class docstring."""
        d = self.d_model
        nn.init.xavier_uniform_(self.word_embedding.weight)
        nn.init.xavier_uniform_(self.memory_projection.weight)
        nn.init.xavier_uniform_(self.classifier.weight)
        fused_bound = _xavier_bound(d, 3 * d)  # nn.MultiheadAttention's (3d, d) in_proj_weight
        for layer in self.layers:
            _uniform_(layer.self_qkv.weight, fused_bound)
            _uniform_(layer.cross_query.weight, fused_bound)
            _uniform_(layer.cross_key_value.weight, fused_bound)
            for linear in (layer.self_out, layer.cross_out, layer.feedforward_in, layer.feedforward_out):
                nn.init.xavier_uniform_(linear.weight)
            for linear in (layer.self_qkv, layer.self_out, layer.cross_query, layer.cross_key_value, layer.cross_out):
                nn.init.zeros_(linear.bias)

    def project_memory(self, memory: Tensor) -> Tensor:
        """The memory (N, T, memory_dim) projected to the model width (N, T, d_model)."""
        projected = self.memory_projection(memory)
        if self.memory_norm is not None:
            projected = self.memory_norm(self.memory_dropout(F.relu(projected)))
        return projected

    def init_state(self, memory: Tensor, memory_mask: Tensor, clip_vector: Tensor) -> DecodingState:
        """State for decoding from the encoder memory (N, T, memory_dim) and its mask (N, T)."""
        projected = self.project_memory(memory)  # (N, T, D)
        clip: dict[str, Tensor] = {"memory_mask": memory_mask}
        for index, layer in enumerate(self.layers):
            clip[f"memory_keys_{index}"], clip[f"memory_values_{index}"] = layer.project_memory(projected)
        return DecodingState(clip=clip)

    def forward_tokens(
        self, state: DecodingState, tokens: Tensor, last_only: bool = False
    ) -> tuple[Tensor, DecodingState]:
        """Logits (N, n, V) for ``n`` new tokens (N, n) that follow the ``state.num_tokens`` cached ones.

        With ``last_only`` only the last position is classified: logits (N, 1, V).
        """
        start = state.num_tokens
        stop = start + tokens.shape[1]
        if stop > self.max_length:
            raise ValueError(
                f"token sequence of length {stop} exceeds the decoder's max_length={self.max_length}"
            )
        x = self.word_embedding(tokens)  # (N, n, D)
        if self.embedding_scale != 1.0:
            x = x * self.embedding_scale
        if self.double_embedding_dropout:
            x = self.embedding_dropout(x)
        x = self.embedding_dropout(x + self.positional_encoding[start:stop])
        cache: dict[str, Tensor] = {}
        for index, layer in enumerate(self.layers):
            x, cache[f"keys_{index}"], cache[f"values_{index}"] = layer(
                x,
                state.clip[f"memory_keys_{index}"],
                state.clip[f"memory_values_{index}"],
                state.clip["memory_mask"],
                state.cache.get(f"keys_{index}"),
                state.cache.get(f"values_{index}"),
            )
        if last_only:
            x = x[:, -1:]  # the vocabulary projection is the costliest part; skip unused positions
        logits = self.classifier(x)  # (N, n, V)
        return logits, DecodingState(clip=state.clip, cache=cache, num_tokens=stop)


# --------------------------------------------------------------------------------------------------
# GRU decoder with attention
# --------------------------------------------------------------------------------------------------


class GRUAttentionDecoder(nn.Module):
    """One-layer GRU decoder with additive (Bahdanau) attention over the encoder memory.

    At step t the previous hidden state ``h_{t-1}`` queries the memory:
    ``e_j = v^T tanh(W_h h_{t-1} + W_m m_j + b)``, ``a = softmax(e)`` over valid frames,
    ``c_t = sum_j a_j m_j``. The GRU input is ``[E w_{t-1}; P_clip z; P_ctx c_t]`` where ``z`` is the
    clip-level vector (mean of the memory), and the word distribution is ``softmax(W_o h_t + b_o)``.
    The initial hidden state is zero (the clip vector enters every step's input instead).

    Parameters with ``vocab_size=4368`` and every size 512 (embedding E=512, hidden H=512, memory
    M=512, attention A=512): embedding ``4368 * 512 = 2,236,416``; clip and context projections
    ``2 * (512 * 512 + 512) = 525,312``; attention ``W_h 512 * 512 + W_m (512 * 512 + 512) + v 512
    = 525,312``; GRU cell ``3 * 512 * (3 * 512) + 3 * 512 * 512 + 2 * 3 * 512 = 3,148,800``;
    classifier ``512 * 4368 + 4368 = 2,240,784``. Total 8,676,624, i.e. 14,584,080 with the BiGRU
    encoder.

    This is the SJTU ``BahAttnDecoder`` (``captioning/models/decoder.py``, used by their
    ``Seq2SeqAttnModel``): the same inputs (word, projected context, projected clip vector; their
    order inside the concatenation differs, which only permutes weight columns), the same additive
    attention (their ``Seq2SeqAttention`` applies one Linear to ``[h; m_j]``; ``W_h`` and ``W_m`` here
    are its two column blocks), zero initial state, the mean of the memory as clip vector. The values
    in brackets rebuild this class as it was before these options existed.

    Args:
        vocab_size: number of words, special tokens included.
        hidden_size: GRU hidden size H.
        embed_dim: word embedding size E (also the size of the projected clip vector and context).
        memory_dim: channels of the encoder memory M.
        attention_dim: size A of the additive attention's hidden layer.
        dropout: dropout on the word embeddings.
        output_dropout: dropout on the GRU output before the classifier. Authors 0.0 (their
            classifier reads the GRU output directly). [None: the same as ``dropout``.]
        weight_init: ``"kaiming"`` (authors' ``init``: ``kaiming_uniform_`` on the embedding and on
            every Linear weight, zero Linear biases; ``W_h`` and ``W_m`` with the fan-in ``H + M`` of
            the authors' single Linear; the score vector ``v`` from N(0, 1) like their
            ``torch.randn``; the GRU cell at PyTorch's default). [``"pytorch"``: PyTorch's defaults.]
    """

    WEIGHT_INITS = ("kaiming", "pytorch")

    # Scheduled sampling in CaptionModel's "batch" mode: the SJTU recurrent decoder carries its
    # state and swaps only the input word (reference word or the previous step's argmax).
    scheduled_sampling_unit = "token"

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 512,
        embed_dim: int = 512,
        memory_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.2,
        output_dropout: float | None = 0.0,
        weight_init: str = "kaiming",
    ) -> None:
        super().__init__()
        for name, value in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("embed_dim", embed_dim),
            ("memory_dim", memory_dim),
            ("attention_dim", attention_dim),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if output_dropout is None:
            output_dropout = dropout
        if not 0.0 <= output_dropout < 1.0:
            raise ValueError(f"output_dropout must lie in [0, 1) or be None, got {output_dropout}")
        if weight_init not in self.WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {list(self.WEIGHT_INITS)}, got {weight_init!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.word_embedding = nn.Embedding(vocab_size, embed_dim)
        self.clip_projection = nn.Linear(memory_dim, embed_dim)
        self.context_projection = nn.Linear(memory_dim, embed_dim)
        self.attention_query = nn.Linear(hidden_size, attention_dim, bias=False)
        self.attention_key = nn.Linear(memory_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1, bias=False)
        self.cell = nn.GRUCell(3 * embed_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(output_dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)
        if weight_init == "kaiming":
            self._kaiming_init()

    def _kaiming_init(self) -> None:
        """The authors' ``init`` (``captioning/models/utils.py``) as applied to ``BahAttnDecoder``."""
        nn.init.kaiming_uniform_(self.word_embedding.weight)
        for linear in (self.clip_projection, self.context_projection, self.classifier):
            nn.init.kaiming_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        # One Linear over [h; m] in the authors' code: kaiming bound sqrt(6 / fan_in), fan_in = H + M.
        fused_bound = math.sqrt(6.0 / (self.attention_query.in_features + self.attention_key.in_features))
        _uniform_(self.attention_query.weight, fused_bound)
        _uniform_(self.attention_key.weight, fused_bound)
        nn.init.zeros_(self.attention_key.bias)
        nn.init.normal_(self.attention_score.weight)  # their v = nn.Parameter(torch.randn(attn_size))

    def init_state(self, memory: Tensor, memory_mask: Tensor, clip_vector: Tensor) -> DecodingState:
        """State for decoding from the encoder memory (N, T, memory_dim) and its mask (N, T)."""
        clip = {
            "memory": memory,
            "memory_mask": memory_mask,
            # W_m m_j does not depend on the step: computed once per clip.
            "memory_keys": self.attention_key(memory),  # (N, T, A)
            "clip_input": self.clip_projection(clip_vector),  # (N, E)
        }
        return DecodingState(clip=clip)

    def attend(self, hidden: Tensor, clip: dict[str, Tensor]) -> Tensor:
        """Attention weights (N, T) of the previous hidden state (N, H) over the memory."""
        energies = torch.tanh(clip["memory_keys"] + self.attention_query(hidden).unsqueeze(1))  # (N, T, A)
        scores = self.attention_score(energies).squeeze(-1)  # (N, T)
        scores = scores.masked_fill(~clip["memory_mask"], float("-inf"))
        return scores.softmax(dim=-1)

    def forward_tokens(
        self, state: DecodingState, tokens: Tensor, last_only: bool = False
    ) -> tuple[Tensor, DecodingState]:
        """Logits (N, n, V) for ``n`` new tokens (N, n) that follow the ``state.num_tokens`` cached ones.

        With ``last_only`` only the last position is classified: logits (N, 1, V).
        """
        clip = state.clip
        hidden = state.cache.get("hidden")
        if hidden is None:
            memory = clip["memory"]
            hidden = memory.new_zeros(memory.shape[0], self.hidden_size)  # (N, H)
        embedded = self.dropout(self.word_embedding(tokens))  # (N, n, E)
        outputs = []
        for position in range(tokens.shape[1]):
            weights = self.attend(hidden, clip)  # (N, T)
            context = torch.bmm(weights.unsqueeze(1), clip["memory"]).squeeze(1)  # (N, M)
            step_input = torch.cat(
                [embedded[:, position], clip["clip_input"], self.context_projection(context)], dim=-1
            )  # (N, 3E)
            hidden = self.cell(step_input, hidden)  # (N, H)
            outputs.append(hidden)
        if last_only:
            outputs = outputs[-1:]
        logits = self.classifier(self.output_dropout(torch.stack(outputs, dim=1)))  # (N, n, V)
        new_state = DecodingState(clip=clip, cache={"hidden": hidden}, num_tokens=state.num_tokens + tokens.shape[1])
        return logits, new_state


# --------------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------------


class CaptionModel(nn.Module):
    """Encoder + decoder captioner with teacher forcing, scheduled sampling and incremental decoding.

    The decoder must provide ``vocab_size``, ``init_state(memory, memory_mask, clip_vector)`` and
    ``forward_tokens(state, tokens, last_only=False) -> (logits, state)`` (both decoders of this
    module do), and may set ``scheduled_sampling_unit`` to ``"prefix"`` or ``"token"`` (default).

    Scheduled sampling (``forward`` with ``teacher_forcing_ratio < 1``) is step-wise and exact; the
    model's own word is always the argmax of its previous distribution (no gradient through the
    choice). ``scheduled_sampling`` picks the scheme:

    * ``"batch"`` (the SJTU code: ``random.random() < ss_ratio`` once per step in
      ``prepare_decoder_input`` of ``captioning/models/transformer_model.py`` and
      ``attn_model.py``): one draw per step, shared by every row of the batch. What the draw selects
      depends on the decoder's ``scheduled_sampling_unit``:

      - ``"prefix"`` (Transformer): at step t the decoder reads either the whole reference prefix
        ``tokens[:, :t+1]`` or the whole prefix of its own greedy words ``[bos, w_0, ..., w_{t-1}]``,
        ``w_s`` being the argmax of step s (whichever prefix step s read). Reference steps are
        positions of one parallel teacher-forced pass; own-prefix steps extend a separate
        self-attention cache, so the cost stays about two teacher-forced passes.
      - ``"token"`` (recurrent decoder): the state is carried from step to step and only the input
        word at t is swapped: ``tokens[:, t]`` or ``w_{t-1}``.

    * ``"row"`` (this package before): one independent draw per row and step; the input word at t is
      ``tokens[:, t]`` or ``w_{t-1}`` and the earlier inputs stay as drawn, for either decoder.

    The first step reads bos under every scheme and takes no draw. Draws come from ``generator``
    (else the global generator): ``"batch"`` draws ``torch.rand(L - 1)`` once, ``"row"`` draws
    ``torch.rand(B)`` before each step after the first.

    Args:
        encoder: the BiGRU encoder.
        decoder: a Transformer or attentional-GRU decoder.
        scheduled_sampling: ``"batch"`` (authors) or ``"row"`` (the behaviour before the option).
    """

    SCHEDULED_SAMPLING = ("batch", "row")

    def __init__(self, encoder: BiGRUEncoder, decoder: nn.Module, scheduled_sampling: str = "batch") -> None:
        super().__init__()
        if scheduled_sampling not in self.SCHEDULED_SAMPLING:
            raise ValueError(
                f"scheduled_sampling must be one of {list(self.SCHEDULED_SAMPLING)}, got {scheduled_sampling!r}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.scheduled_sampling = scheduled_sampling

    @property
    def vocab_size(self) -> int:
        """Number of words of the decoder's vocabulary."""
        return self.decoder.vocab_size

    def encode(self, features: Tensor, feature_lengths: Tensor) -> DecodingState:
        """Encode audio features (B, T, D) into a decoding state of B rows with an empty cache."""
        memory, lengths, clip_vector = self.encoder(features, feature_lengths)
        memory_mask = lengths_to_mask(lengths, memory.shape[1])  # (B, T)
        return self.decoder.init_state(memory, memory_mask, clip_vector)

    def step(self, state: DecodingState, prev_tokens: Tensor) -> tuple[Tensor, DecodingState]:
        """Next-word log-probabilities (N, V) after the prefixes ``prev_tokens`` (N, t).

        The state's cache is assumed to hold the first ``state.num_tokens`` tokens of the prefixes
        (pass the state returned by the previous call); only the remaining tokens are processed.
        With a state straight from :meth:`encode` the whole prefix is processed.
        """
        if prev_tokens.dim() != 2:
            raise ValueError(f"prev_tokens must have shape (rows, length), got {tuple(prev_tokens.shape)}")
        if prev_tokens.shape[1] <= state.num_tokens:
            raise ValueError(
                f"prev_tokens has {prev_tokens.shape[1]} tokens but the state already covers {state.num_tokens}"
            )
        logits, new_state = self.decoder.forward_tokens(state, prev_tokens[:, state.num_tokens :], last_only=True)
        log_probs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (N, V)
        return log_probs, new_state

    def forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        tokens: Tensor,
        teacher_forcing_ratio: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Logits (B, L, V) predicting ``tokens[:, 1:]`` and beyond from inputs that start with bos.

        Args:
            features: (B, T, D) audio features; feature_lengths: (B,) valid frames per clip.
            tokens: (B, L) input words, ``tokens[:, 0]`` being the begin-of-sentence id; position t of
                the output is the distribution of the word after input t.
            teacher_forcing_ratio: probability of feeding the ground truth at each step; 1.0 runs one
                parallel teacher-forced pass, below 1.0 runs :meth:`scheduled_sampling_forward`.
            generator: random generator for the scheduled-sampling draws.
        """
        if not 0.0 <= teacher_forcing_ratio <= 1.0:
            raise ValueError(f"teacher_forcing_ratio must lie in [0, 1], got {teacher_forcing_ratio}")
        if tokens.dim() != 2 or tokens.shape[0] != features.shape[0]:
            raise ValueError(f"tokens must have shape (batch={features.shape[0]}, length), got {tuple(tokens.shape)}")
        if teacher_forcing_ratio < 1.0:
            return self.scheduled_sampling_forward(
                features, feature_lengths, tokens, teacher_forcing_ratio=teacher_forcing_ratio, generator=generator
            )
        state = self.encode(features, feature_lengths)
        logits, _ = self.decoder.forward_tokens(state, tokens)
        return logits

    def scheduled_sampling_forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        tokens: Tensor,
        *,
        teacher_forcing_ratio: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Step-wise logits (B, L, V) where the reference is fed with probability
        ``teacher_forcing_ratio`` and the model's own argmax otherwise (see the class docstring for
        what one draw covers under each ``scheduled_sampling`` scheme)."""
        if not 0.0 <= teacher_forcing_ratio <= 1.0:
            raise ValueError(f"teacher_forcing_ratio must lie in [0, 1], got {teacher_forcing_ratio}")
        state = self.encode(features, feature_lengths)
        batch_size, length = tokens.shape
        draw_device = generator.device if generator is not None else torch.device("cpu")
        if self.scheduled_sampling == "row":
            def draw_step(position: int) -> Tensor:
                draws = torch.rand(batch_size, generator=generator, device=draw_device)
                return (draws < teacher_forcing_ratio).to(tokens.device)  # (B,)
        else:
            step_truth = torch.rand(max(length - 1, 0), generator=generator, device=draw_device) < teacher_forcing_ratio
            step_truth = step_truth.tolist()  # one Python bool per step after the first
            if getattr(self.decoder, "scheduled_sampling_unit", "token") == "prefix":
                return self._prefix_scheduled_sampling(state, tokens, step_truth)

            def draw_step(position: int) -> Tensor:
                return torch.full((batch_size,), step_truth[position], dtype=torch.bool, device=tokens.device)

        step_input = tokens[:, :1]  # (B, 1), the bos column
        step_logits = []
        for position in range(length):
            logits, state = self.decoder.forward_tokens(state, step_input)  # (B, 1, V)
            step_logits.append(logits)
            if position + 1 < length:
                use_truth = draw_step(position)  # (B,)
                predicted = logits[:, 0].detach().argmax(dim=-1)  # (B,)
                step_input = torch.where(use_truth, tokens[:, position + 1], predicted).unsqueeze(1)
        return torch.cat(step_logits, dim=1)

    def _prefix_scheduled_sampling(self, state: DecodingState, tokens: Tensor, step_truth: list[bool]) -> Tensor:
        """``"batch"`` scheme for a decoder that reads whole prefixes (the SJTU Transformer).

        Step t (t >= 1) reads the reference prefix ``tokens[:, :t+1]`` when ``step_truth[t-1]``, else
        the own prefix ``[bos, w_0, ..., w_{t-1}]``; ``w_t`` is the argmax of step t's logits.
        """
        length = tokens.shape[1]
        teacher_logits = None
        if any(step_truth):
            teacher_logits, _ = self.decoder.forward_tokens(state, tokens)  # (B, L, V)
        own_state = state  # its cache covers the first own_state.num_tokens own-prefix tokens
        own_prefix = [tokens[:, :1]]  # bos, then w_0, w_1, ... as (B, 1) columns
        step_logits = []
        for position in range(length):
            if teacher_logits is not None and (position == 0 or step_truth[position - 1]):
                logits = teacher_logits[:, position : position + 1]  # (B, 1, V); step 0 reads bos either way
            else:
                pending = torch.cat(own_prefix[own_state.num_tokens :], dim=1)  # tokens the cache lacks
                logits, own_state = self.decoder.forward_tokens(own_state, pending, last_only=True)
            step_logits.append(logits)
            own_prefix.append(logits[:, 0].detach().argmax(dim=-1, keepdim=True))
        return torch.cat(step_logits, dim=1)


def build_caption_model(
    decoder: str,
    vocab_size: int,
    input_dim: int,
    *,
    encoder_hidden_size: int = 256,
    encoder_num_layers: int = 3,
    encoder_dropout: float = 0.5,
    encoder_input_dropout: float = 0.2,
    scheduled_sampling: str = "batch",
    **decoder_kwargs,
) -> CaptionModel:
    """Build a BiGRU-encoder captioner with a ``"transformer"`` or ``"gru_attention"`` decoder.

    ``encoder_*`` go to :class:`BiGRUEncoder` (``hidden_size``, ``num_layers``, ``dropout``,
    ``input_dropout``), ``scheduled_sampling`` to :class:`CaptionModel`, and ``decoder_kwargs`` to
    :class:`TransformerCaptionDecoder` or :class:`GRUAttentionDecoder` (e.g. ``num_layers=4``); their
    ``memory_dim`` is set to the encoder's output size. Every default is the SJTU authors' setting.

    The model of this package before the SJTU-fidelity options (its checkpoints load into it) is
    ``encoder_dropout=0.2, encoder_input_dropout=0.0, scheduled_sampling="row"`` with, for the
    Transformer, ``memory_projection="linear", scale_embedding=False,
    double_embedding_dropout=False, positional_encoding="sinusoidal", weight_init="pytorch"`` and,
    for the GRU, ``output_dropout=None, weight_init="pytorch"``.
    """
    decoders = {"transformer": TransformerCaptionDecoder, "gru_attention": GRUAttentionDecoder}
    if decoder not in decoders:
        raise ValueError(f"decoder must be one of {sorted(decoders)}, got {decoder!r}")
    encoder = BiGRUEncoder(input_dim, encoder_hidden_size, encoder_num_layers, encoder_dropout, encoder_input_dropout)
    if decoder_kwargs.get("memory_dim", encoder.output_dim) != encoder.output_dim:
        raise ValueError(
            f"memory_dim={decoder_kwargs['memory_dim']} does not match the encoder output size {encoder.output_dim}"
        )
    decoder_kwargs["memory_dim"] = encoder.output_dim
    return CaptionModel(encoder, decoders[decoder](vocab_size, **decoder_kwargs), scheduled_sampling=scheduled_sampling)
