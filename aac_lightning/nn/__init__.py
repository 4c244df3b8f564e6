"""Plain torch modules (no Lightning): audio encoders (with the one encoding rule, `encode_clips`, and
the captioners' frozen extractor), text encoders, bi-encoder, captioner, decoding, losses."""

from aac_lightning.nn.audio_encoders import AudioEncoder, FrozenExtractor, encode_clips, load_audio_encoder
from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.nn.captioning import CaptionModel, build_caption_model
from aac_lightning.nn.contrastive import ContrastiveLoss, info_nce_loss
from aac_lightning.nn.decoding import beam_search, greedy_decode, sample_decode
from aac_lightning.nn.text_encoders import TextEncoder

__all__ = [
    "AudioEncoder",
    "BiEncoder",
    "CaptionModel",
    "ContrastiveLoss",
    "FrozenExtractor",
    "TextEncoder",
    "beam_search",
    "build_caption_model",
    "encode_clips",
    "greedy_decode",
    "info_nce_loss",
    "load_audio_encoder",
    "sample_decode",
]
