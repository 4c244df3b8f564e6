"""`aac-lightning demo`: the recipe `stages/demo.yaml` through the pipeline runner, offline, on a CPU.

Synthetic data (written if absent) -> contrastive pre-training -> fine-tuning -> XE captioning on the
frozen fine-tuned audio encoder -> SCST -> evaluation; `WORKDIR/results.json` gathers the test metrics
and the sample captions are printed next to their references. Rerunning resumes (see `pipeline`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO_DIR / "stages" / "demo.yaml"
# `--fast`: one short epoch per stage, a smoke run of every code path in about a minute.
FAST_OVERRIDES = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
]


def demo_command(args: Sequence[str]) -> None:
    """`aac-lightning demo [--workdir DIR] [--fast] [--loggers ...] [--key=value ...]`."""
    from aac_lightning.pipeline import PipelineRunner, parse_overrides

    parser = argparse.ArgumentParser(
        prog="aac-lightning demo",
        description="Run the demo recipe (stages/demo.yaml) on synthetic data, offline, on a CPU: "
        "contrastive pre-training, fine-tuning, XE captioning, SCST and evaluation. Results go to "
        "WORKDIR/results.json; rerunning skips finished stages. Other '--key=value' arguments are "
        "passed to every stage (e.g. --trainer.accelerator=gpu).",
    )
    parser.add_argument("--workdir", default="demo_workdir", help="output folder (default: demo_workdir)")
    parser.add_argument("--fast", action="store_true", help="one short epoch per stage (a smoke run)")
    parser.add_argument("--loggers", default="wandb,csv", help="comma-separated from wandb, csv, tensorboard (default wandb,csv; W&B offline)")
    ns, overrides = parse_overrides(parser, args)
    loggers = [name.strip() for name in ns.loggers.split(",") if name.strip()]
    runner = PipelineRunner(DEMO_RECIPE, ns.workdir, (FAST_OVERRIDES if ns.fast else []) + overrides, loggers)
    results = runner.run()
    for stage in reversed(list(results["stages"])):
        examples = runner.stage_dir(stage) / "examples.json"
        rows = json.loads(examples.read_text(encoding="utf-8")).get("captions") if examples.is_file() else None
        if rows:
            print(f"\nsample captions of stage {stage} (test set):")
            for row in rows[:5]:
                print(f"{row['file']}\n  predicted: {row['predicted']}\n  reference: {row['references'][0]}")
            break
    print(f"\nresults written to {runner.workdir / 'results.json'}")
