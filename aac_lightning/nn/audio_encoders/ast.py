"""Audio Spectrogram Transformer (Gong et al., 2021) as an audio encoder.

The transformer is timm's DeiT with a distillation token (``VisionTransformerDistilled``) held under
the attribute ``v``, as in the reference ``ASTModel``, so the AudioSet-trained checkpoints
(a ``DataParallel`` state dict with ``module.v.*`` keys) map onto it directly.

Input features follow the reference data pipeline: the clip's mean is removed, then a Kaldi-style
log-mel filter bank (25 ms Hann window, 10 ms shift, 128 bins, pre-emphasis 0.97, per-frame DC
removal, 512-point FFT, power spectrum, 20 Hz to Nyquist) at 16 kHz; the fbank is zero-padded or
cut to ``target_length`` frames and normalised as ``(fbank - mean) / (2 * std)`` with the AudioSet
statistics. The filter bank is computed batched on the encoder's device by :class:`KaldiFbank`.

Patches are 16x16 with a stride of 16 on both axes by default (the SJTU system's setting, to save
memory); the AudioSet checkpoints were trained with stride 10 (a 12 x 101 patch grid for 1024
frames), so :meth:`AST.load_pretrained` resizes their patch position embeddings to the new grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aac_lightning.nn.audio_encoders.base import (
    AudioEncoder,
    check_num_frames,
    check_waveform,
    clamp_to_duration,
    load_checkpoint_file,
    load_third_party_state,
)

__all__ = ["AST", "KaldiFbank", "kaldi_mel_banks", "resize_patch_pos_embed", "AUDIOSET_MEAN", "AUDIOSET_STD"]

AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
NUM_PREFIX_TOKENS = 2  # CLS and distillation tokens


def _mel(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's (HTK) mel scale."""
    return 1127.0 * torch.log1p(freq / 700.0)


def kaldi_mel_banks(
    num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Kaldi's triangular mel filters, (num_bins, padded_window_size // 2 + 1), float64.

    Triangles are equally spaced on the mel scale between ``low_freq`` and ``high_freq``
    (``high_freq <= 0`` means Nyquist + high_freq); the Nyquist FFT bin gets no weight, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= Nyquist, got {low_freq}, {high_freq}, {nyquist}")
    num_fft_bins = padded_window_size // 2
    mel_low, mel_high = _mel(torch.tensor(low_freq, dtype=torch.float64)), _mel(
        torch.tensor(high_freq, dtype=torch.float64)
    )
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float64)  # (num_bins + 2,)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (num_bins, 1)
    bin_mel = _mel(sample_rate / padded_window_size * torch.arange(num_fft_bins, dtype=torch.float64))[None]
    rising = (bin_mel - left) / (center - left)  # (num_bins, num_fft_bins)
    falling = (right - bin_mel) / (right - center)
    banks = torch.minimum(rising, falling).clamp(min=0.0)
    return F.pad(banks, (0, 1))  # no weight on the Nyquist bin


class KaldiFbank(nn.Module):
    """Batched Kaldi-compatible log-mel filter bank as used by AST, with AST's padding/normalisation.

    ``forward(waveform (B, L), lengths (B,))`` returns the normalised fbank (B, target_length,
    num_mel_bins) and the number of valid fbank frames (B,). Each clip is processed as if alone:
    its mean is taken over its own ``lengths`` samples, its frames beyond ``1 + (l - win) // shift``
    are zero (the reference pads the fbank with zeros), then everything is normalised.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        preemphasis: float = 0.97,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        norm_mean: float = AUDIOSET_MEAN,
        norm_std: float = AUDIOSET_STD,
    ) -> None:
        super().__init__()
        self.window_size = int(sample_rate * frame_length_ms * 0.001)
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        if self.window_size <= 0 or self.window_shift <= 0:
            raise ValueError(
                f"window and shift must be at least one sample, got {self.window_size}, {self.window_shift}"
            )
        if target_length <= 0:
            raise ValueError(f"target_length must be positive, got {target_length}")
        if norm_std <= 0:
            raise ValueError(f"norm_std must be positive, got {norm_std}")
        self.padded_window_size = 1 << (self.window_size - 1).bit_length()  # next power of two
        self.target_length = int(target_length)
        self.preemphasis = float(preemphasis)
        self.norm_mean = float(norm_mean)
        self.norm_std = float(norm_std)
        # Not persistent: derived from the arguments, so checkpoints stay free of them.
        self.register_buffer("window", torch.hann_window(self.window_size, periodic=False), persistent=False)
        banks = kaldi_mel_banks(num_mel_bins, self.padded_window_size, sample_rate, low_freq, high_freq)
        self.register_buffer("mel_banks", banks.float(), persistent=False)  # (M, n_fft / 2 + 1)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Kaldi frame count with ``snip_edges``: ``1 + (l - win) // shift``, 0 when ``l < win``."""
        frames = torch.div(lengths - self.window_size, self.window_shift, rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L), (B,) -> normalised fbank (B, target_length, M), valid frames (B,) before cutting."""
        batch_size, num_samples = waveform.shape
        sample_index = torch.arange(num_samples, device=waveform.device)
        valid = (sample_index[None, :] < lengths[:, None]).to(waveform.dtype)  # (B, L)
        mean = (waveform * valid).sum(dim=1, keepdim=True) / lengths[:, None].to(waveform.dtype)
        waveform = (waveform - mean) * valid  # (B, L) clip mean removed, padding kept at zero
        if num_samples < self.window_size:
            waveform = F.pad(waveform, (0, self.window_size - num_samples))
        frames = waveform.unfold(1, self.window_size, self.window_shift)  # (B, N, win)
        frames = frames - frames.mean(dim=2, keepdim=True)  # per-frame DC offset removal
        previous = torch.cat((frames[:, :, :1], frames[:, :, :-1]), dim=2)  # (B, N, win)
        frames = (frames - self.preemphasis * previous) * self.window  # pre-emphasis, Hann window
        spectrum = torch.fft.rfft(frames, n=self.padded_window_size).abs().pow(2)  # (B, N, n_fft/2 + 1)
        fbank = spectrum @ self.mel_banks.T  # (B, N, M)
        fbank = fbank.clamp(min=torch.finfo(torch.float32).eps).log()
        num_valid = self.num_frames(lengths)  # (B,)
        frame_index = torch.arange(fbank.shape[1], device=fbank.device)
        fbank = fbank * (frame_index[None, :] < num_valid[:, None])[..., None]  # zero beyond each clip
        if fbank.shape[1] >= self.target_length:
            fbank = fbank[:, : self.target_length]
        else:
            fbank = F.pad(fbank, (0, 0, 0, self.target_length - fbank.shape[1]))
        return (fbank - self.norm_mean) / (2.0 * self.norm_std), num_valid  # (B, T, M), (B,)


def resize_patch_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int = 2
) -> torch.Tensor:
    """Resize ViT position embeddings from one patch grid to another.

    ``pos_embed``: (1, prefix + F_old * T_old, D), patches in (frequency, time) row-major order.
    The prefix (CLS/distillation) embeddings are kept; the patch embeddings are bilinearly
    interpolated over the 2-D grid with ``align_corners=True``, so the corner patches keep their
    embeddings and an embedding that is linear in the patch indices stays linear.
    Returns (1, prefix + F_new * T_new, D).
    """
    old_f, old_t = old_grid
    new_f, new_t = new_grid
    dim = pos_embed.shape[-1]
    if pos_embed.shape[:2] != (1, num_prefix_tokens + old_f * old_t):
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit a {old_f}x{old_t} grid "
            f"with {num_prefix_tokens} prefix tokens"
        )
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if (old_f, old_t) == (new_f, new_t):
        return pos_embed.clone()
    grid = patches.reshape(1, old_f, old_t, dim).permute(0, 3, 1, 2)  # (1, D, F_old, T_old)
    grid = F.interpolate(grid.float(), size=(new_f, new_t), mode="bilinear", align_corners=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_f * new_t, dim).to(pos_embed.dtype)
    return torch.cat((prefix, patches), dim=1)


def _grid_size(size: int, patch: int, stride: int) -> int:
    return (size - patch) // stride + 1


class AST(AudioEncoder):
    """Audio Spectrogram Transformer encoder (DeiT-base with distillation token by default).

    Outputs:

    - ``clip`` (B, embed_dim): mean of the CLS and distillation token outputs (after the final
      LayerNorm), as AST feeds its classifier.
    - ``frames`` (B, T', embed_dim): patch token outputs averaged over the frequency patches,
      ``T' = (target_length - 16) // tstride + 1`` (64 at the defaults).
    - ``frame_lengths`` (B,): patches covering at least one valid fbank frame,
      ``ceil(n_valid / tstride)`` clamped to [1, T'].

    Attention is not masked: like the reference model, padded (zero-fbank) frames take part.
    Waveforms are expected at ``sample_rate`` (16 kHz), the data side resamples to it.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        mel_bins: int = 128,
        target_length: int = 1024,
        patch_size: int = 16,
        fstride: int = 16,
        tstride: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_mean: float = AUDIOSET_MEAN,
        norm_std: float = AUDIOSET_STD,
    ) -> None:
        super().__init__()
        from timm.models.deit import VisionTransformerDistilled

        if min(patch_size, fstride, tstride) <= 0:
            raise ValueError(f"patch_size and strides must be positive, got {patch_size}, {fstride}, {tstride}")
        if mel_bins < patch_size or target_length < patch_size:
            raise ValueError(
                f"mel_bins ({mel_bins}) and target_length ({target_length}) must be at least patch_size ({patch_size})"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.sample_rate = int(sample_rate)
        self.clip_dim = self.frame_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.tstride = int(tstride)
        self.fbank = KaldiFbank(
            sample_rate=sample_rate, num_mel_bins=mel_bins, target_length=target_length,
            norm_mean=norm_mean, norm_std=norm_std,
        )
        self.v = VisionTransformerDistilled(
            img_size=(mel_bins, target_length), patch_size=patch_size, in_chans=1, num_classes=0,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.grid = (_grid_size(mel_bins, patch_size, fstride), _grid_size(target_length, patch_size, tstride))
        if (fstride, tstride) != (patch_size, patch_size):
            # Overlapping patches (the reference's stride 10): replace timm's stride=patch projection.
            patch_embed = self.v.patch_embed
            patch_embed.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=(fstride, tstride))
            patch_embed.grid_size = self.grid
            patch_embed.num_patches = self.grid[0] * self.grid[1]
            self.v.pos_embed = nn.Parameter(
                torch.zeros(1, NUM_PREFIX_TOKENS + patch_embed.num_patches, embed_dim)
            )
            nn.init.trunc_normal_(self.v.pos_embed, std=0.02)

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``waveform`` (B, L) at 16 kHz, ``lengths`` (B,) samples -> clip/frames/frame_lengths."""
        waveform, lengths = check_waveform(waveform, lengths)
        with torch.autocast(device_type=waveform.device.type, enabled=False):  # float32 features
            fbank, num_valid = self.fbank(waveform.float(), lengths)  # (B, T, M), (B,)
        x = fbank.transpose(1, 2)[:, None]  # (B, 1, M, T): frequency as image height
        tokens = self.v.forward_features(x)  # (B, 2 + F' * T', D)
        clip = (tokens[:, 0] + tokens[:, 1]) / 2  # (B, D)
        patches = tokens[:, NUM_PREFIX_TOKENS:].reshape(x.shape[0], self.grid[0], self.grid[1], -1)
        frames = patches.mean(dim=1)  # (B, T', D) average over frequency patches
        frame_lengths = torch.div(num_valid + self.tstride - 1, self.tstride, rounding_mode="floor")
        frame_lengths = frame_lengths.clamp(min=1, max=self.grid[1])
        return {"clip": clip, "frames": frames, "frame_lengths": frame_lengths}

    def frame_times(self, num_frames: int, num_samples: int | None = None) -> torch.Tensor:
        """Centre time (s) of each output frame, ``(num_frames,)`` float64.

        Kaldi fbank frame ``k`` covers samples ``[k * shift, k * shift + window)`` (centre
        ``k * shift + window / 2``); output frame ``i`` covers fbank frames ``i * tstride`` to
        ``i * tstride + patch - 1``, centred on fbank frame ``i * tstride + (patch - 1) / 2``.
        """
        index = torch.arange(check_num_frames(num_frames), dtype=torch.float64)
        fbank_frame = index * self.tstride + (self.patch_size - 1) / 2
        centres = (fbank_frame * self.fbank.window_shift + self.fbank.window_size / 2) / self.sample_rate
        return clamp_to_duration(centres, self.sample_rate, num_samples)

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames themselves: (..., T', D) -> (..., T', D).

        Frames are patch tokens after the final LayerNorm, in the same space as the CLS and
        distillation tokens whose mean is the clip embedding; no layer sits between them.
        """
        return frames

    def load_pretrained(
        self,
        checkpoint: str | Path,
        trust_checkpoint: bool = False,
        checkpoint_grid: tuple[int, int] | None = None,
    ) -> None:
        """Load an AudioSet-trained AST checkpoint (``module.v.*`` keys, any patch stride).

        Accepted layouts: the reference ``DataParallel`` state dict (``module.v.*``, plus
        ``module.mlp_head.*``, which is ignored), the same without ``module.``, or a dict holding it
        under ``"state_dict"``/``"model"``. DeiT classifier heads (``v.head*``) are ignored too.
        The checkpoint's (frequency, time) patch grid is ``checkpoint_grid`` or is inferred from
        its position-embedding length (the reference AudioSet models: 1212 = 12 x 101 patches,
        stride 10 on 128 x 1024); its patch position embeddings are resized to this encoder's grid
        with :func:`resize_patch_pos_embed`, keeping the CLS/distillation token embeddings.
        """
        content = load_checkpoint_file(checkpoint, trust_checkpoint=trust_checkpoint)
        if isinstance(content, dict):
            for key in ("state_dict", "model"):
                if isinstance(content.get(key), dict):
                    content = content[key]
                    break
        if not isinstance(content, dict):
            raise ValueError(f"checkpoint {checkpoint} is not a state dict (got {type(content).__name__})")
        state_dict = {k.removeprefix("module."): v for k, v in content.items()}
        if "v.pos_embed" not in state_dict:
            raise ValueError(
                f"checkpoint {checkpoint} has no 'v.pos_embed' (or 'module.v.pos_embed'): not an AST checkpoint"
            )
        pos_embed = state_dict["v.pos_embed"]
        num_patches = pos_embed.shape[1] - NUM_PREFIX_TOKENS
        old_grid = checkpoint_grid or self._infer_grid(num_patches, str(checkpoint))
        state_dict["v.pos_embed"] = resize_patch_pos_embed(pos_embed, tuple(old_grid), self.grid, NUM_PREFIX_TOKENS)
        load_third_party_state(
            self, state_dict, source=f"AST checkpoint '{checkpoint}'",
            ignore_prefixes=("mlp_head.", "v.head.", "v.head_dist."),
        )

    def _infer_grid(self, num_patches: int, source: str) -> tuple[int, int]:
        """The (F, T) patch grid of a checkpoint with ``num_patches`` patches, for these mel bins."""
        patch = self.v.patch_embed.proj.kernel_size[0]
        mel_bins = self.v.patch_embed.img_size[0]
        reference = (_grid_size(mel_bins, patch, 10), _grid_size(1024, patch, 10))  # stride-10 AudioSet grid
        if num_patches == self.grid[0] * self.grid[1]:
            return self.grid
        if num_patches == reference[0] * reference[1]:
            return reference
        # Otherwise: a frequency stride in 1..patch whose grid height divides the patch count.
        heights = sorted({_grid_size(mel_bins, patch, stride) for stride in range(1, patch + 1)})
        matches = [(f, num_patches // f) for f in heights if num_patches % f == 0]
        if len(matches) != 1:
            raise ValueError(
                f"cannot infer the patch grid of {source} from its {num_patches} patches "
                f"(candidates {matches}); pass checkpoint_grid=(frequency_patches, time_patches)"
            )
        return matches[0]

    @staticmethod
    def expected_frames(target_length: int, patch_size: int = 16, tstride: int = 16) -> int:
        """Number of output frames T' for a target length."""
        return _grid_size(target_length, patch_size, tstride)

