"""Audio encoders: official-checkpoint loading, reference forward, lengths, AST position embeddings."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aac_lightning.nn.audio_encoders.ast import AST, AUDIOSET_MEAN, AUDIOSET_STD, KaldiFbank, resize_patch_pos_embed
from aac_lightning.nn.audio_encoders import load_audio_encoder, load_checkpoint_file
from aac_lightning.nn.audio_encoders.panns import Cnn14, WavegramLogmelCnn14

# Tiny CNN14-family settings (16 kHz, 32 mel bins: the fewest the five 2x poolings allow).
TINY_CNN = dict(
    sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmin=50.0, fmax=8000.0,
    channels=(4, 8, 8, 16, 16, 24), embed_dim=12,
)
# Wavegram-Logmel needs hop_size to be a multiple of 64 (its strided conv + three 4x poolings).
TINY_WLCNN = dict(TINY_CNN, hop_size=128, wavegram_channels=(4, 4, 8, 16))
TINY_AST = dict(embed_dim=32, depth=2, num_heads=2)


def _randomize_batchnorm_stats(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine terms, so eval-mode BN is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def _official_checkpoint(model: torch.nn.Module, path, num_classes: int = 5, **extra) -> dict:
    """Save ``model`` the way the PANNs training script does, with an AudioSet head."""
    state_dict = dict(model.state_dict())
    state_dict["fc_audioset.weight"] = torch.randn(num_classes, model.clip_dim)
    state_dict["fc_audioset.bias"] = torch.randn(num_classes)
    # The reference script stores the data sampler's numpy state next to the weights.
    checkpoint = {"iteration": 100000, "model": state_dict, "sampler": {"indexes": np.arange(7), "pointer": 3}}
    checkpoint.update(extra)
    torch.save(checkpoint, path)
    return state_dict


# ---- an independent functional implementation of the reference forward (eval mode) ----


def _ref_logmel(sd: dict, waveform: torch.Tensor, window_size: int, hop_size: int) -> torch.Tensor:
    """Centred reflect-padded STFT power through the stored conv kernels, then 10 log10 mel."""
    x = F.pad(waveform[:, None, :], (window_size // 2, window_size // 2), mode="reflect")
    real = F.conv1d(x, sd["spectrogram_extractor.stft.conv_real.weight"], stride=hop_size)
    imag = F.conv1d(x, sd["spectrogram_extractor.stft.conv_imag.weight"], stride=hop_size)
    power = (real**2 + imag**2).transpose(1, 2)[:, None]  # (B, 1, T, F)
    mel = power @ sd["logmel_extractor.melW"]
    return 10.0 * torch.log10(mel.clamp(min=1e-10))


def _ref_bn(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"],
        training=False, eps=1e-5,
    )


def _ref_conv_block(sd: dict, name: str, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
    x = F.relu(_ref_bn(sd, f"{name}.bn1", F.conv2d(x, sd[f"{name}.conv1.weight"], padding=1)))
    x = F.relu(_ref_bn(sd, f"{name}.bn2", F.conv2d(x, sd[f"{name}.conv2.weight"], padding=1)))
    return F.avg_pool2d(x, pool)


def _ref_pre_block(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(_ref_bn(sd, f"{name}.bn1", F.conv1d(x, sd[f"{name}.conv1.weight"], padding=1)))
    x = F.relu(_ref_bn(sd, f"{name}.bn2", F.conv1d(x, sd[f"{name}.conv2.weight"], padding=2, dilation=2)))
    return F.max_pool1d(x, 4)


def _ref_panns(sd: dict, waveform: torch.Tensor, window_size: int, hop_size: int, wavegram_bins: int = 0):
    """Reference CNN14 / Wavegram-Logmel-CNN14 eval forward -> (embedding, clipwise, frames)."""
    x = _ref_logmel(sd, waveform, window_size, hop_size)
    x = _ref_bn(sd, "bn0", x.transpose(1, 3)).transpose(1, 3)
    x = _ref_conv_block(sd, "conv_block1", x, (2, 2))
    if wavegram_bins:
        stride = hop_size // 64
        a = F.conv1d(waveform[:, None], sd["pre_conv0.weight"], stride=stride, padding=5)
        a = F.relu(_ref_bn(sd, "pre_bn0", a))
        for name in ("pre_block1", "pre_block2", "pre_block3"):
            a = _ref_pre_block(sd, name, a)
        a = a.reshape(a.shape[0], -1, wavegram_bins, a.shape[-1]).transpose(2, 3)
        a = _ref_conv_block(sd, "pre_block4", a, (2, 1))
        x = torch.cat((x, a), dim=1)
    for index in range(2, 6):
        x = _ref_conv_block(sd, f"conv_block{index}", x, (2, 2))
    x = _ref_conv_block(sd, "conv_block6", x, (1, 1))
    x = x.mean(dim=3)  # (B, C, T')
    pooled = x.max(dim=2).values + x.mean(dim=2)
    embedding = F.relu(F.linear(pooled, sd["fc1.weight"], sd["fc1.bias"]))
    clipwise = torch.sigmoid(F.linear(embedding, sd["fc_audioset.weight"], sd["fc_audioset.bias"]))
    return embedding, clipwise, x.transpose(1, 2)


# ---- CNN14 ----


def test_official_panns_checkpoint_loads_strictly_and_matches_reference_forward(tmp_path):
    torch.manual_seed(0)
    source = Cnn14(**TINY_CNN)
    _randomize_batchnorm_stats(source)
    path = tmp_path / "Cnn14_tiny.pth"
    official_sd = _official_checkpoint(source, path)

    encoder = load_audio_encoder("cnn14", checkpoint=path, **TINY_CNN).eval()
    waveform = torch.randn(2, 16000) * 0.3  # 101 log-mel frames -> 3 output frames
    with torch.no_grad():
        out = encoder(waveform)
        embedding, clipwise, frames = _ref_panns(official_sd, waveform, 512, 160)
    assert out["clip"].shape == (2, 12) and out["frames"].shape == (2, 3, 24)
    torch.testing.assert_close(out["clip"], embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["frames"], frames, atol=1e-5, rtol=1e-4)
    assert out["frame_lengths"].tolist() == [3, 3]
    assert not torch.allclose(embedding, torch.zeros_like(embedding))  # a non-degenerate comparison
    assert not hasattr(encoder, "fc_audioset")


def test_panns_checkpoint_key_errors_name_the_keys(tmp_path):
    source = Cnn14(**TINY_CNN)
    path = tmp_path / "ok.pth"
    state_dict = _official_checkpoint(source, path)

    missing = dict(state_dict)
    del missing["conv_block3.bn1.running_mean"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: conv_block3\.bn1\.running_mean"):
        load_audio_encoder("cnn14", checkpoint=tmp_path / "missing.pth", **TINY_CNN)

    extra = dict(state_dict, **{"fc_extra.weight": torch.zeros(3)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: fc_extra\.weight"):
        load_audio_encoder("cnn14", checkpoint=tmp_path / "extra.pth", **TINY_CNN)

    # A checkpoint for other channel widths: the shape mismatch is named.
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv_block1\.conv1\.weight"):
        load_audio_encoder("cnn14", checkpoint=path, **dict(TINY_CNN, channels=(8, 8, 8, 16, 16, 24)))

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_audio_encoder("cnn14", checkpoint=tmp_path / "nowhere.pth", **TINY_CNN)
    with pytest.raises(ValueError, match="unknown audio encoder name 'cnn10'"):
        load_audio_encoder("cnn10")


def test_checkpoint_with_arbitrary_objects_needs_trust(tmp_path):
    source = Cnn14(**TINY_CNN)
    path = tmp_path / "odd.pth"
    _official_checkpoint(source, path, saved_on=datetime.date(2020, 1, 1))
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        load_checkpoint_file(path)
    with pytest.raises(ValueError, match="datetime"):
        load_audio_encoder("cnn14", checkpoint=path, **TINY_CNN)
    encoder = load_audio_encoder("cnn14", checkpoint=path, trust_checkpoint=True, **TINY_CNN)
    torch.testing.assert_close(encoder.fc1.weight, source.fc1.weight)


def test_cnn14_lengths_mask_clip_pooling_and_give_frame_lengths():
    torch.manual_seed(1)
    encoder = Cnn14(**TINY_CNN).eval()
    waveform = torch.randn(3, 16000) * 0.3
    lengths = torch.tensor([16000, 5000, 3000])
    with torch.no_grad():
        out = encoder(waveform, lengths)
        full = encoder(waveform)
        same = encoder(waveform, torch.full((3,), 16000))
    # Log-mel frames l // 160 + 1 = 101, 32, 19; output frames ceil(./32) = 4 -> capped at 3, 1, 1.
    assert out["frame_lengths"].tolist() == [3, 1, 1]
    assert full["frame_lengths"].tolist() == [3, 3, 3]
    # Masked max + mean over the valid frames, then fc1 + ReLU, recomputed from the frames.
    for i, n in enumerate(out["frame_lengths"].tolist()):
        frames = out["frames"][i, :n]  # (n, C)
        expected = F.relu(encoder.fc1(frames.max(dim=0).values + frames.mean(dim=0)))
        torch.testing.assert_close(out["clip"][i], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(same["clip"], full["clip"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out["clip"][1], full["clip"][1])  # the mask changed a short clip


def test_eval_is_deterministic_and_specaugment_only_runs_in_training():
    torch.manual_seed(2)
    encoder = Cnn14(**TINY_CNN)
    calls = []
    encoder.spec_augmenter.register_forward_hook(lambda module, args, output: calls.append(1))
    waveform = torch.randn(2, 12000) * 0.3
    encoder.eval()
    with torch.no_grad():
        first, second = encoder(waveform), encoder(waveform)
    assert not calls
    for key in ("clip", "frames", "frame_lengths"):
        assert torch.equal(first[key], second[key])
    encoder.train()
    out = encoder(waveform)
    assert len(calls) == 1
    out["clip"].sum().backward()  # trains end to end, front end stays frozen
    assert encoder.conv_block1.conv1.weight.grad is not None
    assert encoder.logmel_extractor.melW.grad is None


def test_short_clips_are_padded_to_the_minimum_length():
    encoder = Cnn14(**TINY_CNN).train()
    out = encoder(torch.randn(2, 500) * 0.1)  # far below 64 hops: padded, SpecAugment still fits
    assert out["frames"].shape == (2, 2, 24)  # (64 * 160 // 160 + 1) // 32 = 2
    assert out["frame_lengths"].tolist() == [1, 1]


def test_bad_inputs_raise_clear_errors():
    encoder = Cnn14(**TINY_CNN)
    with pytest.raises(ValueError, match="shape"):
        encoder(torch.randn(16000))
    with pytest.raises(ValueError, match="lengths must lie in"):
        encoder(torch.randn(2, 16000), torch.tensor([16000, 16001]))
    with pytest.raises(ValueError, match="integer"):
        encoder(torch.randn(2, 16000), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="channels"):
        Cnn14(channels=(64, 128))
    with pytest.raises(ValueError, match="fmax"):
        Cnn14(sample_rate=16000)  # default fmax 14000 is above Nyquist
    with pytest.raises(ValueError, match="multiple of 64"):
        WavegramLogmelCnn14(**dict(TINY_WLCNN, hop_size=160))


# ---- Wavegram-Logmel-CNN14 ----


def test_wavegram_logmel_branches_line_up_for_odd_lengths():
    torch.manual_seed(3)
    encoder = WavegramLogmelCnn14(**TINY_WLCNN).eval()
    hop = TINY_WLCNN["hop_size"]
    # Without padding, an odd number of hops misaligns the branches (the reference model fails).
    raw = torch.randn(1, hop * 81)
    with torch.no_grad():
        assert encoder.wavegram(raw).shape[2] != encoder.conv_block1(encoder.logmel(raw)).shape[2]
    for num_samples in (10001, 12345, hop * 81, 2 * hop * 40 + 1):
        waveform = torch.randn(2, num_samples) * 0.3
        padded = encoder._pad(waveform)
        assert padded.shape[1] % (2 * hop) == 0 and padded.shape[1] - num_samples < 2 * hop
        assert torch.equal(padded[:, :num_samples], waveform) and not padded[:, num_samples:].any()
        with torch.no_grad():
            wave_branch = encoder.wavegram(padded)
            mel_branch = encoder.conv_block1(encoder.logmel(padded))
            assert wave_branch.shape == mel_branch.shape
            lengths = torch.tensor([num_samples, num_samples // 3])
            out = encoder(waveform, lengths)
        expected_frames = (padded.shape[1] // hop + 1) // 32
        assert out["frames"].shape == (2, expected_frames, 24)
        expected_lengths = [min(max(math.ceil((n // hop + 1) / 32), 1), expected_frames) for n in lengths.tolist()]
        assert out["frame_lengths"].tolist() == expected_lengths
    # Lengths already on the grid are left alone.
    on_grid = torch.randn(1, 2 * hop * 40)
    assert encoder._pad(on_grid) is on_grid


def test_wavegram_logmel_official_checkpoint_matches_reference_forward(tmp_path):
    torch.manual_seed(4)
    source = WavegramLogmelCnn14(**TINY_WLCNN)
    _randomize_batchnorm_stats(source, seed=1)
    path = tmp_path / "Wavegram_Logmel_Cnn14_tiny.pth"
    official_sd = _official_checkpoint(source, path)
    encoder = load_audio_encoder("wavegram_logmel_cnn14", checkpoint=path, **TINY_WLCNN).eval()
    waveform = torch.randn(2, 2 * 128 * 40) * 0.3  # on the 2-hop grid: the reference runs as is
    with torch.no_grad():
        out = encoder(waveform)
        embedding, _, frames = _ref_panns(official_sd, waveform, 512, 128, wavegram_bins=16)
    torch.testing.assert_close(out["clip"], embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["frames"], frames, atol=1e-5, rtol=1e-4)


# ---- parameter counts of the official sizes (hand computed from the layer shapes) ----


def _conv_block_params(c_in: int, c_out: int, k: int = 3, dims: int = 2) -> int:
    return k**dims * c_in * c_out + k**dims * c_out * c_out + 2 * 2 * c_out  # two convs, two BN (w, b)


def test_official_size_parameter_counts():
    channels = (64, 128, 256, 512, 1024, 2048)
    trunk = sum(_conv_block_params(c_in, c_out) for c_in, c_out in zip((1, 64, 128, 256, 512, 1024), channels))
    cnn14_trainable = 2 * 64 + trunk + 2048 * 2048 + 2048  # bn0 + blocks + fc1
    front_end = 2 * 513 * 1024 + 513 * 64  # frozen STFT kernels (real, imag) + mel matrix
    cnn14 = Cnn14()
    assert sum(p.numel() for p in cnn14.parameters() if p.requires_grad) == cnn14_trainable == 79_673_792
    assert sum(p.numel() for p in cnn14.parameters()) == cnn14_trainable + front_end
    # With the AudioSet head (2048 x 527 + 527) this is the PANNs paper's 80.8M.
    assert cnn14_trainable + 2048 * 527 + 527 == 80_753_615
    del cnn14

    wavegram = (
        11 * 64 + 2 * 64  # pre_conv0 + pre_bn0
        + (3 * 64 * 64 + 3 * 64 * 64 + 4 * 64)  # pre_block1
        + (3 * 64 * 128 + 3 * 128 * 128 + 4 * 128)  # pre_block2
        + (3 * 128 * 128 + 3 * 128 * 128 + 4 * 128)  # pre_block3
        + _conv_block_params(4, 64)  # pre_block4
    )
    wl_trainable = cnn14_trainable + wavegram + 9 * 64 * 128  # conv_block2 takes 128 channels
    wlcnn14 = WavegramLogmelCnn14()
    assert sum(p.numel() for p in wlcnn14.parameters() if p.requires_grad) == wl_trainable
    del wlcnn14

    d, grid = 768, 8 * 64
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    ast_params = (d * 256 + d) + 2 * d + (2 + grid) * d + 12 * block + 2 * d
    with torch.device("meta"):
        ast = AST()
    assert ast.grid == (8, 64)
    assert sum(p.numel() for p in ast.parameters()) == ast_params


# ---- AST ----


def test_kaldi_fbank_matches_torchaudio_and_ast_normalisation():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    torch.manual_seed(5)
    waveform = torch.randn(2, 8000) * 0.1 + 0.05  # a DC offset: the clip mean is removed first
    lengths = torch.tensor([8000, 3001])
    fbank, num_valid = KaldiFbank(target_length=60)(waveform, lengths)
    assert num_valid.tolist() == [1 + (8000 - 400) // 160, 1 + (3001 - 400) // 160]
    for i, n in enumerate(lengths.tolist()):
        clip = waveform[i, :n] - waveform[i, :n].mean()
        ref = kaldi.fbank(
            clip[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10,
        )
        ref = F.pad(ref, (0, 0, 0, 60 - ref.shape[0]))[:60]  # AST pads the fbank with zeros / cuts it
        ref = (ref - AUDIOSET_MEAN) / (AUDIOSET_STD * 2)
        torch.testing.assert_close(fbank[i], ref, atol=1e-4, rtol=1e-4)


def test_resize_pos_embed_keeps_linear_embeddings_linear():
    dim, old, new = 3, (12, 101), (8, 64)
    slope_f, slope_t = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 0.0, 3.0])
    offset = torch.tensor([7.0, 1.0, 0.0])
    f = torch.arange(old[0], dtype=torch.float32)[:, None, None]
    t = torch.arange(old[1], dtype=torch.float32)[None, :, None]
    patches = (slope_f * f + slope_t * t + offset).reshape(1, -1, dim)
    prefix = torch.randn(1, 2, dim)
    resized = resize_patch_pos_embed(torch.cat((prefix, patches), dim=1), old, new)
    assert resized.shape == (1, 2 + 64 * 8, dim)
    assert torch.equal(resized[:, :2], prefix)
    # Corners map to corners: new index j sits at old index j * (old - 1) / (new - 1).
    j = torch.arange(new[0], dtype=torch.float32)[:, None, None] * (old[0] - 1) / (new[0] - 1)
    k = torch.arange(new[1], dtype=torch.float32)[None, :, None] * (old[1] - 1) / (new[1] - 1)
    expected = (slope_f * j + slope_t * k + offset).reshape(1, -1, dim)
    torch.testing.assert_close(resized[:, 2:], expected, atol=1e-4, rtol=1e-5)
    constant = torch.full((1, 2 + 12 * 101, dim), 0.7)
    torch.testing.assert_close(resize_patch_pos_embed(constant, old, new), torch.full((1, 2 + 512, dim), 0.7))


def test_ast_loads_stride10_audioset_checkpoint_into_stride16_grid(tmp_path):
    torch.manual_seed(6)
    # A fake reference checkpoint: stride-10 model on 128 x 1024 (12 x 101 patches), DataParallel keys.
    reference = AST(fstride=10, tstride=10, **TINY_AST)
    assert reference.grid == (12, 101)
    sd = {f"module.{k}": v.clone() for k, v in reference.state_dict().items()}
    f = torch.arange(12.0)[:, None, None]
    t = torch.arange(101.0)[None, :, None]
    sd["module.v.pos_embed"][:, 2:] = (0.1 * f - 0.03 * t + 1.0).expand(12, 101, 32).reshape(1, -1, 32)
    sd["module.v.head.weight"], sd["module.v.head.bias"] = torch.randn(10, 32), torch.randn(10)
    sd["module.v.head_dist.weight"], sd["module.v.head_dist.bias"] = torch.randn(10, 32), torch.randn(10)
    sd["module.mlp_head.0.weight"], sd["module.mlp_head.0.bias"] = torch.ones(32), torch.zeros(32)
    sd["module.mlp_head.1.weight"], sd["module.mlp_head.1.bias"] = torch.randn(527, 32), torch.randn(527)
    path = tmp_path / "audioset_10_10_tiny.pth"
    torch.save(sd, path)

    encoder = load_audio_encoder("ast", checkpoint=path, **TINY_AST).eval()
    assert encoder.grid == (8, 64)
    pos = encoder.v.pos_embed.detach()
    assert torch.equal(pos[:, :2], sd["module.v.pos_embed"][:, :2])
    j = torch.arange(8.0)[:, None] * 11 / 7
    k = torch.arange(64.0)[None, :] * 100 / 63
    expected = (0.1 * j - 0.03 * k + 1.0).reshape(1, -1, 1).expand(1, 512, 32)
    torch.testing.assert_close(pos[:, 2:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.v.blocks[1].attn.qkv.weight, sd["module.v.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(encoder.v.patch_embed.proj.weight, sd["module.v.patch_embed.proj.weight"])
    assert encoder.v.patch_embed.proj.stride == (16, 16)

    waveform = torch.randn(2, 32000) * 0.1  # 2 s: 198 fbank frames of the 1024
    with torch.no_grad():
        out = encoder(waveform, torch.tensor([32000, 16000]))
        fbank = encoder.fbank(waveform, torch.tensor([32000, 16000]))[0]  # (B, T, M)
        tokens = encoder.v.forward_features(fbank.transpose(1, 2)[:, None])
    assert out["clip"].shape == (2, 32) and out["frames"].shape == (2, 64, 32)
    torch.testing.assert_close(out["clip"], (tokens[:, 0] + tokens[:, 1]) / 2)
    torch.testing.assert_close(out["frames"], tokens[:, 2:].reshape(2, 8, 64, 32).mean(dim=1))
    assert out["frame_lengths"].tolist() == [math.ceil(198 / 16), math.ceil(98 / 16)]

    del sd["module.v.blocks.0.norm1.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys: v\.blocks\.0\.norm1\.weight"):
        load_audio_encoder("ast", checkpoint=tmp_path / "broken.pth", **TINY_AST)


def test_ast_shorter_target_length_and_eval_determinism():
    torch.manual_seed(7)
    encoder = AST(target_length=256, **TINY_AST).eval()
    assert encoder.sample_rate == 16000 and encoder.clip_dim == encoder.frame_dim == 32
    waveform = torch.randn(3, 50000) * 0.1  # longer than 256 frames: cut, as AST does
    with torch.no_grad():
        first, second = encoder(waveform), encoder(waveform)
        short = encoder(waveform[:, :1000], torch.tensor([1000, 399, 800]))
    assert first["frames"].shape == (3, 16, 32) and first["frame_lengths"].tolist() == [16, 16, 16]
    assert torch.equal(first["clip"], second["clip"])
    # 1000 samples -> 4 fbank frames -> 1 patch; 399 samples -> no frame at all -> at least 1.
    assert short["frame_lengths"].tolist() == [1, 1, 1]


def test_ast_ambiguous_checkpoint_grid_needs_checkpoint_grid(tmp_path):
    torch.manual_seed(8)
    # 128 mel bins x 256 frames at stride 10: 12 x 25 = 300 patches, which 10 x 30 (stride 12) matches too.
    source = AST(target_length=256, fstride=10, tstride=10, **TINY_AST)
    assert source.grid == (12, 25)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ast256.pth")
    with pytest.raises(ValueError, match="pass checkpoint_grid"):
        load_audio_encoder("ast", checkpoint=tmp_path / "ast256.pth", target_length=256, **TINY_AST)
    encoder = load_audio_encoder(
        "ast", checkpoint=tmp_path / "ast256.pth", checkpoint_grid=(12, 25), target_length=256, **TINY_AST
    )
    assert encoder.grid == (8, 16)
    expected = resize_patch_pos_embed(source.v.pos_embed.detach(), (12, 25), (8, 16))
    torch.testing.assert_close(encoder.v.pos_embed.detach(), expected)
