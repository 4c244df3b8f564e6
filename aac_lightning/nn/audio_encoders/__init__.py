"""Audio encoders: the interface and encoding rule (:mod:`.base`), PANNs (:mod:`.panns`), AST
(:mod:`.ast`), the name registry (:mod:`.registry`) and the captioners' frozen extractor
(:mod:`.frozen`).

Imports go one way: ``base`` <- ``panns``, ``ast`` <- ``registry``; ``base`` <- ``frozen``.
"""

from aac_lightning.nn.audio_encoders.ast import AST, KaldiFbank, resize_patch_pos_embed
from aac_lightning.nn.audio_encoders.base import (
    AudioEncoder,
    check_waveform,
    encode_clips,
    load_checkpoint_file,
    load_third_party_state,
)
from aac_lightning.nn.audio_encoders.frozen import FrozenExtractor
from aac_lightning.nn.audio_encoders.panns import Cnn14, WavegramLogmelCnn14, masked_max_mean_pool
from aac_lightning.nn.audio_encoders.registry import AUDIO_ENCODER_NAMES, AUDIO_ENCODERS, load_audio_encoder

__all__ = [
    "AST",
    "AUDIO_ENCODERS",
    "AUDIO_ENCODER_NAMES",
    "AudioEncoder",
    "Cnn14",
    "FrozenExtractor",
    "KaldiFbank",
    "WavegramLogmelCnn14",
    "check_waveform",
    "encode_clips",
    "load_audio_encoder",
    "load_checkpoint_file",
    "load_third_party_state",
    "masked_max_mean_pool",
    "resize_patch_pos_embed",
]
