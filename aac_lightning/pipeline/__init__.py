"""Multi-stage recipes (`stages/*.yaml`), run resumably in a work directory.

A recipe lists stages in order. A training stage names its LightningCLI configs (merged in order),
values to set, and which earlier stage's checkpoint feeds which init argument (`handoff`); an
ensemble stage names earlier stages whose checkpoints it evaluates together. The recipe format is
documented in :mod:`aac_lightning.pipeline.recipe`. Every stage writes under `DIR/<stage>/`:

    config.yaml          the merged config the stage ran with (LightningCLI's own format)
    checkpoints/         ModelCheckpoint's files (best-*.ckpt, last.ckpt)
    best.ckpt last.ckpt  the checkpoints later stages and users take (hard links when possible)
    averaged.ckpt        where the stage averages its last epochs (`EpochWeightAveraging`): the mean
                         weights, which are then the stage's checkpoint (tested, handed on)
    logs/                CSV (and TensorBoard) logs; wandb/ holds the W&B run files
    examples.json        sample captions or retrieval examples of the test set
    metrics.json         ensemble stages: the evaluation report (and submission.csv, the DCASE file)
    stage.json           written last: kind, checkpoint, test metrics; its presence marks the stage done

A rerun skips stages with a `stage.json` and resumes an interrupted one from its `last.ckpt`
(optimizer, schedule and loop state included). `DIR/results.json` gathers every finished stage.

Modules: `recipe` (schema, variables, checks), `runner` (PipelineRunner), `tracking` (loggers, W&B
runs and tables, the JSON files), `demo` (the demo recipe as a library call). The command lines
(`aac-lightning pipeline`, `aac-lightning demo`) live in `aac_lightning.commands`.
"""

from aac_lightning.pipeline.demo import DEMO_RECIPE, FAST_OVERRIDES, run_demo, sample_captions
from aac_lightning.pipeline.recipe import (
    ENSEMBLE_KINDS,
    HANDOFF_CHOICES,
    TRAINING_KINDS,
    Recipe,
    RecipeError,
    Stage,
    config_kind,
    load_recipe,
)
from aac_lightning.pipeline.runner import PipelineRunner, trainer_overrides
from aac_lightning.pipeline.tracking import LOGGER_CHOICES, RETRIEVAL_METRICS, format_results, normalize_metrics, wandb_mode

__all__ = [
    "DEMO_RECIPE",
    "ENSEMBLE_KINDS",
    "FAST_OVERRIDES",
    "HANDOFF_CHOICES",
    "LOGGER_CHOICES",
    "RETRIEVAL_METRICS",
    "TRAINING_KINDS",
    "PipelineRunner",
    "Recipe",
    "RecipeError",
    "Stage",
    "config_kind",
    "format_results",
    "load_recipe",
    "normalize_metrics",
    "run_demo",
    "sample_captions",
    "trainer_overrides",
    "wandb_mode",
]
