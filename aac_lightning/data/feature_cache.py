"""On-disk cache of the frozen audio extractor's frame features (XE and SCST epochs never re-run it).

A cache file holds the features of one extractor with one front end: its name is derived from the
sha256 of the extractor's weights (content, not path) and of its settings (encoder name and
constructor arguments, sample rate). Inside, one HDF5 dataset per clip `(T', D)` float32, named by
the hash of the clip key, with the clip key and the audio file's fingerprint (path, size, mtime) as
attributes. A clip whose audio file changed is re-extracted; a file whose recorded key differs
raises; a file still marked incomplete (extraction interrupted) is deleted and rebuilt. Nothing
stale is ever silently reused.

Clips are extracted one at a time, unpadded, so a clip's features do not depend on the other clips
of a batch. Under DDP the cache is written once: rank 0 extracts and writes, the other ranks wait at
a barrier, then every rank reads the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class StaleCacheError(RuntimeError):
    """A feature cache file that does not belong to the extractor / front end it is opened for."""


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content: every key, dtype, shape and the raw bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode("utf-8"))
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        # Viewing as bytes covers every dtype (bfloat16 included) without a lossy conversion.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def audio_file_fingerprint(path: str | os.PathLike) -> str:
    """`path|size|mtime_ns` of an audio file: changes whenever the file is replaced or edited."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"audio file not found: '{path}'") from err
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def cache_key(weights_sha256: str, frontend: Mapping[str, Any]) -> str:
    """The key of a cache: sha256 of the extractor weights' hash and the front-end settings."""
    payload = json.dumps({"format": FORMAT_VERSION, "weights": weights_sha256, "frontend": frontend}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _clip_name(clip_key: str) -> str:
    # Clip keys hold spaces, commas, slashes and non-ASCII letters: the dataset name is their hash.
    return hashlib.sha1(clip_key.encode("utf-8")).hexdigest()


class FeatureCache:
    """Frame features of one extractor + front end, stored in `cache_dir/features-<key>.h5`.

    Args:
        cache_dir: folder of the cache files (created if needed).
        weights_sha256: `state_dict_sha256` of the extractor.
        frontend: the settings that determine the features besides the weights (JSON-serialisable).
    """

    def __init__(self, cache_dir: str | os.PathLike, weights_sha256: str, frontend: Mapping[str, Any]):
        self.cache_dir = Path(cache_dir)
        self.key = cache_key(weights_sha256, frontend)
        self.frontend = dict(frontend)
        self.path = self.cache_dir / f"features-{self.key[:24]}.h5"
        self._validated = False  # the file was checked complete and of this key

    # ------------------------------------------------------------------ state of the file
    def _check_file(self) -> bool:
        """True if a complete file of this key exists; a partial file is deleted; a foreign one raises."""
        if not self.path.exists():
            return False
        try:
            with h5py.File(self.path, "r") as f:
                key, complete = f.attrs.get("key"), bool(f.attrs.get("complete", False))
        except OSError as err:  # truncated / corrupt HDF5: treat as an interrupted write
            log.warning("feature cache '%s' is unreadable (%s): rebuilding it", self.path, err)
            self.path.unlink()
            return False
        if key != self.key:
            raise StaleCacheError(f"feature cache '{self.path}' holds key {key!r}, expected {self.key!r}; delete it")
        if not complete:
            log.warning("feature cache '%s' is marked incomplete (interrupted extraction): rebuilding it", self.path)
            self.path.unlink()
            return False
        return True

    def is_complete(self) -> bool:
        """Whether a complete cache file of this key exists."""
        return self._check_file()

    def stale_clips(self, clip_keys: Sequence[str], audio_paths: Sequence[str | os.PathLike]) -> list[int]:
        """Positions of the clips that are absent from the cache or whose audio file changed."""
        if not self._check_file():
            return list(range(len(clip_keys)))
        todo = []
        with h5py.File(self.path, "r") as f:
            for i, (clip_key, path) in enumerate(zip(clip_keys, audio_paths)):
                name = _clip_name(clip_key)
                if name not in f or f[name].attrs.get("fingerprint") != audio_file_fingerprint(path):
                    todo.append(i)
        return todo

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def build(
        self,
        extractor: nn.Module,
        clip_keys: Sequence[str],
        audio_paths: Sequence[str | os.PathLike],
        load_audio: Callable[[int], torch.Tensor | None],
        *,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> int:
        """Extract the features of the clips missing or stale in the cache; returns how many were extracted.

        Args:
            extractor: maps `(1, T)` audio and `(1,)` lengths to a dict with `frames (1, T', D)` and
                `frame_lengths (1,)`; used in eval mode without gradients.
            clip_keys: unique clip names; audio_paths: their files (for the fingerprints).
            load_audio: audio `(T,)` or `(1, T)` of clip `i` at the extractor's rate (None: skip the clip).
        """
        if len(clip_keys) != len(audio_paths):
            raise ValueError(f"clip_keys ({len(clip_keys)}) and audio_paths ({len(audio_paths)}) differ in length")
        todo = self.stale_clips(clip_keys, audio_paths)
        if not todo:
            return 0
        self._validated = False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        was_training = extractor.training
        extractor.eval()
        with h5py.File(self.path, "a") as f:
            # Marked incomplete until the last clip is written: an interrupted run is detected.
            f.attrs["key"] = self.key
            f.attrs["frontend"] = json.dumps(self.frontend, sort_keys=True, default=str)
            f.attrs["complete"] = False
            f.flush()
            for i in tqdm(todo, desc="extracting features", disable=not progress, unit="clip"):
                audio = load_audio(i)
                if audio is None:
                    continue
                audio = audio.reshape(1, -1).float().to(device)  # (1, T)
                lengths = torch.tensor([audio.shape[1]], device=device)
                out = extractor(audio, lengths)
                valid = int(out["frame_lengths"][0])
                frames = out["frames"][0, :valid].float().cpu().numpy()  # (T', D)
                name = _clip_name(clip_keys[i])
                if name in f:
                    del f[name]
                dataset = f.create_dataset(name, data=frames)
                dataset.attrs["clip_key"] = clip_keys[i]
                dataset.attrs["fingerprint"] = audio_file_fingerprint(audio_paths[i])
            f.attrs["complete"] = True
        extractor.train(was_training)
        return len(todo)

    # ------------------------------------------------------------------ reading
    def _open(self) -> h5py.File:
        # Opened per read (about a millisecond) rather than held: a handle kept open would stop this
        # or another cache object from adding clips to the same file later (HDF5 refuses the write).
        if not self._validated:
            if not self._check_file():
                raise FileNotFoundError(f"feature cache '{self.path}' does not exist or is incomplete; build it first")
            self._validated = True
        return h5py.File(self.path, "r")

    @staticmethod
    def _read(f: h5py.File, clip_key: str) -> torch.Tensor:
        name = _clip_name(clip_key)
        if name not in f:
            raise KeyError(f"clip {clip_key!r} is not in the feature cache '{f.filename}'")
        return torch.from_numpy(np.asarray(f[name]))

    def get(self, clip_key: str) -> torch.Tensor:
        """Features `(T', D)` of one clip."""
        with self._open() as f:
            return self._read(f, clip_key)

    def batch(self, clip_keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded features `(B, T_max, D)` and valid lengths `(B,)` of a batch of clips."""
        with self._open() as f:
            items = [self._read(f, k) for k in clip_keys]
        lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        feats = torch.zeros(len(items), int(lengths.max()), items[0].shape[1])
        for row, x in enumerate(items):
            feats[row, : x.shape[0]] = x
        return feats, lengths
