"""`aac-lightning fit|validate|test|predict ... --check`: the inputs of one LightningCLI run, as a table.

A real `fit` runs the same check before building the model, and stops (exit 2) with the table when
something is missing; `--check` prints the table and exits (0: all present, 2: something missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aac_lightning.commands.errors import USER_ERROR_EXIT


def _check_config(check_only: bool):
    def check(subcommand: str | None, config: dict[str, Any]) -> None:
        from aac_lightning.pipeline.check import config_requirements, verb_splits
        from aac_lightning.utils.preflight import PreflightReport

        if not check_only and subcommand != "fit":
            return  # validate / test / predict: their errors name the missing input when it is read
        data = (config.get("data") or {}).get("init_args") or {}
        splits = verb_splits(subcommand or "fit", str(data.get("predict_split") or "test"))
        report = PreflightReport(config_requirements(config, subcommand or "fit", splits))
        if check_only:
            print(report.format_table())
            print("\nall inputs present" if report.ok else f"\n{len(report.missing())} input(s) missing")
            raise SystemExit(0 if report.ok else USER_ERROR_EXIT)
        report.raise_if_missing()

    return check


def check_config_files(args: Sequence[str]) -> None:
    """Each `--config FILE` must be a readable file: FileNotFoundError / PermissionError naming it."""
    import os

    for i, arg in enumerate(args):
        path = arg.partition("=")[2] if arg.startswith("--config=") else (args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if path is None or path.lstrip().startswith("{"):
            continue  # an inline YAML/JSON config
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file '{path}' not found" + (" (it is a folder)" if os.path.isdir(path) else "") + ": pass a YAML file from conf/, e.g. --config conf/retrieval/cnn14_bert_base.yaml")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"config file '{path}' is not readable (check its permissions)")


def lightning_cli_with_check(args: Sequence[str] | None, check_only: bool = False):
    """LightningCLI over `args`, with the input check before any class is built (see the module doc)."""
    from aac_lightning.lightning_cli import build_lightning_cli

    return build_lightning_cli(args, before_instantiate=_check_config(check_only))
