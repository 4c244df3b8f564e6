"""What the browser demo does, without the web framework: checks, captions, frame similarity, search.

The page (:mod:`aac_lightning.serve.app`) only turns these results into components; every check a
request goes through is here and is tested without a browser. A request's bad input raises
:class:`ServeError` with the sentence the page shows; the server keeps serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from aac_lightning.checkpoints import checkpoint_kind, read_checkpoint
from aac_lightning.data.audio import AudioError, load_audio
from aac_lightning.inference import Captioner, Retriever

log = logging.getLogger(__name__)

__all__ = ["CaptionResult", "DemoBackend", "SearchHit", "ServeError", "ServeLimits", "split_by_kind"]

CAPTIONER_KINDS = ("xe", "scst")
RETRIEVAL_KINDS = ("contrastive",)


class ServeError(ValueError):
    """Bad input of one request: the message is shown in the page."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may send.

    Args:
        max_upload_mb: largest uploaded file (MB); the server refuses bigger uploads before reading them.
        max_seconds: longest clip captioned (s); longer recordings are refused with their length.
        silence_dbfs: a clip whose RMS level is below this (dB full scale) is refused as silent.
        max_query_chars: longest search query.
    """

    max_upload_mb: float = 20.0
    max_seconds: float = 60.0
    silence_dbfs: float = -70.0
    max_query_chars: int = 500

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_seconds", "max_query_chars"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass
class CaptionResult:
    """One captioned clip: the caption, its log-mel spectrogram and, for a phrase, frame similarities."""

    caption: str | None
    waveform: np.ndarray  # (T,) mono at sample_rate
    sample_rate: int
    similarity: tuple[np.ndarray, np.ndarray] | None = None  # (times_s (T',), cosine (T',))
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SearchHit:
    """One ranked clip of the served folder."""

    rank: int
    name: str  # relative to the folder
    score: float
    path: Path  # resolved, inside the folder


def split_by_kind(models: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """``(captioners, retrieval models)`` among checkpoints / exported folders, by their recorded kind."""
    captioners, retrievers = [], []
    for model in models:
        kind = checkpoint_kind(read_checkpoint(model))
        if kind in CAPTIONER_KINDS:
            captioners.append(str(model))
        elif kind in RETRIEVAL_KINDS:
            retrievers.append(str(model))
        else:
            raise ValueError(f"'{model}' is a model of kind {kind!r}: serve takes captioners {list(CAPTIONER_KINDS)} and retrieval models {list(RETRIEVAL_KINDS)}")
    return captioners, retrievers


class DemoBackend:
    """The models and the folder behind the page.

    Args:
        captioner: captions uploads (one checkpoint or an ensemble); None hides captioning.
        retriever: ranks ``audio_dir`` and draws a phrase's frame similarity; None hides both.
        audio_dir: the only folder whose files a search may return (and the page may play).
        limits: what one request may send (:class:`ServeLimits`).
        top_k: clips a search returns.
    """

    def __init__(
        self,
        captioner: Captioner | None,
        retriever: Retriever | None,
        audio_dir: str | os.PathLike | None = None,
        limits: ServeLimits = ServeLimits(),
        top_k: int = 5,
    ) -> None:
        if captioner is None and retriever is None:
            raise ValueError("serve needs at least one model: a captioner (XE / SCST) or a retrieval checkpoint")
        if audio_dir is not None and retriever is None:
            raise ValueError("--audio-dir is searched with a retrieval model: pass a retrieval checkpoint too")
        self.captioner = captioner
        self.retriever = retriever
        self.limits = limits
        self.top_k = top_k
        self.audio_dir = None if audio_dir is None else Path(audio_dir).resolve()
        self._served: dict[str, Path] = {}  # name (relative to the folder) -> resolved file inside it
        self._names_by_file: dict[str, str] = {}  # the retriever's file strings -> names
        if self.audio_dir is not None:
            if not self.audio_dir.is_dir():
                raise FileNotFoundError(f"--audio-dir '{audio_dir}' is not a folder")
            retriever.index(self.audio_dir, on_bad_audio="skip")  # embeddings cached as `search` caches them
            self._names_by_file = dict(zip(retriever.files, retriever.names))
            for name, path in zip(retriever.names, retriever.files):
                resolved = Path(path).resolve()
                if resolved.is_relative_to(self.audio_dir):  # a symbolic link out of the folder is not served
                    self._served[name] = resolved
            skipped = len(retriever.last_skipped)
            if skipped:
                log.warning("serve: %d file(s) of %s could not be decoded and are not searchable", skipped, self.audio_dir)

    @classmethod
    def from_models(
        cls,
        models: Sequence[str | os.PathLike],
        audio_dir: str | os.PathLike | None = None,
        device: str | None = None,
        limits: ServeLimits = ServeLimits(),
        beam_size: int = 3,
        top_k: int = 5,
    ) -> "DemoBackend":
        """Load checkpoints or exported folders: captioners form one captioner (an ensemble if several),
        retrieval models one retriever."""
        captioners, retrievers = split_by_kind(models)
        captioner = Captioner.from_checkpoint(captioners, device=device, beam_size=beam_size) if captioners else None
        retriever = Retriever.from_checkpoint(retrievers, device=device) if retrievers else None
        return cls(captioner, retriever, audio_dir, limits, top_k)

    @property
    def searchable(self) -> int:
        """Number of clips a search ranks."""
        return len(self._served)

    def read_upload(self, path: str | os.PathLike | None) -> tuple[np.ndarray, int]:
        """The uploaded clip as mono float32 ``(T,)`` and its rate, after every check of :class:`ServeLimits`."""
        if path is None or not str(path):
            raise ServeError("No audio: upload a file or record a clip first.")
        path = Path(path)
        name = path.name
        if not path.is_file():
            raise ServeError(f"The upload '{name}' did not arrive; upload it again.")
        size_mb = path.stat().st_size / 1e6
        if size_mb > self.limits.max_upload_mb:
            raise ServeError(f"'{name}' is {size_mb:.1f} MB; uploads are limited to {self.limits.max_upload_mb:g} MB.")
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError):
            raise ServeError(f"'{name}' is not an audio file this server can read (WAV, FLAC, OGG, AIFF, MP3).") from None
        if info.frames <= 0 or info.samplerate <= 0:
            raise ServeError(f"'{name}' holds no audio samples (an empty recording).")
        seconds = info.frames / info.samplerate
        if seconds > self.limits.max_seconds:
            raise ServeError(f"'{name}' is {seconds:.0f} s long; clips are limited to {self.limits.max_seconds:g} s. Cut it and upload again.")
        try:
            audio, rate = load_audio(path, sample_rate=None)  # (1, T), the file's rate
        except AudioError as err:
            raise ServeError(f"'{name}' cannot be used: {str(err).replace(str(path), name)}") from None
        wave = audio[0].numpy()  # (T,)
        rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
        level = -np.inf if rms == 0 else 20 * np.log10(rms)
        if level < self.limits.silence_dbfs:
            raise ServeError(f"'{name}' is silent (level {level:.0f} dBFS, below {self.limits.silence_dbfs:g} dBFS): nothing to caption.")
        return wave, rate

    def caption(self, path: str | os.PathLike | None, phrase: str = "") -> CaptionResult:
        """Caption an upload and, for a non-empty ``phrase``, its frame-level similarity to the phrase."""
        wave, rate = self.read_upload(path)
        phrase = (phrase or "").strip()
        if len(phrase) > self.limits.max_query_chars:
            raise ServeError(f"The phrase has {len(phrase)} characters; at most {self.limits.max_query_chars}.")
        result = CaptionResult(caption=None, waveform=wave, sample_rate=rate)
        if self.captioner is not None:
            result.caption = self.captioner.caption_waveform(wave, rate)
        else:
            result.notes.append("No captioner loaded: pass an XE or SCST checkpoint to `serve` for captions.")
        if phrase:
            if self.retriever is None:
                result.notes.append("Frame similarity needs a retrieval checkpoint: pass one to `serve`.")
            else:
                result.similarity = self.retriever.frame_similarity_waveform(wave, rate, phrase)
        return result

    def search(self, query: str, k: int | None = None) -> list[SearchHit]:
        """The ``k`` (default ``top_k``) best clips of the folder for ``query``, best first."""
        if self.retriever is None or self.audio_dir is None:
            raise ServeError("Search is off: start `serve` with a retrieval checkpoint and --audio-dir.")
        query = (query or "").strip()
        if not query:
            raise ServeError("Type a query first, e.g. 'a dog barks while cars pass'.")
        if len(query) > self.limits.max_query_chars:
            raise ServeError(f"The query has {len(query)} characters; at most {self.limits.max_query_chars}.")
        if not self._served:
            raise ServeError(f"The folder '{self.audio_dir.name}' holds no audio file this server could read.")
        k = self.top_k if k is None else k
        not_served = len(self.retriever.files) - len(self._served)  # links out of the folder, ranked but dropped
        with torch.inference_mode():
            (ranked,) = self.retriever.search(query, k=k + not_served)
        hits = []
        for path, score in ranked:
            name = self._names_by_file[path]
            if name in self._served and len(hits) < k:
                hits.append(SearchHit(rank=len(hits) + 1, name=name, score=score, path=self._served[name]))
        return hits

    def served_file(self, name: str) -> Path:
        """The file of the folder named ``name`` (as a search returns it); KeyError for any other name."""
        return self._served[name]
