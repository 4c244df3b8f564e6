"""Audio encoders by name: :data:`AUDIO_ENCODERS` and :func:`load_audio_encoder`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aac_lightning.nn.audio_encoders.ast import AST
from aac_lightning.nn.audio_encoders.base import AudioEncoder
from aac_lightning.nn.audio_encoders.panns import Cnn14, WavegramLogmelCnn14

__all__ = ["AUDIO_ENCODERS", "AUDIO_ENCODER_NAMES", "load_audio_encoder"]

# Name -> class; names are matched case-insensitively with "-" read as "_".
AUDIO_ENCODERS: dict[str, type[AudioEncoder]] = {
    "cnn14": Cnn14,
    "wavegram_logmel_cnn14": WavegramLogmelCnn14,
    "ast": AST,
}
ALIASES = {"wlcnn14": "wavegram_logmel_cnn14"}
AUDIO_ENCODER_NAMES = tuple(AUDIO_ENCODERS)


def load_audio_encoder(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> AudioEncoder:
    """Build the audio encoder called ``name`` and optionally load third-party weights.

    Args:
        name: ``"cnn14"``, ``"wavegram_logmel_cnn14"`` or ``"ast"``.
        checkpoint: path to an official checkpoint (PANNs ``.pth`` with a ``"model"`` entry, or an
            AudioSet-trained AST ``.pth``); None keeps the random initialisation.
        **kwargs: constructor arguments of the encoder class (e.g. ``channels`` for CNN14,
            ``embed_dim``/``depth`` for AST); ``trust_checkpoint`` (and, for AST,
            ``checkpoint_grid``) go to the encoder's ``load_pretrained``.
    """
    load_kwargs: dict[str, Any] = {"trust_checkpoint": bool(kwargs.pop("trust_checkpoint", False))}
    if "checkpoint_grid" in kwargs:  # AST only: patch grid of the checkpoint when it is ambiguous
        load_kwargs["checkpoint_grid"] = kwargs.pop("checkpoint_grid")
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in AUDIO_ENCODERS:
        raise ValueError(f"unknown audio encoder name {name!r}; expected one of {AUDIO_ENCODER_NAMES}")
    encoder = AUDIO_ENCODERS[key](**kwargs)
    if checkpoint is not None:
        encoder.load_pretrained(checkpoint, **load_kwargs)
    return encoder
