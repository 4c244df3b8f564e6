"""`aac-lightning pipeline RECIPE --workdir DIR`: run a multi-stage recipe (`stages/*.yaml`), resumably.

Argument parsing and printing only; the runner is :class:`aac_lightning.pipeline.PipelineRunner`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser(prog: str = "aac-lightning pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a multi-stage recipe (stages/*.yaml): each stage's checkpoints, config, logs and "
        "test metrics go to WORKDIR/<stage>/, and WORKDIR/results.json gathers them. Rerunning skips "
        "finished stages and resumes an interrupted one from its last checkpoint. Any other "
        "'--key=value' argument (e.g. --trainer.devices=4 --trainer.precision=bf16-mixed) is passed to "
        "every training stage.",
    )
    parser.add_argument("recipe", help="recipe YAML (e.g. stages/sjtu_retrieval.yaml)")
    parser.add_argument("--workdir", required=True, help="output folder of the run")
    parser.add_argument(
        "--loggers", default="wandb,csv", help="comma-separated from wandb, csv, tensorboard (default wandb,csv; W&B is offline unless logged in or WANDB_MODE=online)"
    )
    parser.add_argument("--wandb-project", default="aac_lightning", help="W&B project (default aac_lightning)")
    parser.add_argument("--examples", type=int, default=8, help="test examples kept per stage (default 8)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a recipe variable, e.g. --var data_root=/data (repeatable)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only list every input the unfinished stages need (data, weights, text encoders, handoffs, Java, disk) "
        "and exit: 0 when all are present, 2 when something is missing. A real run does the same check first.",
    )
    return parser


def parse_variables(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """`["a=1", "b=2"]` -> `{"a": "1", "b": "2"}`."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--var takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def parse_overrides(parser: argparse.ArgumentParser, args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command's options; the rest must be LightningCLI `--key=value` / `--key value` overrides."""
    ns, rest = parser.parse_known_args(list(args))
    from aac_lightning.pipeline import trainer_overrides  # after parsing: `--help` needs no torch

    try:
        return ns, trainer_overrides(rest)
    except ValueError as err:
        parser.error(str(err))
        raise  # parser.error exits


def pipeline_command(args: Sequence[str]) -> None:
    """`aac-lightning pipeline RECIPE --workdir DIR [--loggers ...] [--key=value ...]`."""
    from aac_lightning.pipeline import PipelineRunner

    parser = build_parser()
    ns, overrides = parse_overrides(parser, args)
    loggers = [name.strip() for name in ns.loggers.split(",") if name.strip()]
    runner = PipelineRunner(ns.recipe, ns.workdir, overrides, loggers, ns.wandb_project, ns.examples, parse_variables(parser, ns.var))
    if ns.check:
        report = runner.check()
        print(report.format_table())
        print(f"\nrecipe {runner.recipe.path}: " + ("all inputs present" if report.ok else f"{len(report.missing())} input(s) missing"))
        raise SystemExit(0 if report.ok else 2)
    runner.run()
    print(f"results written to {runner.workdir / 'results.json'}")
