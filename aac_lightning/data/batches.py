"""What the datamodules' loaders serve: pair and clip datasets (with or without audio) and their collate functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from aac_lightning.data.audio import crop_start
from aac_lightning.data.datasets import CaptionDataset


def pad_waveforms(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad mono waveforms `(T_i,)` into `(B, T_max)`, with their true lengths `(B,)`."""
    lengths = torch.tensor([w.shape[-1] for w in waveforms], dtype=torch.long)
    rows, cols = len(waveforms), int(lengths.max()) if len(waveforms) else 0
    if rows and get_worker_info() is not None:
        # In a loader worker, build the batch straight in shared memory, as torch's default_collate
        # does: otherwise sending it to the main process copies it once more (164 MB per batch of
        # 128 ten-second crops at 32 kHz, more time than reading the crops from a pack).
        storage = waveforms[0]._typed_storage()._new_shared(rows * cols, device=waveforms[0].device)
        batch = waveforms[0].new(storage).resize_(rows, cols)
    else:
        batch = torch.empty(rows, cols)
    for row, w in enumerate(waveforms):
        batch[row, : w.shape[-1]] = w
        batch[row, w.shape[-1] :] = 0
    return batch, lengths


def crop_waveform(waveform: torch.Tensor, max_samples: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """A random window of `max_samples` of a `(T,)` waveform (the whole one if it is shorter)."""
    if max_samples is None or waveform.shape[-1] <= max_samples:
        return waveform
    start = crop_start(waveform.shape[-1], max_samples, generator)
    return waveform[start : start + max_samples]


class CaptionPairs(Dataset):
    """One `(audio, caption)` pair per item: every caption of every clip once per epoch.

    Items: the clip's item dict with `caption` (str), `caption_index` and `clip_id` (the clip's position
    in `clips`, so captions of one clip that meet in a batch can be recognised).

    Only the crop is read and resampled (`CaptionDataset.load_crop`: a seek into the file, or a window
    of a pack): the same offset draw, hence the same crops, as decoding the whole clip and cropping it.
    """

    def __init__(self, clips: CaptionDataset, max_seconds: float | None = None):
        self.clips = clips
        self.pairs = [(c, k) for c, caps in enumerate(clips.captions) for k in range(len(caps))]
        self.max_samples = None if max_seconds is None else int(max_seconds * (clips.sample_rate or 1))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        clip_index, caption_index = self.pairs[index]
        audio = self.clips.load_crop(clip_index, self.max_samples, None)
        if audio is None:
            return None
        record = self.clips.records[clip_index]
        return {
            "audio": audio[0],
            "caption": record.captions[caption_index],
            "caption_index": caption_index,
            "clip_id": clip_index,
            "fname": record.fname,
            "captions": list(record.captions),
        }


class ClipItems(Dataset):
    """One clip per item with all its captions (evaluation), audio optionally cut to `max_seconds`."""

    def __init__(self, clips: CaptionDataset, max_seconds: float | None = None):
        self.clips = clips
        self.max_samples = None if max_seconds is None else int(max_seconds * (clips.sample_rate or 1))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        audio = self.clips.load_audio(index, 0, self.max_samples)  # only the first max_samples are read
        if audio is None:
            return None
        record = self.clips.records[index]
        return {"audio": audio[0], "captions": list(record.captions), "clip_id": index, "fname": record.fname}


def collate_pairs(items: list[dict | None]) -> dict[str, Any]:
    """Batch of training pairs: `audio (B, T)`, `audio_lengths (B,)`, `captions`, `clip_ids (B,)`, `fnames`."""
    items = [it for it in items if it is not None]
    audio, lengths = pad_waveforms([it["audio"] for it in items])
    return {
        "audio": audio,
        "audio_lengths": lengths,
        "captions": [it["caption"] for it in items],
        "clip_ids": torch.tensor([it["clip_id"] for it in items], dtype=torch.long),
        "fnames": [it["fname"] for it in items],
    }


def collate_clips(items: list[dict | None]) -> dict[str, Any]:
    """Batch of evaluation clips: `audio (B, T)`, `audio_lengths`, `references` (captions per clip), `clip_ids`, `fnames`."""
    items = [it for it in items if it is not None]
    audio, lengths = pad_waveforms([it["audio"] for it in items])
    return {
        "audio": audio,
        "audio_lengths": lengths,
        "references": [it["captions"] for it in items],
        "clip_ids": torch.tensor([it["clip_id"] for it in items], dtype=torch.long),
        "fnames": [it["fname"] for it in items],
    }


class TextOnlyPairs(CaptionPairs):
    """`CaptionPairs` without reading audio (`audio` is empty): for captioners on cached features."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip_index, caption_index = self.pairs[index]
        record = self.clips.records[clip_index]
        return {
            "audio": torch.zeros(0),
            "caption": record.captions[caption_index],
            "caption_index": caption_index,
            "clip_id": clip_index,
            "fname": record.fname,
            "captions": list(record.captions),
        }


class TextOnlyClips(ClipItems):
    """`ClipItems` without reading audio (`audio` is empty): for captioners on cached features."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.clips.records[index]
        return {"audio": torch.zeros(0), "captions": list(record.captions), "clip_id": index, "fname": record.fname}
