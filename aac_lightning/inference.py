"""Inference on users' own recordings: caption audio files and search a folder of audio with text.

Python (notebooks)::

    from aac_lightning import Captioner, Retriever

    captioner = Captioner.from_checkpoint("runs/scst/best.ckpt")          # several paths: ensemble
    captioner.caption("recordings/")                                       # [(file, caption), ...]
    captioner.caption_waveform(samples, sample_rate=44100)                 # an array, (T,) or (C, T)

    retriever = Retriever.from_checkpoint(["a.ckpt", "b.ckpt"])            # similarity matrices averaged
    retriever.index("recordings/")                                         # embeddings cached on disk
    retriever.search("a dog barks while cars pass", k=5)                   # [[(file, score), ...]]
    times, scores = retriever.frame_similarity("recordings/street.wav", "a dog barks")

Command line: ``aac-lightning caption CKPT... AUDIO...`` and
``aac-lightning search CKPT... --audio-dir DIR QUERY...`` (see :func:`caption_command` and
:func:`search_command`).

Audio: any format libsndfile reads (WAV of any bit depth, FLAC, OGG, MP3, AIFF), any rate, any
number of channels; channels are averaged and the result resampled (libsoxr) to each model's rate,
exactly as :func:`aac_lightning.data.audio.load_audio` does for training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from aac_lightning.captioning_ensemble import CaptionEnsemble
from aac_lightning.data.audio import AUDIO_EXTENSIONS, AudioError, list_audio_files, load_audio, resample
from aac_lightning.features import state_dict_sha256
from aac_lightning.metrics.retrieval import top_k_candidates
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH
from aac_lightning.retrieval_ensemble import RetrievalEnsemble

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_DIR_NAME",
    "Captioner",
    "Retriever",
    "caption_command",
    "expand_audio_paths",
    "frame_embeddings",
    "frame_times",
    "search_command",
]

CACHE_DIR_NAME = ".aac_lightning_cache"  # default embedding cache, inside the indexed folder
CACHE_FORMAT = 1
PROGRESS_MIN_FILES = 8  # progress bars only when there are more files than this
ON_BAD_AUDIO = ("error", "skip")

AudioInput = str | os.PathLike | Sequence[str | os.PathLike]


# ------------------------------------------------------------------------------------ audio input


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


def _check_on_bad_audio(value: str) -> None:
    if value not in ON_BAD_AUDIO:
        raise ValueError(f"on_bad_audio must be one of {list(ON_BAD_AUDIO)}, got {value!r}")


def _check_positive_int(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")


def _array_to_mono(waveform: np.ndarray | Tensor, sample_rate: int, target_rate: int) -> Tensor:
    """A ``(T,)`` or ``(C, T)`` array as the mono float32 ``(T',)`` tensor at ``target_rate``.

    The same operations in the same order as :func:`load_audio` (float32, channel mean, libsoxr),
    so an array read from a file gives the very samples the file gives.
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


def _progress(items: Sequence[Any], description: str):
    """A tqdm bar on stderr, shown only for more than a handful of items."""
    return tqdm(items, desc=description, unit="file", disable=len(items) <= PROGRESS_MIN_FILES, file=sys.stderr)


# ------------------------------------------------------------------------------------- captioning


class Captioner:
    """Captions audio files and arrays with one captioner (XE / SCST checkpoint) or an ensemble.

    An ensemble decodes with one shared beam on the per-step mean of the members' log-probabilities
    (:class:`~aac_lightning.captioning_ensemble.CaptionEnsemble`). Each clip goes through the frozen
    extractors alone, unpadded, as the training feature cache does; clips are then decoded in
    batches (the captioner skips padded frames), so a file's caption never depends on the other
    files of its batch. Build with :meth:`from_checkpoint`.
    """

    def __init__(self, ensemble: CaptionEnsemble) -> None:
        self.ensemble = ensemble
        self.last_skipped: list[tuple[str, str]] = []  # (file, reason) of the last caption() call

    @classmethod
    def from_checkpoint(
        cls,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device = "cpu",
        beam_size: int = 3,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> "Captioner":
        """Load one captioning checkpoint, or several as an ensemble (they must share the vocabulary)."""
        paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        if not paths:
            raise ValueError("checkpoints is empty: give at least one captioning (XE / SCST) checkpoint")
        _check_positive_int(beam_size, "beam_size")
        _check_positive_int(max_length, "max_length")
        ensemble = CaptionEnsemble.from_checkpoints(
            [str(p) for p in paths], device=device, beam_size=beam_size, max_length=max_length
        )
        return cls(ensemble)

    @property
    def device(self) -> torch.device:
        return self.ensemble.device

    @property
    def sample_rates(self) -> list[int]:
        """The distinct audio rates (Hz) the members' extractors read."""
        return sorted({int(m.extractor.sample_rate) for m in self.ensemble.captioners})

    @torch.no_grad()
    def _clip_features(self, waves: Mapping[int, Tensor]) -> list[Tensor]:
        """Each member's valid frames ``(T'_m, D_m)`` of one clip given as ``{rate: (T,)}``."""
        features = []
        for member in self.ensemble.captioners:
            audio = waves[int(member.extractor.sample_rate)].to(self.device)[None]  # (1, T)
            out = member.extractor(audio, torch.tensor([audio.shape[1]], device=self.device))
            features.append(out["frames"][0, : int(out["frame_lengths"][0])])  # (T'_m, D_m)
        return features

    @torch.no_grad()
    def _decode(self, clips: Sequence[Sequence[Tensor]]) -> list[str]:
        """Captions of a batch of clips, each given as its members' frames ``(T'_m, D_m)``."""
        features, lengths = [], []
        for m in range(len(self.ensemble.captioners)):
            frames = [clip[m] for clip in clips]
            features.append(pad_sequence(frames, batch_first=True))  # (B, T'max, D_m), zero-padded
            lengths.append(torch.tensor([f.shape[0] for f in frames], device=self.device))  # (B,)
        return self.ensemble.decode(features, lengths)  # one shared beam over the members

    def caption(
        self, audio: AudioInput, batch_size: int = 16, on_bad_audio: str = "error"
    ) -> list[tuple[str, str]]:
        """``(file, caption)`` for every audio file named by ``audio`` (files, folders, or a list).

        Folders expand recursively (see :func:`expand_audio_paths`); a file is returned as the path
        string (folder contents joined to the folder as given). ``batch_size`` clips are decoded
        together. A file that cannot be decoded raises
        :class:`~aac_lightning.data.audio.AudioError` naming it (``on_bad_audio="error"``), or is
        left out (``"skip"``): the skipped files and reasons are in :attr:`last_skipped` and logged.
        """
        _check_positive_int(batch_size, "batch_size")
        _check_on_bad_audio(on_bad_audio)
        paths = [path for path, _ in expand_audio_paths(audio)]
        self.last_skipped = []
        results: list[tuple[str, str]] = []
        pending: list[tuple[Path, list[Tensor]]] = []

        def flush() -> None:
            if pending:
                captions = self._decode([features for _, features in pending])
                results.extend((str(path), text) for (path, _), text in zip(pending, captions))
                pending.clear()

        for path in _progress(paths, "captioning"):
            try:
                waves = {rate: load_audio(path, rate)[0][0] for rate in self.sample_rates}  # each (T,)
            except AudioError as err:
                if on_bad_audio == "error":
                    raise
                self.last_skipped.append((str(path), str(err)))
                log.warning("skipped: %s", err)
                continue
            pending.append((path, self._clip_features(waves)))
            if len(pending) == batch_size:
                flush()
        flush()
        return results

    def caption_waveform(self, waveform: np.ndarray | Tensor, sample_rate: int) -> str:
        """Caption of one waveform: ``(time,)`` mono or ``(channels, time)``, at any ``sample_rate``.

        Integer arrays are read as PCM (int16 full scale 32768). Channels are averaged, then the
        signal is resampled to each member's rate as audio files are.
        """
        waves = {rate: _array_to_mono(waveform, sample_rate, rate) for rate in self.sample_rates}
        return self._decode([self._clip_features(waves)])[0]


# -------------------------------------------------------------------------------------- retrieval


def frame_embeddings(model: BiEncoder, waveform: Tensor) -> Tensor:
    """Unit-norm embeddings ``(T', E)`` of the valid frames of one mono waveform ``(T,)``.

    Each frame of the audio encoder's frame sequence goes through the layers that map the pooled
    features to the clip embedding, applied frame by frame: for CNN14 / Wavegram-Logmel-CNN14
    ``relu(fc1(frame))`` (the clip is ``relu(fc1(max_t + mean_t))``), for encoders whose frames
    already live in the clip space (AST) nothing; then the bi-encoder's audio projection. This is
    the usual frame-level relevance approximation: the model was trained on clip embeddings only,
    so frame scores are comparable with each other rather than calibrated like clip scores.
    """
    from aac_lightning.nn.panns import Cnn14, WavegramLogmelCnn14

    encoder = model.audio_encoder
    waveform = waveform.reshape(1, -1)  # (1, T)
    lengths = torch.tensor([waveform.shape[1]], device=waveform.device)
    out = encoder(waveform, lengths)
    frames = out["frames"][0, : int(out["frame_lengths"][0])]  # (T', D)
    if isinstance(encoder, (Cnn14, WavegramLogmelCnn14)):
        frames = F.relu(encoder.fc1(frames))  # (T', clip_dim)
    elif encoder.frame_dim != encoder.clip_dim:
        raise NotImplementedError(
            f"{type(encoder).__name__}: frames ({encoder.frame_dim}) and clip embedding ({encoder.clip_dim}) "
            "differ in size and no frame-to-clip mapping is known for this encoder"
        )
    return F.normalize(model.audio_projection(frames), dim=-1)  # (T', E)


def frame_times(encoder: torch.nn.Module, num_frames: int, num_samples: int) -> np.ndarray:
    """Centre time (s) of each of the first ``num_frames`` output frames of ``encoder``.

    CNN14-family frames pool 32 log-mel frames of a centred STFT (hop ``hop_size``); AST frames are
    patches of ``patch`` fbank frames every ``tstride`` frames (Kaldi frames, 25 ms / 10 ms). Other
    encoders: frames spread evenly over the clip. Times are clipped to the clip's duration.
    """
    from aac_lightning.nn.panns import TIME_DOWNSAMPLING, Cnn14, WavegramLogmelCnn14

    rate = float(encoder.sample_rate)
    index = np.arange(num_frames, dtype=np.float64)
    if isinstance(encoder, (Cnn14, WavegramLogmelCnn14)):
        centres = (index * TIME_DOWNSAMPLING + (TIME_DOWNSAMPLING - 1) / 2) * encoder.hop_size / rate
    elif hasattr(encoder, "tstride") and hasattr(encoder, "fbank"):  # AST
        shift, window = encoder.fbank.window_shift, encoder.fbank.window_size
        patch = getattr(getattr(getattr(encoder, "v", None), "patch_embed", None), "patch_size", (encoder.tstride,) * 2)
        patch_t = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
        centres = ((index * encoder.tstride + (patch_t - 1) / 2) * shift + window / 2) / rate
    else:
        centres = (index + 0.5) * (num_samples / rate) / max(1, num_frames)
    return np.minimum(centres, num_samples / rate)


def _audio_side_key(path: Path, model: BiEncoder) -> str:
    """Content hash of what determines a retrieval checkpoint's audio embeddings.

    The audio encoder's architecture (name and arguments, from the checkpoint's hyper-parameters)
    and the weights of the audio encoder and audio projection: checkpoints with other weights never
    share a cache; re-saving the same weights (e.g. other optimizer state) keeps it.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files that cannot be memory-mapped are read whole
        ckpt = read_checkpoint(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("audio_encoder.", "audio_projection."))}
    payload = {
        "format": CACHE_FORMAT,
        "audio_encoder": hparams.get("audio_encoder", type(model.audio_encoder).__name__),
        "audio_encoder_kwargs": hparams.get("audio_encoder_kwargs"),
        "sample_rate": int(model.audio_encoder.sample_rate),
        "weights": state_dict_sha256(state),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class _EmbeddingCache:
    """Audio embeddings of one model (``key``) for files under one folder, in one ``.pt`` file.

    Entries are keyed by the file path relative to the folder and stamped with its size and
    modification time (ns); a stamp that differs means the file changed and is re-encoded. The file
    is replaced atomically, so an interrupted write never leaves a half-written cache. ``folder``
    names the indexed folder in the file name when the cache lives outside it (a cache folder
    shared by several audio folders); a cache inside its folder moves with it.
    """

    def __init__(self, cache_dir: Path, key: str, folder: Path | None = None) -> None:
        self.key = key
        scope = "" if folder is None else "-" + hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:12]
        self.path = cache_dir / f"audio-embeddings-{key[:24]}{scope}.pt"
        self.entries: dict[str, tuple[int, int, Tensor]] = {}  # name -> (size, mtime_ns, (E,))
        self.dirty = False
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            if data.get("format") != CACHE_FORMAT or data.get("key") != self.key:
                raise ValueError("format or model key differs")
            names, sizes, mtimes, embeddings = data["names"], data["sizes"], data["mtimes_ns"], data["embeddings"]
            if not (len(names) == len(sizes) == len(mtimes) == embeddings.shape[0]):
                raise ValueError("inconsistent entry counts")
        except Exception as err:  # noqa: BLE001 - an unusable cache is rebuilt, never trusted
            log.warning("ignoring the embedding cache '%s' (%s): it will be rebuilt", self.path, err)
            self.dirty = True
            return
        self.entries = {n: (int(s), int(m), e) for n, s, m, e in zip(names, sizes, mtimes, embeddings)}

    def get(self, name: str, stamp: tuple[int, int]) -> Tensor | None:
        entry = self.entries.get(name)
        return entry[2] if entry is not None and entry[:2] == stamp else None

    def put(self, name: str, stamp: tuple[int, int], embedding: Tensor) -> None:
        self.entries[name] = (*stamp, embedding)
        self.dirty = True

    def prune(self, root: Path) -> None:
        """Drop the entries whose file no longer exists under ``root``."""
        gone = [name for name in self.entries if not (root / name).is_file()]
        for name in gone:
            del self.entries[name]
        self.dirty = self.dirty or bool(gone)

    def write(self) -> None:
        if not self.dirty:
            return
        names = sorted(self.entries)
        payload = {
            "format": CACHE_FORMAT,
            "key": self.key,
            "names": names,
            "sizes": [self.entries[n][0] for n in names],
            "mtimes_ns": [self.entries[n][1] for n in names],
            "embeddings": torch.stack([self.entries[n][2] for n in names]) if names else torch.zeros(0, 0),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("cannot write the embedding cache '%s' (%s): embeddings are not cached", self.path, err)
            return
        self.dirty = False


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class Retriever:
    """Text-to-audio search over a folder of audio with one retrieval checkpoint or an ensemble.

    An ensemble scores with the mean of its members' cosine similarity matrices
    (:class:`~aac_lightning.retrieval_ensemble.RetrievalEnsemble`). :meth:`index` encodes the audio
    once and caches the embeddings on disk; :meth:`search` and :meth:`similarity` then only encode
    the queries. Build with :meth:`from_checkpoint`.
    """

    def __init__(
        self,
        ensemble: RetrievalEnsemble,
        model_keys: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ) -> None:
        if len(model_keys) != len(ensemble):
            raise ValueError(f"need one model key per member ({len(ensemble)}), got {len(model_keys)}")
        self.ensemble = ensemble
        self.model_keys = list(model_keys)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.use_cache = use_cache
        self.root: Path | None = None
        self._files: list[Path] = []
        self._names: list[str] = []
        self._embeddings: list[Tensor] = []  # per member (A, E_m)
        self.last_skipped: list[tuple[str, str]] = []

    @classmethod
    def from_checkpoint(
        cls,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ) -> "Retriever":
        """Load one retrieval checkpoint, or several as an ensemble.

        ``cache_dir``: where :meth:`index` keeps audio embeddings (default: a
        ``.aac_lightning_cache`` folder inside the indexed folder); ``use_cache=False`` neither
        reads nor writes any cache.
        """
        paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        ensemble = RetrievalEnsemble.from_checkpoints(paths, device=device)
        keys = [_audio_side_key(Path(p), model) for p, model in zip(paths, ensemble.models)]
        return cls(ensemble, keys, cache_dir=cache_dir, use_cache=use_cache)

    @property
    def files(self) -> list[str]:
        """The indexed files (paths joined to the folder as given), in index order."""
        return [str(p) for p in self._files]

    @property
    def names(self) -> list[str]:
        """The indexed files relative to the indexed folder, in index order."""
        return list(self._names)

    @torch.inference_mode()
    def _encode_file(self, path: Path, members: Sequence[int]) -> dict[int, Tensor]:
        """``{member: (E_m,)}`` embeddings of one file, decoded once per distinct rate, unbatched.

        One file per forward pass, so an embedding never depends on which other files were encoded
        with it (zero-padding a batch changes the convolutions near the end of shorter clips).
        """
        out: dict[int, Tensor] = {}
        by_rate: dict[int, list[int]] = {}
        for m in members:
            by_rate.setdefault(self.ensemble.sample_rates[m], []).append(m)
        for rate, indices in by_rate.items():
            audio = load_audio(path, rate)[0]  # (1, T)
            audio = audio.to(self.ensemble.device)
            lengths = torch.tensor([audio.shape[1]], device=audio.device)
            for m in indices:
                out[m] = self.ensemble.models[m].encode_audio(audio, lengths)[0].float().cpu()  # (E_m,)
        return out

    def index(self, audio: AudioInput, on_bad_audio: str = "error") -> None:
        """Compute (or read from the cache) the audio embeddings of a folder or of files.

        A folder is searched recursively; for a list of files the folder is their closest common
        parent. Cache entries are keyed by the model's content hash and the file's path relative to
        the folder, size and modification time: changed or added files are encoded, entries of
        removed files dropped. ``on_bad_audio="skip"`` leaves undecodable files out (counted,
        logged, listed in :attr:`last_skipped`) instead of raising AudioError.
        """
        _check_on_bad_audio(on_bad_audio)
        single_folder = isinstance(audio, (str, os.PathLike)) and Path(audio).is_dir()
        paths = [path for path, _ in expand_audio_paths(audio)]
        # absolute without resolving symbolic links, so linked files keep their place in the folder
        absolute = [Path(os.path.abspath(p)) for p in paths]
        if single_folder:
            root = Path(audio)
        else:
            root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
        root_abs = os.path.abspath(root)
        names = [Path(os.path.relpath(p, root_abs)).as_posix() for p in absolute]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"audio files given twice: {repeated[:5]}")
        caches: list[_EmbeddingCache | None] = [None] * len(self.ensemble)
        if self.use_cache:
            cache_dir = self.cache_dir if self.cache_dir is not None else root / CACHE_DIR_NAME
            inside = Path(root_abs) in Path(os.path.abspath(cache_dir)).parents
            folder = None if inside else Path(root_abs)
            shared: dict[str, _EmbeddingCache] = {}  # identical members share one cache file
            for m, key in enumerate(self.model_keys):
                if key not in shared:
                    shared[key] = _EmbeddingCache(cache_dir, key, folder)
                caches[m] = shared[key]
        stamps = [_file_stamp(p) for p in paths]
        embeddings: list[list[Tensor | None]] = [
            [None if cache is None else cache.get(name, stamp) for name, stamp in zip(names, stamps)] for cache in caches
        ]
        todo = [i for i in range(len(paths)) if any(embeddings[m][i] is None for m in range(len(caches)))]
        self.last_skipped = []
        bad: set[int] = set()
        for i in _progress(todo, "encoding audio"):
            members = [m for m in range(len(caches)) if embeddings[m][i] is None]
            try:
                encoded = self._encode_file(paths[i], members)
            except AudioError as err:
                if on_bad_audio == "error":
                    raise
                self.last_skipped.append((str(paths[i]), str(err)))
                log.warning("skipped: %s", err)
                bad.add(i)
                continue
            for m, emb in encoded.items():
                embeddings[m][i] = emb
                if caches[m] is not None:
                    caches[m].put(names[i], stamps[i], emb)
        for cache in {id(c): c for c in caches if c is not None}.values():
            cache.prune(root)
            cache.write()
        keep = [i for i in range(len(paths)) if i not in bad]
        if not keep:
            raise ValueError(f"none of the {len(paths)} audio files could be decoded")
        self.root = root
        self._files = [paths[i] for i in keep]
        self._names = [names[i] for i in keep]
        self._embeddings = [torch.stack([per_file[i] for i in keep]) for per_file in embeddings]  # (A, E_m)
        log.info("indexed %d audio files under '%s' (%d encoded)", len(keep), root, len(todo) - len(bad))

    def _queries(self, queries: str | Sequence[str]) -> list[str]:
        return [queries] if isinstance(queries, str) else list(queries)

    def similarity(self, queries: str | Sequence[str], files: AudioInput | None = None) -> Tensor:
        """Ensemble scores ``(Q, A)``: the mean over members of the cosine of query and audio.

        ``files=None`` scores the indexed files (see :meth:`index`); otherwise the files given,
        taking indexed ones from the index and encoding the others (without caching them).
        """
        texts = self.ensemble.encode_texts(self._queries(queries))  # per member (Q, E_m)
        if files is None:
            if not self._files:
                raise RuntimeError("nothing indexed: call index(folder) first, or pass files")
            audio = self._embeddings
        else:
            position = {p.resolve(): i for i, p in enumerate(self._files)}
            columns: list[list[Tensor]] = [[] for _ in range(len(self.ensemble))]
            for path, _ in expand_audio_paths(files):
                i = position.get(path.resolve())
                encoded = (
                    {m: emb[i] for m, emb in enumerate(self._embeddings)}
                    if i is not None
                    else self._encode_file(path, range(len(self.ensemble)))
                )
                for m in range(len(self.ensemble)):
                    columns[m].append(encoded[m])
            audio = [torch.stack(c) for c in columns]  # per member (A, E_m)
        return self.ensemble.similarity(texts, audio)

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """For each query, the ``k`` best indexed files (paths) and their scores, best first."""
        _check_positive_int(k, "k")
        sim = self.similarity(queries)  # (Q, A)
        scores, indices = top_k_candidates(sim, k)  # (Q, k'), (Q, k')
        return [
            [(str(self._files[i]), float(s)) for i, s in zip(row_i, row_s)]
            for row_i, row_s in zip(indices.tolist(), scores.tolist())
        ]

    @torch.inference_mode()
    def frame_similarity(self, audio_path: str | os.PathLike, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Where in a recording a query fits: ``(times_s (T',), scores (T',))``.

        The cosine similarity between the query's text embedding and each frame of the audio
        encoder's frame sequence, passed through the same layers as the clip embedding (see
        :func:`frame_embeddings`): the usual frame-level relevance approximation, for plots rather
        than for thresholds. ``times_s`` are the frames' centres in seconds. With an ensemble, the
        first member (first checkpoint) is used.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        model = self.ensemble.models[0]
        audio = load_audio(audio_path, model.audio_encoder.sample_rate)[0][0].to(self.ensemble.device)  # (T,)
        frames = frame_embeddings(model, audio)  # (T', E)
        text = model.encode_text([query])  # (1, E)
        scores = (frames @ text[0]).float().cpu().numpy()  # (T',)
        times = frame_times(model.audio_encoder, len(scores), audio.shape[0])
        return times, scores


# ----------------------------------------------------------------------------------- command line


def _split_checkpoints(items: Sequence[str]) -> tuple[list[str], list[str]]:
    checkpoints = [a for a in items if a.lower().endswith(".ckpt")]
    rest = [a for a in items if not a.lower().endswith(".ckpt")]
    return checkpoints, rest


def caption_command(args: Sequence[str]) -> None:
    """``aac-lightning caption CKPT [CKPT ...] AUDIO [AUDIO ...]`` (see ``--help``)."""
    from aac_lightning.metrics.captioning import write_dcase_captioning_csv

    parser = argparse.ArgumentParser(
        prog="aac-lightning caption",
        description="Caption audio files with a captioning checkpoint (XE or SCST) or an ensemble. "
        "Arguments ending in .ckpt are checkpoints (several = ensemble); the others are audio files or "
        "folders (searched recursively). Prints 'file<TAB>caption' lines, files as given or relative "
        "to the folder given.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CKPT_OR_AUDIO", help="checkpoints (.ckpt), then audio files / folders")
    parser.add_argument("--out", help="also write the DCASE 2022 task 6a submission CSV (file_name,caption_predicted)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam width (default 3)")
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"longest caption in words (default {DEFAULT_MAX_LENGTH}, the authors')"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips decoded at once (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--on-bad-audio", choices=ON_BAD_AUDIO, default="error",
                        help="a file that cannot be decoded stops the run (error, default) or is skipped and counted (skip)")
    ns = parser.parse_intermixed_args(list(args))  # options may sit between positionals
    checkpoints, audio = _split_checkpoints(ns.inputs)
    if not checkpoints:
        parser.error("give at least one captioning checkpoint (a file ending in .ckpt)")
    if not audio:
        parser.error("give at least one audio file or folder")
    for name in ("beam_size", "max_length", "batch_size"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    try:
        items = expand_audio_paths(audio)  # fail on a missing path before loading any model
        captioner = Captioner.from_checkpoint(checkpoints, device=ns.device, beam_size=ns.beam_size, max_length=ns.max_length)
        label = {str(path): name for path, name in items}
        results = captioner.caption([path for path, _ in items], batch_size=ns.batch_size, on_bad_audio=ns.on_bad_audio)
    except (AudioError, HandoffError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aac-lightning caption: error: {err}") from err
    for path, text in results:
        print(f"{label[path]}\t{text}")
    if captioner.last_skipped:  # each one was logged with its reason as it was met
        print(f"skipped {len(captioner.last_skipped)} of {len(items)} audio files", file=sys.stderr)
    if ns.out:
        try:
            write_dcase_captioning_csv(ns.out, [label[p] for p, _ in results], [t for _, t in results])
        except ValueError as err:
            raise SystemExit(f"aac-lightning caption: error: cannot write '{ns.out}': {err}") from err
        print(f"submission written to {ns.out}", file=sys.stderr)
    if not results:
        raise SystemExit("aac-lightning caption: error: no audio file could be captioned")


def search_command(args: Sequence[str]) -> None:
    """``aac-lightning search CKPT [CKPT ...] --audio-dir DIR QUERY [QUERY ...]`` (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning search",
        description="Rank the audio files of a folder for text queries with a retrieval checkpoint or an "
        "ensemble (mean of the cosine similarity matrices). Arguments ending in .ckpt are checkpoints, "
        "the others queries. Audio embeddings are cached (DIR/.aac_lightning_cache by default) and "
        "recomputed only for added or changed files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CKPT_OR_QUERY", help="checkpoints (.ckpt), then text queries")
    parser.add_argument("--audio-dir", required=True, help="folder of audio files (searched recursively)")
    parser.add_argument("-k", type=int, default=10, help="files listed per query (default 10)")
    parser.add_argument("--cache-dir", help=f"embedding cache folder (default: AUDIO_DIR/{CACHE_DIR_NAME})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--on-bad-audio", choices=ON_BAD_AUDIO, default="error",
                        help="a file that cannot be decoded stops the run (error, default) or is skipped and counted (skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text lines")
    ns = parser.parse_intermixed_args(list(args))  # options may sit between positionals
    checkpoints, queries = _split_checkpoints(ns.inputs)
    if not checkpoints:
        parser.error("give at least one retrieval checkpoint (a file ending in .ckpt)")
    if not queries:
        parser.error("give at least one text query")
    if any(not q.strip() for q in queries):
        parser.error("queries must not be empty")
    if ns.k < 1:
        parser.error(f"-k must be >= 1, got {ns.k}")
    if not Path(ns.audio_dir).is_dir():
        parser.error(f"--audio-dir '{ns.audio_dir}' is not a folder")
    try:
        retriever = Retriever.from_checkpoint(checkpoints, device=ns.device, cache_dir=ns.cache_dir, use_cache=not ns.no_cache)
        retriever.index(ns.audio_dir, on_bad_audio=ns.on_bad_audio)
        results = retriever.search(queries, k=ns.k)
    except (AudioError, HandoffError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aac-lightning search: error: {err}") from err
    relative = dict(zip(retriever.files, retriever.names))
    if retriever.last_skipped:  # each one was logged with its reason as it was met
        total = len(retriever.files) + len(retriever.last_skipped)
        print(f"skipped {len(retriever.last_skipped)} of {total} audio files", file=sys.stderr)
    if ns.json:
        payload = {
            "audio_dir": str(ns.audio_dir),
            "checkpoints": checkpoints,
            "num_files": len(retriever.files),
            "results": [
                {
                    "query": query,
                    "ranking": [{"rank": r, "score": score, "file": relative[path]} for r, (path, score) in enumerate(ranked, 1)],
                }
                for query, ranked in zip(queries, results)
            ],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    for n, (query, ranked) in enumerate(zip(queries, results)):
        if n:
            print()
        print(f"# {query}")
        for r, (path, score) in enumerate(ranked, start=1):
            print(f"{r}\t{score:.4f}\t{relative[path]}")
