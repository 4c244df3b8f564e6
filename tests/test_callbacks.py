"""LatestCheckpoint keeps `last.ckpt` at the latest epoch, where Lightning's `save_last` falls behind."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from aac_lightning.callbacks import LatestCheckpoint


class Regressor(pl.LightningModule):
    """A linear model whose logged validation score never improves after epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -float(self.current_epoch))  # best at epoch 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    x = torch.randn(16, 4)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(tmp_path: Path, callbacks: list) -> None:
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(Regressor(), loader(), loader())


def test_last_ckpt_follows_every_epoch_next_to_the_best(tmp_path: Path):
    best = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/score", mode="max", filename="best")
    latest = LatestCheckpoint()  # dirpath None: next to `best`
    fit(tmp_path, [latest, best])
    last = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 12
    assert torch.load(tmp_path / "ckpts" / "best.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["best.ckpt", "last.ckpt"]  # no .partial left


def test_lightning_save_last_alone_falls_behind(tmp_path: Path):
    """Why LatestCheckpoint exists: with a monitor that stops improving, save_last keeps an old epoch."""
    fit(tmp_path, [ModelCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_last=True, filename="best")])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0


def test_resume_restores_and_continues(tmp_path: Path):
    fit(tmp_path, [LatestCheckpoint(tmp_path / "a")])
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[LatestCheckpoint(tmp_path / "a")])
    trainer.fit(Regressor(), loader(), loader(), ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    assert trainer.global_step == 16
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["epoch"] == 3


def test_a_save_interrupted_midway_keeps_the_previous_complete_last_ckpt(tmp_path: Path):
    """`last.ckpt` is written aside and renamed: a run killed while writing epoch 2 leaves epoch 1's file."""
    import io

    import pytest
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class KilledWhileWriting(TorchCheckpointIO):
        """Writes the third checkpoint (epoch 2) half-way, then the process "dies"."""

        calls = 0

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            KilledWhileWriting.calls += 1
            if KilledWhileWriting.calls < 3:
                return super().save_checkpoint(checkpoint, path, storage_options)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise RuntimeError("killed while saving")

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[LatestCheckpoint(tmp_path / "a")], plugins=[KilledWhileWriting()])
    with pytest.raises(RuntimeError, match="killed while saving"):
        trainer.fit(Regressor(), loader(), loader())
    last = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)  # complete, the epoch before
    assert last["epoch"] == 1 and last["global_step"] == 8
    # and a run resumed from it finishes like an uninterrupted one
    resumed = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[LatestCheckpoint(tmp_path / "a")])
    resumed.fit(Regressor(), loader(), loader(), ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["epoch"] == 2
