"""The one encoding rule (`encode_clips`) and the frame-level interface (`frame_times`, `frame_embeddings`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aac_lightning.nn.audio_encoders import (
    AST,
    FrozenExtractor,
    encode_clips,
    load_audio_encoder,
    masked_max_mean_pool,
)
from aac_lightning.nn.bi_encoder import BiEncoder
from tests.test_audio_encoders import _randomize_batchnorm_stats

TINY_CNN = dict(
    sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmin=50.0, fmax=8000.0,
    channels=(4, 8, 8, 16, 16, 24), embed_dim=12,
)
# hop 128: Wavegram-Logmel pads its input to a multiple of 2 * hop = 256 samples (640 at the defaults).
TINY_WLCNN = dict(TINY_CNN, hop_size=128, wavegram_channels=(4, 4, 8, 16))
TINY_AST = dict(embed_dim=16, depth=2, num_heads=2, mel_bins=32, target_length=64)
TOL = dict(atol=1e-5, rtol=1e-5)

# Mixed lengths (none a multiple of 256, two equal) and the padded length: 1.3 s max.
LENGTHS = [20800, 9001, 13333, 9001, 4000]


def _encoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"cnn14": TINY_CNN, "wavegram_logmel_cnn14": TINY_WLCNN, "ast": TINY_AST}[name]
    encoder = load_audio_encoder(name, **kwargs)
    _randomize_batchnorm_stats(encoder)
    return encoder.eval()


def _padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    waveform = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveform[i, :n] = torch.randn(n, generator=generator) * 0.3
    return waveform, torch.tensor(lengths)


def _count_calls(encoder: torch.nn.Module) -> list[tuple[int, ...]]:
    """Shapes of the waveforms each forward call of ``encoder`` receives."""
    calls: list[tuple[int, ...]] = []
    encoder.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    return calls


@pytest.mark.parametrize("name", ["cnn14", "wavegram_logmel_cnn14", "ast"])
def test_encode_clips_equals_each_clip_encoded_alone(name: str) -> None:
    encoder = _encoder(name)
    waveform, lengths = _padded_batch(LENGTHS)
    with torch.no_grad():
        out = encode_clips(encoder, waveform, lengths)
        alone = [encoder(waveform[i : i + 1, :n], lengths[i : i + 1]) for i, n in enumerate(LENGTHS)]
    assert set(out) == {"clip", "frames", "frame_lengths"}  # the encoder's own keys
    longest = max(a["frames"].shape[1] for a in alone)
    assert out["frames"].shape == (len(LENGTHS), longest, encoder.frame_dim)
    assert out["clip"].shape == (len(LENGTHS), encoder.clip_dim)
    for i, single in enumerate(alone):
        n = int(single["frame_lengths"][0])
        assert int(out["frame_lengths"][i]) == n
        torch.testing.assert_close(out["clip"][i], single["clip"][0], **TOL)
        torch.testing.assert_close(out["frames"][i, :n], single["frames"][0, :n], **TOL)
        assert not out["frames"][i, n:].any()  # zero beyond the clip's frames
    assert len(set(out["frame_lengths"].tolist())) > 1  # a mixed batch, really


def test_padding_would_change_a_short_clip() -> None:
    """Why the rule exists: the naive padded batch gives a short clip other features."""
    encoder = _encoder("cnn14")
    waveform, lengths = _padded_batch(LENGTHS)
    with torch.no_grad():
        naive = encoder(waveform, lengths)
        ruled = encode_clips(encoder, waveform, lengths)
    n = int(ruled["frame_lengths"][2])
    assert not torch.allclose(naive["frames"][2, :n], ruled["frames"][2, :n], atol=1e-4)


@pytest.mark.parametrize("name", ["cnn14", "ast"])
def test_equal_length_clips_run_as_one_batch(name: str) -> None:
    encoder = _encoder(name)
    calls = _count_calls(encoder)
    waveform, lengths = _padded_batch([16000] * 4)
    with torch.no_grad():
        out = encode_clips(encoder, waveform, lengths)
        assert calls == [(4, 16000)]
        # lengths=None means full length: the same single call and the same numbers
        same = encode_clips(encoder, waveform)
        assert calls == [(4, 16000), (4, 16000)]
        direct = encoder(waveform, lengths)
    for key in out:
        torch.testing.assert_close(out[key], same[key])
    torch.testing.assert_close(out["clip"], direct["clip"])


def test_mixed_lengths_run_one_call_per_distinct_length_without_padding() -> None:
    encoder = _encoder("cnn14")
    calls = _count_calls(encoder)
    waveform, lengths = _padded_batch(LENGTHS)
    with torch.no_grad():
        encode_clips(encoder, waveform, lengths)
    assert sorted(calls) == sorted([(2, 9001), (1, 4000), (1, 13333), (1, 20800)])


def test_encode_clips_checks_its_inputs() -> None:
    encoder = _encoder("cnn14")
    with pytest.raises(ValueError, match="lengths must lie in"):
        encode_clips(encoder, torch.randn(2, 8000), torch.tensor([8000, 9000]))
    with pytest.raises(ValueError, match="shape"):
        encode_clips(encoder, torch.randn(8000))


def test_frozen_extractor_uses_the_rule_stays_in_eval_and_has_no_grad() -> None:
    encoder = _encoder("cnn14")
    extractor = FrozenExtractor(encoder)
    extractor.train()  # Lightning does this every epoch
    assert not extractor.encoder.training
    waveform, lengths = _padded_batch(LENGTHS)
    out = extractor(waveform, lengths)
    expected = encode_clips(encoder, waveform, lengths)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key])
    assert not out["frames"].requires_grad
    assert all(not p.requires_grad for p in extractor.parameters())
    # checkpoint keys stay `encoder.*` under the extractor
    assert all(key.startswith("encoder.") for key in extractor.state_dict())


class _WordCount(torch.nn.Module):
    embed_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(1, 4)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.proj(torch.tensor([[float(len(t.split()))] for t in texts]))


def test_bi_encoder_encode_audio_uses_the_rule_and_training_forward_stays_batched() -> None:
    encoder = _encoder("cnn14")
    torch.manual_seed(0)
    model = BiEncoder(encoder, _WordCount(), embed_dim=8).eval()
    waveform, lengths = _padded_batch(LENGTHS)
    calls = _count_calls(encoder)
    with torch.no_grad():
        emb = model.encode_audio(waveform, lengths)
        assert len(calls) == 4  # one call per distinct length
        for i, n in enumerate(LENGTHS):
            torch.testing.assert_close(emb[i], model.encode_audio(waveform[i : i + 1, :n])[0], **TOL)
        calls.clear()
        out = model(waveform, ["a b"] * len(LENGTHS), lengths)
    assert calls == [tuple(waveform.shape)]  # training path: the batch as it is, one call
    naive = F.normalize(model.audio_projection(encoder(waveform, lengths)["clip"]), dim=-1)
    torch.testing.assert_close(out["audio_emb"], naive)


# ------------------------------------------------------------------ frame-level interface


def test_panns_frame_times_follow_hop_maths() -> None:
    for name in ("cnn14", "wavegram_logmel_cnn14"):
        encoder = _encoder(name)
        hop, rate = encoder.hop_size, encoder.sample_rate
        times = encoder.frame_times(4)
        assert times.dtype == torch.float64 and times.shape == (4,)
        # output frame i pools log-mel frames 32 i .. 32 i + 31, log-mel frame k centred on sample k * hop
        expected = torch.tensor([(32 * i + 15.5) * hop / rate for i in range(4)], dtype=torch.float64)
        torch.testing.assert_close(times, expected)
        assert bool((times.diff() > 0).all())
    encoder = _encoder("cnn14")
    # clipped to the clip's duration: 0.5 s at 16 kHz; the 3rd frame's centre (1.27 s) is beyond it
    torch.testing.assert_close(encoder.frame_times(3, num_samples=8000)[-1], torch.tensor(0.5, dtype=torch.float64))
    assert encoder.frame_times(0).shape == (0,)
    with pytest.raises(ValueError, match="num_frames"):
        encoder.frame_times(-1)


def test_ast_frame_times_follow_patch_maths() -> None:
    encoder = AST(tstride=8, **TINY_AST)  # overlapping patches: 16 fbank frames every 8
    times = encoder.frame_times(encoder.grid[1])
    # fbank frame k covers samples [160 k, 160 k + 400) at 16 kHz; patch i covers frames 8 i .. 8 i + 15
    expected = torch.tensor([((8 * i + 7.5) * 160 + 200) / 16000 for i in range(encoder.grid[1])], dtype=torch.float64)
    torch.testing.assert_close(times, expected)
    assert bool((times.diff() > 0).all())
    assert encoder.patch_size == 16 and encoder.tstride == 8


def test_panns_frame_embeddings_pooled_as_the_encoder_pools_give_the_clip_embedding() -> None:
    encoder = _encoder("cnn14")
    # a clip with one valid output frame: its clip embedding is exactly that frame's embedding
    waveform = torch.randn(2, 4000) * 0.3
    with torch.no_grad():
        out = encoder(waveform, torch.tensor([4000, 4000]))
        frames = encoder.frame_embeddings(out["frames"])  # (B, T', clip_dim)
    assert out["frame_lengths"].tolist() == [1, 1]
    assert frames.shape == (2, out["frames"].shape[1], encoder.clip_dim)
    torch.testing.assert_close(frames[:, 0], out["clip"], **TOL)
    # and for any frames constant in time, the clip head (max + mean pooling, fc1, ReLU) agrees
    h = torch.randn(3, 1, encoder.frame_dim).expand(3, 5, encoder.frame_dim)  # (B, T', C)
    with torch.no_grad():
        clip = F.relu(encoder.fc1(masked_max_mean_pool(h.transpose(1, 2), None)))
        torch.testing.assert_close(encoder.frame_embeddings(h)[:, 2], clip, **TOL)
        # frames that vary: per-frame embeddings of the clip-embedding size, ReLU outputs like the clip
        # (the clip head is nonlinear, so pooling frame embeddings does not give the clip exactly)
        mixed = encoder(torch.randn(1, 16000) * 0.3)
        per_frame = encoder.frame_embeddings(mixed["frames"][0])  # (T', clip_dim)
    assert per_frame.shape == (mixed["frames"].shape[1], encoder.clip_dim) and bool((per_frame >= 0).all())


def test_ast_frame_embeddings_live_in_the_clip_space() -> None:
    encoder = _encoder("ast")
    with torch.no_grad():
        out = encoder(torch.randn(2, 8000) * 0.3)
        frames = encoder.frame_embeddings(out["frames"])
    assert frames.shape == (2, encoder.grid[1], encoder.clip_dim)
    torch.testing.assert_close(frames, out["frames"])  # patch tokens share the CLS tokens' space
    # the clip (mean of CLS and distillation tokens) and the frames come out of the same final LayerNorm
    final_norm = encoder.v.norm
    standardised = (frames - final_norm.bias) / final_norm.weight
    torch.testing.assert_close(standardised.mean(dim=-1), torch.zeros(2, encoder.grid[1]), atol=1e-4, rtol=0)
    assert out["clip"].shape == (2, encoder.clip_dim)
