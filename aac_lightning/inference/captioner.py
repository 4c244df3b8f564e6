"""Captioning users' own recordings with one captioner or an ensemble."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from aac_lightning.checkpoints import check_pretrained_folders
from aac_lightning.ensembles.captioning import CaptionEnsemble
from aac_lightning.inference.audio import (
    AudioInput,
    array_to_mono,
    check_on_bad_audio,
    check_positive_int,
    expand_audio_paths,
    read_batches,
)
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH

__all__ = ["Captioner"]


class Captioner:
    """Captions audio files and arrays with one captioner (XE / SCST checkpoint) or an ensemble.

    An ensemble decodes with one shared beam on the per-step mean of the members' log-probabilities
    (:class:`~aac_lightning.ensembles.captioning.CaptionEnsemble`). Clips are captioned exactly as
    ``caption-eval`` captions them (:meth:`CaptionEnsemble.caption_waveforms`): a padded batch goes
    through each member's frozen extractor, which encodes every clip as if it were alone, then one
    beam search; a file's caption never depends on the other files of its batch. Build with
    :meth:`from_checkpoint` (a ``.ckpt``) or :meth:`from_pretrained` (an exported folder).
    """

    def __init__(self, ensemble: CaptionEnsemble) -> None:
        self.ensemble = ensemble
        self.last_skipped: list[tuple[str, str]] = []  # (file, reason) of the last caption() call

    @classmethod
    def from_checkpoint(
        cls,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device | None = None,
        beam_size: int = 3,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> "Captioner":
        """Load one captioning checkpoint, or several as an ensemble (they must share the vocabulary).

        A checkpoint may also be an exported model folder (``aac-lightning export``).
        """
        paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        if not paths:
            raise ValueError("checkpoints is empty: give at least one captioning (XE / SCST) checkpoint")
        check_positive_int(beam_size, "beam_size")
        check_positive_int(max_length, "max_length")
        ensemble = CaptionEnsemble.from_checkpoints(
            [str(p) for p in paths], device=device, beam_size=beam_size, max_length=max_length
        )
        return cls(ensemble)

    @classmethod
    def from_pretrained(
        cls,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device | None = None,
        beam_size: int = 3,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> "Captioner":
        """Load an exported captioner folder (``aac-lightning export``), or several as an ensemble.

        Same as :meth:`from_checkpoint` (which takes folders too), but refuses anything that is not a
        folder. Nothing is unpickled: the folder is read with json and safetensors.
        """
        paths = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
        check_pretrained_folders(paths)
        return cls.from_checkpoint(paths, device=device, beam_size=beam_size, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.ensemble.device

    @property
    def sample_rates(self) -> list[int]:
        """The distinct audio rates (Hz) the members' extractors read."""
        return self.ensemble.sample_rates

    def caption(
        self, audio: AudioInput, batch_size: int = 16, on_bad_audio: str = "error"
    ) -> list[tuple[str, str]]:
        """``(file, caption)`` for every audio file named by ``audio`` (files, folders, or a list).

        Folders expand recursively (see :func:`expand_audio_paths`); a file is returned as the path
        string (folder contents joined to the folder as given). ``batch_size`` clips are captioned
        together. A file that cannot be decoded raises
        :class:`~aac_lightning.data.audio.AudioError` naming it (``on_bad_audio="error"``), or is
        left out (``"skip"``): the skipped files and reasons are in :attr:`last_skipped` and logged.
        """
        check_positive_int(batch_size, "batch_size")
        check_on_bad_audio(on_bad_audio)
        paths = [path for path, _ in expand_audio_paths(audio)]
        self.last_skipped = []
        results: list[tuple[str, str]] = []
        for indices, waves in read_batches(paths, self.sample_rates, batch_size, on_bad_audio, self.last_skipped, "captioning"):
            captions = self.ensemble.caption_waveforms(waves)
            results.extend((str(paths[i]), text) for i, text in zip(indices, captions))
        return results

    def caption_waveform(self, waveform: np.ndarray | Tensor, sample_rate: int) -> str:
        """Caption of one waveform: ``(time,)`` mono or ``(channels, time)``, at any ``sample_rate``.

        Integer arrays are read as PCM (int16 full scale 32768). Channels are averaged, then the
        signal is resampled to each member's rate as audio files are.
        """
        waves = {rate: [array_to_mono(waveform, sample_rate, rate)] for rate in self.sample_rates}
        return self.ensemble.caption_waveforms(waves)[0]
