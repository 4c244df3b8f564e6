"""Recipes (`stages/*.yaml`): the schema, `${...}` variables, and the checks that name file, stage and field.

Recipe format (config paths are relative to the recipe file; `${workdir}`, `${recipe_dir}` and the
recipe's own `variables`, overridable with `--var NAME=VALUE`, are replaced in every string)::

    name: demo
    variables: {data_root: data}
    synthetic_data: {dir: ${workdir}/data, clips: 400, seed: 0}   # optional: written if absent
    stages:
      - name: pretrain
        configs: [../conf/demo/contrastive_pretrain.yaml]
        set: {data.init_args.clotho_root: ${workdir}/data}
      - name: xe
        configs: [../conf/demo/xe.yaml]
        handoff: {model.init_args.extractor_ckpt: pretrain}      # "<stage>": its checkpoint (averaged, else best);
                                                                  # or "<stage>:best", ":last", ":averaged"
      - name: ensemble
        kind: retrieval_ensemble                                  # or caption_ensemble
        members: [pretrain]
        clotho_root: ${workdir}/data
        relevance: ${data_root}/metadata_eval.csv                 # optional: DCASE 2025 mAP@16 too
                                                                  # (caption_ensemble: metrics: dcase2024)

A training stage's kind, when the stage does not name it, is the `kind` of the last `model.class_path`
among its configs (`ContrastiveRetrieval.kind == "contrastive"`, `CaptioningXE.kind == "xe"`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aac_lightning.utils.shipped import resolve_recipe

TRAINING_KINDS = ("contrastive", "xe", "scst")
ENSEMBLE_KINDS = ("retrieval_ensemble", "caption_ensemble")
HANDOFF_CHOICES = ("best", "last", "averaged")
STAGE_KEYS = {"name", "kind", "configs", "set", "handoff", "members", "clotho_root", "subset", "metrics", "relevance", "tags", "description"}
RECIPE_KEYS = {"name", "description", "variables", "synthetic_data", "stages"}
SYNTH_KEYS = {"dir", "clips", "seed", "sample_rate"}
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A recipe file that is malformed: the message names the file, the stage and the field."""


@dataclass
class Stage:
    """One stage of a recipe (see the module docstring for the fields)."""

    name: str
    kind: str
    configs: list[Path] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    handoff: dict[str, str] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    clotho_root: str | None = None
    subset: str = "evaluation"
    metrics: str | list[str] | None = None  # caption ensembles: metric sets / names (`dcase2024`, ...)
    relevance: str | None = None  # retrieval ensembles: the DCASE 2025 relevance file (adds mAP@16)
    tags: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class Recipe:
    """A parsed `stages/*.yaml` file."""

    name: str
    path: Path
    stages: list[Stage]
    description: str = ""
    synthetic_data: dict[str, Any] | None = None


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    """Replace `${name}` in every string of `value`; an unknown name is an error."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, str):

        def repl(match: re.Match) -> str:
            if match.group(1) not in variables:
                raise KeyError(match.group(1))
            return variables[match.group(1)]

        return re.sub(r"\$\{([A-Za-z_]+)\}", repl, value)
    return value


def config_kind(configs: Sequence[Path]) -> str | None:
    """The stage kind of the last `model.class_path` among the configs: that class's own `kind`.

    Raises ValueError (naming the class) when a `class_path` cannot be imported.
    """
    from aac_lightning.config import import_class

    kind = None
    for path in configs:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        class_path = ((data.get("model") or {}) if isinstance(data, dict) else {}).get("class_path")
        if class_path:
            own = getattr(import_class(str(class_path)), "kind", None)
            kind = own if isinstance(own, str) else kind
    return kind


def _read(path: Path) -> dict[str, Any]:
    """The recipe file as a mapping; RecipeError for bad YAML, bad encoding or another type."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not valid UTF-8 text ({err})") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with 'name' and 'stages', got {type(raw).__name__}")
    unknown = set(raw) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    return raw


def _parse_stage(path: Path, index: int, entry: Any, earlier: dict[str, Stage]) -> Stage:
    """One `stages:` entry, checked against the stages before it."""
    where = f"{path}: stages[{index}]"
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: a stage is a mapping, got {type(entry).__name__}")
    unknown = set(entry) - STAGE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise RecipeError(f"{where}: 'name' must be a folder-safe name (letters, digits, _ . -), got {name!r}")
    where = f"{path}: stage '{name}'"
    if name in earlier:
        raise RecipeError(f"{where}: the name is used twice")
    configs = entry.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    config_paths = [(path.parent / c).resolve() for c in configs]
    for c in config_paths:
        if not c.is_file():
            raise RecipeError(f"{where}: config '{c}' not found")
    kind = entry.get("kind")
    if not kind and config_paths:
        try:
            kind = config_kind(config_paths)
        except ValueError as err:
            raise RecipeError(f"{where}: 'configs': {err}") from err
    if kind not in TRAINING_KINDS + ENSEMBLE_KINDS:
        raise RecipeError(f"{where}: 'kind' must be one of {list(TRAINING_KINDS + ENSEMBLE_KINDS)}, got {kind!r}")
    stage = Stage(
        name=name,
        kind=kind,
        configs=config_paths,
        set=dict(entry.get("set") or {}),
        handoff={str(k): str(v) for k, v in (entry.get("handoff") or {}).items()},
        members=[str(m) for m in entry.get("members") or []],
        clotho_root=entry.get("clotho_root"),
        subset=str(entry.get("subset") or "evaluation"),
        metrics=entry.get("metrics"),
        relevance=None if entry.get("relevance") is None else str(entry.get("relevance")),
        tags=[str(t) for t in entry.get("tags") or []],
        description=str(entry.get("description") or ""),
    )
    if kind in TRAINING_KINDS:
        _check_training_stage(where, stage, earlier, config_paths)
    else:
        _check_ensemble_stage(where, stage, earlier)
    return stage


def _check_training_stage(where: str, stage: Stage, earlier: dict[str, Stage], config_paths: list[Path]) -> None:
    if not config_paths:
        raise RecipeError(f"{where}: a training stage needs 'configs'")
    if stage.members or stage.clotho_root or stage.metrics is not None or stage.relevance is not None:
        raise RecipeError(
            f"{where}: 'members', 'clotho_root', 'metrics' and 'relevance' belong to ensemble stages "
            "(a training stage sets model.init_args.test_metrics / test_relevance)"
        )
    for key, source in stage.handoff.items():
        source_name = source.split(":")[0]
        if source_name not in earlier:
            raise RecipeError(f"{where}: handoff '{key}' names '{source}', which is not an earlier stage ({sorted(earlier)})")
        if source.count(":") > 1 or (":" in source and source.split(":")[1] not in HANDOFF_CHOICES):
            raise RecipeError(
                f"{where}: handoff '{key}': use '<stage>' or '<stage>:best', '<stage>:last' or '<stage>:averaged', got {source!r}"
            )


def _check_ensemble_stage(where: str, stage: Stage, earlier: dict[str, Stage]) -> None:
    if not stage.members:
        raise RecipeError(f"{where}: an ensemble stage needs 'members' (earlier stage names)")
    for member in stage.members:
        if member not in earlier or earlier[member].kind not in TRAINING_KINDS:
            raise RecipeError(f"{where}: member '{member}' is not an earlier training stage")
        wanted = ("contrastive",) if stage.kind == "retrieval_ensemble" else ("xe", "scst")
        if earlier[member].kind not in wanted:
            raise RecipeError(f"{where}: member '{member}' is a {earlier[member].kind} stage; a {stage.kind} takes {list(wanted)}")
    if not stage.clotho_root:
        raise RecipeError(f"{where}: an ensemble stage needs 'clotho_root' (the data to evaluate on)")
    if stage.metrics is not None:
        if stage.kind != "caption_ensemble":
            raise RecipeError(f"{where}: 'metrics' (caption metric sets) belongs to caption_ensemble stages")
        from aac_lightning.metrics.sets import resolve_caption_metrics

        try:
            resolve_caption_metrics(stage.metrics)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}: 'metrics': {err}") from None
    if stage.relevance is not None and stage.kind != "retrieval_ensemble":
        raise RecipeError(f"{where}: 'relevance' (the DCASE 2025 relevance file) belongs to retrieval_ensemble stages")


def load_recipe(path: str | Path, workdir: str | Path, variables: dict[str, str] | None = None) -> Recipe:
    """Read and check a recipe (a file, or the name of a shipped recipe). Errors name the file, the stage and the field.

    `${workdir}` becomes the absolute `workdir`, `${recipe_dir}` the recipe's folder, and `${NAME}` a
    value of the recipe's `variables:` mapping, which `variables` (e.g. from `--var NAME=VALUE`) overrides.
    """
    path = resolve_recipe(path)
    raw = _read(path)
    declared = raw.get("variables") or {}
    if not isinstance(declared, dict):
        raise RecipeError(f"{path}: 'variables' must be a mapping of names to values")
    unknown = set(variables or {}) - set(declared)
    if unknown:
        raise RecipeError(f"{path}: --var {sorted(unknown)} not among the recipe's variables {sorted(declared)}")
    builtin = {"workdir": str(Path(workdir).resolve()), "recipe_dir": str(path.resolve().parent)}
    variables = {**builtin, **{str(k): str(v) for k, v in declared.items()}, **(variables or {}), **builtin}
    try:
        raw = _substitute({k: v for k, v in raw.items() if k != "variables"}, variables)
    except KeyError as err:
        raise RecipeError(f"{path}: unknown variable ${{{err.args[0]}}}; known: {sorted(variables)}") from None
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{path}: 'stages' must be a non-empty list")
    synthetic = raw.get("synthetic_data")
    if synthetic is not None:
        if not isinstance(synthetic, dict) or "dir" not in synthetic or set(synthetic) - SYNTH_KEYS:
            raise RecipeError(f"{path}: 'synthetic_data' must be a mapping with 'dir' and optional {sorted(SYNTH_KEYS - {'dir'})}")
    stages: dict[str, Stage] = {}
    for index, entry in enumerate(stages_raw):
        stage = _parse_stage(path, index, entry, stages)
        stages[stage.name] = stage
    return Recipe(
        name=str(raw.get("name") or path.stem),
        path=path,
        stages=list(stages.values()),
        description=str(raw.get("description") or ""),
        synthetic_data=synthetic,
    )
