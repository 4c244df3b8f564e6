"""The Transformer word decoder (post-norm, causal, with cached keys/values for incremental decoding)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aac_lightning.nn.captioning.common import DecodingState, uniform_, xavier_bound

__all__ = [
    "TransformerCaptionDecoder",
    "TransformerDecoderBlock",
    "random_positional_table",
    "sinusoidal_positional_encoding",
]


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
        fused_bound = xavier_bound(d, 3 * d)  # nn.MultiheadAttention's (3d, d) in_proj_weight
        for layer in self.layers:
            uniform_(layer.self_qkv.weight, fused_bound)
            uniform_(layer.cross_query.weight, fused_bound)
            uniform_(layer.cross_key_value.weight, fused_bound)
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
