"""The LightningCLI of the package: `fit | validate | test | predict` over its modules and datamodules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def build_lightning_cli(args: Sequence[str] | None, run: bool = True, before_instantiate: Callable[[str | None, dict[str, Any]], None] | None = None):
    """LightningCLI in subclass mode over the package's modules and datamodules.

    `args=None` lets LightningCLI read `sys.argv` itself (the console script); `run=False` only
    instantiates the trainer, model and datamodule (the demo runs them itself). `before_instantiate`
    is called with the subcommand (None when `run=False`) and the parsed config as a plain mapping
    before any class is built (the console script's input check, `aac-lightning fit ... --check`).
    Exceptions raised while the config is parsed and its classes built carry the attribute
    `aac_lightning_setup = True`, so the console script can report them as configuration errors.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    # Importing registers the classes, so configs may name them by their short names.
    import aac_lightning.data  # noqa: F401
    import aac_lightning.modules  # noqa: F401

    cli_class = _preflight_cli_class(LightningCLI)
    cli_class.before_instantiate_callback = staticmethod(before_instantiate) if before_instantiate is not None else None
    return cli_class(
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
        before_instantiate_callback = None

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            callback = type(self).before_instantiate_callback
            if callback is not None:
                config = self.config[self.subcommand] if self.subcommand else self.config
                callback(self.subcommand, config.as_dict())

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as err:
                setattr(err, "aac_lightning_setup", True)  # see build_lightning_cli
                raise
            # `--ckpt_path`: the module is restored after its `setup`; modules that extract features
            # in `setup` (captioners with a feature cache) wait for the restored weights instead.
            ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
            if ckpt_path is not None and hasattr(self.model, "restoring_from"):
                self.model.restoring_from = str(ckpt_path)

        def before_fit(self) -> None:
            from aac_lightning.utils.preflight import preflight_trainer_outputs

            preflight_trainer_outputs(self.trainer)

    return PreflightLightningCLI
