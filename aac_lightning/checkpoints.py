"""The one place that reads this package's checkpoints, checks their stage kind and loads weights strictly.

Every checkpoint the package writes records, under `METADATA_KEY`, the package version, the stage
kind (`contrastive`, `xe`, `scst`) and the class that wrote it. `read_checkpoint` loads a file safely
(`weights_only=True`) and completes the hyper-parameters of a checkpoint written by an older version
(`CHECKPOINT_UPGRADES`); `check_kind` refuses a checkpoint of the wrong stage kind;
`load_state_dict_strict` loads weights with an error naming every mismatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

METADATA_KEY = "aac_lightning"


class HandoffError(ValueError):
    """A checkpoint handed to a stage does not fit it (wrong stage, architecture or keys)."""


# Stage kind -> function filling, in place, the hyper-parameters that a checkpoint written by an older
# package version lacks (with the values that rebuild the model it was trained as); it returns the
# names it filled. Registered by the modules that own the kinds.
CHECKPOINT_UPGRADES: dict[str, Callable[[dict[str, Any]], list[str]]] = {}
UPGRADED_KEY = "upgraded_hyper_parameters"


def package_version(ckpt: dict[str, Any]) -> tuple[int, ...]:
    """The package version a checkpoint was written with, as numbers (`(0,)` when unrecorded)."""
    text = str((ckpt.get(METADATA_KEY) or {}).get("version") or "0")
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of this package, loaded on the CPU.

    Checkpoints written by this package hold only tensors, numbers, strings, lists and dicts, so they
    load with `weights_only=True`; a checkpoint that needs arbitrary code to unpickle is refused. The
    hyper-parameters of a checkpoint from an older package version are completed with the values
    that rebuild it (`CHECKPOINT_UPGRADES`); the names filled are listed under `UPGRADED_KEY`.
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
    upgrade = CHECKPOINT_UPGRADES.get(checkpoint_kind(ckpt))
    if upgrade is not None and isinstance(ckpt.get("hyper_parameters"), dict):
        ckpt[UPGRADED_KEY] = upgrade(ckpt)
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str | None:
    """The stage kind recorded in a checkpoint (`contrastive`, `xe`, `scst`), if any."""
    return (ckpt.get(METADATA_KEY) or {}).get("kind")


# How many keys of each kind (missing, unexpected, mismatched) an error names before "... (N in all)".
NAMES_SHOWN = 12


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
                shown = ", ".join(items[:NAMES_SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > NAMES_SHOWN else "")
                parts.append(f"{label}: {shown}")
        raise HandoffError(f"weights from {source} do not fit the model; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def extract_submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. `model.audio_encoder.`), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def check_kind(ckpt: dict[str, Any], expected_kinds: Sequence[str], path: str | Path, needed_by: str = "this stage") -> dict[str, Any]:
    """`ckpt` itself if its stage kind is one of `expected_kinds`, else a `HandoffError` naming both."""
    kind = checkpoint_kind(ckpt)
    if kind not in expected_kinds:
        raise HandoffError(f"'{path}' is a checkpoint of stage kind {kind!r}, but {needed_by} needs one of {list(expected_kinds)}")
    return ckpt
