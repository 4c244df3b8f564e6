"""The one place that reads this package's checkpoints, checks their stage kind and loads weights strictly.

Every checkpoint the package writes records, under `METADATA_KEY`, the package version, the stage
kind (`contrastive`, `xe`, `scst`) and the class that wrote it. `read_checkpoint` loads a file safely
(`weights_only=True`) and completes the hyper-parameters of a checkpoint written by an older version
(`CHECKPOINT_UPGRADES`); `check_kind` refuses a checkpoint of the wrong stage kind;
`load_state_dict_strict` loads weights with an error naming every mismatch.

An exported model folder (`aac-lightning export`, :mod:`aac_lightning.pretrained`) is read here too:
`read_checkpoint(folder)` returns the same structure from `config.json`, `model.safetensors` and
`vocabulary.json` with json and safetensors only (nothing is unpickled), so every loader that takes a
checkpoint takes a folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
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
    A folder is read by `read_pretrained_folder`.
    """
    path = Path(path)
    if path.is_dir():
        return read_pretrained_folder(path)
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


# ---------------------------------------------------------------------------------------------- exported folders
# The folder `aac-lightning export` writes (aac_lightning/pretrained.py writes it; it is read here only).
PRETRAINED_FORMAT = "aac-lightning-pretrained"
PRETRAINED_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCABULARY_FILE = "vocabulary.json"
# Set in the structure `read_checkpoint` returns for a folder: the folder's config.json as read.
PRETRAINED_KEY = "pretrained_folder"


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a `config.json` (an exported model, as commands tell it from audio folders)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def check_pretrained_folders(paths: Sequence[str | Path]) -> None:
    """Refuse an empty list or a path that is not an exported model folder (a FileNotFoundError / NotADirectoryError naming it)."""
    if not paths:
        raise ValueError("give at least one exported model folder")
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"exported model folder not found: '{path}'")
        if not path.is_dir():
            raise NotADirectoryError(f"'{path}' is not an exported model folder (from_checkpoint reads .ckpt files)")
        _folder_file(path, CONFIG_FILE, "config")


def _folder_file(folder: Path, name: str, what: str) -> Path:
    """`folder / name`, or a FileNotFoundError naming the missing file."""
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"exported model folder '{folder}' lacks its {what} '{file}'")
    return file


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HandoffError(f"'{file}' is not valid JSON: {err}") from err


def read_pretrained_folder(folder: str | Path) -> dict[str, Any]:
    """An exported model folder as the structure `read_checkpoint` returns (`state_dict`, `hyper_parameters`, metadata).

    Reads `config.json` (format, stage kind, class, init arguments), `model.safetensors` (weights) and,
    when the config names one, `vocabulary.json`; init arguments the config lists under
    `path_arguments` (e.g. a text encoder's config and tokenizer) point into the folder. json and
    safetensors only: nothing is unpickled. A missing file is a FileNotFoundError naming it; a file that
    is not what it should be is a `HandoffError` naming it. Whether the weights fit the rebuilt model is
    checked when it is built (`load_state_dict_strict`, naming `model.safetensors`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file = _folder_file(folder, CONFIG_FILE, "config")
    config = _read_json(config_file)
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise HandoffError(f"'{config_file}' is not an aac-lightning export config (format {found!r}, expected {PRETRAINED_FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PRETRAINED_FORMAT_VERSION:
        raise HandoffError(
            f"'{config_file}' has format_version {version!r}; this aac-lightning reads versions 1 to {PRETRAINED_FORMAT_VERSION} "
            "(a newer version wrote it: upgrade aac-lightning)"
        )
    for key, kind in (("kind", str), ("class_path", str), ("init_args", dict)):
        if not isinstance(config.get(key), kind):
            raise HandoffError(f"'{config_file}' lacks '{key}' (a {kind.__name__})")
    init_args = dict(config["init_args"])
    for name, relative in dict(config.get("path_arguments") or {}).items():
        parts = PurePosixPath(str(relative)).parts
        if not parts or PurePosixPath(str(relative)).is_absolute() or ".." in parts:
            raise HandoffError(f"'{config_file}': path_arguments.{name} must be a path inside the folder, got {relative!r}")
        target = folder.joinpath(*parts)
        if not target.exists():
            raise FileNotFoundError(f"exported model folder '{folder}' lacks '{target}' (init argument '{name}')")
        init_args[name] = str(target)
    vocabulary_name = config.get("vocabulary_file")
    if vocabulary_name is not None:
        vocabulary_file = _folder_file(folder, str(vocabulary_name), "vocabulary")
        words = _read_json(vocabulary_file)
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise HandoffError(f"'{vocabulary_file}' must hold a non-empty JSON list of words (in id order)")
        size = init_args.get("vocab_size")
        if size is not None and size != len(words):
            raise HandoffError(f"'{vocabulary_file}' holds {len(words)} words but '{config_file}' records vocab_size={size}")
        init_args["vocabulary"] = words
    weights_file = _folder_file(folder, WEIGHTS_FILE, "weights")
    try:
        state_dict = load_file(weights_file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise HandoffError(f"cannot read '{weights_file}' as safetensors: {err}") from err
    return {
        "state_dict": state_dict,
        "hyper_parameters": init_args,
        METADATA_KEY: {
            "version": str(config.get("package_version") or "0"),
            "kind": config["kind"],
            "class_path": config["class_path"],
            "weights_file": str(weights_file),
        },
        PRETRAINED_KEY: config,
    }
