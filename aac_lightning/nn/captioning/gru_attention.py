"""The attentional GRU word decoder (one GRU layer, additive attention over the encoder memory)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aac_lightning.nn.captioning.common import DecodingState, uniform_

__all__ = ["GRUAttentionDecoder"]


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
        uniform_(self.attention_query.weight, fused_bound)
        uniform_(self.attention_key.weight, fused_bound)
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
