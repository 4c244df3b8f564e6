"""Under DDP rank 0 writes every file and the other rank goes on only once it is written.

Two gloo processes (started as torchrun starts them) run a real XE stage with the shipped callbacks
(`LatestCheckpoint`, a monitored `ModelCheckpoint`, `EpochWeightAveraging`), a feature cache and
audio packs, then `predict` through `PredictionWriter`. Each process records every file it opens
for writing or renames under the output folder (a `sys.addaudithook` hook, plus h5py's writes,
which bypass Python's `open`). Rank 0 is made slow at each write (a sleep before it writes), and
rank 1 checks, right after each place where it must wait (the feature cache, the packs, `last.ckpt`,
`averaged.ckpt`, the predictions), that the file is there and complete: a missing barrier shows as a
file not there yet.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from tests.ddp import spawn_workers
from tests.test_xe_module import TINY_CAPTIONER, retrieval_ckpt  # noqa: F401 - fixture

WORLD_SIZE = 2
SLOW_WRITE_S = 1.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(out: Path, writes: list[str]) -> None:
    """Append to `writes` every file under `out` this process opens for writing, renames, or h5py writes."""
    import h5py

    root = str(out)

    def inside(path: Any) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & WRITE_FLAGS):
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.replace") and inside(args[1]):
            writes.append(os.fsdecode(args[1]))

    sys.addaudithook(hook)
    original = h5py.File

    class RecordingFile(original):
        def __init__(self, name, mode="r", *args, **kwargs):
            if mode != "r" and inside(name):
                writes.append(os.fsdecode(name))
            super().__init__(name, mode, *args, **kwargs)

    h5py.File = RecordingFile


def _slow(cls: type, name: str) -> None:
    """Rank 0 sleeps before `cls.name` writes: a rank that does not wait checks too early."""
    original = getattr(cls, name)

    def slow(*args, **kwargs):
        time.sleep(SLOW_WRITE_S)
        return original(*args, **kwargs)

    setattr(cls, name, slow)


def _check_after(cls: type, name: str, check, checked: dict[str, list[str]], label: str) -> None:
    """On rank 1: run `check(*args)` right after `cls.name` returns; record a failure message or 'ok'."""
    original = getattr(cls, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            check(*args)
            checked.setdefault(label, []).append("ok")
        except Exception as err:  # noqa: BLE001 - recorded, asserted in the test process
            checked.setdefault(label, []).append(f"{type(err).__name__}: {err}")
        return result

    setattr(cls, name, wrapped)


def _worker(rank: int, port: int, root: str, extractor_ckpt: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy

    from aac_lightning.callbacks import EpochWeightAveraging, LatestCheckpoint, PredictionWriter
    from aac_lightning.data import CaptioningDataModule
    from aac_lightning.data import datamodules, feature_cache, pack
    from aac_lightning.modules.captioner import CaptionerModule
    from aac_lightning.modules.captioning import CaptioningXE

    out = Path(out_dir)
    writes: list[str] = []
    checked: dict[str, list[str]] = {}
    _record_writes(out, writes)
    if rank == 0:
        _slow(TorchCheckpointIO, "save_checkpoint")
        _slow(feature_cache.FeatureCache, "build")
        _slow(datamodules, "pack_records")
        import aac_lightning.callbacks as callbacks_module

        _slow(callbacks_module, "write_predictions")
    else:
        def cache_complete(module, datamodule, stage):
            assert module.feature_cache.path.is_file(), f"{module.feature_cache.path} missing"
            keys = [r.key for split in ("train", "val") for r in datamodule.clips(split).records]
            module.feature_cache.batch(keys)  # raises on a clip not in the cache

        def packs_complete(dm, rate):
            readable = pack.PackedAudio(dm.packed_dir, rate, dm.pack_dtype)
            readable.check([r for split in ("train", "val") for r in dm.clips(split).records])

        def last_written(callback, trainer, filepath):
            assert torch.load(filepath, weights_only=True, map_location="cpu")["epoch"] == trainer.current_epoch

        def averaged_written(callback, trainer, pl_module):
            assert Path(callback.averaged_path).is_file(), f"{callback.averaged_path} missing"

        def predictions_written(callback, trainer, pl_module, predictions, batch_indices):
            lines = callback.output_path.read_text(encoding="utf-8").splitlines()
            assert len(lines) == 1 + len(trainer.datamodule.clips("test").records), lines

        _check_after(CaptionerModule, "_prepare_feature_cache", cache_complete, checked, "feature cache")
        _check_after(CaptioningDataModule, "_use_packs", packs_complete, checked, "packs")
        _check_after(LatestCheckpoint, "_save_checkpoint", last_written, checked, "last.ckpt")
        _check_after(EpochWeightAveraging, "on_train_end", averaged_written, checked, "averaged.ckpt")
        _check_after(PredictionWriter, "write_on_epoch_end", predictions_written, checked, "predictions")

    pl.seed_everything(0)
    module = CaptioningXE(extractor_ckpt=extractor_ckpt, feature_cache_dir=str(out / "cache"), **TINY_CAPTIONER)
    dm = CaptioningDataModule(
        clotho_root=root, global_batch_size=8, eval_batch_size=4, split_dir=str(out / "splits"), packed_dir=str(out / "packs")
    )
    checkpoints = out / "checkpoints"
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_epochs=2,
        limit_train_batches=2, limit_val_batches=1, limit_predict_batches=2, default_root_dir=str(out),
        callbacks=[
            EpochWeightAveraging(last_epochs=2),
            LatestCheckpoint(),
            ModelCheckpoint(dirpath=str(checkpoints), monitor="val/cider_d", mode="max", filename="best-{epoch:02d}"),
            PredictionWriter(out / "captions.csv"),
        ],
    )
    trainer.fit(module, datamodule=dm)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "checked": checked}), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # leave without interpreter teardown (gloo's threads can abort it on a loaded machine)


@pytest.mark.ddp
def test_rank_zero_writes_every_file_and_the_other_rank_waits_for_it(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    spawn_workers(_worker, (str(synth_root), str(retrieval_ckpt), str(out)), WORLD_SIZE, timeout_s=240)
    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(WORLD_SIZE)]
    written = {str(Path(p).relative_to(out)) for p in ranks[0]["writes"]}
    # rank 0 wrote each kind of file: feature cache, packs, re-split lists, checkpoints, predictions
    assert any(p.startswith("cache/") and p.endswith(".h5") for p in written), written
    assert any(p.startswith("packs/") for p in written), written
    assert {"splits/splits.json", "checkpoints/last.ckpt", "checkpoints/averaged.ckpt", "captions.csv"} <= written, written
    assert any(p.startswith("checkpoints/best-") for p in written), written
    # rank 1 wrote nothing at all (its rank1.json is written after the records were taken)
    assert ranks[1]["writes"] == []
    # ...and found every file complete right after each place where it waits
    checked = ranks[1]["checked"]
    assert sorted(checked) == ["averaged.ckpt", "feature cache", "last.ckpt", "packs", "predictions"], checked
    failures = {label: results for label, results in checked.items() if any(r != "ok" for r in results)}
    assert not failures, failures
    assert len(checked["last.ckpt"]) == 2  # one per epoch
