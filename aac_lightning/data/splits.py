"""The 9:1 re-split of Clotho development + validation, per clip, deterministic from a seed."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path


def _split_key(seed: int, clip_key: str) -> bytes:
    # A keyed hash orders the clips: it depends only on the seed and the clip's own name, so the split
    # is the same whatever the order the files are listed in, the machine, the Python hash seed or the
    # DDP rank that computes it.
    return hashlib.sha256(f"{seed}\x00{clip_key}".encode("utf-8")).digest()


def resplit(clip_keys: Iterable[str], train_fraction: float = 0.9, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split clips into `(train, val)` with `round(train_fraction * n)` training clips.

    Args:
        clip_keys: one unique key per clip (e.g. `"development/<file name>"`); captions never enter the
            split, so all captions of a clip land on the same side.
        train_fraction: share of clips for training, in (0, 1).
        seed: changes which clips go where.

    Returns:
        the train and val keys, each sorted.
    """
    keys = list(clip_keys)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = [k for k in keys if k in seen or seen.add(k)]
        raise ValueError(f"re-split needs unique clip keys; duplicated: {dup[:5]}")
    ordered = sorted(keys, key=lambda k: _split_key(seed, k))
    n_train = int(math.floor(train_fraction * len(ordered) + 0.5))
    return sorted(ordered[:n_train]), sorted(ordered[n_train:])


def write_split_lists(out_dir: str | os.PathLike, splits: dict[str, list[str]], meta: dict | None = None) -> Path:
    """Write the chosen clip lists (one JSON file) next to a run's outputs, for reproduction and audit."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "splits.json"
    payload = {"meta": meta or {}, "splits": {name: list(keys) for name, keys in splits.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path
