"""Bi-encoder for audio-text retrieval (report Sec. 2, eq. 5).

Audio and text are encoded separately, each projected by one linear layer into a shared
``embed_dim`` space and L2-normalised, so that their dot product is the cosine similarity. A
trainable temperature ``tau`` scales the similarities in the contrastive loss; it is stored as
``log_logit_scale = log(1 / tau)`` so that the optimiser works on a well-conditioned, unbounded
parameter and ``1 / tau`` stays positive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aac_lightning.nn.audio_encoders.base import encode_clips


def _positive_int_attribute(module: nn.Module, argument: str, attribute: str) -> int:
    value = getattr(module, attribute, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TypeError(
            f"{argument} ({type(module).__name__}) must expose a positive int attribute "
            f"`{attribute}`, got {value!r}"
        )
    return value


class BiEncoder(nn.Module):
    """Audio encoder + text encoder + one linear projection each + trainable temperature.

    Args:
        audio_encoder: module with ``forward(waveform (B, T), lengths (B,) | None)`` returning a
            mapping with ``"clip"`` ``(B, clip_dim)``, and an int attribute ``clip_dim``.
        text_encoder: module with ``forward(texts: list[str]) -> (B, embed_dim)`` and an int
            attribute ``embed_dim``.
        embed_dim: size of the shared embedding space.
        init_temperature: initial ``tau``; the logit scale starts at ``1 / tau``.
        max_logit_scale: upper bound of the logit scale ``1 / tau``.

    Temperature bound: the logit scale is clamped in two places, on purpose.
    :attr:`logit_scale` returns ``exp(log_logit_scale)`` clamped to ``max_logit_scale``, so the
    scale used in a loss never exceeds the bound whatever the training loop does. The training loop
    should also call :meth:`clamp_logit_scale` after every optimiser step: it clamps the parameter's
    data, so that the parameter never drifts above the bound, where the clamp in
    :attr:`logit_scale` would cut its gradient (Adam's momentum keeps moving a parameter whose
    gradient is zero) and it could no longer come back. At the bound itself the gradient still
    flows, so the scale can move down again.
    """

    def __init__(
        self,
        audio_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int = 1024,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        audio_dim = _positive_int_attribute(audio_encoder, "audio_encoder", "clip_dim")
        text_dim = _positive_int_attribute(text_encoder, "text_encoder", "embed_dim")
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature!r}")
        if 1.0 / init_temperature > max_logit_scale:
            raise ValueError(
                f"init_temperature={init_temperature} gives a logit scale 1/tau = "
                f"{1.0 / init_temperature:.4g} above max_logit_scale={max_logit_scale}"
            )
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.max_logit_scale = float(max_logit_scale)
        self.audio_projection = nn.Linear(audio_dim, embed_dim)
        self.text_projection = nn.Linear(text_dim, embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def logit_scale(self) -> torch.Tensor:
        """``1 / tau`` as a scalar tensor, clamped to ``max_logit_scale`` (gradient flows below
        and at the bound)."""
        # clamp in log space, against the same bound as clamp_logit_scale(): a parameter sitting
        # exactly on the bound then passes the (inclusive) clamp and keeps its gradient, which
        # exp() rounding could otherwise push a hair over the bound and cut
        return self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    @property
    def temperature(self) -> float:
        """Current temperature ``tau`` (a plain float, for logging)."""
        return float(1.0 / self.logit_scale.detach())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the parameter in place to ``log(max_logit_scale)``; call after each optimiser step."""
        self.log_logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def no_weight_decay_parameter_names(self, prefix: str = "") -> list[str]:
        """Names of parameters to exclude from weight decay (the temperature), as
        ``named_parameters()`` of the module holding this one spells them given ``prefix``
        (e.g. ``prefix="model."`` when this bi-encoder is the attribute ``model``)."""
        return [f"{prefix}log_logit_scale"]

    def encode_audio(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embed audio clips: ``waveform (B, T)``, optional ``lengths (B,)`` -> ``(B, embed_dim)``, unit norm.

        Each clip is embedded as if alone (:func:`~aac_lightning.nn.audio_encoders.encode_clips`:
        rows grouped by length, padding never reaches the encoder), so an embedding does not
        depend on the batch; this is the path of evaluation, inference and search. Training
        (:meth:`forward`) encodes its crops as one batch instead.
        """
        return self._project_audio(encode_clips(self.audio_encoder, waveform, lengths))

    def _project_audio(self, outputs: object) -> torch.Tensor:
        """The audio encoder's output mapping -> projected, unit-norm clip embeddings ``(B, E)``."""
        if not isinstance(outputs, Mapping) or "clip" not in outputs:
            raise TypeError(
                f"audio_encoder ({type(self.audio_encoder).__name__}) must return a mapping with key "
                f"'clip', got {type(outputs).__name__}"
            )
        projected = self.audio_projection(outputs["clip"])  # (B, E)
        return F.normalize(projected, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts: ``B`` strings -> ``(B, embed_dim)``, unit norm."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        projected = self.text_projection(self.text_encoder(list(texts)))  # (B, E)
        return F.normalize(projected, dim=-1)

    @staticmethod
    def similarity(audio_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every audio with every text: ``(A, E), (T, E) -> (A, T)``.

        Inputs are normalised here too, so any embeddings give a true cosine.
        """
        if audio_emb.ndim != 2 or text_emb.ndim != 2 or audio_emb.shape[1] != text_emb.shape[1]:
            raise ValueError(
                f"similarity needs (A, E) and (T, E) embeddings, got {tuple(audio_emb.shape)} and "
                f"{tuple(text_emb.shape)}"
            )
        return F.normalize(audio_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (A, T)

    def forward(
        self,
        waveform: torch.Tensor,
        texts: Sequence[str],
        lengths: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed a batch of pairs (row i of audio and text belong together).

        Returns ``{"audio_emb": (B, E), "text_emb": (B, E), "logit_scale": ()}``; one call does
        both modalities so that a DistributedDataParallel wrapper sees every parameter used.
        The training path: the audio batch goes through the encoder as it is, in one call (training
        crops share a length), unlike :meth:`encode_audio`.
        """
        audio_emb = self._project_audio(self.audio_encoder(waveform, lengths))  # (B, E)
        text_emb = self.encode_text(texts)
        if audio_emb.shape[0] != text_emb.shape[0]:
            raise ValueError(
                f"got {audio_emb.shape[0]} waveforms but {text_emb.shape[0]} texts: a batch of pairs "
                "needs as many of each"
            )
        return {"audio_emb": audio_emb, "text_emb": text_emb, "logit_scale": self.logit_scale}
