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
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------------
# Checks of a run's inputs (`aac-lightning pipeline RECIPE --check`, `aac-lightning fit ... --check`):
# the requirement rows and the error that carries them. What is required is decided above this layer
# (`aac_lightning.pipeline.check`); this module only holds the plain records, the table and the disk probe.

PRESENT = "present"
MISSING = "MISSING"
WARNING = "warning"  # missing but not needed to run (e.g. SPICE jars): listed, does not stop the run
LATER = "made later"  # a handoff checkpoint an earlier stage of the same run will write


class PreflightError(FileNotFoundError):
    """Inputs of a run are missing; `report` lists every requirement (present and missing) with how to fix.

    A FileNotFoundError, so callers catching missing files keep working; `str(err)` is the whole table.
    """

    def __init__(self, report: "PreflightReport") -> None:
        self.report = report
        missing = report.missing()
        super().__init__(f"{len(missing)} required input(s) missing before the run starts:\n{report.format_table()}")


@dataclass
class Requirement:
    """One input of one stage: what it is, where (path, hub id or config key), its status and how to get it."""

    stage: str
    what: str
    target: str
    status: str
    fix: str = ""
    key: str = ""  # the config key or recipe variable that sets it

    @property
    def blocking(self) -> bool:
        return self.status == MISSING


@dataclass
class PreflightReport:
    """Every requirement of a run; `ok` when none is missing."""

    requirements: list[Requirement] = field(default_factory=list)

    def missing(self) -> list[Requirement]:
        return [r for r in self.requirements if r.blocking]

    @property
    def ok(self) -> bool:
        return not self.missing()

    def raise_if_missing(self) -> None:
        """Raises PreflightError (carrying this report) when something required is missing."""
        if not self.ok:
            raise PreflightError(self)

    def format_table(self, only_problems: bool = False) -> str:
        """A plain-text table `stage | input | status | where`, then one 'how to fix' line per problem."""
        rows = [r for r in self.requirements if not only_problems or r.status in (MISSING, WARNING)]
        if not rows:
            return "(nothing to check)"
        header = ("stage", "input", "status", "where")
        cells = [(r.stage, r.what, r.status if r.status != LATER else r.fix, r.target) for r in rows]
        widths = [min(40, max(len(header[i]), *(len(c[i]) for c in cells))) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
        lines += ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
        problems: dict[tuple[str, str, bool], list[str]] = {}  # one line per (input, fix), naming its stages
        for r in rows:
            if r.status in (MISSING, WARNING) and r.fix:
                problems.setdefault((r.what, r.fix, r.blocking), []).append(r.stage)
        if problems:
            lines += ["", "how to get what is missing:"]
            for (what, fix, blocking), stages in problems.items():
                label = "" if blocking else ", not required"
                lines.append(f"  - {what} [{', '.join(dict.fromkeys(stages))}{label}]: {fix}")
        return "\n".join(lines)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds `path` or its nearest existing parent (None for remote paths)."""
    text = os.fspath(path)
    if _is_remote(text):
        return None
    folder = Path(text).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_requirement(stage: str, path: str | os.PathLike, what: str = "free disk", min_free_bytes: int | None = None) -> Requirement:
    """A requirement row: at least `min_free_bytes` (default `$AAC_LIGHTNING_MIN_FREE_MB`) free where `path` will be."""
    need = min_free_bytes_from_env() if min_free_bytes is None else min_free_bytes
    free = free_bytes(path)
    target = f"{path}"
    if free is None or need <= 0:
        return Requirement(stage, what, target, PRESENT, key="")
    status = PRESENT if free >= need else MISSING
    fix = f"only {free / _MB:.0f} MB free, {need / _MB:.0f} MB required: free some space, or set {MIN_FREE_ENV}"
    return Requirement(stage, what, f"{target} ({free / _MB:.0f} MB free)", status, fix if status == MISSING else "")
