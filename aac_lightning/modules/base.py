"""What every stage's LightningModule shares: checkpoint metadata and the weights-only handoff."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from aac_lightning import __version__

log = logging.getLogger(__name__)

METADATA_KEY = "aac_lightning"


class HandoffError(ValueError):
    """A checkpoint handed to a stage does not fit it (wrong stage, architecture or keys)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of this package, loaded on the CPU.

    Checkpoints written by this package hold only tensors, numbers, strings, lists and dicts, so they
    load with `weights_only=True`; a checkpoint that needs arbitrary code to unpickle is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the message says which file and why
        raise HandoffError(f"cannot load checkpoint '{path}' safely (weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise HandoffError(f"'{path}' is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str | None:
    """The stage kind recorded in a checkpoint (`contrastive`, `xe`, `scst`), if any."""
    return (ckpt.get(METADATA_KEY) or {}).get("kind")


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state_dict, strict=True)` with an error naming every mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise HandoffError(f"weights from {source} do not fit the model; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def extract_submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. `model.audio_encoder.`), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


class AACModule(pl.LightningModule):
    """Base of the stage modules: records package version, stage kind and architecture in checkpoints.

    Subclasses set `kind` and call `save_hyperparameters()`, so `load_from_checkpoint(path)` rebuilds
    the architecture alone. Init arguments that point at files used only to initialise weights
    (`init_from`, third-party checkpoints) are listed in `handoff_arguments`: `load_for_inference`
    clears them, since the checkpoint's own weights replace them.
    """

    kind: str = "base"
    handoff_arguments: tuple[str, ...] = ("init_from",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = {
            "version": __version__,
            "kind": self.kind,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
        }

    def load_handoff(self, path: str, expected_kinds: tuple[str, ...]) -> dict[str, Any]:
        """Read a checkpoint given to a stage through an init argument, checking its stage kind."""
        ckpt = read_checkpoint(path)
        kind = checkpoint_kind(ckpt)
        if kind not in expected_kinds:
            raise HandoffError(
                f"'{path}' is a checkpoint of stage kind {kind!r}, but {type(self).__name__} needs one of "
                f"{list(expected_kinds)}"
            )
        return ckpt

    @classmethod
    def load_for_inference(cls, path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any):
        """Rebuild a module from its checkpoint alone (no handoff files, no downloads), in eval mode."""
        ckpt = read_checkpoint(path)
        kwargs = cls.offline_build_overrides(dict(ckpt.get("hyper_parameters", {})))
        kwargs.update(overrides)
        module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, **kwargs)
        return module.eval()

    @classmethod
    def offline_build_overrides(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """Init arguments that build the architecture with random weights, reading no weight file.

        Handoff files are cleared; subclasses add their own (e.g. no pretrained text weights).
        """
        return {name: None for name in cls.handoff_arguments}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_exponential(step: int, warmup_steps: int, total_steps: int, peak_lr: float, final_lr: float) -> float:
    """Learning-rate factor: linear warm-up to `peak_lr`, then exponential decay reaching `final_lr` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (final_lr / peak_lr) ** progress
