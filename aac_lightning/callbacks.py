"""Callbacks for long runs."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


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
