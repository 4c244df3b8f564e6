"""Audio file reading: soundfile decoding, mono mix-down, band-limited resampling, validation."""

from __future__ import annotations

import logging
import math
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


def check_audio_file(path: Path) -> None:
    """`FileNotFoundError` for a missing file, `AudioError` for an empty one; both name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: '{path}'")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file '{path}' is empty (0 bytes)")


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
    check_audio_file(path)
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


def resampled_length(frames: int, orig_sr: int, target_sr: int) -> int:
    """Samples that `resample` returns for `frames` input samples (libsoxr rounds to nearest: n * out / in)."""
    if orig_sr == target_sr:
        return int(frames)
    return (2 * int(frames) * int(target_sr) + int(orig_sr)) // (2 * int(orig_sr))


# Formats whose header gives the exact decoded length (a seek lands on the sample). For the others
# (mp3) a window is cut from the whole decoded file, so lengths and crops match the full read.
SEEKABLE_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")

# Input context read on each side of a window before resampling, so that the window's samples equal
# those of the whole file resampled (libsoxr HQ's filter support is a few ms; 20 ms is ample:
# measured max abs difference ~2.4e-7 at 44.1 -> 32 kHz, float32 rounding).
WINDOW_CONTEXT_SECONDS = 0.02


def audio_length(path: str | os.PathLike, sample_rate: int | None = 32000) -> int:
    """Number of samples of the file at `sample_rate` (as `load_audio` returns it), from the header.

    Raises:
        AudioError: the header cannot be read, or the file has no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: '{path}'")
    if path.suffix.lower() not in SEEKABLE_EXTENSIONS:
        return load_audio(path, sample_rate)[0].shape[-1]
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot decode audio file '{path}': {err}") from err
    if info.frames <= 0:
        raise AudioError(f"audio file '{path}' has zero length (no samples)")
    return info.frames if sample_rate is None else resampled_length(info.frames, info.samplerate, sample_rate)


def load_audio_window(
    path: str | os.PathLike,
    start: int,
    num_samples: int | None,
    sample_rate: int | None = 32000,
    mono: bool = True,
) -> torch.Tensor:
    """Samples `[start, start + num_samples)` of the file at `sample_rate`, decoding only that window.

    Equal (to float32 rounding, ~1e-6) to `load_audio(path, sample_rate)[0][:, start:start + num_samples]`:
    the read starts and ends on whole resampling periods (`orig_sr / gcd` input samples map onto
    `target_sr / gcd` output samples) with `WINDOW_CONTEXT_SECONDS` of context either side, so the
    resampler sees the same neighbourhood as on the whole file. Only this window is checked for
    non-finite samples. `num_samples=None` reads to the end.

    Returns:
        audio `(channels, time)` float32 (mono: one channel).
    """
    path = Path(path)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if path.suffix.lower() not in SEEKABLE_EXTENSIONS:
        audio, _ = load_audio(path, sample_rate, mono)
        return audio[:, start : None if num_samples is None else start + num_samples]
    check_audio_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            file_sr, total = f.samplerate, f.frames
            target_sr = file_sr if sample_rate is None else int(sample_rate)
            if total <= 0:
                raise AudioError(f"audio file '{path}' has zero length (no samples)")
            out_total = resampled_length(total, file_sr, target_sr)
            stop = out_total if num_samples is None else min(out_total, start + num_samples)
            if target_sr == file_sr:
                in_start, in_stop, skip = start, stop, 0
            else:
                g = math.gcd(file_sr, target_sr)
                in_period, out_period = file_sr // g, target_sr // g
                context = -(-int(WINDOW_CONTEXT_SECONDS * file_sr) // in_period)  # whole periods
                first = max(0, start // out_period - context)
                last = -(-stop // out_period) + context
                in_start, in_stop = first * in_period, min(total, last * in_period)
                skip = start - first * out_period
            f.seek(in_start)
            data = f.read(frames=max(0, in_stop - in_start), dtype="float32", always_2d=True)  # (time, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot decode audio file '{path}': {err}") from err
    if not np.isfinite(data).all():
        raise AudioError(f"audio file '{path}' contains non-finite samples (NaN or inf)")
    if mono and data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
    if target_sr != file_sr:
        data = resample(data, file_sr, target_sr)
        if data.ndim == 1:
            data = data[:, None]
    data = data[skip : skip + (stop - start)]
    return torch.from_numpy(np.ascontiguousarray(data.T))


def crop_start(length: int, max_samples: int | None, generator: torch.Generator | None = None) -> int:
    """Start of a random window of `max_samples` in `length` samples (0 when it fits whole).

    The one offset draw of every training crop (whole-file, windowed or packed reads): one
    `torch.randint` on `generator` (the global RNG when `None`), and none when the clip is not longer.
    """
    if max_samples is None or length <= max_samples:
        return 0
    return int(torch.randint(0, length - max_samples + 1, (1,), generator=generator))


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
