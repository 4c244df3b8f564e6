"""`aac-lightning demo`: the contrastive stages end to end on the synthetic dataset, offline, on a CPU.

Stages: synthetic data (if absent) -> contrastive pre-training -> fine-tuning from the pre-training
checkpoint (weights only) -> XE captioning on the frozen audio encoder of the fine-tuned checkpoint ->
SCST from the XE checkpoint; each stage's best checkpoint is tested on the held-out evaluation subset.
The stage configs are `conf/demo/*.yaml`, whose paths under `demo_workdir/` are moved to `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "demo"
STAGES = {"contrastive_pretrain": "contrastive", "contrastive_finetune": "contrastive", "xe": "xe", "scst": "scst"}
PLACEHOLDER = "demo_workdir"


def _relocate(value: Any, workdir: str) -> Any:
    """Replace the `demo_workdir` prefix of every path in a config by `workdir`."""
    if isinstance(value, dict):
        return {k: _relocate(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, workdir) for v in value]
    if isinstance(value, str) and (value == PLACEHOLDER or value.startswith(PLACEHOLDER + "/")):
        return workdir + value[len(PLACEHOLDER) :]
    return value


def stage_config(stage: str, workdir: Path, conf_dir: Path = CONF_DIR) -> Path:
    """Write the stage's config with its paths moved under `workdir`; returns the written file."""
    source = conf_dir / f"{stage}.yaml"
    config = _relocate(yaml.safe_load(source.read_text(encoding="utf-8")), str(workdir))
    out = workdir / "configs" / f"{stage}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


def run_stage(config: Path, extra_args: Sequence[str] = ()) -> tuple[dict[str, float], Any]:
    """Fit one stage through LightningCLI, then test its best checkpoint; returns the test metrics and the module."""
    from aac_lightning.cli import build_lightning_cli

    cli = build_lightning_cli(["--config", str(config), *extra_args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return {k: float(v) for k, v in (results[0] if results else {}).items()}, cli.model


def demo_command(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="aac-lightning demo",
        description="Run the demo on the synthetic dataset (offline, CPU): contrastive pre-training, "
        "fine-tuning, and retrieval evaluation. Results go to WORKDIR/results.json.",
    )
    parser.add_argument("--workdir", default="demo_workdir", help="output folder (default: demo_workdir)")
    parser.add_argument("--clips", type=int, default=400, help="synthetic clips to generate if the data is absent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--fast", action="store_true", help="one short epoch per stage (a smoke run)")
    ns = parser.parse_args(args)

    from aac_lightning.data.synth import write_synthetic_clotho

    workdir = Path(ns.workdir)
    data_dir = workdir / "data"
    if not (data_dir / "CLOTHO_v2.1").is_dir():
        print(f"writing {ns.clips} synthetic clips to {data_dir} ...")
        write_synthetic_clotho(data_dir, n_clips=ns.clips, seed=ns.seed)
    extra = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"] if ns.fast else []
    started = time.time()
    results: dict[str, Any] = {"stages": {}}
    samples: list = []
    for stage, kind in STAGES.items():
        config = stage_config(stage, workdir)
        print(f"\n=== stage {stage} ({config})")
        metrics, module = run_stage(config, extra)
        ckpt_dir = workdir / "runs" / stage / "checkpoints"
        results["stages"][stage] = {"kind": kind, "checkpoint": str(ckpt_dir / "last.ckpt"), "metrics": metrics}
        samples = getattr(module, "test_captions", None) or samples
    results["seconds"] = round(time.time() - started, 1)
    (workdir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\n" + format_results(results))
    for fname, caption, references in list(samples)[:5]:
        print(f"\n{fname}\n  predicted: {caption}\n  reference: {references[0]}")
    print(f"results written to {workdir / 'results.json'}")


def format_results(results: dict[str, Any]) -> str:
    """A plain table of every stage's test metrics."""
    lines = [f"{'stage':<24} {'metric':<22} value"]
    for stage, info in results["stages"].items():
        for name, value in sorted(info["metrics"].items()):
            lines.append(f"{stage:<24} {name:<22} {value:.4f}")
    return "\n".join(lines)
