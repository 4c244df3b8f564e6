"""Reading only the training crop (seek + resample the window) equals cropping the whole decoded clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from aac_lightning.data.audio import audio_length, crop_start, load_audio, load_audio_window
from aac_lightning.data.batches import CaptionPairs, ClipItems, crop_waveform
from aac_lightning.data.datasets import CaptionDataset, ClipRecord, Clotho
from tests.conftest import write_clotho

# The window is resampled with 20 ms of context either side: equal to the whole-file resampling up to
# float32 rounding (measured ~2.4e-7); this bound leaves room for other rates and platforms.
TOLERANCE = 1e-5


def write_noise(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0, subtype: str = "PCM_16") -> None:
    rng = np.random.default_rng(seed)
    data = (0.3 * rng.standard_normal((int(seconds * sr), channels))).clip(-1, 1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)


@pytest.mark.parametrize(
    ("file_sr", "target_sr", "channels"),
    [(44100, 32000, 1), (44100, 16000, 2), (48000, 32000, 1), (32000, 32000, 1), (22050, 32000, 1), (8000, 16000, 1)],
)
def test_window_equals_crop_of_whole_clip(tmp_path: Path, file_sr: int, target_sr: int, channels: int) -> None:
    path = tmp_path / "clip.wav"
    write_noise(path, 3.3, file_sr, channels)
    whole, _ = load_audio(path, target_sr)  # (1, T)
    assert audio_length(path, target_sr) == whole.shape[1]
    n = target_sr  # a 1 s window
    total = whole.shape[1]
    for start in [0, 1, 319, 320, 12345, total // 2, total - n, total - n - 7]:
        window = load_audio_window(path, start, n, target_sr)
        assert window.shape == (1, n)
        assert torch.allclose(window, whole[:, start : start + n], atol=TOLERANCE, rtol=0), start
    assert torch.allclose(load_audio_window(path, 0, None, target_sr), whole, atol=TOLERANCE, rtol=0)
    tail = load_audio_window(path, total - 100, n, target_sr)  # past the end: what is there
    assert tail.shape == (1, 100)


def test_crop_start_is_the_crop_waveform_draw() -> None:
    torch.manual_seed(5)
    old = [crop_waveform(torch.arange(1000.0), 100, None)[0].item() for _ in range(20)]
    torch.manual_seed(5)
    new = [crop_start(1000, 100, None) for _ in range(20)]
    assert old == new
    assert crop_start(100, 100) == 0 and crop_start(50, None) == 0  # no draw when it fits


def _old_pair(clips: CaptionDataset, max_samples: int, clip_index: int) -> torch.Tensor:
    """Today's path before the change: decode and resample the whole clip, then crop."""
    whole, _ = load_audio(clips.records[clip_index].path, clips.sample_rate)
    return crop_waveform(whole[0], max_samples, None)


@pytest.fixture
def real_format_clotho(tmp_path: Path) -> Path:
    """Clotho layout with 44.1 kHz 16-bit mono WAVs of 2-4 s (real format, shorter clips)."""
    names = {"development": [f"dev {i}, x.wav" for i in range(4)], "validation": ["v.wav"], "evaluation": ["e.wav"]}
    root = write_clotho(tmp_path / "clotho", names)
    for subset, files in names.items():
        for k, name in enumerate(files):
            write_noise(root / "CLOTHO_v2.1" / "clotho_audio_files" / subset / name, 2.0 + 0.5 * k, 44100, seed=k)
    return root


def test_caption_pairs_same_crops_as_whole_decode(real_format_clotho: Path) -> None:
    clips = Clotho(real_format_clotho, "development", sample_rate=32000)
    pairs = CaptionPairs(clips, max_seconds=1.0)
    for index in range(len(pairs)):
        torch.manual_seed(100 + index)
        new = pairs[index]["audio"]
        torch.manual_seed(100 + index)
        old = _old_pair(clips, pairs.max_samples, pairs.pairs[index][0])
        assert new.shape == old.shape == (32000,)
        assert torch.allclose(new, old, atol=TOLERANCE, rtol=0)
    evaluation = ClipItems(clips, max_seconds=1.5)[1]["audio"]
    assert torch.allclose(evaluation, load_audio(clips.records[1].path, 32000)[0][0, :48000], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("dataset", ["audiocaps", "macs"])
def test_every_reader_reads_windows(tmp_path: Path, dataset: str) -> None:
    """AudioCaps and MACS clips go through the same `CaptionDataset.load_crop` as Clotho."""
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"{dataset}_{k}.wav")
        write_noise(paths[-1], 2.5, 44100, seed=k)
    records = [ClipRecord(p.name, p, ("a sound",), dataset, "train") for p in paths]
    clips = CaptionDataset(records, dataset, 32000)
    for k in range(2):
        torch.manual_seed(k)
        new = clips.load_crop(k, 32000)
        torch.manual_seed(k)
        old = crop_waveform(load_audio(paths[k], 32000)[0][0], 32000, None)
        assert torch.allclose(new[0], old, atol=TOLERANCE, rtol=0)


def test_bad_file_in_window_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not audio")
    clips = CaptionDataset([ClipRecord("bad.wav", bad, ("x",), "clotho", "development")], "c", 32000, on_bad_audio="skip")
    assert clips.load_crop(0, 32000) is None and clips.bad_audio_skipped == 1
