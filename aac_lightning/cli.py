"""The `aac-lightning` console script (also `python -m aac_lightning`): a dispatch table only.

`fit | validate | test | predict` go to LightningCLI (`aac_lightning.lightning_cli`); the other
subcommands are listed in `aac_lightning.commands.COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from aac_lightning.commands import COMMANDS

TRAINER_SUBCOMMANDS = {
    "fit": "train a stage (LightningCLI): aac-lightning fit --config conf/....yaml",
    "validate": "run the validation loop of a configured model",
    "test": "run the test loop of a configured model",
    "predict": "write a configured model's captions (captioners) or clip embeddings (retrieval)",
}


def _print_help() -> None:
    lines = ["usage: aac-lightning <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    for name, (text, _) in COMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    lines += [
        "",
        "Run 'aac-lightning <subcommand> --help' for the options of one subcommand. 'fit ... --check' and",
        "'pipeline RECIPE --check' list every input a run needs. Errors are one line (exit status 2);",
        "--traceback (or AAC_LIGHTNING_TRACEBACK=1) shows the full traceback.",
    ]
    print("\n".join(lines))


def main(args: Sequence[str] | None = None, report_errors: bool | None = None) -> None:
    """Entry point of the `aac-lightning` console script and `python -m aac_lightning`.

    `report_errors` (default: only when `args` is None, i.e. the console script) turns user errors into
    one line on stderr and exit status 2; Python callers passing `args` get the typed exceptions.
    """
    from_command_line = args is None
    if report_errors is None:
        report_errors = from_command_line
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        _print_help()
        return
    if args[0] in ("-V", "--version"):
        from aac_lightning import __version__

        print(__version__)
        return
    from aac_lightning.commands.errors import run_reporting_errors, traceback_requested

    show_traceback, stripped = traceback_requested(args)
    show_traceback = show_traceback or not report_errors
    command, rest = stripped[0], stripped[1:]
    if command in TRAINER_SUBCOMMANDS:
        from aac_lightning.commands.check import lightning_cli_with_check, resolve_config_args

        check_only = "--check" in rest
        cli_args = run_reporting_errors(
            f"aac-lightning {command}", lambda: resolve_config_args([a for a in stripped if a != "--check"]), show_traceback
        )
        if from_command_line and cli_args != args:
            sys.argv = [sys.argv[0], *cli_args]  # LightningCLI (and Lightning's DDP launcher) read sys.argv
        passed = None if from_command_line else cli_args
        run_reporting_errors(f"aac-lightning {command}", lambda: lightning_cli_with_check(passed, check_only), show_traceback)
    elif command in COMMANDS:
        module_name, _, function = COMMANDS[command][1].partition(":")
        run_reporting_errors(f"aac-lightning {command}", lambda: getattr(importlib.import_module(module_name), function)(rest), show_traceback)
    else:
        _print_help()
        print(f"aac-lightning: error: unknown subcommand {command!r}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
