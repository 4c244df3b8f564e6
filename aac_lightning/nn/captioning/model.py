"""The full captioner (:class:`CaptionModel`: encoder + decoder, teacher forcing, scheduled sampling,
incremental decoding) and :func:`build_caption_model`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aac_lightning.nn.captioning.common import DecodingState, lengths_to_mask
from aac_lightning.nn.captioning.encoder import BiGRUEncoder
from aac_lightning.nn.captioning.gru_attention import GRUAttentionDecoder
from aac_lightning.nn.captioning.transformer import TransformerCaptionDecoder

__all__ = ["CaptionModel", "build_caption_model"]


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
