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

from aac_lightning.nn.captioning.common import DecodingState, check_features, lengths_to_mask
from aac_lightning.nn.captioning.encoder import BiGRUEncoder, EncoderOutput
from aac_lightning.nn.captioning.gru_attention import GRUAttentionDecoder
from aac_lightning.nn.captioning.model import CaptionModel, build_caption_model
from aac_lightning.nn.captioning.transformer import (
    TransformerCaptionDecoder,
    TransformerDecoderBlock,
    random_positional_table,
    sinusoidal_positional_encoding,
)

__all__ = [
    "BiGRUEncoder",
    "CaptionModel",
    "DecodingState",
    "EncoderOutput",
    "GRUAttentionDecoder",
    "TransformerCaptionDecoder",
    "TransformerDecoderBlock",
    "build_caption_model",
    "check_features",
    "lengths_to_mask",
    "random_positional_table",
    "sinusoidal_positional_encoding",
]
