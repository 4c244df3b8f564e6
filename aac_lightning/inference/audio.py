"""Audio input for inference: files, folders and arrays; undecodable files skipped on request.

Audio: any format libsndfile reads (WAV of any bit depth, FLAC, OGG, MP3, AIFF), any rate, any
number of channels; channels are averaged and the result resampled (libsoxr) to each model's rate,
exactly as :func:`aac_lightning.data.audio.load_audio` does for training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aac_lightning.ensembles.waveforms import file_progress
from aac_lightning.data.audio import AUDIO_EXTENSIONS, AudioError, list_audio_files, load_audio, resample

log = logging.getLogger(__name__)

__all__ = [
    "ON_BAD_AUDIO",
    "AudioInput",
    "array_to_mono",
    "check_on_bad_audio",
    "check_positive_int",
    "expand_audio_paths",
    "read_batches",
]

PROGRESS_MIN_FILES = 8  # progress bars only when there are more files than this
ON_BAD_AUDIO = ("error", "skip")

AudioInput = str | os.PathLike | Sequence[str | os.PathLike]


def expand_audio_paths(audio: AudioInput) -> list[tuple[Path, str]]:
    """Audio files named by ``audio`` as ``(path, label)`` pairs, in order.

    ``audio`` is a file, a folder or a sequence of those. A folder expands recursively to its
    audio files (extensions ``.wav .flac .ogg .mp3 .aiff .aif``, any case) sorted by path, each
    labelled with its path relative to the folder; a file is labelled as given. A path that does
    not exist raises FileNotFoundError naming it; a folder without audio files raises ValueError.
    """
    if isinstance(audio, (str, os.PathLike)):
        audio = [audio]
    items = list(audio)
    if not items:
        raise ValueError("no audio given: pass a file, a folder or a list of them")
    out: list[tuple[Path, str]] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"audio paths must be str or os.PathLike, got {type(item).__name__}: {item!r}")
        path = Path(item)
        if path.is_dir():
            files = list_audio_files(path)
            if not files:
                raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under the folder '{path}'")
            out.extend((f, f.relative_to(path).as_posix()) for f in files)
        elif path.is_file():
            out.append((path, str(item)))
        else:
            raise FileNotFoundError(f"audio path not found: '{path}'")
    return out


def check_on_bad_audio(value: str) -> None:
    if value not in ON_BAD_AUDIO:
        raise ValueError(f"on_bad_audio must be one of {list(ON_BAD_AUDIO)}, got {value!r}")


def check_positive_int(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")


def array_to_mono(waveform: np.ndarray | Tensor, sample_rate: int, target_rate: int) -> Tensor:
    """A ``(T,)`` or ``(C, T)`` array as the mono float32 ``(T',)`` tensor at ``target_rate``.

    The same operations in the same order as :func:`load_audio` (float32, channel mean, libsoxr),
    so an array read from a file gives the very samples the file gives. Integer arrays are read as
    PCM (int16 full scale 32768).
    """
    if isinstance(waveform, Tensor):
        waveform = waveform.detach().cpu().numpy()
    if not isinstance(waveform, np.ndarray):
        raise TypeError(f"waveform must be a numpy array or a torch tensor, got {type(waveform).__name__}")
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    if waveform.ndim == 1:
        data = waveform[:, None]  # (T, 1)
    elif waveform.ndim == 2:
        if waveform.shape[0] > waveform.shape[1]:
            raise ValueError(
                f"waveform of shape {tuple(waveform.shape)} has more channels than samples: pass "
                "(channels, time), e.g. `data.T` for soundfile's (time, channels) arrays"
            )
        data = waveform.T  # (T, C)
    else:
        raise ValueError(f"waveform must be (time,) or (channels, time), got shape {tuple(waveform.shape)}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"waveform has no samples (shape {tuple(waveform.shape)})")
    if np.issubdtype(data.dtype, np.unsignedinteger):
        raise ValueError(f"waveform of unsigned dtype {data.dtype}: convert it to float in [-1, 1] first")
    if np.issubdtype(data.dtype, np.integer):
        # integer PCM scaled as libsndfile does: full scale 2 ** (bits - 1)
        data = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"waveform must hold floats or integer PCM, got dtype {data.dtype}")
    data = np.ascontiguousarray(data, dtype=np.float32)  # (T, C)
    if not np.isfinite(data).all():
        raise ValueError("waveform contains non-finite samples (NaN or inf)")
    if data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)  # (T, 1)
    if sample_rate != target_rate:
        data = resample(data, int(sample_rate), target_rate)
        if data.ndim == 1:
            data = data[:, None]
    return torch.from_numpy(np.ascontiguousarray(data[:, 0]))  # (T',)


def read_batches(
    paths: Sequence[Path],
    rates: Iterable[int],
    batch_size: int,
    on_bad_audio: str = "error",
    skipped: list[tuple[str, str]] | None = None,
    description: str = "reading audio",
) -> Iterator[tuple[list[int], dict[int, list[Tensor]]]]:
    """Batches of decoded files: ``(indices into paths, {rate: [mono (T_i,) waveform, ...]})``.

    Each file is decoded once per rate (:func:`load_audio`). A file that cannot be decoded raises
    :class:`AudioError` naming it (``on_bad_audio="error"``), or is left out, logged and appended
    as ``(file, reason)`` to ``skipped`` (``"skip"``). Batches hold ``batch_size`` decoded files
    (the last one fewer).
    """
    check_on_bad_audio(on_bad_audio)
    check_positive_int(batch_size, "batch_size")
    rates = sorted({int(r) for r in rates})
    indices: list[int] = []
    waves: dict[int, list[Tensor]] = {rate: [] for rate in rates}
    with file_progress(len(paths), description, progress=len(paths) > PROGRESS_MIN_FILES) as bar:
        for index, path in enumerate(paths):
            bar.update(1)
            try:
                clip = {rate: load_audio(path, rate)[0][0] for rate in rates}  # each (T,)
            except AudioError as err:
                if on_bad_audio == "error":
                    raise
                if skipped is not None:
                    skipped.append((str(path), str(err)))
                log.warning("skipped: %s", err)
                continue
            indices.append(index)
            for rate, wave in clip.items():
                waves[rate].append(wave)
            if len(indices) == batch_size:
                yield indices, waves
                indices, waves = [], {rate: [] for rate in rates}
        if indices:
            yield indices, waves
