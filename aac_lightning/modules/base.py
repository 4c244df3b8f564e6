"""What every stage's LightningModule shares: checkpoint metadata and the weights-only handoff."""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler

from aac_lightning import __version__
from aac_lightning.checkpoints import (
    METADATA_KEY,
    PRETRAINED_KEY,
    UPGRADED_KEY,
    HandoffError,
    check_kind,
    load_state_dict_strict,
    read_checkpoint,
)

log = logging.getLogger(__name__)

NONFINITE_LOSS_MODES = ("error", "skip")


def check_nonfinite_loss_mode(nonfinite_loss: str) -> str:
    """`nonfinite_loss` itself, or a ValueError naming the allowed values."""
    if nonfinite_loss not in NONFINITE_LOSS_MODES:
        raise ValueError(f"nonfinite_loss must be one of {list(NONFINITE_LOSS_MODES)}, got {nonfinite_loss!r}")
    return nonfinite_loss


def global_seed() -> int | None:
    """The run's global seed, as `seed_everything` (and LightningCLI's `seed_everything:`) records it."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return None if value in (None, "") else int(value)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one training epoch on one rank: a hash of `(seed, epoch, rank)`, in [0, 2**63)."""
    if seed < 0 or epoch < 0 or rank < 0:
        raise ValueError(f"seed, epoch and rank must be >= 0, got {seed}, {epoch}, {rank}")
    # SeedSequence mixes the three numbers well: neighbouring epochs get unrelated streams.
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def _flat_dataloaders(loaders: Any) -> list[DataLoader]:
    """The `DataLoader`s of a (possibly nested) train-dataloader structure."""
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [dl for item in loaders for dl in _flat_dataloaders(item)]
    return []


class AACModule(pl.LightningModule):
    """Base of the stage modules: records package version, stage kind and architecture in checkpoints.

    Subclasses set `kind` and call `save_hyperparameters()`, so `load_from_checkpoint(path)` rebuilds
    the architecture alone. Init arguments that point at files used only to initialise weights
    (`init_from`, third-party checkpoints) are listed in `handoff_arguments`: `load_for_inference`
    clears them, since the checkpoint's own weights replace them.

    **Reproducible epochs.** At the start of every training epoch the module reseeds the random
    generators of the process (torch on every device, numpy, `random`) from `epoch_seed(global seed,
    epoch, rank)`, where the global seed is the one `seed_everything` set (`seed_everything:` in a
    config); without a global seed they are left alone. An epoch's random draws in the main process
    (random crops, SpecAugment, dropout, scheduled sampling, SCST sampling) therefore depend only on
    the seed, the epoch and the weights, so a run resumed from an end-of-epoch checkpoint
    (`ckpt_path`, e.g. `last.ckpt`) repeats the epochs of an uninterrupted run exactly. The shuffle is
    made a function of the epoch too: a `DistributedSampler` gets `set_epoch` from Lightning; a
    `RandomSampler` drawing from the loader's seeded generator gets a fresh generator seeded with
    `loader seed + epoch`, the permutation `EvenTrainSampler` splits across DDP ranks, so one process
    sees the same global batches as several. A loader without a generator gets its own, so creating
    its iterator never consumes the reseeded global stream. Not covered: draws made inside data-loader
    worker processes (`num_workers > 0`), which follow the workers' own seeds, and resuming from a
    mid-epoch checkpoint.

    **Non-finite losses.** Every `training_step` passes its loss through `checked_loss`. With
    `nonfinite_loss="error"` (default) a NaN/inf loss raises `FloatingPointError` naming the global
    step, epoch, batch and value; with `"skip"` the step is skipped (no optimizer update, buffers such
    as BatchNorm statistics restored), counted, warned about and logged as `train/nonfinite_skipped`
    (the total so far, kept in checkpoints). Under DDP the ranks share their losses first, so all of
    them raise or skip together. With gradient accumulation the whole optimizer step is skipped.
    """

    kind: str = "base"
    handoff_arguments: tuple[str, ...] = ("init_from",)

    def __init__(self, nonfinite_loss: str = "error"):
        super().__init__()
        self.nonfinite_loss = check_nonfinite_loss_mode(nonfinite_loss)
        self.nonfinite_skipped = 0
        self.skipping_step = False

    # ------------------------------------------------------------------ reproducible epochs
    def on_train_epoch_start(self) -> None:
        self.reseed_epoch(self.current_epoch)

    def reseed_epoch(self, epoch: int) -> int | None:
        """Reseed the global generators and the train loaders' shuffles for `epoch`; returns the seed used (None: no global seed)."""
        trainer = self._trainer
        for loader in _flat_dataloaders(trainer.train_dataloader if trainer is not None else None):
            sampler = loader.sampler if isinstance(loader.sampler, RandomSampler) else getattr(loader.batch_sampler, "sampler", None)
            if isinstance(sampler, RandomSampler) and loader.generator is not None:
                # Same order as EvenTrainSampler's global permutation (seeded by seed + epoch).
                sampler.generator = torch.Generator().manual_seed(loader.generator.initial_seed() + epoch)
        seed = global_seed()
        if seed is None:
            return None
        value = epoch_seed(seed, epoch, self.global_rank)
        random.seed(value)
        np.random.seed(value % 2**32)
        torch.manual_seed(value)  # every device's generator
        for loader in _flat_dataloaders(trainer.train_dataloader if trainer is not None else None):
            if loader.generator is None:
                # Otherwise the loader draws its worker base seed from the global generator whenever
                # its iterator is created, which is before or after this hook depending on resuming.
                loader.generator = torch.Generator().manual_seed(value)
        return value

    # ------------------------------------------------------------------ non-finite losses
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.nonfinite_loss == "skip":
            # The forward pass updates BatchNorm statistics before the loss is known: kept to undo.
            self._buffers_before_step = {name: b.detach().clone() for name, b in self.named_buffers()}

    def checked_loss(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """`loss` if it is finite on every rank; else raise (`error`) or return a stand-in loss (`skip`).

        In `skip` mode `self.skipping_step` is then True and the returned loss is a zero connected to
        every trainable parameter: its backward gives zero gradients (so DDP's gradient all-reduce runs
        on every rank as usual), and `on_before_optimizer_step` clears them, so the optimizer leaves
        the weights and its own state alone. Buffers (BatchNorm statistics) are put back as they were
        before the step. The training step returns this loss without logging it.
        """
        self.skipping_step = False
        local = loss.detach().float().reshape(1)  # (1,)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            losses = trainer.strategy.all_gather(local).reshape(-1)  # (world,) every rank's loss
        else:
            losses = local
        if bool(torch.isfinite(losses).all()):
            return loss
        values = losses.tolist()
        if len(values) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values) if not math.isfinite(v))
        else:
            shown = str(values[0])
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.nonfinite_loss == "error":
            raise FloatingPointError(
                f"non-finite training loss at {where}: {shown}; pass nonfinite_loss='skip' to skip such steps"
            )
        self.nonfinite_skipped += 1
        rank_zero_warn(
            f"non-finite training loss at {where}: {shown}; step skipped ({self.nonfinite_skipped} skipped so far)",
            category=RuntimeWarning,
        )
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False, sync_dist=False)
        saved = getattr(self, "_buffers_before_step", None)
        if saved is not None:
            with torch.no_grad():
                for name, buffer in self.named_buffers():
                    if name in saved:
                        buffer.copy_(saved[name])
        self.skipping_step = True
        # Lightning refuses a None loss under DDP; a zero on every trainable parameter is accepted everywhere.
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in trainable]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self, "skipping_step", False):
            # No gradient, no update: torch optimizers pass over parameters whose `grad` is None.
            optimizer.zero_grad(set_to_none=True)
            self.skipping_step = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = int((checkpoint.get(METADATA_KEY) or {}).get("nonfinite_skipped", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = {
            "version": __version__,
            "kind": self.kind,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_handoff(self, path: str, expected_kinds: tuple[str, ...]) -> dict[str, Any]:
        """Read a checkpoint given to a stage through an init argument, checking its stage kind."""
        return check_kind(read_checkpoint(path), expected_kinds, path, needed_by=type(self).__name__)

    @classmethod
    def load_for_inference(cls, path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any):
        """Rebuild a module from its checkpoint alone (no handoff files, no downloads), in eval mode.

        `path` may also be an exported model folder (`aac-lightning export`): the module is built from
        its `config.json` and given the weights of its `model.safetensors` strictly (nothing unpickled).
        """
        ckpt = read_checkpoint(path)
        hparams = dict(ckpt.get("hyper_parameters", {}))
        if PRETRAINED_KEY in ckpt:
            return cls._load_pretrained_folder(path, ckpt, map_location, overrides)
        # Values an older checkpoint lacks, so its model is rebuilt as it was trained.
        kwargs = {name: hparams[name] for name in ckpt.get(UPGRADED_KEY, ())}
        kwargs.update(cls.offline_build_overrides(hparams))
        kwargs.update(overrides)
        module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, **kwargs)
        return module.eval()

    @classmethod
    def _load_pretrained_folder(cls, path: str | Path, ckpt: dict[str, Any], map_location: str | torch.device, overrides: dict[str, Any]):
        """The module of an exported folder read by `read_checkpoint`: built from its init arguments, weights loaded strictly."""
        meta = ckpt[METADATA_KEY]
        if meta["kind"] != cls.kind:
            raise HandoffError(
                f"'{Path(path) / 'config.json'}' records a model of stage kind {meta['kind']!r} ({meta['class_path']}), "
                f"but {cls.__name__} loads kind {cls.kind!r}"
            )
        init_args = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
        init_args.update(cls.offline_build_overrides(init_args))
        init_args.update(overrides)
        try:
            module = cls(**init_args)
        except TypeError as err:  # an init argument the class does not take (a hand-edited or foreign config)
            raise HandoffError(f"the init arguments of '{Path(path) / 'config.json'}' do not fit {cls.__name__}: {err}") from err
        load_state_dict_strict(module, ckpt["state_dict"], f"'{meta['weights_file']}'")
        module.on_load_checkpoint(ckpt)
        return module.to(map_location).eval()

    @classmethod
    def offline_build_overrides(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """Init arguments that build the architecture with random weights, reading no weight file.

        Handoff files are cleared; subclasses add their own (e.g. no pretrained text weights).
        """
        return {name: None for name in cls.handoff_arguments}

