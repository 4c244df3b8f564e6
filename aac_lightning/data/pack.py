"""Audio packed once at the model's sample rate into HDF5 shards, read by random windows.

Decoding a 15-30 s 44.1 kHz WAV and resampling it costs far more than the training step can wait
for; a pack stores every clip of a dataset already resampled (int16 by default, float32 optional),
so a training crop is one slice read.

Layout: `packed_dir/<dataset>_<subset>-<rate>Hz-<dtype>/shard-00000.h5`, ... Each shard holds up to
`SHARD_CLIPS` clips of the group in key order: one 1-D `audio` array (the clips end to end) and,
per clip, its key, offset, length, gain (int16: the clip's peak when above full scale, so the
resampler's overshoot is not clipped; reads are within `0.5 * gain / 32768` of the float), status (packed, or bad audio with the reason) and the stamp of
its source file (size and mtime_ns, like the feature cache). A shard is written to a temporary file
and renamed into place when complete, so a killed run leaves only whole shards: `pack` resumes by
keeping every shard whose clips and stamps still match and rewriting the others (a changed or
replaced source file re-packs its shard). A file in a group folder that is not one of these shards
(another format or rate, unreadable) is reported, never read.

Reading (`PackedAudio`): the index of the groups in use is loaded once; `check` verifies that every
clip is packed and unchanged since (a missing clip: incomplete pack; a changed stamp: stale pack),
naming the first ones and the command that fixes it. HDF5 handles are opened lazily per process
(safe with DataLoader workers).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from aac_lightning.data.audio import AudioError, load_audio
from aac_lightning.data.datasets import CaptionDataset, ClipRecord

log = logging.getLogger(__name__)

FORMAT = "aac_lightning-pack"
FORMAT_VERSION = 1
SHARD_CLIPS = 256
PackDtype = Literal["int16", "float32"]
INT16_SCALE = 32768.0  # as libsndfile reads 16-bit PCM: x = int / 32768
STATUS_OK, STATUS_BAD = 0, 1


class PackError(RuntimeError):
    """A pack that cannot serve the clips asked of it: foreign, incomplete or stale."""


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """`(size, mtime_ns)` of a source file: changes when the file is edited or replaced."""
    stat = Path(path).stat()
    return int(stat.st_size), int(stat.st_mtime_ns)


def group_dir(packed_dir: str | os.PathLike, dataset: str, subset: str, sample_rate: int, dtype: PackDtype) -> Path:
    """The folder of one dataset subset's shards."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset}_{subset}")
    return Path(packed_dir) / f"{name}-{int(sample_rate)}Hz-{dtype}"


def _groups(records: Sequence[ClipRecord]) -> dict[tuple[str, str], list[ClipRecord]]:
    groups: dict[tuple[str, str], list[ClipRecord]] = {}
    for record in records:
        groups.setdefault((record.dataset, record.subset), []).append(record)
    return {g: sorted(rs, key=lambda r: r.key) for g, rs in groups.items()}


def _to_stored(audio: np.ndarray, dtype: PackDtype) -> tuple[np.ndarray, float]:
    """The stored samples and the clip's gain: int16 steps of `gain / 32768`, where the gain (>= 1) is the
    clip's peak, so resampling overshoot past full scale is kept rather than clipped."""
    if dtype == "float32":
        return audio.astype(np.float32, copy=False), 1.0
    gain = max(1.0, float(np.abs(audio).max()) if audio.size else 1.0) * (32768.0 / 32767.0)
    return np.clip(np.round(audio * (INT16_SCALE / gain)), -32768, 32767).astype(np.int16), gain


@dataclass(frozen=True)
class _Shard:
    keys: list[str]
    stamps: list[tuple[int, int]]


def _read_shard_header(path: Path, sample_rate: int, dtype: PackDtype) -> _Shard:
    """Keys and stamps of a shard; `PackError` if it is not a complete shard of this rate and dtype."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT or int(attrs.get("version", -1)) != FORMAT_VERSION:
                raise PackError(f"'{path}' is not an aac_lightning pack shard (format {attrs.get('format')!r}); remove it")
            if int(attrs["sample_rate"]) != sample_rate or attrs["dtype"] != dtype:
                raise PackError(f"'{path}' holds {attrs['sample_rate']} Hz {attrs['dtype']}, expected {sample_rate} Hz {dtype}; remove it")
            if not bool(attrs.get("complete", False)):
                raise PackError(f"'{path}' is marked incomplete; remove it and run `aac-lightning pack` again")
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            stamps = [(int(a), int(b)) for a, b in zip(f["sizes"][()], f["mtimes"][()])]
    except OSError as err:
        raise PackError(f"pack shard '{path}' is unreadable ({err}); remove it and run `aac-lightning pack` again") from err
    return _Shard(keys, stamps)


def _write_shard(
    path: Path,
    records: Sequence[ClipRecord],
    sample_rate: int,
    dtype: PackDtype,
    read: Callable[[ClipRecord], np.ndarray],
    bar: tqdm,
) -> None:
    pieces, lengths, status, reasons, stamps, gains = [], [], [], [], [], []
    for record in records:
        stamps.append(file_stamp(record.path))
        try:
            audio = read(record)
            stored, gain = _to_stored(audio, dtype)
            pieces.append(stored)
            gains.append(gain)
            lengths.append(len(audio))
            status.append(STATUS_OK)
            reasons.append("")
        except AudioError as err:
            log.warning("pack: bad audio, recorded as such: %s", err)
            lengths.append(0)
            gains.append(1.0)
            status.append(STATUS_BAD)
            reasons.append(str(err))
        bar.update(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16 if dtype == "int16" else np.float32)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    string = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": FORMAT, "version": FORMAT_VERSION, "sample_rate": sample_rate, "dtype": dtype, "complete": False})
        f.create_dataset("audio", data=audio)
        f.create_dataset("keys", data=np.array([r.key for r in records], dtype=object), dtype=string)
        f.create_dataset("reasons", data=np.array(reasons, dtype=object), dtype=string)
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("lengths", data=np.asarray(lengths, dtype=np.int64))
        f.create_dataset("status", data=np.asarray(status, dtype=np.int8))
        f.create_dataset("gains", data=np.asarray(gains, dtype=np.float64))
        f.create_dataset("sizes", data=np.asarray([s for s, _ in stamps], dtype=np.int64))
        f.create_dataset("mtimes", data=np.asarray([m for _, m in stamps], dtype=np.int64))
        f.attrs["complete"] = True
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written shard under its name


def pack_records(
    records: Sequence[ClipRecord],
    packed_dir: str | os.PathLike,
    sample_rate: int,
    dtype: PackDtype = "int16",
    *,
    progress: bool = True,
    shard_clips: int = SHARD_CLIPS,
) -> int:
    """Pack the clips of `records` that are not packed yet or changed since; returns how many clips were (re)written.

    Clips that cannot be decoded are recorded as bad (readers then apply their `on_bad_audio`).
    Safe to kill and rerun: whole shards are kept, the rest is rewritten.
    """
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    sample_rate = int(sample_rate)

    def read(record: ClipRecord) -> np.ndarray:
        return load_audio(record.path, sample_rate)[0][0].numpy()

    plan: list[tuple[Path, list[ClipRecord]]] = []
    for (dataset, subset), group in _groups(records).items():
        directory = group_dir(packed_dir, dataset, subset, sample_rate, dtype)
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob("*.tmp-*"):  # from a killed run
            leftover.unlink()
        chunks = [group[i : i + shard_clips] for i in range(0, len(group), shard_clips)]
        for index, chunk in enumerate(chunks):
            path = directory / f"shard-{index:05d}.h5"
            if path.exists():
                shard = _read_shard_header(path, sample_rate, dtype)
                if shard.keys == [r.key for r in chunk] and shard.stamps == [file_stamp(r.path) for r in chunk]:
                    continue
            plan.append((path, chunk))
        for extra in sorted(directory.glob("shard-*.h5")):
            if int(extra.stem.split("-")[1]) >= len(chunks):  # the group shrank
                extra.unlink()
    total = sum(len(chunk) for _, chunk in plan)
    with tqdm(total=total, desc="packing audio", unit="clip", disable=not progress or total == 0) as bar:
        for path, chunk in plan:
            _write_shard(path, chunk, sample_rate, dtype, read, bar)
    return total


def pack_dataset(dataset: CaptionDataset, packed_dir: str | os.PathLike, dtype: PackDtype = "int16", *, progress: bool = True) -> int:
    """`pack_records` of a dataset's clips at its sample rate."""
    if dataset.sample_rate is None:
        raise ValueError(f"{dataset.name}: a pack needs a fixed sample rate (the dataset keeps each file's own)")
    return pack_records(dataset.records, packed_dir, dataset.sample_rate, dtype, progress=progress)


@dataclass(frozen=True)
class _Entry:
    shard: str
    offset: int
    length: int
    status: int
    reason: str
    stamp: tuple[int, int]
    gain: float


class PackedAudio:
    """Random-window reads from the packs of `packed_dir` at `sample_rate` (see the module docstring).

    Args:
        packed_dir: the folder `pack_records` wrote.
        sample_rate: the rate of the packs to read.
        dtype: the packs' storage type (`int16` reads back as float32 `x / 32768`).
    """

    def __init__(self, packed_dir: str | os.PathLike, sample_rate: int, dtype: PackDtype = "int16"):
        self.packed_dir = Path(packed_dir)
        self.sample_rate = int(sample_rate)
        self.dtype: PackDtype = dtype
        self._index: dict[str, _Entry] = {}
        self._loaded: set[tuple[str, str]] = set()
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # HDF5 handles do not cross process boundaries
        return state

    def _load_group(self, dataset: str, subset: str) -> None:
        if (dataset, subset) in self._loaded:
            return
        directory = group_dir(self.packed_dir, dataset, subset, self.sample_rate, self.dtype)
        for path in sorted(directory.glob("*")) if directory.is_dir() else []:
            if not re.fullmatch(r"shard-\d{5}\.h5", path.name):
                if ".tmp-" in path.name:
                    continue  # a shard being written (or left by a kill): not part of the pack
                raise PackError(f"'{path}' is not a pack shard (foreign file in the pack folder '{directory}'); remove it")
            _read_shard_header(path, self.sample_rate, self.dtype)
            with h5py.File(path, "r") as f:
                keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
                columns = [f[name][()] for name in ("offsets", "lengths", "status", "reasons", "sizes", "mtimes", "gains")]
            for key, offset, length, status, reason, size, mtime, gain in zip(keys, *columns):
                reason = reason.decode("utf-8") if isinstance(reason, bytes) else str(reason)
                entry = _Entry(str(path), int(offset), int(length), int(status), reason, (int(size), int(mtime)), float(gain))
                self._index[key] = entry
        self._loaded.add((dataset, subset))

    def check(self, records: Sequence[ClipRecord]) -> None:
        """Raise `PackError` unless every clip of `records` is packed and its source unchanged since."""
        for dataset, subset in {(r.dataset, r.subset) for r in records}:
            self._load_group(dataset, subset)
        missing = [r for r in records if r.key not in self._index]
        stale = [r for r in records if r.key in self._index and self._index[r.key].stamp != file_stamp(r.path)]
        fix = f"run `aac-lightning pack {self.packed_dir} --sample-rate {self.sample_rate} --dtype {self.dtype} ...` (it resumes)"
        if missing:
            first = ", ".join(repr(r.key) for r in missing[:3])
            raise PackError(f"incomplete pack in '{self.packed_dir}': {len(missing)} of {len(records)} clips are not packed (first: {first}); {fix}")
        if stale:
            first = ", ".join(repr(r.key) for r in stale[:3])
            raise PackError(f"stale pack in '{self.packed_dir}': {len(stale)} source files changed since they were packed (first: {first}); {fix}")

    def _entry(self, key: str) -> _Entry:
        if key not in self._index:
            dataset, subset = key.split("/", 2)[:2]
            self._load_group(dataset, subset)
        entry = self._index.get(key)
        if entry is None:
            raise PackError(f"clip {key!r} is not in the pack '{self.packed_dir}'")
        if entry.status != STATUS_OK:
            raise AudioError(entry.reason or f"clip {key!r} was recorded as bad audio when packed")
        return entry

    def length(self, key: str) -> int:
        """Samples of a clip at `sample_rate`."""
        return self._entry(key).length

    def read(self, key: str, start: int = 0, num_samples: int | None = None) -> torch.Tensor:
        """Samples `[start, start + num_samples)` of a clip as float32 `(1, time)`."""
        entry = self._entry(key)
        if os.getpid() != self._pid:  # a forked worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(entry.shard)
        if handle is None:
            handle = self._handles[entry.shard] = h5py.File(entry.shard, "r")
        stop = entry.length if num_samples is None else min(entry.length, start + num_samples)
        data = handle["audio"][entry.offset + start : entry.offset + max(start, stop)]
        if self.dtype == "int16":
            data = data.astype(np.float32) * np.float32(entry.gain / INT16_SCALE)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]


def pack_sources(
    packed_dir: str | os.PathLike,
    roots: dict[str, str | os.PathLike | None],
    sample_rate: int,
    dtype: PackDtype = "int16",
    *,
    on_missing: str = "error",
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Pack every subset found of the datasets whose root is given (`clotho`, `audiocaps`, `macs`).

    Returns `{dataset name: (clips, clips written now)}`.
    """
    from aac_lightning.data.datasets import MACS, AudioCaps, Clotho

    subsets = {"clotho": (Clotho, ("development", "validation", "evaluation")), "audiocaps": (AudioCaps, ("train", "val", "test")), "macs": (MACS, (None,))}
    counts: dict[str, tuple[int, int]] = {}
    for source, root in roots.items():
        if root is None:
            continue
        cls, names = subsets[source]
        for subset in names:
            kwargs = dict(sample_rate=sample_rate, on_missing=on_missing, on_bad_audio="skip")
            try:
                dataset = cls(root, **kwargs) if subset is None else cls(root, subset, **kwargs)
            except FileNotFoundError as err:
                if (source, subset) in (("clotho", "development"), ("macs", None)):
                    raise
                log.warning("pack: %s %s not found, skipped (%s)", source, subset, err)
                continue
            counts[dataset.name] = (len(dataset), pack_dataset(dataset, packed_dir, dtype, progress=progress))
    return counts
