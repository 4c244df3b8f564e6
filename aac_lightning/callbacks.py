"""Callbacks for long runs."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
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
