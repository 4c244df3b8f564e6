"""LightningDataModules of the retrieval and captioning stages.

Sources are named (`clotho`, `audiocaps`, `macs`) and mixed by listing several in `train_sources`.
Clotho's training data is the 9:1 re-split of development + validation (per clip, from a seed, the
same on every rank), its validation data the other tenth, its test data the evaluation subset.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from aac_lightning.data.batches import (
    CaptionPairs,
    ClipItems,
    TextOnlyClips,
    TextOnlyPairs,
    collate_clips,
    collate_pairs,
    crop_waveform,
    pad_waveforms,
)
from aac_lightning.data.datasets import MACS, AudioCaps, CaptionDataset, Clotho, OnMissing
from aac_lightning.data.pack import PackDtype, PackedAudio, pack_records
from aac_lightning.data.samplers import EvenTrainSampler, ShardedEvalSampler
from aac_lightning.data.splits import resplit, write_split_lists
from aac_lightning.data.text import Vocabulary, check_hyphens, pad_token_ids

__all__ = [  # the datasets and collate functions of `data.batches` are importable from here too
    "AudioCaptionDataModule",
    "CaptionPairs",
    "CaptioningDataModule",
    "ClipItems",
    "RetrievalDataModule",
    "TextOnlyClips",
    "TextOnlyPairs",
    "collate_clips",
    "collate_pairs",
    "crop_waveform",
    "pad_waveforms",
    "per_device_batch_size",
]

log = logging.getLogger(__name__)

Source = Literal["clotho", "audiocaps", "macs"]
Split = Literal["train", "val", "test"]


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """The micro-batch each device loads so that one optimizer step sees `global_batch_size` samples.

    Raises a `ValueError` naming the numbers when the global batch does not divide evenly.
    """
    shares = world_size * accumulate_grad_batches
    if global_batch_size % shares:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"trainer.accumulate_grad_batches {accumulate_grad_batches} = {shares}: each device would load a "
            "different share of the global batch; choose a global batch (or a device / accumulation count) "
            "that divides evenly"
        )
    return global_batch_size // shares


class AudioCaptionDataModule(pl.LightningDataModule):
    """Shared data plumbing of both stages: sources, the Clotho re-split, loaders, DDP samplers.

    Args:
        clotho_root: folder holding Clotho v2.1 (aac-datasets layout or unzipped Zenodo files).
        audiocaps_root: folder holding AudioCaps (aac-datasets layout).
        macs_root: folder holding MACS (aac-datasets layout).
        train_sources: datasets mixed for training (e.g. `[clotho, audiocaps, macs]`).
        val_source: dataset used for validation (`clotho`: the re-split tenth; `audiocaps`: its val).
        test_source: dataset used for testing (`clotho`: evaluation; `audiocaps`: its test).
        resplit: merge Clotho development + validation and re-split them 9:1 per clip; when false,
            Clotho development trains and validation validates.
        resplit_train_fraction: share of clips for training in the re-split.
        resplit_seed: seed of the re-split.
        sample_rate: rate the audio is resampled to (Hz); `None` (default) follows the model's
            `sample_rate` (its audio encoder's) once attached to a trainer, else 32000.
        global_batch_size: training samples per optimizer step, over all devices, nodes and
            gradient-accumulation micro-batches together: the paper's batch size, whatever the
            hardware. Each device loads `global_batch_size / (world size x accumulate_grad_batches)`
            per micro-batch; a run where that does not divide evenly stops before training with an
            error naming the numbers.
        batch_size: deprecated name of `global_batch_size` (same meaning; a warning says so).
        eval_batch_size: per-device evaluation batch size (defaults to the per-device training batch).
        num_workers: data loader worker processes.
        pin_memory: page-locked host memory for faster host-to-GPU copies (defaults to CUDA available).
        on_missing: `error` or `skip` clips whose audio file is missing.
        on_bad_audio: `error` or `skip` (counted, logged) files that cannot be decoded or hold bad samples.
        split_dir: where the re-split's file lists go (default: the trainer's log dir).
        seed: seed of the training shuffle; `None` (default) takes the run's seed (`seed_everything`),
            so runs with different seeds also see different shuffles (0 when no seed is set).
        predict_split: the split `predict_dataloader` serves (`aac-lightning predict`): `test` (default),
            `val` or `train`; one clip per item, in order, no audio crop beyond the evaluation one.
        packed_dir: read audio from the packs in this folder (`aac-lightning pack`: every clip stored
            once at the model's rate) instead of decoding the files: same items, same crops. At setup,
            clips not packed yet or changed since are packed first (rank 0 writes, the others wait).
        pack_dtype: storage type of the packs: `int16` (default; reads equal the files' up to int16
            rounding) or `float32` (equal exactly, twice the disk).
    """

    def __init__(
        self,
        clotho_root: str | None = None,
        audiocaps_root: str | None = None,
        macs_root: str | None = None,
        train_sources: list[Source] = ["clotho"],  # noqa: B006 (jsonargparse needs a literal default)
        val_source: Source = "clotho",
        test_source: Source = "clotho",
        resplit: bool = True,
        resplit_train_fraction: float = 0.9,
        resplit_seed: int = 0,
        sample_rate: int | None = None,
        global_batch_size: int = 32,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        on_missing: OnMissing = "error",
        on_bad_audio: OnMissing = "error",
        split_dir: str | None = None,
        seed: int | None = None,
        predict_split: Split = "test",
        packed_dir: str | None = None,
        pack_dtype: PackDtype = "int16",
    ):
        super().__init__()
        if predict_split not in ("train", "val", "test"):
            raise ValueError(f"predict_split must be one of ['train', 'val', 'test'], got {predict_split!r}")
        if not train_sources:
            raise ValueError("train_sources must name at least one dataset")
        for field_name, value in (("val_source", val_source), ("test_source", test_source)):
            if value == "macs":
                raise ValueError(f"{field_name}: MACS has no validation/test subsets; use 'clotho' or 'audiocaps'")
        self.roots = {"clotho": clotho_root, "audiocaps": audiocaps_root, "macs": macs_root}
        needed = set(train_sources) | {val_source, test_source}
        missing = sorted(s for s in needed if self.roots[s] is None)
        if missing:
            raise ValueError(f"data sources {missing} are used but their root is not set ({', '.join(m + '_root' for m in missing)})")
        if batch_size is not None:
            rank_zero_warn(
                "data.batch_size is deprecated: it is the global batch, now named data.global_batch_size "
                f"(using global_batch_size={batch_size})",
                category=DeprecationWarning,
            )
            global_batch_size = batch_size
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.train_sources = list(train_sources)
        self.val_source, self.test_source = val_source, test_source
        self.resplit, self.resplit_train_fraction, self.resplit_seed = resplit, resplit_train_fraction, resplit_seed
        self.sample_rate = sample_rate
        self.global_batch_size = global_batch_size
        self._eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.on_missing, self.on_bad_audio = on_missing, on_bad_audio
        self.split_dir = split_dir
        self._seed = seed
        self.predict_split: Split = predict_split
        if pack_dtype not in ("int16", "float32"):
            raise ValueError(f"pack_dtype must be 'int16' or 'float32', got {pack_dtype!r}")
        self.packed_dir, self.pack_dtype = packed_dir, pack_dtype
        self._clips: dict[Split, CaptionDataset] = {}
        self._clotho_split: tuple[list[str], list[str]] | None = None

    # ------------------------------------------------------------------ datasets
    def resolved_sample_rate(self) -> int:
        """The rate audio is read at: the configured one, else the attached model's, else 32000."""
        trainer = self.trainer
        model = trainer.lightning_module if trainer is not None else None
        model_rate = getattr(model, "sample_rate", None)
        if self.sample_rate is not None:
            if model_rate is not None and model_rate != self.sample_rate:
                raise ValueError(
                    f"data.sample_rate={self.sample_rate} but the model's audio encoder expects {model_rate} Hz; "
                    "leave data.sample_rate unset to follow the model"
                )
            return self.sample_rate
        return int(model_rate) if model_rate is not None else 32000

    def _read(self, cls, source: str, subset: str | None) -> CaptionDataset:
        kwargs = dict(sample_rate=self.resolved_sample_rate(), on_missing=self.on_missing, on_bad_audio=self.on_bad_audio)
        root = self.roots[source]
        return cls(root, **kwargs) if subset is None else cls(root, subset, **kwargs)

    def clotho_resplit(self) -> tuple[list[str], list[str]]:
        """The re-split's `(train_keys, val_keys)` (clip keys `clotho/<subset>/<file name>`)."""
        if self._clotho_split is None:
            merged = [self._read(Clotho, "clotho", s) for s in ("development", "validation")]
            keys = [r.key for d in merged for r in d.records]
            self._clotho_split = resplit(keys, self.resplit_train_fraction, self.resplit_seed)
        return self._clotho_split

    def source_split(self, source: str, split: Split) -> CaptionDataset:
        """The clips of one source for one split."""
        if source == "clotho":
            if split == "test":
                return self._read(Clotho, "clotho", "evaluation")
            if not self.resplit:
                return self._read(Clotho, "clotho", "development" if split == "train" else "validation")
            merged = CaptionDataset.concat(
                [self._read(Clotho, "clotho", s) for s in ("development", "validation")], "Clotho(dev+val)"
            )
            train_keys, val_keys = self.clotho_resplit()
            return merged.select(train_keys if split == "train" else val_keys, f"Clotho(resplit {split})")
        if source == "audiocaps":
            return self._read(AudioCaps, "audiocaps", {"train": "train", "val": "val", "test": "test"}[split])
        if source == "macs":
            if split != "train":
                raise ValueError("MACS only provides training data")
            return self._read(MACS, "macs", None)
        raise ValueError(f"unknown data source {source!r}")

    def clips(self, split: Split) -> CaptionDataset:
        """The clips of a split (train: the mix of `train_sources`)."""
        if split not in self._clips:
            if split == "train":
                parts = [self.source_split(s, "train") for s in self.train_sources]
                self._clips[split] = parts[0] if len(parts) == 1 else CaptionDataset.concat(parts, "train mix")
            else:
                self._clips[split] = self.source_split(self.val_source if split == "val" else self.test_source, split)
        return self._clips[split]

    def setup(self, stage: str | None = None) -> None:
        # Clips read before a model was attached (e.g. for the vocabulary) may be at another rate.
        rate = self.resolved_sample_rate()
        self._clips = {split: clips for split, clips in self._clips.items() if clips.sample_rate == rate}
        if stage in (None, "fit"):
            self.clips("train")
            self.clips("val")
            self._write_split_lists()
        if stage in (None, "validate"):
            self.clips("val")
        if stage in (None, "test"):
            self.clips("test")
        if stage == "predict":
            self.clips(self.predict_split)
        if self.packed_dir is not None:
            self._use_packs(rate)

    def _use_packs(self, rate: int) -> None:
        """Pack what is missing or stale (rank 0; the others wait), then read every split from the packs."""
        records = {r.key: r for clips in self._clips.values() for r in clips.records}
        trainer = self.trainer
        if trainer is None or trainer.global_rank == 0:
            written = pack_records(list(records.values()), self.packed_dir, rate, self.pack_dtype)
            if written:
                log.info("packed %d clips into %s", written, self.packed_dir)
        if trainer is not None:
            trainer.strategy.barrier("pack")
        packed = PackedAudio(self.packed_dir, rate, self.pack_dtype)
        packed.check(list(records.values()))
        for clips in self._clips.values():
            clips.use_pack(packed)

    def _write_split_lists(self) -> None:
        if "clotho" not in self.train_sources or not self.resplit:
            return
        trainer = self.trainer
        # `trainer.log_dir` is a collective (a broadcast) under DDP: every rank must ask for it.
        out_dir = self.split_dir or (trainer.log_dir if trainer is not None else None)
        if out_dir is None or (trainer is not None and trainer.global_rank != 0):
            return
        train_keys, val_keys = self.clotho_resplit()
        meta = {"seed": self.resplit_seed, "train_fraction": self.resplit_train_fraction, "clotho_root": str(self.roots["clotho"])}
        path = write_split_lists(out_dir, {"train": train_keys, "val": val_keys}, meta)
        log.info("re-split file lists written to %s", path)

    # ------------------------------------------------------------------ loaders
    @property
    def seed(self) -> int:
        """Seed of the training shuffle: `seed` if given, else the run's global seed, else 0."""
        if self._seed is not None:
            return self._seed
        value = os.environ.get("PL_GLOBAL_SEED")
        return int(value) if value not in (None, "") else 0

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    @property
    def batch_size(self) -> int:
        """Per-device training micro-batch: `global_batch_size / (world size x accumulate_grad_batches)`."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        return per_device_batch_size(self.global_batch_size, world, accumulate)

    @property
    def eval_batch_size(self) -> int:
        """Per-device evaluation batch: `eval_batch_size`, else the per-device training batch."""
        return self._eval_batch_size or self.batch_size

    def _loader(self, dataset: Dataset, collate, train: bool) -> DataLoader:
        world, rank = self._world()
        batch_size = self.batch_size if train else self.eval_batch_size
        if world > 1:
            sampler = (
                EvenTrainSampler(dataset, batch_size, world, rank, shuffle=True, seed=self.seed)
                if train
                else ShardedEvalSampler(dataset, world, rank)
            )
            shuffle = None
        else:
            sampler, shuffle = None, train
        generator = torch.Generator().manual_seed(self.seed) if train and sampler is None else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )


class RetrievalDataModule(AudioCaptionDataModule):
    """Data of the contrastive stage.

    Training: one `(audio, caption)` pair per sample, every caption of every clip once per epoch, the
    audio randomly cropped to `train_max_seconds` (shorter clips zero-padded in the batch, true lengths
    in `audio_lengths`). Evaluation: one clip per sample with all its captions.

    Args:
        train_max_seconds: length of the random training crops (`None`: whole clips).
        eval_max_seconds: evaluation audio is cut to this length (`None`: whole clips).
        **kwargs: see `AudioCaptionDataModule`.
    """

    def __init__(self, *args, train_max_seconds: float | None = 10.0, eval_max_seconds: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_max_seconds = train_max_seconds
        self.eval_max_seconds = eval_max_seconds

    def train_dataloader(self) -> DataLoader:
        return self._loader(CaptionPairs(self.clips("train"), self.train_max_seconds), collate_pairs, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ClipItems(self.clips("val"), self.eval_max_seconds), collate_clips, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(ClipItems(self.clips("test"), self.eval_max_seconds), collate_clips, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The clips of `predict_split`, as evaluated (one clip per item, in order)."""
        return self._loader(ClipItems(self.clips(self.predict_split), self.eval_max_seconds), collate_clips, train=False)


class CaptioningDataModule(AudioCaptionDataModule):
    """Data of the captioning stages: audio plus tokenised captions and the word vocabulary.

    The vocabulary is built from the training captions (normalised words seen at least
    `vocab_min_count` times) or read from `vocabulary_path`; the captioner stores it in its checkpoints.

    Args:
        vocab_min_count: minimum count of a word to enter the vocabulary.
        caption_hyphens: how captions are cut into words for the vocabulary: `keep` (default, the
            authors' PTB tokenisation: "high-pitched" is one word) or `split` ("high pitched").
        vocabulary_path: a saved vocabulary (JSON) to use instead of building one.
        max_caption_words: captions are cut to this many words (plus `<bos>`/`<eos>`) for training.
        train_max_seconds: training audio is cut to this length (`None`: whole clips).
        eval_max_seconds: evaluation audio is cut to this length (`None`: whole clips).
        **kwargs: see `AudioCaptionDataModule`.
    """

    def __init__(
        self,
        *args,
        vocab_min_count: int = 1,
        caption_hyphens: Literal["keep", "split"] = "keep",
        vocabulary_path: str | None = None,
        max_caption_words: int = 30,
        train_max_seconds: float | None = None,
        eval_max_seconds: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.vocab_min_count = vocab_min_count
        self.caption_hyphens = check_hyphens(caption_hyphens)
        self.vocabulary_path = vocabulary_path
        self.max_caption_words = max_caption_words
        self.train_max_seconds = train_max_seconds
        self.eval_max_seconds = eval_max_seconds
        self._vocabulary: Vocabulary | None = None
        self._load_audio = True

    def use_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Encode captions with `vocabulary` (a model's) instead of building one from the training captions.

        A vocabulary given explicitly (`vocabulary_path`) cannot be replaced: a different one raises.
        """
        if self.vocabulary_path is not None and self.vocabulary != vocabulary:
            raise ValueError(f"the datamodule's vocabulary comes from vocabulary_path '{self.vocabulary_path}' and cannot be replaced")
        self._vocabulary = vocabulary

    def features_only(self, enabled: bool = True) -> None:
        """Serve batches without audio (`audio` is `(B, 0)`): for a captioner whose features are all cached.

        No audio file is then decoded; batches keep their clip `keys` (names in the feature cache).
        """
        self._load_audio = not enabled

    @property
    def loads_audio(self) -> bool:
        """False once `features_only()` was called: batches then carry no audio."""
        return self._load_audio

    @property
    def vocabulary(self) -> Vocabulary:
        """The word vocabulary (built from the training captions on first access; no audio is read)."""
        if self._vocabulary is None:
            if self.vocabulary_path is not None:
                self._vocabulary = Vocabulary.load(self.vocabulary_path)
            else:
                captions = [c for caps in self.clips("train").captions for c in caps]
                self._vocabulary = Vocabulary.build(captions, self.vocab_min_count, hyphens=self.caption_hyphens)
        return self._vocabulary

    def collate_train(self, items: list[dict | None]) -> dict[str, Any]:
        """`collate_pairs` plus `tokens (B, L)`: `<bos> words <eos>` right-padded with `<pad>`, and clip `keys`."""
        batch = collate_pairs(items)
        vocab = self.vocabulary
        ids = []
        for caption in batch["captions"]:
            seq = vocab.encode(caption)  # <bos> w_1 .. w_n <eos>
            if len(seq) > self.max_caption_words + 2:
                seq = seq[: self.max_caption_words + 1] + [vocab.eos_id]
            ids.append(seq)
        batch["tokens"] = pad_token_ids(ids, vocab.pad_id)
        batch["keys"] = self._keys("train", batch["clip_ids"])
        return batch

    def collate_val(self, items: list[dict | None]) -> dict[str, Any]:
        """`collate_clips` plus the clip `keys` (names in the feature cache)."""
        batch = collate_clips(items)
        batch["keys"] = self._keys("val", batch["clip_ids"])
        return batch

    def collate_test(self, items: list[dict | None]) -> dict[str, Any]:
        """`collate_clips` plus the clip `keys` (names in the feature cache)."""
        batch = collate_clips(items)
        batch["keys"] = self._keys("test", batch["clip_ids"])
        return batch

    def collate_predict(self, items: list[dict | None]) -> dict[str, Any]:
        """`collate_clips` plus the clip `keys` of `predict_split`."""
        batch = collate_clips(items)
        batch["keys"] = self._keys(self.predict_split, batch["clip_ids"])
        return batch

    def _keys(self, split: Split, clip_ids: torch.Tensor) -> list[str]:
        records = self.clips(split).records
        return [records[i].key for i in clip_ids.tolist()]

    def _clip_dataset(self, split: Split) -> Dataset:
        clips = self.clips(split)
        return ClipItems(clips, self.eval_max_seconds) if self._load_audio else TextOnlyClips(clips)

    def train_dataloader(self) -> DataLoader:
        clips = self.clips("train")
        dataset = CaptionPairs(clips, self.train_max_seconds) if self._load_audio else TextOnlyPairs(clips)
        return self._loader(dataset, self.collate_train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._clip_dataset("val"), self.collate_val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._clip_dataset("test"), self.collate_test, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The clips of `predict_split`, as evaluated (one clip per item, in order)."""
        return self._loader(self._clip_dataset(self.predict_split), self.collate_predict, train=False)
