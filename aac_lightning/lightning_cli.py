"""The LightningCLI of the package: `fit | validate | test | predict` over its modules and datamodules."""

from __future__ import annotations

from collections.abc import Sequence


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
