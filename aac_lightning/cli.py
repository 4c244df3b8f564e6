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
    lines += ["", "Run 'aac-lightning <subcommand> --help' for the options of one subcommand."]
    print("\n".join(lines))


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `aac-lightning` console script and `python -m aac_lightning`."""
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        _print_help()
        return
    if args[0] in ("-V", "--version"):
        from aac_lightning import __version__

        print(__version__)
        return
    command, rest = args[0], args[1:]
    if command in TRAINER_SUBCOMMANDS:
        from aac_lightning.lightning_cli import build_lightning_cli

        build_lightning_cli(None if from_command_line else args)
    elif command in COMMANDS:
        module_name, _, function = COMMANDS[command][1].partition(":")
        getattr(importlib.import_module(module_name), function)(rest)
    else:
        _print_help()
        raise SystemExit(f"aac-lightning: unknown subcommand {command!r}")


if __name__ == "__main__":
    main()
