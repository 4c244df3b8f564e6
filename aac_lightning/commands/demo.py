"""`aac-lightning demo`: the recipe `stages/demo.yaml` through the pipeline runner, offline, on a CPU.

Argument parsing and printing only (the run is :func:`aac_lightning.pipeline.run_demo`); the sample
captions of the last captioning stage are printed next to their references.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def demo_command(args: Sequence[str]) -> None:
    """`aac-lightning demo [--workdir DIR] [--fast] [--loggers ...] [--key=value ...]`."""
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
    ns, rest = parser.parse_known_args(list(args))
    from aac_lightning.pipeline import run_demo, sample_captions, trainer_overrides  # after parsing: `--help` needs no torch

    try:
        overrides = trainer_overrides(rest)
    except ValueError as err:
        parser.error(str(err))
    loggers = [name.strip() for name in ns.loggers.split(",") if name.strip()]
    results = run_demo(ns.workdir, ns.fast, overrides, loggers)
    samples = sample_captions(results)
    if samples is not None:
        stage, rows = samples
        print(f"\nsample captions of stage {stage} (test set):")
        for row in rows[:5]:
            print(f"{row['file']}\n  predicted: {row['predicted']}\n  reference: {row['references'][0]}")
    print(f"\nresults written to {Path(results['workdir']) / 'results.json'}")
