"""The on-disk cache of audio embeddings that :class:`~aac_lightning.inference.Retriever` keeps.

One ``.pt`` file per model and indexed folder. A model is keyed by a content hash of what
determines its audio embeddings (:func:`audio_side_key`); an entry by the file's path relative to
the folder, its size and its modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from aac_lightning.checkpoints import read_checkpoint
from aac_lightning.data.feature_cache import state_dict_sha256
from aac_lightning.nn.bi_encoder import BiEncoder

log = logging.getLogger(__name__)

__all__ = ["CACHE_DIR_NAME", "CACHE_FORMAT", "EmbeddingCache", "audio_side_key", "file_stamp"]

CACHE_DIR_NAME = ".aac_lightning_cache"  # default embedding cache, inside the indexed folder
CACHE_FORMAT = 1


def audio_side_key(path: Path, model: BiEncoder) -> str:
    """Content hash of what determines a retrieval checkpoint's audio embeddings.

    The audio encoder's architecture (name and arguments, from the checkpoint's hyper-parameters)
    and the weights of the audio encoder and audio projection: checkpoints with other weights never
    share a cache; re-saving the same weights (e.g. other optimizer state) keeps it.
    """
    if path.is_dir():  # an exported model folder (same hyper-parameters and weights: same key)
        ckpt = read_checkpoint(path)
    else:
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


class EmbeddingCache:
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


def file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
