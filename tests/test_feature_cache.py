"""The frozen-feature cache: content-keyed, reused, invalidated by weights / front end / audio changes, partial files caught."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest
import torch

from aac_lightning.data.datasets import Clotho
from aac_lightning.data.feature_cache import FeatureCache, StaleCacheError, audio_file_fingerprint, cache_key, state_dict_sha256
from aac_lightning.nn.audio_encoders import load_audio_encoder

TINY_AUDIO = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmax=8000, channels=[4, 8, 8, 8, 8, 8], embed_dim=16)
FRONTEND = {"audio_encoder": "cnn14", "audio_encoder_kwargs": TINY_AUDIO, "sample_rate": 16000}


def tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return load_audio_encoder("cnn14", **TINY_AUDIO).eval()


def clips_of(root: Path) -> Clotho:
    return Clotho(str(root), "development", sample_rate=16000)


def build(cache: FeatureCache, encoder, clips: Clotho, load_audio=None) -> int:
    keys = [r.key for r in clips.records]
    paths = [r.path for r in clips.records]
    return cache.build(encoder, keys, paths, load_audio or clips.load_audio, progress=False)


def test_state_dict_hash_follows_content_not_identity():
    encoder = tiny_encoder()
    state = encoder.state_dict()
    clone = {k: v.clone() for k, v in state.items()}
    assert state_dict_sha256(state) == state_dict_sha256(clone)
    perturbed = dict(clone)
    key = next(k for k in perturbed if k.endswith("weight"))
    perturbed[key] = perturbed[key].clone()
    perturbed[key][(0,) * perturbed[key].dim()] += 1e-6
    assert state_dict_sha256(perturbed) != state_dict_sha256(state)
    as_double = {k: v.double() for k, v in state.items()}
    assert state_dict_sha256(as_double) != state_dict_sha256(state)  # same values, other dtype
    assert cache_key("a", FRONTEND) != cache_key("a", {**FRONTEND, "sample_rate": 32000})
    assert cache_key("a", FRONTEND) != cache_key("b", FRONTEND)


def test_cached_features_equal_online_extraction_and_are_reused(clotho_root: Path, tmp_path: Path):
    encoder = tiny_encoder()
    clips = clips_of(clotho_root)
    cache = FeatureCache(tmp_path / "cache", state_dict_sha256(encoder.state_dict()), FRONTEND)
    assert build(cache, encoder, clips) == len(clips)
    assert cache.is_complete()
    with torch.no_grad():
        for index, record in enumerate(clips.records):
            audio = clips.load_audio(index)  # (1, T)
            out = encoder(audio, torch.tensor([audio.shape[1]]))
            expected = out["frames"][0, : int(out["frame_lengths"][0])]
            assert torch.equal(cache.get(record.key), expected), record.fname
    # a second build extracts nothing (every clip is there with the same audio file)
    calls = []
    assert build(cache, encoder, clips, load_audio=lambda i: calls.append(i)) == 0 and calls == []
    # batches are zero-padded with their true lengths
    keys = [r.key for r in clips.records[:3]]
    feats, lengths = cache.batch(keys)
    for row, key in enumerate(keys):
        single = cache.get(key)
        assert lengths[row] == single.shape[0]
        assert torch.equal(feats[row, : single.shape[0]], single)
        assert not feats[row, single.shape[0] :].any()


def test_other_weights_get_another_cache_and_changed_audio_is_re_extracted(clotho_root: Path, tmp_path: Path):
    clips = clips_of(clotho_root)
    encoder = tiny_encoder(seed=0)
    cache = FeatureCache(tmp_path / "cache", state_dict_sha256(encoder.state_dict()), FRONTEND)
    build(cache, encoder, clips)
    # weights changed (as after more training): a new key, a new file, everything extracted again
    with torch.no_grad():
        for weight in encoder.parameters():
            weight.mul_(1.5)
    other = FeatureCache(tmp_path / "cache", state_dict_sha256(encoder.state_dict()), FRONTEND)
    assert other.path != cache.path
    assert build(other, encoder, clips) == len(clips)
    first = clips.records[0]
    assert not torch.equal(other.get(first.key), cache.get(first.key))
    # an edited audio file: only that clip is extracted again
    target = clips.records[2].path
    before = audio_file_fingerprint(target)
    assert audio_file_fingerprint(target) == before  # stable while the file is untouched
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert audio_file_fingerprint(target) != before  # same file, same size, edited: another fingerprint
    assert cache.stale_clips([r.key for r in clips.records], [r.path for r in clips.records]) == [2]
    assert build(cache, encoder, clips) == 1


def test_interrupted_extraction_is_detected_and_rebuilt(clotho_root: Path, tmp_path: Path):
    clips = clips_of(clotho_root)
    encoder = tiny_encoder()
    cache = FeatureCache(tmp_path / "cache", state_dict_sha256(encoder.state_dict()), FRONTEND)

    def failing_load(index: int):
        if index == 3:
            raise KeyboardInterrupt  # the run is stopped in the middle of the extraction
        return clips.load_audio(index)

    with pytest.raises(KeyboardInterrupt):
        build(cache, encoder, clips, load_audio=failing_load)
    with h5py.File(cache.path, "r") as f:
        assert not f.attrs["complete"] and len(f.keys()) == 3
    assert not cache.is_complete()  # the partial file is deleted, never read
    assert not cache.path.exists()
    with pytest.raises(FileNotFoundError, match="does not exist or is incomplete"):
        cache.get(clips.records[0].key)
    assert build(cache, encoder, clips) == len(clips)
    assert cache.is_complete()


def test_a_file_of_another_key_raises(clotho_root: Path, tmp_path: Path):
    clips = clips_of(clotho_root)
    encoder = tiny_encoder()
    cache = FeatureCache(tmp_path / "cache", state_dict_sha256(encoder.state_dict()), FRONTEND)
    build(cache, encoder, clips)
    with h5py.File(cache.path, "a") as f:
        f.attrs["key"] = "something else"
    with pytest.raises(StaleCacheError, match="holds key 'something else'"):
        cache.get(clips.records[0].key)
