"""EpochWeightAveraging: the authors' SWA over the last epochs, as a Lightning callback.

Truth: the per-epoch checkpoints a `ModelCheckpoint(save_top_k=-1)` writes; the average must equal
their element-wise mean, computed here independently.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from aac_lightning.callbacks import EpochWeightAveraging, LatestCheckpoint
from aac_lightning.data import CaptioningDataModule
from aac_lightning.modules.captioning import CaptioningXE
from tests.test_xe_module import TINY_CAPTIONER, retrieval_ckpt  # noqa: F401 - fixture


class StopAfter(pl.Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit(ckpt: Path, root: Path, out: Path, max_epochs: int, last_epochs: int, callbacks=(), ckpt_path=None, limit_train_batches=3):
    pl.seed_everything(0)
    module = CaptioningXE(extractor_ckpt=str(ckpt), feature_cache_dir=str(out.parent / "cache"), **TINY_CAPTIONER)
    dm = CaptioningDataModule(clotho_root=str(root), global_batch_size=8, eval_batch_size=8, split_dir=str(out))
    averaging = EpochWeightAveraging(last_epochs=last_epochs)
    every_epoch = ModelCheckpoint(dirpath=out / "epochs", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs, limit_train_batches=limit_train_batches, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(out),
        callbacks=[every_epoch, LatestCheckpoint(out / "epochs"), averaging, *callbacks],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer, averaging


def test_averaged_weights_are_the_mean_of_the_last_epochs(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    module, trainer, averaging = fit(retrieval_ckpt, synth_root, tmp_path / "run", max_epochs=4, last_epochs=2)
    assert averaging.num_averaged == 2
    path = Path(averaging.averaged_path)
    assert path == tmp_path / "run" / "epochs" / "averaged.ckpt" and path.is_file()
    epochs = [torch.load(tmp_path / "run" / "epochs" / f"epoch={e}.ckpt", weights_only=True)["state_dict"] for e in range(4)]
    averaged = torch.load(path, weights_only=True)
    assert averaged["aac_lightning"]["kind"] == "xe"
    trained = [k for k in averaged["state_dict"] if k.startswith("model.") and averaged["state_dict"][k].is_floating_point()]
    assert trained
    moved = 0
    for key in trained:
        expected = (epochs[2][key] + epochs[3][key]) / 2
        torch.testing.assert_close(averaged["state_dict"][key], expected, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(epochs[2][key], epochs[3][key]))
    assert moved > 0  # the two epochs differ, so the mean is not one of them
    # the module holds the average after fit; per-epoch checkpoints hold the trained weights
    for key in trained:
        torch.testing.assert_close(module.state_dict()[key], averaged["state_dict"][key])
    assert "weight_averaging" in torch.load(tmp_path / "run" / "epochs" / "epoch=3.ckpt", weights_only=True)
    assert "weight_averaging" not in averaged
    # the averaged checkpoint rebuilds alone
    rebuilt = CaptioningXE.load_for_inference(path)
    for key in trained:
        assert torch.equal(rebuilt.state_dict()[key], averaged["state_dict"][key])


def test_a_resumed_run_continues_the_average(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    _, _, whole = fit(retrieval_ckpt, synth_root, tmp_path / "whole", max_epochs=4, last_epochs=3)
    with pytest.warns(UserWarning, match="only 1 of the last 3"):
        fit(retrieval_ckpt, synth_root, tmp_path / "cut", max_epochs=4, last_epochs=3, callbacks=[StopAfter(2)])
    _, _, resumed = fit(retrieval_ckpt, synth_root, tmp_path / "cut", max_epochs=4, last_epochs=3, ckpt_path=str(tmp_path / "cut" / "epochs" / "last.ckpt"))
    assert resumed.num_averaged == 3
    first = torch.load(whole.averaged_path, weights_only=True)["state_dict"]
    second = torch.load(resumed.averaged_path, weights_only=True)["state_dict"]
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-6, atol=1e-7)


def test_more_averaged_epochs_than_the_run_has_is_an_error(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(ValueError, match=r"last_epochs=5 is more than the run's trainer.max_epochs=3"):
        fit(retrieval_ckpt, synth_root, tmp_path / "run", max_epochs=3, last_epochs=5, limit_train_batches=1.0)
    # a run shortened on purpose (limit_train_batches) averages all its epochs, with a warning
    with pytest.warns(UserWarning, match="more than this shortened run's 2 epochs"):
        _, _, averaging = fit(retrieval_ckpt, synth_root, tmp_path / "short", max_epochs=2, last_epochs=5)
    assert averaging.num_averaged == 2
