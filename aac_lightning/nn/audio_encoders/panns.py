"""PANNs CNN14 and Wavegram-Logmel-CNN14 (Kong et al., 2020) as audio encoders.

The layers, their order and their names follow the PANNs reference models, so that the official
AudioSet checkpoints (``torch.load(path)["model"]``) load with a strict key check; only the AudioSet
classifier ``fc_audioset.*`` is dropped, because an encoder has no use for it. Channel widths, the
sample rate and the STFT settings are arguments so that small models can be built (tests, CPU demo);
the defaults are the paper's (32 kHz, 1024-point window, hop 320, 64 mel bins, 50-14000 Hz).

Front end: ``torchlibrosa`` STFT (Hann window, centred, reflect padding) and log-mel filter bank, both
frozen; BatchNorm over the mel bins (``bn0``); SpecAugment (two time stripes up to 64 frames, two
frequency stripes up to 8 bins) in training only, when ``spec_augment=True`` (the default, PANNs' own
training recipe). The SJTU authors trained their retrieval models without it (``specaug=False`` in
``models/audio_encoder.py`` of wsntxxn/DCASE2022T6_CLAP): the SJTU retrieval configs set
``audio_encoder_kwargs: {spec_augment: false}``. Their front end (torchaudio ``MelSpectrogram`` with
slaney mel filters and ``AmplitudeToDB``) gives the same log-mel as this one (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchlibrosa.augmentation import SpecAugmentation
from torchlibrosa.stft import LogmelFilterBank, Spectrogram

from aac_lightning.nn.audio_encoders.base import (
    AudioEncoder,
    check_num_frames,
    check_waveform,
    clamp_to_duration,
    load_checkpoint_file,
    load_third_party_state,
)

__all__ = ["ConvBlock", "ConvPreWavBlock", "Cnn14", "WavegramLogmelCnn14", "masked_max_mean_pool"]

# Official head that encoders drop: its keys are accepted in a checkpoint and ignored.
AUDIOSET_HEAD_PREFIX = "fc_audioset."
# Five 2x2 average poolings between the log-mel frames and the last conv block.
TIME_DOWNSAMPLING = 32


def _init_layer(layer: nn.Module) -> None:
    """Xavier-uniform weights and zero bias, as the reference initialisation."""
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def _init_bn(bn: nn.Module) -> None:
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class ConvBlock(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU layers followed by 2-D pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for conv in (self.conv1, self.conv2):
            _init_layer(conv)
        for bn in (self.bn1, self.bn2):
            _init_bn(bn)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
        """(B, C_in, T, F) -> (B, C_out, T / pool_t, F / pool_f), average pooling."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class ConvPreWavBlock(nn.Module):
    """Wavegram block: 1-D conv (k3) and dilated 1-D conv (k3, dilation 2), each BN + ReLU, max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv2 = nn.Conv1d(
            out_channels, out_channels, kernel_size=3, stride=1, dilation=2, padding=2, bias=False
        )
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.bn2 = nn.BatchNorm1d(out_channels)
        for conv in (self.conv1, self.conv2):
            _init_layer(conv)
        for bn in (self.bn1, self.bn2):
            _init_bn(bn)

    def forward(self, x: torch.Tensor, pool_size: int) -> torch.Tensor:
        """(B, C_in, L) -> (B, C_out, L / pool_size)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool1d(x, kernel_size=pool_size)


def masked_max_mean_pool(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """PANNs clip pooling ``max_t x + mean_t x`` over the first ``lengths`` frames.

    ``x``: (B, C, T); ``lengths``: (B,) valid frame counts in [1, T], or None for all frames.
    Returns (B, C).
    """
    if lengths is None:
        return x.max(dim=2).values + x.mean(dim=2)
    valid = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    valid = valid[:, None, :]  # (B, 1, T)
    max_pooled = x.masked_fill(~valid, float("-inf")).max(dim=2).values  # (B, C)
    mean_pooled = (x * valid).sum(dim=2) / lengths[:, None].to(x.dtype)  # (B, C)
    return max_pooled + mean_pooled


def _check_channels(channels: Sequence[int], count: int, argument: str) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if len(channels) != count or any(c <= 0 for c in channels):
        raise ValueError(f"{argument} must be {count} positive integers, got {channels}")
    return channels


class _PannsEncoder(AudioEncoder):
    """Log-mel front end, the six CNN14 conv blocks, fc1 and the shared output logic."""

    def __init__(
        self,
        sample_rate: int,
        window_size: int,
        hop_size: int,
        mel_bins: int,
        fmin: float,
        fmax: float,
        channels: Sequence[int],
        embed_dim: int,
        spec_augment: bool,
        dropout: float,
        fc_dropout: float,
        concat_wavegram: bool = False,
    ) -> None:
        super().__init__()
        if sample_rate <= 0 or window_size <= 0 or hop_size <= 0:
            raise ValueError(
                f"sample_rate, window_size and hop_size must be positive, got "
                f"{sample_rate}, {window_size}, {hop_size}"
            )
        if mel_bins < TIME_DOWNSAMPLING:
            # Five halvings of the mel axis must leave at least one bin.
            raise ValueError(f"mel_bins must be at least {TIME_DOWNSAMPLING}, got {mel_bins}")
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                f"sample_rate={sample_rate}"
            )
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        channels = _check_channels(channels, 6, "channels")
        self.sample_rate = int(sample_rate)
        self.hop_size = int(hop_size)
        self.window_size = int(window_size)
        self.mel_bins = int(mel_bins)
        self.dropout = float(dropout)
        self.fc_dropout = float(fc_dropout)
        self.clip_dim = int(embed_dim)
        self.frame_dim = channels[-1]

        self.spectrogram_extractor = Spectrogram(
            n_fft=window_size, hop_length=hop_size, win_length=window_size, window="hann",
            center=True, pad_mode="reflect", freeze_parameters=True,
        )
        self.logmel_extractor = LogmelFilterBank(
            sr=sample_rate, n_fft=window_size, n_mels=mel_bins, fmin=fmin, fmax=fmax,
            ref=1.0, amin=1e-10, top_db=None, freeze_parameters=True,
        )
        self.spec_augmenter = (
            SpecAugmentation(time_drop_width=64, time_stripes_num=2, freq_drop_width=8, freq_stripes_num=2)
            if spec_augment
            else None
        )
        self.bn0 = nn.BatchNorm2d(mel_bins)
        # Wavegram-Logmel concatenates the wavegram (as many channels as block 1) before block 2.
        in_channels = (1, channels[0] * (2 if concat_wavegram else 1), *channels[1:5])
        for index, (c_in, c_out) in enumerate(zip(in_channels, channels), start=1):
            setattr(self, f"conv_block{index}", ConvBlock(c_in, c_out))
        self.fc1 = nn.Linear(channels[-1], embed_dim, bias=True)
        _init_bn(self.bn0)
        _init_layer(self.fc1)

    # Padding rules shared by both models.
    def _min_samples(self) -> int:
        # At least 65 log-mel frames: five poolings leave one frame and SpecAugment's time stripes
        # (up to 63 frames wide) always fit.
        return 64 * self.hop_size

    def _pad(self, waveform: torch.Tensor) -> torch.Tensor:
        target = max(waveform.shape[1], self._min_samples())
        return F.pad(waveform, (0, target - waveform.shape[1])) if target > waveform.shape[1] else waveform

    def frame_lengths_from(self, lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Valid output frames for valid sample ``lengths`` (B,), clamped to [1, num_frames].

        A clip of ``l`` samples has ``l // hop + 1`` log-mel frames (centred STFT); an output frame
        pools 32 log-mel frames and counts as valid when any of them is valid (ceiling division).
        """
        logmel_frames = torch.div(lengths, self.hop_size, rounding_mode="floor") + 1
        frames = torch.div(logmel_frames + TIME_DOWNSAMPLING - 1, TIME_DOWNSAMPLING, rounding_mode="floor")
        return frames.clamp(min=1, max=num_frames)

    def logmel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) -> normalised (and, in training, SpecAugmented) log-mel (B, 1, T, mel_bins)."""
        # Float32 even under mixed precision: the power spectrum and the 1e-10 floor of the log
        # under- and overflow in float16.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            x = self.spectrogram_extractor(waveform.float())  # (B, 1, T, n_fft / 2 + 1)
            x = self.logmel_extractor(x)  # (B, 1, T, mel_bins)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over mel bins
        if self.training and self.spec_augmenter is not None:
            x = self.spec_augmenter(x)
        return x

    def _trunk_from_block2(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C1', T/2, F/2) after block 1 -> (B, C6, T/32, F/32) after block 6."""
        for index in range(2, 6):
            x = F.dropout(x, p=self.dropout, training=self.training)
            x = getattr(self, f"conv_block{index}")(x, pool_size=(2, 2))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.conv_block6(x, pool_size=(1, 1))
        return F.dropout(x, p=self.dropout, training=self.training)

    def _outputs(
        self, x: torch.Tensor, lengths: torch.Tensor, lengths_given: bool
    ) -> dict[str, torch.Tensor]:
        """Conv-block-6 output (B, C6, T', F') -> clip / frames / frame_lengths."""
        x = x.mean(dim=3)  # (B, C6, T') frequency average
        frames = x.transpose(1, 2)  # (B, T', C6)
        frame_lengths = self.frame_lengths_from(lengths, x.shape[2])  # (B,)
        pooled = masked_max_mean_pool(x, frame_lengths if lengths_given else None)  # (B, C6)
        pooled = F.dropout(pooled, p=self.fc_dropout, training=self.training)
        clip = F.relu(self.fc1(pooled))  # (B, embed_dim)
        clip = F.dropout(clip, p=self.fc_dropout, training=self.training)
        return {"clip": clip, "frames": frames, "frame_lengths": frame_lengths}

    def frame_times(self, num_frames: int, num_samples: int | None = None) -> torch.Tensor:
        """Centre time (s) of each output frame, ``(num_frames,)`` float64.

        Log-mel frame ``k`` of the centred STFT is centred on sample ``k * hop``; output frame ``i``
        pools log-mel frames ``32 i .. 32 i + 31``, so its centre is ``(32 i + 15.5) * hop / sr``.
        """
        index = torch.arange(check_num_frames(num_frames), dtype=torch.float64)
        centres = (index * TIME_DOWNSAMPLING + (TIME_DOWNSAMPLING - 1) / 2) * self.hop_size / self.sample_rate
        return clamp_to_duration(centres, self.sample_rate, num_samples)

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """``relu(fc1(2 h))`` per frame: (..., T', C6) -> (..., T', clip_dim), no dropout.

        The clip embedding is ``relu(fc1(max_t h + mean_t h))``; for a frame ``h`` this is the clip
        embedding of a clip whose every frame is ``h`` (``max + mean`` of a constant sequence is
        ``2 h``), so a one-frame clip's frame embedding equals its clip embedding exactly.
        """
        return F.relu(self.fc1(2.0 * frames))

    def load_pretrained(self, checkpoint: str | Path, trust_checkpoint: bool = False) -> None:
        """Load an official PANNs checkpoint (``{"model": state_dict, ...}``) strictly.

        The AudioSet classifier ``fc_audioset.*`` is ignored; any other missing or unexpected key
        or shape mismatch raises a ValueError (:class:`~aac_lightning.checkpoints.HandoffError`)
        naming it. A bare state dict (no ``"model"`` entry) is accepted too.
        """
        content = load_checkpoint_file(checkpoint, trust_checkpoint=trust_checkpoint)
        state_dict = content.get("model", content) if isinstance(content, dict) else None
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"checkpoint {checkpoint} is not a PANNs checkpoint: expected a dict with a 'model' "
                f"state dict, got {type(content).__name__}"
            )
        load_third_party_state(
            self, state_dict, source=f"PANNs checkpoint '{checkpoint}'", ignore_prefixes=(AUDIOSET_HEAD_PREFIX,)
        )


class Cnn14(_PannsEncoder):
    """PANNs CNN14 audio encoder.

    Outputs (eval mode, ``lengths=None``):

    - ``clip`` (B, embed_dim): the reference model's ``embedding``: ``relu(fc1(max_t h + mean_t h))``
      where ``h`` (B, C6, T') is the frequency-averaged output of ``conv_block6``; in training,
      dropout 0.5 before fc1 and after the ReLU as the reference.
    - ``frames`` (B, T', C6): ``h`` transposed, i.e. conv block 6 output (after its 0.2 dropout in
      training) averaged over frequency, before time pooling and fc1. ``T' = (L // hop + 1) // 32``.
    - ``frame_lengths`` (B,): see :meth:`frame_lengths_from`; all ``T'`` when ``lengths`` is None.

    When ``lengths`` is given, the max and mean over time ignore frames beyond ``frame_lengths``
    (the convolutions still see the zero padding, as in batch training of the reference model).
    Waveforms shorter than ``64 * hop_size`` samples are zero-padded to that length.
    """

    def __init__(
        self,
        sample_rate: int = 32000,
        window_size: int = 1024,
        hop_size: int = 320,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
        embed_dim: int = 2048,
        spec_augment: bool = True,
        dropout: float = 0.2,
        fc_dropout: float = 0.5,
    ) -> None:
        super().__init__(
            sample_rate, window_size, hop_size, mel_bins, fmin, fmax, channels, embed_dim,
            spec_augment, dropout, fc_dropout,
        )

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``waveform`` (B, L) at ``sample_rate``, ``lengths`` (B,) samples -> clip/frames/frame_lengths."""
        lengths_given = lengths is not None
        waveform, lengths = check_waveform(waveform, lengths)
        x = self.logmel(self._pad(waveform))  # (B, 1, T, mel)
        x = self.conv_block1(x, pool_size=(2, 2))  # (B, C1, T/2, mel/2)
        x = self._trunk_from_block2(x)  # (B, C6, T/32, mel/32)
        return self._outputs(x, lengths, lengths_given)


class WavegramLogmelCnn14(_PannsEncoder):
    """PANNs Wavegram-Logmel-CNN14 audio encoder.

    A learned "wavegram" branch (strided 1-D convs on the waveform, folded into
    ``mel_bins / 2`` pseudo-frequency bins) is concatenated on the channel axis with the log-mel
    branch after conv block 1; the rest is CNN14. Outputs are defined as for :class:`Cnn14`.

    The two branches only line up in time for waveform lengths that are multiples of
    ``2 * hop_size`` samples (640 at the defaults): the wavegram has ``L / hop`` frames before its
    2x pooling, the centred STFT ``L / hop + 1``. Inputs are therefore zero-padded to the next such
    multiple (and to at least ``64 * hop_size``); ``frame_lengths`` come from the true lengths.
    The wavegram's first conv has stride ``hop_size / 64`` (5 at the defaults), so ``hop_size``
    must be a multiple of 64.
    """

    def __init__(
        self,
        sample_rate: int = 32000,
        window_size: int = 1024,
        hop_size: int = 320,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
        embed_dim: int = 2048,
        spec_augment: bool = True,
        dropout: float = 0.2,
        fc_dropout: float = 0.5,
        wavegram_channels: Sequence[int] = (64, 64, 128, 128),
    ) -> None:
        super().__init__(
            sample_rate, window_size, hop_size, mel_bins, fmin, fmax, channels, embed_dim,
            spec_augment, dropout, fc_dropout, concat_wavegram=True,
        )
        if hop_size % 64 != 0:
            # Three 4x max-poolings after the strided conv: the wavegram hop is 64 * stride.
            raise ValueError(f"WavegramLogmelCnn14 needs hop_size to be a multiple of 64, got {hop_size}")
        wavegram_channels = _check_channels(wavegram_channels, 4, "wavegram_channels")
        self.wavegram_bins = mel_bins // 2  # frequency size of the log-mel branch after block 1
        if wavegram_channels[3] % self.wavegram_bins != 0:
            raise ValueError(
                f"wavegram_channels[3] ({wavegram_channels[3]}) must be a multiple of mel_bins / 2 "
                f"({self.wavegram_bins}) to fold the wavegram into frequency bins"
            )
        stride = hop_size // 64
        self.pre_conv0 = nn.Conv1d(1, wavegram_channels[0], kernel_size=11, stride=stride, padding=5, bias=False)
        self.pre_bn0 = nn.BatchNorm1d(wavegram_channels[0])
        self.pre_block1 = ConvPreWavBlock(wavegram_channels[0], wavegram_channels[1])
        self.pre_block2 = ConvPreWavBlock(wavegram_channels[1], wavegram_channels[2])
        self.pre_block3 = ConvPreWavBlock(wavegram_channels[2], wavegram_channels[3])
        self.pre_block4 = ConvBlock(wavegram_channels[3] // self.wavegram_bins, channels[0])
        _init_layer(self.pre_conv0)
        _init_bn(self.pre_bn0)

    def _pad(self, waveform: torch.Tensor) -> torch.Tensor:
        multiple = 2 * self.hop_size
        target = max(waveform.shape[1], self._min_samples())
        target = -(-target // multiple) * multiple  # next multiple of 2 * hop
        return F.pad(waveform, (0, target - waveform.shape[1])) if target > waveform.shape[1] else waveform

    def wavegram(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) with L a multiple of 2 * hop -> (B, C1, L / (2 hop), mel_bins / 2)."""
        a = F.relu(self.pre_bn0(self.pre_conv0(waveform[:, None, :])))  # (B, W0, L / stride)
        a = self.pre_block1(a, pool_size=4)  # (B, W1, L / (4 stride))
        a = self.pre_block2(a, pool_size=4)  # (B, W2, L / (16 stride))
        a = self.pre_block3(a, pool_size=4)  # (B, W3, L / hop)
        a = a.reshape(a.shape[0], -1, self.wavegram_bins, a.shape[-1]).transpose(2, 3)  # (B, W3/F, L/hop, F)
        return self.pre_block4(a, pool_size=(2, 1))  # (B, C1, L / (2 hop), F)

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``waveform`` (B, L) at ``sample_rate``, ``lengths`` (B,) samples -> clip/frames/frame_lengths."""
        lengths_given = lengths is not None
        waveform, lengths = check_waveform(waveform, lengths)
        waveform = self._pad(waveform)
        wave_branch = self.wavegram(waveform)  # (B, C1, T/2, mel/2)
        x = self.logmel(waveform)  # (B, 1, T + 1, mel)
        x = self.conv_block1(x, pool_size=(2, 2))  # (B, C1, T/2, mel/2)
        if x.shape[2:] != wave_branch.shape[2:]:  # guarded by _pad; kept as a clear failure
            raise RuntimeError(
                f"wavegram {tuple(wave_branch.shape)} and log-mel {tuple(x.shape)} branches do not line up"
            )
        x = torch.cat((x, wave_branch), dim=1)  # (B, 2 C1, T/2, mel/2)
        x = self._trunk_from_block2(x)  # (B, C6, T/32, mel/32)
        return self._outputs(x, lengths, lengths_given)
