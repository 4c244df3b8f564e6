"""Reading and merging YAML configs, importing the classes they name, building a configured model offline."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import yaml

ENSEMBLE_CONFIG_KEYS = ("checkpoints", "name", "description")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged into a copy of `base`, recursively for nested dicts (later configs win).

    As LightningCLI (jsonargparse) merges `--config a --config b`: where `update` switches a
    `class_path` to another class, the earlier `init_args` that the new class does not accept are
    dropped (an XE config followed by `scst.yaml` gives SCST only SCST's arguments).
    """
    out = dict(base)
    switched = "class_path" in update and "class_path" in base and update["class_path"] != base["class_path"]
    if switched and isinstance(base.get("init_args"), dict):
        accepted = init_argument_names(import_class(str(update["class_path"])))
        out["init_args"] = {k: v for k, v in base["init_args"].items() if accepted is None or k in accepted}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def init_argument_names(cls: type) -> set[str] | None:
    """The keyword arguments `cls(...)` accepts (`None`: any, it takes `**kwargs`)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "self"}


def read_configs(paths: Sequence[str]) -> dict[str, Any]:
    """Several LightningCLI YAML configs (files, or shipped configs' names) merged in order, as
    `--config a --config b` would."""
    from aac_lightning.utils.shipped import resolve_config

    merged: dict[str, Any] = {}
    for path in paths:
        path = resolve_config(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config '{path}' is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config '{path}' must hold a mapping at the top level")
        merged = deep_merge(merged, data)
    return merged


def import_class(class_path: str) -> type:
    """The class named by a dotted path (`aac_lightning.modules.ContrastiveRetrieval`) or a short name."""
    if "." not in class_path:
        import aac_lightning.modules as modules

        if hasattr(modules, class_path):
            return getattr(modules, class_path)
        raise ValueError(f"unknown model class {class_path!r}")
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model class {class_path!r}: {err}") from err


def build_model_offline(config: dict[str, Any], **overrides: Any):
    """Instantiate the configured model with no weight downloads and no handoff files."""
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        raise ValueError("the config has no 'model.class_path'")
    cls = import_class(model_cfg["class_path"])
    init_args = dict(model_cfg.get("init_args") or {})
    init_args.update(cls.offline_build_overrides(init_args))
    init_args.update(overrides)
    return cls(**init_args)


def count_parameters(model) -> tuple[int, int]:
    """`(total, trainable)` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def read_ensemble_config(path: str | os.PathLike) -> list[str]:
    """The checkpoint list of an ensemble config (``checkpoints: [a.ckpt, b.ckpt, ...]``): a file, or a
    shipped config's name (``captioning/ensembles/system2``)."""
    from aac_lightning.utils.shipped import resolve_config

    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"ensemble config '{path}' is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"ensemble config '{path}' must hold a mapping with the key 'checkpoints'")
    unknown = sorted(set(data) - set(ENSEMBLE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"ensemble config '{path}' has unknown key(s) {unknown}; allowed: {list(ENSEMBLE_CONFIG_KEYS)}")
    checkpoints = data.get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints or not all(isinstance(c, str) and c for c in checkpoints):
        raise ValueError(f"ensemble config '{path}': 'checkpoints' must be a non-empty list of paths, got {checkpoints!r}")
    return list(checkpoints)
