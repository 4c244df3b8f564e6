"""Audio file reading: soundfile decoding, mono mix-down, band-limited resampling, validation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, empty, or with non-finite samples."""


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling (libsoxr, high quality) of a `(time,)` or `(time, channels)` array."""
    if orig_sr == target_sr:
        return waveform
    return soxr.resample(waveform, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int | None = 32000,
    mono: bool = True,
    max_seconds: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Read an audio file as a float32 tensor `(channels, time)` at `sample_rate`.

    Args:
        path: the file (any format libsndfile reads: WAV of 8/16/24/32-bit int or float, FLAC, OGG...).
        sample_rate: target rate in Hz; `None` keeps the file's rate.
        mono: average the channels into one.
        max_seconds: read at most this many seconds from the start (saves I/O on long files).

    Returns:
        `(audio, sr)`: audio `(channels, time)` float32 in [-1, 1] for integer formats, and its rate.

    Raises:
        AudioError: the file cannot be decoded, has no samples, or contains NaN/inf; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: '{path}'")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file '{path}' is empty (0 bytes)")
    try:
        with sf.SoundFile(str(path)) as f:
            file_sr = f.samplerate
            frames = -1 if max_seconds is None else int(round(max_seconds * file_sr))
            data = f.read(frames=frames, dtype="float32", always_2d=True)  # (time, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot decode audio file '{path}': {err}") from err
    if data.shape[0] == 0:
        raise AudioError(f"audio file '{path}' has zero length (no samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file '{path}' contains non-finite samples (NaN or inf)")
    if mono and data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
    sr = file_sr
    if sample_rate is not None and sample_rate != file_sr:
        data = resample(data, file_sr, sample_rate)
        sr = sample_rate
        if data.ndim == 1:
            data = data[:, None]
    # (time, channels) -> (channels, time)
    audio = torch.from_numpy(np.ascontiguousarray(data.T))
    return audio, sr


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header, without decoding the samples."""
    info = sf.info(str(path))
    return info.frames / info.samplerate


def list_audio_files(directory: str | os.PathLike) -> list[Path]:
    """The audio files directly inside or below `directory`, sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"audio folder not found: '{directory}'")
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
