"""Learning-rate schedules over the optimizer steps a run really takes, and the checks that they can finish.

A step-based schedule is defined over optimizer steps: one step per global batch (all devices, all
nodes, all gradient-accumulation micro-batches together). Because the datamodules fix the *global*
batch (`global_batch_size`), a config gives the same number of steps, and so the same schedule, on
one GPU or on eight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn


class ScheduleError(ValueError):
    """A schedule that cannot run as configured (warm-up as long as the run, no end, ...)."""


@dataclass(frozen=True)
class StepBudget:
    """How many optimizer steps a run takes: `steps_per_epoch` x `epochs` = `total` (capped by `max_steps`)."""

    steps_per_epoch: int
    epochs: int | None
    total: int

    def describe(self) -> str:
        if self.epochs is not None and self.total == self.steps_per_epoch * self.epochs:
            return f"{self.total} optimizer steps ({self.epochs} epochs x {self.steps_per_epoch} steps)"
        return f"{self.total} optimizer steps"


def step_budget(trainer: Any) -> StepBudget:
    """The optimizer steps of the run `trainer` is about to make (call from `configure_optimizers`).

    Raises `ScheduleError` when the run has no end (no `max_epochs` and no `max_steps`), since no
    schedule defined over the whole run can then be laid out.
    """
    total = trainer.estimated_stepping_batches
    if total is None or not math.isfinite(float(total)):
        raise ScheduleError(
            "the run has no end (trainer.max_epochs=-1/None and no trainer.max_steps): a learning-rate schedule "
            "over the whole run cannot be laid out; set trainer.max_epochs or trainer.max_steps"
        )
    total = max(1, int(total))
    batches = getattr(trainer, "num_training_batches", None)
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    if batches is None or not math.isfinite(float(batches)):
        return StepBudget(steps_per_epoch=total, epochs=None, total=total)
    steps_per_epoch = max(1, math.ceil(int(batches) / accumulate))
    max_epochs = getattr(trainer, "max_epochs", None)
    max_epochs = max_epochs if max_epochs not in (None, -1) else None
    return StepBudget(steps_per_epoch=steps_per_epoch, epochs=max_epochs, total=total)


def is_shortened_run(trainer: Any | None) -> bool:
    """A debugging run cut short on purpose: `fast_dev_run`, or `limit_train_batches` below the whole epoch."""
    if trainer is None:
        return False
    if getattr(trainer, "fast_dev_run", False):
        return True
    limit = getattr(trainer, "limit_train_batches", 1.0)
    return limit is not None and not (isinstance(limit, float) and limit == 1.0)


def check_warmup(name: str, warmup_steps: int, budget: StepBudget, trainer: Any | None = None) -> None:
    """Raise `ScheduleError` when a warm-up of `warmup_steps` does not end before the run does.

    A run shortened on purpose (`fast_dev_run`, `limit_train_batches`: smoke tests, debugging) gets a
    warning instead: it is not meant to finish its schedule.
    """
    if warmup_steps >= budget.total:
        if is_shortened_run(trainer):
            rank_zero_warn(
                f"{name}: the warm-up of {warmup_steps} optimizer steps is not shorter than this shortened run "
                f"({budget.describe()}, limit_train_batches / fast_dev_run)"
            )
            return
        raise ScheduleError(
            f"{name}: the warm-up of {warmup_steps} optimizer steps is not shorter than the whole run, "
            f"{budget.describe()}: the learning rate would never reach its peak nor decay. Shorten the warm-up, "
            "train longer, or lower data.global_batch_size"
        )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_exponential(step: int, warmup_steps: int, total_steps: int, peak_lr: float, final_lr: float) -> float:
    """Learning-rate factor of optimizer step `step` (0-based) of a run of `total_steps` steps.

    Linear warm-up: step `k < warmup_steps` runs at `(k + 1) / warmup_steps` of `peak_lr`, so the
    last warm-up step is at the peak; then exponential decay that reaches `final_lr` on the run's
    last step (`total_steps - 1`).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    peak_step = max(warmup_steps - 1, 0)
    progress = min(1.0, (step - peak_step) / max(1, total_steps - 1 - peak_step))
    return (final_lr / peak_lr) ** progress
