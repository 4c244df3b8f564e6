"""What a pipeline run records: logger specs (W&B, CSV, TensorBoard), W&B run ids and groups, example
tables, and the JSON files of the work directory (`pipeline.json`, `stage.json`, `results.json`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOGGER_CHOICES = ("wandb", "csv", "tensorboard")
RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "mAP@10")


# ---------------------------------------------------------------------------------------------- metrics
def normalize_metrics(kind: str, metrics: dict[str, float]) -> dict[str, float]:
    """Test metrics under the names results.json uses.

    Retrieval: text-to-audio as `R@1 R@5 R@10 mAP@10`, audio-to-text as `a2t/R@1 ...`; captioning:
    aac-metrics' names (`bleu_1`, `cider_d`, `spider`, ...).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = key[len("test/") :] if key.startswith("test/") else key
        if kind in ("contrastive", "retrieval_ensemble") and name.startswith("t2a/"):
            name = name[len("t2a/") :]
        out[name] = float(value)
    return out


def format_results(results: dict[str, Any]) -> str:
    """A plain table of every stage's test metrics."""
    lines = [f"{'stage':<28} {'kind':<18} {'metric':<14} value"]
    for stage, info in results["stages"].items():
        for name, value in info["metrics"].items():
            lines.append(f"{stage:<28} {info['kind']:<18} {name:<14} {value:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files
def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is not there."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_json(path: Path, data: Any, *, ensure_ascii: bool = True) -> None:
    """`data` as indented JSON (the format of every file the pipeline writes)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=ensure_ascii), encoding="utf-8")


def pipeline_state(workdir: Path, recipe_name: str, recipe_path: Path) -> dict[str, Any]:
    """`DIR/pipeline.json`: the W&B group of this work directory, created once and kept across reruns."""
    path = workdir / "pipeline.json"
    state = read_json(path)
    if state is None:
        state = {"recipe": recipe_name, "group": f"{recipe_name}-{uuid.uuid4().hex[:8]}", "created": time.time()}
    state["recipe_path"] = str(recipe_path.resolve())
    write_json(path, state)
    return state


def wait_for_pipeline_state(workdir: Path, rank: int, timeout_s: float = 3600.0) -> dict[str, Any]:
    """`DIR/pipeline.json` once rank 0 has written it (the other ranks of a torchrun / SLURM launch)."""
    path = workdir / "pipeline.json"
    deadline = time.time() + timeout_s
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout_s:.0f} s for rank 0 to write '{path}'")
        time.sleep(1.0)
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- loggers
def wandb_mode() -> str:
    """`online` where the user set WANDB_MODE=online or has an API key (login), else WANDB_MODE or `offline`."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace"):
            return "online"
    except OSError:
        pass
    return "offline"


def architecture_tags(config: dict[str, Any]) -> list[str]:
    """Short tags naming the architecture of a stage (audio/text encoders, decoder)."""
    init = ((config.get("model") or {}).get("init_args") or {}) if isinstance(config.get("model"), dict) else {}
    tags = []
    for key in ("audio_encoder", "text_encoder", "decoder"):
        value = init.get(key)
        if isinstance(value, str) and value:
            # a local folder or hub id counts by its last part; W&B tags hold at most 64 characters
            tags.append(f"{key}:{Path(value).name or value}"[:64])
    return tags


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"a.b.c": value}` with plain values (what W&B's run config shows)."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten_config(value, f"{prefix}{key}." if prefix or key else ""))
        return out
    return {prefix.rstrip("."): config if isinstance(config, (int, float, str, bool, type(None))) else str(config)}


def wandb_run_id(stage_dir: Path, group: str, stage: str) -> str:
    """The stage's W&B run id, kept in `stage_dir/wandb_id.txt`: a resumed stage continues its own run."""
    id_file = stage_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else f"{group}-{stage}"[-64:]
    id_file.write_text(run_id)
    return run_id


def logger_specs(
    loggers: Sequence[str],
    stage_dir: Path,
    *,
    stage: str,
    kind: str,
    group: str,
    project: str,
    tags: Sequence[str],
) -> list[dict[str, Any]]:
    """The stage's loggers as LightningCLI `class_path` / `init_args` entries, writing under `stage_dir`.

    W&B: one run per stage, grouped by the work directory's pipeline run (`group`), with the stage's
    kind as job type; a resumed stage continues its own run (same id).
    """
    out = str(stage_dir)
    specs: list[dict[str, Any]] = []
    if "csv" in loggers:
        specs.append({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": out, "name": "logs"}})
    if "tensorboard" in loggers:
        specs.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": out, "name": "tensorboard"}})
    if "wandb" in loggers:
        init_args = {
            "project": project,
            "name": stage,
            "group": group,
            "job_type": kind,
            "tags": list(tags),
            "save_dir": out,
            "id": wandb_run_id(stage_dir, group, stage),
            "resume": "allow",
            "mode": wandb_mode(),
        }
        specs.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args})
    return specs


def instantiate(spec: dict[str, Any]) -> Any:
    """The object a `class_path` / `init_args` spec names."""
    from aac_lightning.config import import_class

    return import_class(spec["class_path"])(**spec["init_args"])


def update_wandb_config(loggers: Sequence[Any], values: dict[str, Any]) -> None:
    """Add `values` to the run config of the W&B loggers among `loggers`."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(values, allow_val_change=True)


def log_tables(loggers: Sequence[Any], examples: dict[str, Any]) -> None:
    """Examples as W&B tables, so runs compare side by side on the dashboard."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        if "captions" in examples:
            data = [[r["file"], r["predicted"], " | ".join(r["references"])] for r in examples["captions"]]
            logger.log_table("test/sample_captions", columns=["file", "predicted", "references"], data=data)
        if "retrieval" in examples:
            data = [[r["query"], r["target"], k + 1, e["file"], e["score"], e["correct"]] for r in examples["retrieval"] for k, e in enumerate(r["ranked"])]
            logger.log_table("test/retrieval_examples", columns=["query", "target", "rank", "file", "score", "correct"], data=data)


def finish_loggers(loggers: Sequence[Any]) -> None:
    """Finalize the stage's loggers and close its W&B run, so the next stage starts its own run in the same process."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        logger.finalize("success")
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
