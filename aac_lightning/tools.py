"""Extra `aac-lightning` subcommands besides LightningCLI's: model summaries and the like."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged into a copy of `base`, recursively for nested dicts (later configs win)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_configs(paths: Sequence[str]) -> dict[str, Any]:
    """Several LightningCLI YAML configs merged in order, as `--config a --config b` would."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as err:
            raise FileNotFoundError(f"config file not found: '{path}'") from err
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


def _summary(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="aac-lightning summary",
        description="Build the configured model offline (random weights, no downloads, no data read) "
        "and print its parameter counts as 'total=<N> trainable=<M>'.",
    )
    parser.add_argument("--config", "-c", action="append", required=True, help="config file(s), merged in order")
    parser.add_argument("--vocab-size", type=int, default=None, help="captioners: vocabulary size to build with")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print per-submodule counts")
    ns = parser.parse_args(args)
    overrides = {} if ns.vocab_size is None else {"vocab_size": ns.vocab_size}
    model = build_model_offline(read_configs(ns.config), **overrides)
    total, trainable = count_parameters(model)
    if ns.verbose:
        for name, child in model.named_children():
            t, tr = count_parameters(child)
            print(f"{name}: total={t} trainable={tr}")
            for sub_name, sub in child.named_children():
                t, tr = count_parameters(sub)
                print(f"  {name}.{sub_name}: total={t} trainable={tr}")
    print(f"total={total} trainable={trainable}")


def _demo(args: Sequence[str]) -> None:
    from aac_lightning.demo import demo_command

    demo_command(args)


def _pipeline(args: Sequence[str]) -> None:
    from aac_lightning.pipeline import pipeline_command

    pipeline_command(args)


def _retrieval_eval(args: Sequence[str]) -> None:
    from aac_lightning.retrieval_ensemble import retrieval_eval_command

    retrieval_eval_command(args)


def _caption_eval(args: Sequence[str]) -> None:
    from aac_lightning.captioning_ensemble import caption_eval_command

    caption_eval_command(args)


def _caption(args: Sequence[str]) -> None:
    from aac_lightning.inference import caption_command

    caption_command(args)


def _search(args: Sequence[str]) -> None:
    from aac_lightning.inference import search_command

    search_command(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "summary": ("build a configured model offline and print its parameter counts", _summary),
    "pipeline": ("run a multi-stage recipe (stages/*.yaml) in a work directory; reruns resume", _pipeline),
    "demo": ("run the demo recipe stages/demo.yaml on synthetic data (offline, CPU)", _demo),
    "caption-eval": ("caption a Clotho subset with a captioner or an ensemble and score it", _caption_eval),
    "retrieval-eval": ("evaluate retrieval checkpoints or an ensemble; DCASE 6b submission CSV", _retrieval_eval),
    "caption": ("caption audio files or folders with a captioner or an ensemble", _caption),
    "search": ("rank the audio files of a folder for text queries (cached embeddings)", _search),
}
