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


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """`args` with each `--config X` made a readable file: X itself, else the shipped config named X.

    A shipped config is named by its path under `conf/` (`captioning/transformer2`, or
    `conf/captioning/transformer2.yaml` from any folder; `aac-lightning recipes` lists them). A value
    that is neither is a FileNotFoundError naming it; an unreadable file a PermissionError.
    """
    import os

    from aac_lightning.utils.shipped import resolve_config

    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            value, place = arg.partition("=")[2], "--config="
        elif arg == "--config" and i + 1 < len(out):
            value, place = out[i + 1], None
        else:
            continue
        if value.lstrip().startswith("{"):
            continue  # an inline YAML/JSON config
        path = str(resolve_config(value))
        if not os.access(path, os.R_OK):
            raise PermissionError(f"config file '{path}' is not readable (check its permissions)")
        if place:
            out[i] = place + path
        else:
            out[i + 1] = path
    return out


def lightning_cli_with_check(args: Sequence[str] | None, check_only: bool = False):
    """LightningCLI over `args`, with the input check before any class is built (see the module doc)."""
    from aac_lightning.lightning_cli import build_lightning_cli

    return build_lightning_cli(args, before_instantiate=_check_config(check_only))
