"""The demo: the recipe `stages/demo.yaml` through the pipeline runner, offline, on a CPU.

Synthetic data (written if absent) -> contrastive pre-training -> fine-tuning -> XE captioning on the
frozen fine-tuned audio encoder -> SCST -> evaluation; `WORKDIR/results.json` gathers the test metrics.
Rerunning resumes (see :class:`aac_lightning.pipeline.PipelineRunner`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aac_lightning.pipeline.runner import PipelineRunner

DEMO_RECIPE = "demo"  # the shipped recipe stages/demo.yaml (see aac_lightning.utils.shipped)
# `fast`: one short epoch per stage, a smoke run of every code path in about a minute.
FAST_OVERRIDES = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
]


def run_demo(
    workdir: str | Path = "demo_workdir",
    fast: bool = False,
    overrides: Sequence[str] = (),
    loggers: Sequence[str] = ("wandb", "csv"),
) -> dict[str, Any]:
    """Run (or resume) the demo recipe in `workdir`; returns its results (as `WORKDIR/results.json`).

    Args:
        workdir: output folder.
        fast: one short epoch per stage (`FAST_OVERRIDES`), before `overrides`.
        overrides: LightningCLI `--key=value` arguments for every stage (e.g. `--trainer.accelerator=gpu`).
        loggers: any of `wandb`, `csv`, `tensorboard` (W&B offline unless logged in).
    """
    runner = PipelineRunner(DEMO_RECIPE, workdir, (FAST_OVERRIDES if fast else []) + list(overrides), list(loggers))
    return runner.run()


def sample_captions(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """`(stage, rows)`: the test-set sample captions (examples.json) of the last stage that has some."""
    workdir = Path(results["workdir"])
    for stage in reversed(list(results["stages"])):
        examples = workdir / stage / "examples.json"
        rows = json.loads(examples.read_text(encoding="utf-8")).get("captions") if examples.is_file() else None
        if rows:
            return stage, rows
    return None
