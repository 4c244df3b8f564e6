"""The `aac-lightning` command: LightningCLI's fit/validate/test/predict plus the package's own tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

TRAINER_SUBCOMMANDS = {
    "fit": "train a stage (LightningCLI): aac-lightning fit --config conf/....yaml",
    "validate": "run the validation loop of a configured model",
    "test": "run the test loop of a configured model",
    "predict": "run the predict loop of a configured model",
}


def build_lightning_cli(args: Sequence[str] | None, run: bool = True):
    """LightningCLI in subclass mode over the package's modules and datamodules.

    `args=None` lets LightningCLI read `sys.argv` itself (the console script); `run=False` only
    instantiates the trainer, model and datamodule (the demo runs them itself).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    # Importing registers the classes, so configs may name them by their short names.
    import aac_lightning.data  # noqa: F401
    import aac_lightning.modules  # noqa: F401

    return _preflight_cli_class(LightningCLI)(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=run,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
    )


def _preflight_cli_class(base: type) -> type:
    """`base` (LightningCLI) whose `fit` first checks every output folder (`preflight_trainer_outputs`).

    An unwritable or full output folder then fails the run before `trainer.fit` begins, not hours later.
    With `run=False` the caller runs `trainer.fit` itself and calls `preflight_trainer_outputs` first.
    """

    class PreflightLightningCLI(base):
        def before_fit(self) -> None:
            from aac_lightning.utils.preflight import preflight_trainer_outputs

            preflight_trainer_outputs(self.trainer)

    return PreflightLightningCLI


def _synth(args: Sequence[str]) -> None:
    from aac_lightning.data.synth import write_synthetic_clotho

    parser = argparse.ArgumentParser(
        prog="aac-lightning synth",
        description="Write the synthetic dataset (sound-event sequences with captions) in the Clotho "
        "layout under OUT_DIR, readable with aac_lightning.data.Clotho(OUT_DIR, subset).",
    )
    parser.add_argument("out_dir", help="output folder (CLOTHO_v2.1/ is created inside)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--clips", type=int, default=400, help="total clips, split 60/20/20 into dev/val/eval (default 400)")
    parser.add_argument("--sample-rate", type=int, default=32000, help="sample rate of the WAV files (default 32000)")
    ns = parser.parse_args(args)
    counts = write_synthetic_clotho(ns.out_dir, n_clips=ns.clips, seed=ns.seed, sample_rate=ns.sample_rate)
    print(f"wrote {sum(counts.values())} clips to {ns.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


EXTRA_SUBCOMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "synth": ("write the synthetic dataset in the Clotho layout", _synth),
}


def _register_optional_subcommands() -> None:
    """Subcommands whose modules are imported only when used (they pull in heavier dependencies)."""
    try:
        from aac_lightning import tools
    except ImportError:
        return
    EXTRA_SUBCOMMANDS.update(tools.SUBCOMMANDS)


def _print_help() -> None:
    lines = ["usage: aac-lightning <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    for name, (text, _) in EXTRA_SUBCOMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    lines += ["", "Run 'aac-lightning <subcommand> --help' for the options of one subcommand."]
    print("\n".join(lines))


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `aac-lightning` console script and `python -m aac_lightning`."""
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    _register_optional_subcommands()
    if not args or args[0] in ("-h", "--help"):
        _print_help()
        return
    if args[0] in ("-V", "--version"):
        from aac_lightning import __version__

        print(__version__)
        return
    command, rest = args[0], args[1:]
    if command in TRAINER_SUBCOMMANDS:
        build_lightning_cli(None if from_command_line else args)
    elif command in EXTRA_SUBCOMMANDS:
        EXTRA_SUBCOMMANDS[command][1](rest)
    else:
        _print_help()
        raise SystemExit(f"aac-lightning: unknown subcommand {command!r}")


if __name__ == "__main__":
    main()
