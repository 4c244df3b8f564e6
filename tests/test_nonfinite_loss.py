"""A NaN training loss either stops the run with a message naming where, or skips exactly that step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from aac_lightning.data import RetrievalDataModule
from aac_lightning.modules import CaptioningSCST, CaptioningXE, ContrastiveRetrieval
from aac_lightning.checkpoints import read_checkpoint
from tests.test_retrieval_module import tiny_module
from tests.test_xe_module import retrieval_ckpt  # noqa: F401 (fixture)

NAN_BATCH = 1  # the second training batch of the epoch gets a NaN loss


class NaNOnCall(nn.Module):
    """Wraps a loss module; the `nan_call`-th call (0-based) returns NaN (still attached to the graph)."""

    def __init__(self, loss_fn: nn.Module, nan_call: int, value: float = float("nan")):
        super().__init__()
        self.loss_fn = loss_fn
        self.nan_call = nan_call
        self.value = value
        self.calls = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        loss = self.loss_fn(*args, **kwargs)
        call, self.calls = self.calls, self.calls + 1
        return loss * self.value if call == self.nan_call else loss  # the InfoNCE loss is > 0: nan, inf or -inf


class WeightWatcher(pl.Callback):
    """Records, per training batch, whether the step changed any weight or buffer (BatchNorm statistics)."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: v.clone() for n, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = pl_module.state_dict()
        self.changed[batch_idx] = any(not torch.equal(after[n], v) for n, v in self._before.items())


def nan_run(root: Path, out: Path, mode: str, batches: int = 4, value: float = float("nan")):
    pl.seed_everything(0)
    module = tiny_module(nonfinite_loss=mode)
    module.loss_fn = NaNOnCall(module.loss_fn, nan_call=NAN_BATCH, value=value)
    watcher = WeightWatcher()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watcher],
        default_root_dir=out,
    )
    dm = RetrievalDataModule(clotho_root=str(root), global_batch_size=4, split_dir=str(out))
    trainer.fit(module, datamodule=dm)
    return module, trainer, watcher


def test_bad_mode_is_rejected_by_every_stage():
    for build in (
        lambda: ContrastiveRetrieval(nonfinite_loss="ignore"),
        lambda: CaptioningXE(vocab_size=10, nonfinite_loss="ignore"),
        lambda: CaptioningSCST(nonfinite_loss="ignore"),
    ):
        with pytest.raises(ValueError, match=r"nonfinite_loss must be one of \['error', 'skip'\], got 'ignore'"):
            build()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_error_mode_names_step_epoch_batch_and_value(synth_root: Path, tmp_path: Path, value: float):
    with pytest.raises(FloatingPointError, match=rf"non-finite training loss at global step {NAN_BATCH} \(epoch 0, batch {NAN_BATCH}\): {value}; "):
        nan_run(synth_root, tmp_path, "error", value=value)


def test_skip_mode_leaves_the_weights_of_that_step_and_trains_on(synth_root: Path, tmp_path: Path):
    with pytest.warns(RuntimeWarning, match=rf"global step {NAN_BATCH} \(epoch 0, batch {NAN_BATCH}\): nan; step skipped \(1 skipped so far\)"):
        module, trainer, watcher = nan_run(synth_root, tmp_path, "skip")
    # every batch ran; only the NaN one left the weights and BatchNorm statistics as they were
    assert watcher.changed == {0: True, 1: False, 2: True, 3: True}
    # no optimizer update for it: Adam counted three steps, not four
    optimizer = trainer.optimizers[0]
    steps = {float(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}
    assert steps == {3.0}
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])  # the NaN was never logged as the loss
    # the count travels with the checkpoint (a resumed run keeps adding to it)
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    ckpt = read_checkpoint(tmp_path / "skipped.ckpt")
    assert ckpt["aac_lightning"]["nonfinite_skipped"] == 1
    fresh = tiny_module(nonfinite_loss="skip")
    fresh.on_load_checkpoint(ckpt)
    assert fresh.nonfinite_skipped == 1


def test_xe_and_scst_skip_an_inf_step(synth_root: Path, tmp_path: Path, monkeypatch, retrieval_ckpt: Path):  # noqa: F811
    """`skip` in the captioning stages: an inf loss (XE: the cross-entropy; SCST: a reward) leaves that step's weights."""
    import types

    import aac_lightning.modules.captioning as captioning
    from aac_lightning.data import CaptioningDataModule
    from tests.test_xe_module import TINY_CAPTIONER

    def trainer_with(watcher):
        return pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[watcher], default_root_dir=tmp_path)

    def data():
        return CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=4, split_dir=str(tmp_path))

    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        call, calls["n"] = calls["n"], calls["n"] + 1
        return loss * float("inf") if call == NAN_BATCH else loss

    monkeypatch.setattr(captioning, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    pl.seed_everything(0)
    xe = CaptioningXE(extractor_ckpt=str(retrieval_ckpt), feature_cache_dir=str(tmp_path / "cache"), nonfinite_loss="skip", **TINY_CAPTIONER)
    watcher = WeightWatcher()
    trainer = trainer_with(watcher)
    with pytest.warns(RuntimeWarning, match=rf"global step {NAN_BATCH} \(epoch 0, batch {NAN_BATCH}\): inf; step skipped"):
        trainer.fit(xe, datamodule=data())
    assert watcher.changed == {0: True, 1: False, 2: True} and xe.nonfinite_skipped == 1
    trainer.save_checkpoint(tmp_path / "xe.ckpt")
    monkeypatch.undo()

    pl.seed_everything(0)
    scst = CaptioningSCST(init_from=str(tmp_path / "xe.ckpt"), feature_cache_dir=str(tmp_path / "cache"), nonfinite_loss="skip", max_decode_length=8)
    real_rewards, reward_calls = scst.cider_rewards, {"n": 0}

    def rewards(cands, refs, clips=None):  # per step: the samples' rewards, then the greedy baseline's
        out = real_rewards(cands, refs, clips)
        call, reward_calls["n"] = reward_calls["n"], reward_calls["n"] + 1
        return torch.full_like(out, float("inf")) if call == 2 * NAN_BATCH else out

    scst.cider_rewards = rewards
    watcher = WeightWatcher()
    trainer = trainer_with(watcher)
    with pytest.warns(RuntimeWarning, match=rf"global step {NAN_BATCH} \(epoch 0, batch {NAN_BATCH}\): -?inf; step skipped"):
        trainer.fit(scst, datamodule=data())
    assert watcher.changed == {0: True, 1: False, 2: True} and scst.nonfinite_skipped == 1
