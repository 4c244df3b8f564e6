"""Callbacks for long runs, and the writer of `aac-lightning predict`'s outputs."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.swa_utils import AveragedModel

from aac_lightning.modules.schedules import is_shortened_run


class LatestCheckpoint(ModelCheckpoint):
    """Writes `<dirpath>/last.ckpt` at the end of every training epoch, atomically.

    Why not `ModelCheckpoint(save_last=True)`: since Lightning 2.6 that `last.ckpt` is refreshed only
    when a top-k checkpoint is saved, so with a monitored metric that stops improving it falls behind
    and a resumed run would repeat epochs. This one always holds the latest finished epoch (weights,
    optimizer, schedule, loop and callback state). The file is written aside and renamed into place,
    so a run killed while saving keeps the previous complete `last.ckpt`.

    Args:
        dirpath: folder of `last.ckpt`; `None`: the folder of the trainer's other ModelCheckpoint
            that names one (the best checkpoints), else Lightning's default checkpoint folder.
    """

    FILE_NAME = "last"

    def __init__(self, dirpath: str | os.PathLike | None = None) -> None:
        super().__init__(
            dirpath=None if dirpath is None else str(dirpath),
            filename=self.FILE_NAME,
            monitor=None,
            save_top_k=1,
            save_last=False,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            others = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb is not self and cb.dirpath]
            if others:
                self.dirpath = others[0]
        super().setup(trainer, pl_module, stage)

    @property
    def state_key(self) -> str:
        # distinct from any ModelCheckpoint of the config, even one without a monitor; one per trainer
        return "LatestCheckpoint"

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("latest-checkpoint")


class EpochWeightAveraging(WeightAveraging):
    """Stochastic weight averaging over the last epochs: the equal-weight mean of the weights at the
    end of each of the run's last `last_epochs` epochs (parameters and buffers).

    This is the authors' recipe for the captioners: XE averages epochs 21-25 of 25 and SCST epochs
    96-100 of 100 (`last_epochs: 5`), and the averaged weights are what SCST starts from and what the
    ensembles decode with. Built on Lightning's `WeightAveraging`, with three differences:

    - validation (and so the monitored `best-*.ckpt`) sees the weights being trained, as in the
      authors' runs, not the running average (which holds the initial weights until averaging starts);
    - checkpoints keep the trained weights in `state_dict` and carry the running average under
      `weight_averaging`, so a resumed run (`ckpt_path`) continues both;
    - when training ends the averaged weights are loaded into the module and written to
      `<dirpath>/averaged.ckpt` (a complete checkpoint of the stage kind; `dirpath` defaults to the
      folder of the trainer's checkpoints). The pipeline hands this file on and tests it.

    Args:
        last_epochs: how many final epochs are averaged; at most `trainer.max_epochs` (checked at setup).
        dirpath: folder of `averaged.ckpt` (`None`: the trainer's checkpoint folder).
    """

    FILE_NAME = "averaged.ckpt"
    CHECKPOINT_KEY = "weight_averaging"

    def __init__(self, last_epochs: int = 5, dirpath: str | os.PathLike | None = None) -> None:
        if last_epochs < 1:
            raise ValueError(f"last_epochs must be >= 1, got {last_epochs}")
        super().__init__(use_buffers=True)
        self.last_epochs = last_epochs
        self.dirpath = None if dirpath is None else str(dirpath)
        self.first_epoch = 0
        self.averaged_path: str | None = None
        self._writing_average = False
        self.enabled = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.enabled = not trainer.fast_dev_run
        if stage == "fit" and not self.enabled:
            rank_zero_warn("EpochWeightAveraging is off in a fast_dev_run (it takes one step): no averaged.ckpt")
        if stage == "fit" and self.enabled:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ValueError(
                    f"EpochWeightAveraging(last_epochs={self.last_epochs}) needs trainer.max_epochs, got {max_epochs}"
                )
            if self.last_epochs > max_epochs and is_shortened_run(trainer):
                rank_zero_warn(
                    f"EpochWeightAveraging: last_epochs={self.last_epochs} is more than this shortened run's "
                    f"{max_epochs} epochs (limit_train_batches): all of them are averaged"
                )
            elif self.last_epochs > max_epochs:
                raise ValueError(
                    f"EpochWeightAveraging: last_epochs={self.last_epochs} is more than the run's "
                    f"trainer.max_epochs={max_epochs}: the average could never be complete"
                )
            self.first_epoch = max(0, max_epochs - self.last_epochs)
        # The averaged copy is made once the module is complete (a captioner builds its decoder in its
        # own `setup`, which runs after the callbacks'; a resumed one may rebuild it from the checkpoint).

    def _ensure_average_model(self, pl_module: pl.LightningModule) -> None:
        if self._average_model is None:
            self._average_model = AveragedModel(model=pl_module, device=self._device or pl_module.device, use_buffers=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self._ensure_average_model(pl_module)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass  # updated per epoch only (`should_update`)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.first_epoch

    @property
    def num_averaged(self) -> int:
        """How many epochs' weights are in the average so far."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    # Validation sees the trained weights: no swapping in of the average.
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_epoch": self._latest_update_epoch, "last_epochs": self.last_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None and not self._writing_average:
            checkpoint[self.CHECKPOINT_KEY] = {
                name: value.detach().clone() for name, value in self._average_model.state_dict().items()
            }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.CHECKPOINT_KEY)
        if state is not None and trainer.state.fn == "fit":
            self._ensure_average_model(pl_module)
            self._average_model.load_state_dict(state)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if self._average_model is None or self.num_averaged == 0:
            rank_zero_warn(
                f"EpochWeightAveraging: training ended before its first averaged epoch ({self.first_epoch}); "
                "no averaged.ckpt written"
            )
            return
        if self.num_averaged < self.last_epochs:
            rank_zero_warn(
                f"EpochWeightAveraging: only {self.num_averaged} of the last {self.last_epochs} epochs were "
                "averaged (the run stopped early)"
            )
        self._copy_average_to_current(pl_module)
        dirpath = self.dirpath
        if dirpath is None:
            dirpath = next((cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath), None)
        if dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, self.FILE_NAME)
        if trainer.is_global_zero:
            os.makedirs(dirpath, exist_ok=True)
        self._writing_average = True  # the file holds the average as its weights; no second copy
        try:
            trainer.save_checkpoint(path, weights_only=True)
        finally:
            self._writing_average = False
        self.averaged_path = path


CAPTION_SUFFIXES = (".json", ".csv")
EMBEDDING_SUFFIXES = (".pt", ".npz")


class PredictionWriter(BasePredictionWriter):
    """Write what `trainer.predict` (`aac-lightning predict`) returns to one file, in dataset order.

    Captioners (`predict_step` gives `CaptionPrediction(file, caption)` per clip):
        `.json`: a list of `{"file": ..., "caption": ...}`; `.csv`: the DCASE submission layout,
        header `file_name,caption_predicted`, one row per clip.
    Retrieval (`predict_step` gives `{"fnames": [...], "audio_emb": (B, E)}`):
        `.pt`: `{"files": [...], "audio_emb": (N, E) float32 tensor}`; `.npz`: arrays `files` and `audio_emb`.

    Rows come in the order of the predict dataloader's dataset (the datamodule's `predict_split`);
    under DDP every rank's share is gathered, rank 0 writes the file and the others wait until it is written.

    Args:
        output_path: the file to write; its suffix picks the format.
    """

    def __init__(self, output_path: str | os.PathLike) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)
        if self.output_path.suffix not in CAPTION_SUFFIXES + EMBEDDING_SUFFIXES:
            raise ValueError(
                f"output_path '{output_path}': unknown suffix; use {list(CAPTION_SUFFIXES)} for captions "
                f"or {list(EMBEDDING_SUFFIXES)} for embeddings"
            )

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        rows = prediction_rows(predictions, batch_indices)
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero:
            rows.sort(key=lambda row: row[0])
            write_predictions(self.output_path, [(file, value) for _, file, value in rows])
        # The other ranks go on (and may read the file) only once it is complete.
        trainer.strategy.barrier("prediction-writer")


def prediction_rows(predictions: Sequence[Any], batch_indices: Sequence[Any]) -> list[tuple[int, str, Any]]:
    """`(dataset index, file, caption or embedding row)` of every predicted clip of one dataloader."""
    if predictions and isinstance(predictions[0], list) and predictions[0] and isinstance(predictions[0][0], (list, dict)):
        raise ValueError("PredictionWriter takes one predict dataloader")
    rows: list[tuple[int, str, Any]] = []
    position = 0
    for b, batch in enumerate(predictions):
        if isinstance(batch, dict):  # retrieval: {"fnames", "audio_emb"}
            items = list(zip(batch["fnames"], batch["audio_emb"].detach().float().cpu()))
        else:  # captioners: [CaptionPrediction(file, caption), ...]
            items = [(item[0], item[1]) for item in batch]
        indices = list(batch_indices[b]) if b < len(batch_indices) and batch_indices[b] is not None else []
        if len(indices) != len(items):  # no indices tracked: the order of the batches
            indices = list(range(position, position + len(items)))
        position += len(items)
        rows.extend((int(i), str(file), value) for i, (file, value) in zip(indices, items))
    return rows


def write_predictions(path: Path, rows: list[tuple[str, Any]]) -> None:
    """Write `(file, caption)` rows (`.json`, `.csv`) or `(file, embedding)` rows (`.pt`, `.npz`) to `path`."""
    are_captions = all(isinstance(value, str) for _, value in rows)
    if are_captions != (path.suffix in CAPTION_SUFFIXES):
        kind = "captions" if are_captions else "embeddings"
        raise ValueError(f"'{path}': the model predicts {kind}; use {list(CAPTION_SUFFIXES if are_captions else EMBEDDING_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [file for file, _ in rows]
    if path.suffix == ".json":
        path.write_text(json.dumps([{"file": f, "caption": c} for f, c in rows], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "caption_predicted"])
            writer.writerows(rows)
    else:
        emb = torch.stack([value for _, value in rows]) if rows else torch.zeros(0, 0)  # (N, E)
        if path.suffix == ".pt":
            torch.save({"files": files, "audio_emb": emb}, path)
        else:
            np.savez(path, files=np.array(files, dtype=str), audio_emb=emb.numpy())
