"""Datasets (Clotho, AudioCaps, MACS, synthetic), audio I/O, text, the re-split and the DataModules."""

from aac_lightning.data.audio import AudioError, load_audio
from aac_lightning.data.datamodules import AudioCaptionDataModule, CaptioningDataModule, RetrievalDataModule
from aac_lightning.data.datasets import MACS, AudioCaps, CaptionDataset, ClipRecord, Clotho, DatasetFormatError
from aac_lightning.data.splits import resplit
from aac_lightning.data.synth import write_synthetic_clotho
from aac_lightning.data.text import Vocabulary, normalize_caption, tokenize_caption

__all__ = [
    "AudioCaps",
    "AudioCaptionDataModule",
    "AudioError",
    "CaptionDataset",
    "CaptioningDataModule",
    "ClipRecord",
    "Clotho",
    "DatasetFormatError",
    "MACS",
    "RetrievalDataModule",
    "Vocabulary",
    "load_audio",
    "normalize_caption",
    "resplit",
    "tokenize_caption",
    "write_synthetic_clotho",
]
