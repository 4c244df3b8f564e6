"""Which pipeline run a checkpoint belongs to: the test metrics its `results.json` records, the stage's `config.yaml`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RESULTS_FILE", "RunResults", "display_path", "find_run_results", "read_stage_config", "stage_dir_of"]

RESULTS_FILE = "results.json"
RESULTS_SEARCH_DEPTH = 3  # the checkpoint's folder and the two above it (WORKDIR/<stage>/checkpoints/x.ckpt)


@dataclass
class RunResults:
    """The test metrics of the pipeline stage a checkpoint belongs to, and where they were found.

    `note` says what was done in words (for the command and the model card); `metrics` is empty when
    no results were found.
    """

    note: str
    metrics: dict[str, float] = field(default_factory=dict)
    card_note: str = ""  # the same for the model card, without local paths
    results_file: Path | None = None
    stage: str | None = None
    recipe: str | None = None
    stage_dir: Path | None = None


def _same_file(a: str | os.PathLike, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def stage_dir_of(checkpoint: Path) -> Path:
    """The pipeline stage folder a checkpoint sits in (WORKDIR/<stage>/x.ckpt or WORKDIR/<stage>/checkpoints/x.ckpt)."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def _match_stage(data: dict[str, Any], checkpoint: Path, results_file: Path) -> tuple[str, dict[str, Any], bool] | None:
    """`(stage, record, exact)` of the stage of `data["stages"]` that `checkpoint` belongs to, or None.

    Exact: the stage's evaluated checkpoint is this file (links and hard links count). Otherwise the
    checkpoint lies in the stage's folder (e.g. its `last.ckpt` or an epoch checkpoint).
    """
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return None
    records = [(name, rec) for name, rec in stages.items() if isinstance(rec, dict) and isinstance(rec.get("metrics"), dict)]
    for name, rec in records:
        if rec.get("checkpoint") and _same_file(rec["checkpoint"], checkpoint):
            return name, rec, True
    stage_dir = stage_dir_of(checkpoint.resolve())
    for name, rec in records:
        if _same_file(results_file.parent / name, stage_dir):
            return name, rec, False
    for name, rec in records:  # a moved work directory: the stage folder's name
        if stage_dir.name == name:
            return name, rec, False
    return None


def _read_results_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: '{path}'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"'{path}' is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a JSON object (a pipeline results.json or a stage.json)")
    return data


def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def find_run_results(checkpoint: str | os.PathLike, results: str | os.PathLike | None = None) -> RunResults:
    """The test metrics recorded for `checkpoint` by the pipeline run it belongs to.

    With `results`: that file, a pipeline `results.json` (the stage is the one whose checkpoint this
    is, or whose folder holds it) or a file with a top-level `metrics` object (a `stage.json`); a file
    with no entry for the checkpoint is an error. Without: the first `results.json` found in the
    checkpoint's folder or the two above it that has an entry for it; none is not an error (the
    card then has no metrics, and `note` says why).
    """
    checkpoint = Path(checkpoint)
    if results is not None:
        path = Path(results)
        data = _read_results_file(path)
        if isinstance(data.get("metrics"), dict) and "stages" not in data:
            metrics = _float_metrics(data["metrics"])
            return RunResults(f"metrics from '{path}' (given with --results)", metrics, card_note=f"metrics from {path.name}", results_file=path, stage_dir=path.parent)
        match = _match_stage(data, checkpoint, path)
        if match is None:
            stages = sorted(data.get("stages") or {}) if isinstance(data.get("stages"), dict) else []
            raise ValueError(
                f"'{path}' has no stage for checkpoint '{checkpoint}' (stages: {stages}); give the stage's "
                "stage.json, or a file with a 'metrics' object"
            )
        return _run_results(data, match, path, given=True)
    searched = []
    folder = checkpoint.resolve().parent
    for _ in range(RESULTS_SEARCH_DEPTH):
        candidate = folder / RESULTS_FILE
        searched.append(str(folder))
        if candidate.is_file():
            try:
                data = _read_results_file(candidate)
            except ValueError:
                data = {}
            match = _match_stage(data, checkpoint, candidate)
            if match is not None:
                return _run_results(data, match, candidate, given=False)
        if folder.parent == folder:
            break
        folder = folder.parent
    return RunResults(
        f"no {RESULTS_FILE} with an entry for this checkpoint in {', '.join(repr(s) for s in searched)}: "
        "the model card has no metrics (pass --results FILE)",
        card_note=f"no {RESULTS_FILE} of a pipeline run was found for the exported checkpoint",
    )


def _run_results(data: dict[str, Any], match: tuple[str, dict[str, Any], bool], path: Path, given: bool) -> RunResults:
    stage, record, exact = match
    how = "given with --results" if given else "found next to the checkpoint"
    note = f"test metrics of stage '{stage}' from '{path}' ({how})"
    card_note = f"Test metrics of stage `{stage}`" + (f" of the recipe `{data['recipe']}`" if data.get("recipe") else "") + f", from the run's {path.name}"
    if not exact:
        evaluated = Path(str(record.get("checkpoint") or "?")).name
        note += f"; they were measured on the stage's {evaluated}, not on this file"
        card_note += f" (measured on the stage's {evaluated}, which is not the exported checkpoint)"
    stage_dir = path.parent / stage
    return RunResults(
        note, _float_metrics(record["metrics"]), card_note, path, stage, data.get("recipe"), stage_dir if stage_dir.is_dir() else None
    )


def read_stage_config(run: RunResults, checkpoint: Path) -> dict[str, Any]:
    """The stage's `config.yaml` (what the pipeline ran it with), or {} when there is none."""
    for folder in (run.stage_dir, stage_dir_of(checkpoint)):
        if folder is not None and (folder / "config.yaml").is_file():
            try:
                data = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def display_path(path: Any, workdir: Path | None) -> str:
    """A recorded local path as shown in the card: relative to the run's work directory, else its file name."""
    if not path:
        return "-"
    p = Path(str(path))
    if workdir is not None:
        try:
            return p.resolve().relative_to(workdir.resolve()).as_posix()
        except ValueError:
            pass
    return p.name
