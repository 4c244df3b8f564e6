"""Readers of Clotho, AudioCaps and MACS as they lie on disk; items follow aac-datasets' keys.

Every dataset is a list of clip records (file name, path, captions); `__getitem__` decodes the audio.
Items: `audio` float32 `(channels, time)` (mono: one channel), `sr`, `captions` (list of str, file
order), `fname`, `dataset`, `subset`, `index`.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from aac_lightning.data.audio import AudioError, audio_length, crop_start, load_audio_window

log = logging.getLogger(__name__)

OnMissing = Literal["error", "skip"]


class DatasetFormatError(ValueError):
    """An annotation file (CSV / YAML) that is malformed, wrongly encoded, or lacks columns or keys."""


@dataclass(frozen=True)
class ClipRecord:
    """One audio clip and its reference captions."""

    fname: str
    path: Path
    captions: tuple[str, ...]
    dataset: str
    subset: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """A name unique across datasets and subsets: `dataset/subset/fname`."""
        return f"{self.dataset}/{self.subset}/{self.fname}"


def safe_join(directory: Path, fname: str, source: str) -> Path:
    """`directory / fname`, rejecting names that resolve outside `directory` (`..`, absolute paths, links)."""
    if not fname or fname != fname.strip("\x00") or "\x00" in fname:
        raise DatasetFormatError(f"{source}: invalid file name {fname!r}")
    candidate = Path(fname)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise DatasetFormatError(f"{source}: file name {fname!r} escapes the dataset folder '{directory}'")
    path = directory / candidate
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise DatasetFormatError(f"{source}: file name {fname!r} resolves outside the dataset folder '{directory}'")
    return path


def read_csv_rows(path: Path, required: Sequence[str], delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV file as dicts; clear errors for a missing file, bad encoding or missing columns.

    A UTF-8 byte-order mark is accepted. Errors name the file and, where it applies, the line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: '{path}'")
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # Decoding the whole file at once makes the error position absolute, so the line can be named.
        line_no = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFormatError(
            f"'{path}' line {line_no}: byte 0x{raw[err.start]:02x} (byte {column} of the line) is not valid UTF-8 "
            "(the file is probably Latin-1 / Windows-1252); re-save it as UTF-8"
        ) from err
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [col for col in required if col not in header]
        if missing:
            raise DatasetFormatError(
                f"'{path}' lacks the column(s) {missing}; found columns {header} (expected {list(required)})"
            )
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names
                raise DatasetFormatError(f"'{path}' line {reader.line_num}: more fields than the header has columns")
            if None in row.values():  # DictReader fills absent trailing fields with None
                found = sum(v is not None for v in row.values())
                raise DatasetFormatError(
                    f"'{path}' line {reader.line_num}: {found} field(s), but the header has {len(header)} columns"
                )
            rows.append(row)
    except csv.Error as err:
        raise DatasetFormatError(f"'{path}' is not a well-formed CSV file: {err}") from err
    return rows


def check_caption(caption: Any, source: str) -> str:
    """A stripped, non-empty caption, or a `DatasetFormatError` naming where it came from."""
    if caption is None or not isinstance(caption, str):
        raise DatasetFormatError(f"{source}: caption is missing or not text ({caption!r})")
    caption = caption.strip()
    if not caption:
        raise DatasetFormatError(f"{source}: caption is empty")
    return caption


class CaptionDataset(Dataset):
    """Clips with captions; decodes, mixes to mono and resamples audio on access.

    Args:
        records: the clips.
        name: name of this collection (used in messages and as `subset` default).
        sample_rate: rate the audio is returned at (Hz); `None` keeps each file's own rate.
        on_missing: what to do with clips whose audio file does not exist: `"error"` raises an error
            naming how many and the first ones; `"skip"` drops them, with one warning giving the count
            and the first names; the count is `missing_skipped`, the names `missing_fnames`. (A folder
            with no audio at all is an error either way.)
        on_bad_audio: what to do with a file that cannot be decoded, is empty or has non-finite
            samples: `"error"` raises; `"skip"` returns `None` for that item (collate functions drop
            it) and counts it in `bad_audio_skipped`.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        name: str = "dataset",
        sample_rate: int | None = 32000,
        on_missing: OnMissing = "error",
        on_bad_audio: OnMissing = "error",
    ):
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        if on_bad_audio not in ("error", "skip"):
            raise ValueError(f"on_bad_audio must be 'error' or 'skip', got {on_bad_audio!r}")
        self.name = name
        self.sample_rate = sample_rate
        self.on_missing = on_missing
        self.on_bad_audio = on_bad_audio
        self.bad_audio_skipped = 0
        self.missing_fnames: list[str] = []  # clips dropped because their audio file is missing
        self.packed: Any = None  # a PackedAudio to read from instead of the files (`use_pack`)
        self.records = self._check_files(list(records))

    def _check_files(self, records: list[ClipRecord]) -> list[ClipRecord]:
        missing = [r for r in records if not r.path.is_file()]
        if not missing:
            return records
        first = ", ".join(f"'{r.path}'" for r in missing[:5])
        msg = f"{self.name}: {len(missing)} of {len(records)} audio files are missing (first: {first})"
        if len(missing) == len(records):
            # Nothing to skip to: most likely the wrong folder, or the audio was never downloaded.
            folders = sorted({str(r.path.parent) for r in records})
            shown = ", ".join(f"'{f}'" for f in folders[:3]) + (" ..." if len(folders) > 3 else "")
            raise FileNotFoundError(f"{msg}: no audio at all in {shown}; is the dataset root right and its audio downloaded?")
        if self.on_missing == "error":
            raise FileNotFoundError(msg + "; pass on_missing='skip' to train without them")
        log.warning("%s; skipping them (on_missing='skip')", msg)
        self.missing_fnames = [r.fname for r in missing]
        missing_keys = {r.key for r in missing}
        return [r for r in records if r.key not in missing_keys]

    @property
    def missing_skipped(self) -> int:
        """How many clips were dropped because their audio file is missing (`on_missing="skip"`)."""
        return len(self.missing_fnames)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[list[str]]:
        """All captions, per clip (no audio is read)."""
        return [list(r.captions) for r in self.records]

    @property
    def fnames(self) -> list[str]:
        return [r.fname for r in self.records]

    def use_pack(self, packed: Any) -> None:
        """Read audio from a pack (`aac_lightning.data.pack.PackedAudio`) instead of the files; `None`: the files."""
        self.packed = packed

    def _bad_audio(self, err: AudioError) -> None:
        if self.on_bad_audio == "error":
            raise err
        self.bad_audio_skipped += 1
        log.warning("skipping bad audio (%d so far in this process): %s", self.bad_audio_skipped, err)

    def audio_length(self, index: int) -> int | None:
        """Samples of clip `index` at `sample_rate` (from the header or the pack, nothing decoded); `None`: bad file, skipped."""
        record = self.records[index]
        try:
            if self.packed is not None:
                return self.packed.length(record.key)
            return audio_length(record.path, self.sample_rate)
        except AudioError as err:
            self._bad_audio(err)
            return None

    def load_audio(self, index: int, start: int = 0, num_samples: int | None = None) -> torch.Tensor | None:
        """Audio `(channels, time)` of clip `index` (samples `[start, start + num_samples)` only: nothing
        else is decoded), or `None` for a bad file under `on_bad_audio='skip'`."""
        record = self.records[index]
        try:
            if self.packed is not None:
                return self.packed.read(record.key, start, num_samples)
            return load_audio_window(record.path, start, num_samples, self.sample_rate)
        except AudioError as err:
            self._bad_audio(err)
            return None

    def load_crop(self, index: int, max_samples: int | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A random window of `max_samples` of clip `index` (`(channels, time)`), reading only that window.

        The offset is drawn as `crop_start(length, max_samples, generator)`: the same draw, hence the
        same crop, as cropping the whole decoded clip (`batches.crop_waveform`).
        """
        length = self.audio_length(index)
        if length is None:
            return None
        start = crop_start(length, max_samples, generator)
        return self.load_audio(index, start, max_samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        audio = self.load_audio(index)
        if audio is None:
            return None
        return {
            "audio": audio,
            "sr": self.sample_rate,
            "captions": list(record.captions),
            "fname": record.fname,
            "dataset": record.dataset,
            "subset": record.subset,
            "index": index,
        }

    def select(self, keys: Iterable[str], name: str) -> "CaptionDataset":
        """A new dataset of the clips whose `record.key` is in `keys`, in the order of `keys`."""
        by_key = {r.key: r for r in self.records}
        keys = list(keys)
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise KeyError(f"{self.name}: unknown clip keys {unknown[:5]}")
        selected = CaptionDataset([by_key[k] for k in keys], name, self.sample_rate, self.on_missing, self.on_bad_audio)
        selected.packed = self.packed
        return selected

    @staticmethod
    def concat(datasets: Sequence["CaptionDataset"], name: str) -> "CaptionDataset":
        """The clips of several datasets as one (e.g. Clotho + AudioCaps + MACS)."""
        if not datasets:
            raise ValueError("concat needs at least one dataset")
        rates = {d.sample_rate for d in datasets}
        if len(rates) > 1:
            raise ValueError(f"cannot concatenate datasets with different sample rates {sorted(map(str, rates))}")
        first = datasets[0]
        records = [r for d in datasets for r in d.records]
        combined = CaptionDataset(records, name, first.sample_rate, first.on_missing, first.on_bad_audio)
        combined.missing_fnames = [f for d in datasets for f in d.missing_fnames]  # what its parts skipped
        return combined


# ---------------------------------------------------------------------------------------------- Clotho

CLOTHO_SUBSETS = {
    "development": "development",
    "dev": "development",
    "validation": "validation",
    "val": "validation",
    "evaluation": "evaluation",
    "eval": "evaluation",
}
CLOTHO_CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))


def find_clotho_files(root: str | os.PathLike, subset: str) -> tuple[Path, Path]:
    """`(captions_csv, audio_dir)` of a Clotho subset in the aac-datasets layout or the plain Zenodo one.

    aac-datasets: `root/CLOTHO_v2.1/clotho_csv_files/clotho_captions_<subset>.csv` and
    `root/CLOTHO_v2.1/clotho_audio_files/<subset>/`. Zenodo, unzipped: `root/clotho_captions_<subset>.csv`
    and `root/<subset>/` (or `root/clotho_audio_<subset>/`). `root` may also be the `CLOTHO_v2.1` folder.
    """
    root = Path(root)
    if subset not in CLOTHO_SUBSETS:
        raise ValueError(f"unknown Clotho subset {subset!r}; expected one of {sorted(CLOTHO_SUBSETS)}")
    subset = CLOTHO_SUBSETS[subset]
    csv_name = f"clotho_captions_{subset}.csv"
    candidates = [
        (root / "CLOTHO_v2.1" / "clotho_csv_files" / csv_name, root / "CLOTHO_v2.1" / "clotho_audio_files" / subset),
        (root / "clotho_csv_files" / csv_name, root / "clotho_audio_files" / subset),
        (root / csv_name, root / subset),
        (root / csv_name, root / f"clotho_audio_{subset}"),
    ]
    for csv_path, audio_dir in candidates:
        if csv_path.is_file() and audio_dir.is_dir():
            return csv_path, audio_dir
    tried = "; ".join(f"'{c}' + '{a}/'" for c, a in candidates)
    raise FileNotFoundError(f"Clotho subset '{subset}' not found under '{root}'. Looked for: {tried}")


class Clotho(CaptionDataset):
    """Clotho v2.1 (`development`, `validation`, `evaluation`; `dev`, `val`, `eval` accepted too).

    Reads `clotho_captions_<subset>.csv` (`file_name, caption_1..caption_5`) from the aac-datasets
    layout or the unzipped Zenodo layout; see `find_clotho_files`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subset: str = "development",
        sample_rate: int | None = 32000,
        on_missing: OnMissing = "error",
        on_bad_audio: OnMissing = "error",
    ):
        csv_path, audio_dir = find_clotho_files(root, subset)
        subset = CLOTHO_SUBSETS[subset]
        rows = read_csv_rows(csv_path, ("file_name", *CLOTHO_CAPTION_COLUMNS))
        records, seen = [], set()
        for line_no, row in enumerate(rows, start=2):
            source = f"'{csv_path}' line {line_no}"
            fname = row["file_name"]
            if fname in seen:
                raise DatasetFormatError(f"{source}: file name {fname!r} appears twice")
            seen.add(fname)
            captions = tuple(check_caption(row[col], f"{source} column {col}") for col in CLOTHO_CAPTION_COLUMNS)
            records.append(ClipRecord(fname, safe_join(audio_dir, fname, source), captions, "clotho", subset))
        super().__init__(records, f"Clotho({subset})", sample_rate, on_missing, on_bad_audio)


# ------------------------------------------------------------------------------------------- AudioCaps

AUDIOCAPS_SUBSETS = ("train", "val", "test")
AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def find_audiocaps_files(root: str | os.PathLike, subset: str, audio_format: str) -> tuple[Path, Path]:
    """`(captions_csv, audio_dir)` of an AudioCaps subset.

    aac-datasets layout: `root/AUDIOCAPS/csv_files_v1/<subset>.csv` (older: `root/AUDIOCAPS/<subset>.csv`)
    and `root/AUDIOCAPS/audio_32000Hz/<subset>/<youtube_id>_<start_time>.<fmt>` (any `audio_*Hz`
    folder). Also accepted: `root/<subset>.csv` with `root/<subset>/`.
    """
    root = Path(root)
    if subset not in AUDIOCAPS_SUBSETS:
        raise ValueError(f"unknown AudioCaps subset {subset!r}; expected one of {AUDIOCAPS_SUBSETS}")
    base = root / "AUDIOCAPS" if (root / "AUDIOCAPS").is_dir() else root
    csv_candidates = [base / "csv_files_v1" / f"{subset}.csv", base / f"{subset}.csv"]
    csv_path = next((p for p in csv_candidates if p.is_file()), None)
    audio_candidates = [base / "audio_32000Hz" / subset]
    audio_candidates += sorted(d / subset for d in base.glob("audio_*Hz") if d.is_dir())
    audio_candidates += [base / subset]
    audio_dir = next((d for d in audio_candidates if d.is_dir()), None)
    if csv_path is None or audio_dir is None:
        raise FileNotFoundError(
            f"AudioCaps subset '{subset}' not found under '{root}': looked for captions in "
            f"{[str(p) for p in csv_candidates]} and audio in {[str(d) for d in audio_candidates]}"
        )
    return csv_path, audio_dir


class AudioCaps(CaptionDataset):
    """AudioCaps `train` / `val` / `test`: CSV rows `audiocap_id,youtube_id,start_time,caption`.

    Rows of one clip (same `youtube_id` and `start_time`) are grouped, captions in CSV order (train has
    one caption per clip, val/test five). Audio files are named `<youtube_id>_<start_time>.<audio_format>`
    as aac-datasets writes them. Clips whose video could not be downloaded are common (every copy of
    AudioCaps lacks some): pass `on_missing="skip"` to drop them with a logged count (`missing_skipped`),
    as the authors' pipeline does (it only lists the clips it has audio for).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subset: str = "train",
        sample_rate: int | None = 32000,
        audio_format: str = "flac",
        on_missing: OnMissing = "error",
        on_bad_audio: OnMissing = "error",
    ):
        csv_path, audio_dir = find_audiocaps_files(root, subset, audio_format)
        rows = read_csv_rows(csv_path, AUDIOCAPS_COLUMNS)
        grouped: dict[str, list[str]] = {}
        for line_no, row in enumerate(rows, start=2):
            source = f"'{csv_path}' line {line_no}"
            youtube_id, start = row["youtube_id"].strip(), row["start_time"].strip()
            if not youtube_id:
                raise DatasetFormatError(f"{source}: empty youtube_id")
            try:
                start_int = int(float(start))
            except ValueError as err:
                raise DatasetFormatError(f"{source}: start_time {start!r} is not a number") from err
            fname = f"{youtube_id}_{start_int}.{audio_format}"
            grouped.setdefault(fname, []).append(check_caption(row["caption"], f"{source} column caption"))
        records = [
            ClipRecord(fname, safe_join(audio_dir, fname, f"'{csv_path}'"), tuple(caps), "audiocaps", subset)
            for fname, caps in grouped.items()
        ]
        super().__init__(records, f"AudioCaps({subset})", sample_rate, on_missing, on_bad_audio)


# ------------------------------------------------------------------------------------------------ MACS


def find_macs_files(root: str | os.PathLike) -> tuple[Path, Path]:
    """`(MACS.yaml, audio_dir)`: aac-datasets' `root/MACS/MACS.yaml` + `root/MACS/audio/`, or the same under `root`."""
    root = Path(root)
    for base in (root / "MACS", root):
        yaml_path, audio_dir = base / "MACS.yaml", base / "audio"
        if yaml_path.is_file() and audio_dir.is_dir():
            return yaml_path, audio_dir
    raise FileNotFoundError(f"MACS not found under '{root}': expected MACS/MACS.yaml and MACS/audio/")


class MACS(CaptionDataset):
    """MACS captions of TAU Urban Acoustic Scenes 2019 audio, from `MACS.yaml`.

    The YAML holds `files: [{filename, annotations: [{sentence, annotator_id, tags}, ...]}, ...]`;
    audio is the TAU 2019 development WAV files, flat in `MACS/audio/`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        sample_rate: int | None = 32000,
        on_missing: OnMissing = "error",
        on_bad_audio: OnMissing = "error",
    ):
        import yaml

        yaml_path, audio_dir = find_macs_files(root)
        try:
            with open(yaml_path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except UnicodeDecodeError as err:
            raise DatasetFormatError(f"'{yaml_path}' is not valid UTF-8 text ({err})") from err
        except yaml.YAMLError as err:
            raise DatasetFormatError(f"'{yaml_path}' is not valid YAML: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise DatasetFormatError(f"'{yaml_path}' lacks the top-level key 'files' (a list of clips)")
        records = []
        for i, item in enumerate(data["files"]):
            source = f"'{yaml_path}' files[{i}]"
            if not isinstance(item, dict):
                raise DatasetFormatError(f"{source}: expected a mapping with keys 'filename' and 'annotations'")
            missing = [k for k in ("filename", "annotations") if k not in item]
            if missing:
                raise DatasetFormatError(f"{source}: missing key(s) {missing}")
            annotations = item["annotations"]
            if not isinstance(annotations, list) or not annotations:
                raise DatasetFormatError(f"{source}: 'annotations' must be a non-empty list")
            captions = []
            for j, ann in enumerate(annotations):
                if not isinstance(ann, dict) or "sentence" not in ann:
                    raise DatasetFormatError(f"{source}.annotations[{j}]: missing key 'sentence'")
                captions.append(check_caption(ann["sentence"], f"{source}.annotations[{j}].sentence"))
            fname = str(item["filename"])
            records.append(ClipRecord(fname, safe_join(audio_dir, fname, source), tuple(captions), "macs", "full"))
        super().__init__(records, "MACS", sample_rate, on_missing, on_bad_audio)
