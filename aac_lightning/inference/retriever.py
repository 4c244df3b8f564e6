"""Text-to-audio search over a folder of users' audio with one retrieval checkpoint or an ensemble."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aac_lightning.checkpoints import check_pretrained_folders
from aac_lightning.data.audio import load_audio
from aac_lightning.ensembles.retrieval import RetrievalEnsemble
from aac_lightning.inference.audio import (
    AudioInput,
    array_to_mono,
    check_on_bad_audio,
    check_positive_int,
    expand_audio_paths,
    read_batches,
)
from aac_lightning.inference.cache import CACHE_DIR_NAME, EmbeddingCache, audio_side_key, file_stamp
from aac_lightning.inference.frames import frame_scores
from aac_lightning.metrics.retrieval import top_k_candidates

log = logging.getLogger(__name__)

__all__ = ["Retriever"]


class Retriever:
    """Text-to-audio search over a folder of audio with one retrieval checkpoint or an ensemble.

    An ensemble scores with the mean of its members' cosine similarity matrices
    (:class:`~aac_lightning.ensembles.retrieval.RetrievalEnsemble`). :meth:`index` encodes the audio
    once, exactly as ``retrieval-eval`` does (:meth:`RetrievalEnsemble.encode_waveforms`: padded
    batches, each clip encoded as if it were alone), and caches the embeddings on disk;
    :meth:`search` and :meth:`similarity` then only encode the queries. Build with
    :meth:`from_checkpoint` (a ``.ckpt``) or :meth:`from_pretrained` (an exported folder).
    """

    def __init__(
        self,
        ensemble: RetrievalEnsemble,
        model_keys: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        batch_size: int = 16,
    ) -> None:
        if len(model_keys) != len(ensemble):
            raise ValueError(f"need one model key per member ({len(ensemble)}), got {len(model_keys)}")
        check_positive_int(batch_size, "batch_size")
        self.ensemble = ensemble
        self.model_keys = list(model_keys)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.use_cache = use_cache
        self.batch_size = batch_size
        self.root: Path | None = None
        self._files: list[Path] = []
        self._names: list[str] = []
        self._embeddings: list[Tensor] = []  # per member (A, E_m)
        self.last_skipped: list[tuple[str, str]] = []

    @classmethod
    def from_checkpoint(
        cls,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        batch_size: int = 16,
    ) -> "Retriever":
        """Load one retrieval checkpoint, or several as an ensemble (exported model folders too).

        ``cache_dir``: where :meth:`index` keeps audio embeddings (default: a
        ``.aac_lightning_cache`` folder inside the indexed folder); ``use_cache=False`` neither
        reads nor writes any cache. ``batch_size``: audio files encoded per forward pass.
        """
        paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        ensemble = RetrievalEnsemble.from_checkpoints(paths, device=device)
        keys = [audio_side_key(Path(p), model) for p, model in zip(paths, ensemble.models)]
        return cls(ensemble, keys, cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size)

    @classmethod
    def from_pretrained(
        cls,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        batch_size: int = 16,
    ) -> "Retriever":
        """Load an exported retrieval folder (``aac-lightning export``), or several as an ensemble.

        Same as :meth:`from_checkpoint` (which takes folders too), but refuses anything that is not a
        folder. Nothing is unpickled: the folder is read with json, safetensors and tokenizer files.
        A folder and the checkpoint it was exported from share the embedding cache.
        """
        paths = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
        check_pretrained_folders(paths)
        return cls.from_checkpoint(paths, device=device, cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size)

    @property
    def files(self) -> list[str]:
        """The indexed files (paths joined to the folder as given), in index order."""
        return [str(p) for p in self._files]

    @property
    def names(self) -> list[str]:
        """The indexed files relative to the indexed folder, in index order."""
        return list(self._names)

    def _encode_files(
        self, paths: Sequence[Path], members: Sequence[int], on_bad_audio: str = "error"
    ) -> dict[int, dict[int, Tensor]]:
        """``{file index: {member: (E_m,)}}`` for the decodable files, ``batch_size`` at a time,
        each file decoded once per rate the ``members`` need."""
        rates = {self.ensemble.sample_rates[m] for m in members}
        out: dict[int, dict[int, Tensor]] = {}
        batches = read_batches(paths, rates, self.batch_size, on_bad_audio, self.last_skipped, "encoding audio")
        for indices, waves in batches:
            encoded = self.ensemble.encode_waveforms(waves, members)  # {member: (B, E_m)}
            for row, i in enumerate(indices):
                out[i] = {m: emb[row] for m, emb in encoded.items()}
        return out

    def index(self, audio: AudioInput, on_bad_audio: str = "error") -> None:
        """Compute (or read from the cache) the audio embeddings of a folder or of files.

        A folder is searched recursively; for a list of files the folder is their closest common
        parent. Cache entries are keyed by the model's content hash and the file's path relative to
        the folder, size and modification time: changed or added files are encoded, entries of
        removed files dropped. ``on_bad_audio="skip"`` leaves undecodable files out (counted,
        logged, listed in :attr:`last_skipped`) instead of raising AudioError.
        """
        check_on_bad_audio(on_bad_audio)
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
        caches: list[EmbeddingCache | None] = [None] * len(self.ensemble)
        if self.use_cache:
            cache_dir = self.cache_dir if self.cache_dir is not None else root / CACHE_DIR_NAME
            inside = Path(root_abs) in Path(os.path.abspath(cache_dir)).parents
            folder = None if inside else Path(root_abs)
            shared: dict[str, EmbeddingCache] = {}  # identical members share one cache file
            for m, key in enumerate(self.model_keys):
                if key not in shared:
                    shared[key] = EmbeddingCache(cache_dir, key, folder)
                caches[m] = shared[key]
        stamps = [file_stamp(p) for p in paths]
        embeddings: list[list[Tensor | None]] = [
            [None if cache is None else cache.get(name, stamp) for name, stamp in zip(names, stamps)] for cache in caches
        ]
        # files grouped by the members they miss (usually all or none), so each group is batched
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(paths)):
            missing = tuple(m for m in range(len(caches)) if embeddings[m][i] is None)
            if missing:
                groups.setdefault(missing, []).append(i)
        self.last_skipped = []
        num_todo = sum(len(files) for files in groups.values())
        encoded_ok: set[int] = set()
        for members, todo in groups.items():
            encoded = self._encode_files([paths[i] for i in todo], members, on_bad_audio)
            for j, per_member in encoded.items():
                i = todo[j]
                encoded_ok.add(i)
                for m, emb in per_member.items():
                    embeddings[m][i] = emb
                    if caches[m] is not None:
                        caches[m].put(names[i], stamps[i], emb)
        for cache in {id(c): c for c in caches if c is not None}.values():
            cache.prune(root)
            cache.write()
        keep = [i for i in range(len(paths)) if all(embeddings[m][i] is not None for m in range(len(caches)))]
        if not keep:
            raise ValueError(f"none of the {len(paths)} audio files could be decoded")
        self.root = root
        self._files = [paths[i] for i in keep]
        self._names = [names[i] for i in keep]
        self._embeddings = [torch.stack([per_file[i] for i in keep]) for per_file in embeddings]  # (A, E_m)
        log.info("indexed %d audio files under '%s' (%d encoded)", len(keep), root, len(encoded_ok))
        if num_todo != len(encoded_ok):
            log.info("%d audio files skipped", num_todo - len(encoded_ok))

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
            paths = [path for path, _ in expand_audio_paths(files)]
            new = [j for j, p in enumerate(paths) if p.resolve() not in position]
            encoded = self._encode_files([paths[j] for j in new], range(len(self.ensemble))) if new else {}
            fresh = {j: encoded[n] for n, j in enumerate(new)}
            columns: list[list[Tensor]] = [[] for _ in range(len(self.ensemble))]
            for j, path in enumerate(paths):
                for m in range(len(self.ensemble)):
                    columns[m].append(fresh[j][m] if j in fresh else self._embeddings[m][position[path.resolve()]])
            audio = [torch.stack(c) for c in columns]  # per member (A, E_m)
        return self.ensemble.similarity(texts, audio)

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """For each query, the ``k`` best indexed files (paths) and their scores, best first."""
        check_positive_int(k, "k")
        sim = self.similarity(queries)  # (Q, A)
        scores, indices = top_k_candidates(sim, k)  # (Q, k'), (Q, k')
        return [
            [(str(self._files[i]), float(s)) for i, s in zip(row_i, row_s)]
            for row_i, row_s in zip(indices.tolist(), scores.tolist())
        ]

    def frame_similarity(self, audio_path: str | os.PathLike, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Where in a recording a query fits: ``(times_s (T',), scores (T',))``.

        The cosine similarity between the query's text embedding and each frame of the audio
        encoder's frame sequence mapped into the clip space (see
        :mod:`aac_lightning.inference.frames`): the usual frame-level relevance approximation, for
        plots rather than for thresholds. ``times_s`` are the frames' centres in seconds. With an
        ensemble, the first member (first checkpoint) is used.
        """
        model = self.ensemble.models[0]
        audio = load_audio(audio_path, model.audio_encoder.sample_rate)[0][0]  # (T,)
        return self.frame_similarity_waveform(audio, model.audio_encoder.sample_rate, query)

    def frame_similarity_waveform(self, waveform: np.ndarray | Tensor, sample_rate: int, query: str) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`frame_similarity` of a waveform ``(time,)`` or ``(channels, time)`` at any
        ``sample_rate`` (channels averaged and resampled as audio files are)."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        model = self.ensemble.models[0]
        audio = array_to_mono(waveform, sample_rate, model.audio_encoder.sample_rate).to(self.ensemble.device)  # (T',)
        return frame_scores(model, audio, query)
