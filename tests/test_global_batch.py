"""The batch of a config is the global batch: the same optimizer steps and learning rates on 1 or 2 processes.

The DDP run starts two CPU processes the way torchrun does (gloo). Each records, per optimizer step,
the learning rate the step used and the number of training items it saw; the test process runs the
same config on one process, and once more with gradient accumulation, and compares all three with
the schedule computed by hand.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from aac_lightning.data import CaptioningDataModule
from aac_lightning.data.datamodules import per_device_batch_size
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.schedules import ScheduleError, step_budget, warmup_exponential
from tests.test_xe_module import TINY_CAPTIONER, retrieval_ckpt  # noqa: F401 - fixture
from tests.ddp import spawn_workers

GLOBAL_BATCH = 8
EPOCHS = 2
WARMUP = 3
LR, FINAL_LR = 1e-3, 1e-5


class StepRecorder(pl.Callback):
    """Per optimizer step: the global step, the learning rate it used and the items it saw on this rank."""

    def __init__(self):
        self.items = 0
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.items += int(batch["tokens"].shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({"step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"], "items": self.items})
        self.items = 0


def run_xe(ckpt: Path, root: Path, out: Path, devices: int = 1, accumulate: int = 1) -> list[dict]:
    pl.seed_everything(0)
    module = CaptioningXE(
        extractor_ckpt=str(ckpt), feature_cache_dir=str(out.parent / "cache"), **{**TINY_CAPTIONER, "warmup_steps": WARMUP, "lr": LR, "final_lr": FINAL_LR}
    )
    dm = CaptioningDataModule(clotho_root=str(root), global_batch_size=GLOBAL_BATCH, eval_batch_size=4, split_dir=str(out))
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_epochs=EPOCHS, accumulate_grad_batches=accumulate, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out), callbacks=[recorder],
    )
    trainer.fit(module, datamodule=dm)
    return recorder.steps


def training_items(root: Path, out: Path) -> int:
    """Training (clip, caption) items of the re-split: 5 per training clip."""
    clips = CaptioningDataModule(clotho_root=str(root), split_dir=str(out)).clips("train")
    return sum(len(c) for c in clips.captions)


def _worker(rank: int, port: int, ckpt: str, root: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    steps = run_xe(Path(ckpt), Path(root), Path(out), devices=2)
    torch.save(steps, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_per_device_batch_divides_the_global_batch():
    assert per_device_batch_size(64, 1) == 64
    assert per_device_batch_size(64, 4) == 16
    assert per_device_batch_size(128, 4, 2) == 16
    with pytest.raises(ValueError, match=r"global_batch_size=64 is not divisible by world size 3 x trainer.accumulate_grad_batches 1 = 3"):
        per_device_batch_size(64, 3)


def test_a_run_without_an_end_has_no_schedule():
    trainer = types.SimpleNamespace(estimated_stepping_batches=float("inf"), num_training_batches=10, accumulate_grad_batches=1, max_epochs=-1)
    with pytest.raises(ScheduleError, match="no end"):
        step_budget(trainer)


def test_a_warmup_as_long_as_the_run_stops_before_training(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    module = CaptioningXE(extractor_ckpt=str(retrieval_ckpt), **{**TINY_CAPTIONER, "warmup_steps": 3000})
    dm = CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=GLOBAL_BATCH, split_dir=str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    per_epoch = -(-training_items(synth_root, tmp_path) // GLOBAL_BATCH)
    with pytest.raises(ScheduleError, match=rf"warm-up of 3000 optimizer steps .* {2 * per_epoch} optimizer steps \(2 epochs x {per_epoch} steps\)"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


def test_global_batch_config_gives_the_same_steps_and_rates_on_one_and_two_processes(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    single = run_xe(retrieval_ckpt, synth_root, tmp_path / "single")
    accumulated = run_xe(retrieval_ckpt, synth_root, tmp_path / "accumulated", accumulate=2)
    out = tmp_path / "ddp"
    out.mkdir()
    spawn_workers(_worker, (str(retrieval_ckpt), str(synth_root), str(out)), nprocs=2, timeout_s=300)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

    items = training_items(synth_root, tmp_path)
    per_epoch = -(-items // GLOBAL_BATCH)
    total = per_epoch * EPOCHS
    expected_lr = [LR * warmup_exponential(k, WARMUP, total, LR, FINAL_LR) for k in range(total)]
    for name, steps in (("single", single), ("accumulated", accumulated), ("rank 0", ranks[0]), ("rank 1", ranks[1])):
        assert [s["step"] for s in steps] == list(range(total)), name
        assert [s["lr"] for s in steps] == pytest.approx(expected_lr, rel=1e-12), name
    assert expected_lr[-1] == pytest.approx(FINAL_LR, rel=1e-9)  # the decay reaches its stated end
    # every optimizer step saw the global batch: one process, two micro-batches, or two ranks' halves
    last = items - (per_epoch - 1) * GLOBAL_BATCH  # the epoch's last global batch may be short
    global_items = [s["items"] for s in single]
    assert global_items == ([GLOBAL_BATCH] * (per_epoch - 1) + [last]) * EPOCHS
    assert [s["items"] for s in accumulated] == global_items
    assert [a["items"] + b["items"] for a, b in zip(*ranks)] == global_items
    assert all(s["items"] == GLOBAL_BATCH // 2 for i, s in enumerate(ranks[0]) if (i + 1) % per_epoch)
