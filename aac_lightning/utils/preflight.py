"""Checks of the output folders before a run starts: creatable, writable, with enough free disk space.

A run that dies after hours because its checkpoint folder is read-only or its disk is full loses
everything since the last checkpoint; these checks make it fail in its first second instead.
Only the standard library is imported at module level.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIN_FREE_ENV = "AAC_LIGHTNING_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 500
_MB = 1024 * 1024


class OutputDirError(OSError):
    """An output folder that cannot be created, is not writable, or lies on a disk with too little free space."""


def min_free_bytes_from_env() -> int:
    """Required free space in bytes: `$AAC_LIGHTNING_MIN_FREE_MB` (MB, `0` disables the check), default 500 MB."""
    raw = os.environ.get(MIN_FREE_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MIN_FREE_MB * _MB
    try:
        value = float(raw)
    except ValueError as err:
        raise ValueError(f"{MIN_FREE_ENV}={raw!r} is not a number of megabytes") from err
    if value < 0 or value != value:  # value != value: NaN
        raise ValueError(f"{MIN_FREE_ENV}={raw!r} must be a non-negative number of megabytes")
    return int(value * _MB)


def _is_remote(path: str) -> bool:
    # Lightning accepts fsspec URLs (s3://, gs://...): their storage cannot be probed like a local disk.
    return "://" in path


def check_output_dir(path: str | os.PathLike, min_free_bytes: int | None = None, purpose: str = "output folder") -> None:
    """Make sure `path` exists (creating it), is writable and has `min_free_bytes` free on its disk.

    Writability is tested by really creating and removing a probe file (permission bits do not tell
    the whole story: read-only mounts, ACLs, quotas, root squash). Remote (`scheme://`) paths are skipped.

    Args:
        path: the folder.
        min_free_bytes: required free space; `None` reads `$AAC_LIGHTNING_MIN_FREE_MB` (default 500 MB).
        purpose: what the folder is for, named in the error (e.g. `trainer.default_root_dir`).

    Raises:
        OutputDirError: naming `purpose`, the path and the reason.
    """
    text = os.fspath(path)
    if _is_remote(text):
        log.debug("not checking remote %s '%s'", purpose, text)
        return
    if min_free_bytes is None:
        min_free_bytes = min_free_bytes_from_env()
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{purpose} '{folder}' exists but is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{purpose} '{folder}' cannot be created: {err.strerror or err}") from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".aac_lightning_write_probe_", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"{purpose} '{folder}' is not writable: {err.strerror or err}") from err
    if min_free_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < min_free_bytes:
            raise OutputDirError(
                f"{purpose} '{folder}': only {free / _MB:.0f} MB free on its disk, below the required "
                f"{min_free_bytes / _MB:.0f} MB (free some space, or set {MIN_FREE_ENV} to change the requirement)"
            )


def trainer_output_dirs(trainer: Any) -> list[tuple[str, str]]:
    """`(purpose, path)` of every folder a Lightning trainer will write to, known before `fit` starts.

    The trainer's `default_root_dir`, each logger's `save_dir`, and each `ModelCheckpoint`'s `dirpath`
    (a checkpoint callback without `dirpath` writes under the logger's or the root folder, checked already).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs: list[tuple[str, str]] = [("trainer.default_root_dir", os.fspath(trainer.default_root_dir))]
    for i, logger in enumerate(getattr(trainer, "loggers", None) or []):
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is not None:
            dirs.append((f"save_dir of logger {i} ({type(logger).__name__})", os.fspath(save_dir)))
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            dirs.append(("ModelCheckpoint dirpath", os.fspath(callback.dirpath)))
    return dirs


def preflight_trainer_outputs(trainer: Any, min_free_bytes: int | None = None) -> None:
    """`check_output_dir` on every folder of `trainer_output_dirs(trainer)`; call it before `trainer.fit`.

    Raises:
        OutputDirError: for the first folder that fails, naming what it is for.
    """
    if min_free_bytes is None:
        min_free_bytes = min_free_bytes_from_env()
    seen: set[str] = set()
    for purpose, path in trainer_output_dirs(trainer):
        key = path if _is_remote(path) else os.path.abspath(os.path.expanduser(path))
        if key in seen:
            continue
        seen.add(key)
        check_output_dir(path, min_free_bytes, purpose)
