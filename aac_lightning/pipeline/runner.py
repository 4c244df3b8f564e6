"""`PipelineRunner`: runs a recipe's stages in order in a work directory, hands checkpoints on, skips
finished stages, resumes an interrupted one, and gathers the results (see the package docstring).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from aac_lightning.pipeline.recipe import TRAINING_KINDS, Stage, load_recipe
from aac_lightning.pipeline.tracking import (
    LOGGER_CHOICES,
    RETRIEVAL_METRICS,
    architecture_tags,
    finish_loggers,
    flatten_config,
    format_results,
    instantiate,
    log_tables,
    logger_specs,
    normalize_metrics,
    pipeline_state,
    read_json,
    update_wandb_config,
    wait_for_pipeline_state,
    write_json,
)
from aac_lightning.utils.distributed import barrier, is_launcher_rank_zero, launcher_rank


class PipelineRunner:
    """Runs a recipe in a work directory; see the package docstring.

    Args:
        recipe: path of the recipe YAML.
        workdir: output folder (created).
        overrides: LightningCLI arguments given to every training stage (e.g. `--trainer.devices=4`).
        loggers: any of `wandb`, `csv`, `tensorboard` (the CSV log is also what the notebooks read).
        wandb_project: W&B project of the stage runs.
        examples: sample captions / retrieval queries kept per test set (examples.json, W&B tables).
        variables: values of the recipe's `variables` (e.g. data folders).
    """

    def __init__(
        self,
        recipe: str | Path,
        workdir: str | Path,
        overrides: Sequence[str] = (),
        loggers: Sequence[str] = ("wandb", "csv"),
        wandb_project: str = "aac_lightning",
        examples: int = 8,
        variables: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.recipe = load_recipe(recipe, self.workdir, variables)
        bad = [name for name in loggers if name not in LOGGER_CHOICES]
        if bad:
            raise ValueError(f"unknown logger(s) {bad}; choose from {list(LOGGER_CHOICES)}")
        self.overrides = list(overrides)
        self.loggers = list(loggers)
        self.wandb_project = wandb_project
        self.examples = examples

    # ------------------------------------------------------------------ bookkeeping
    def stage_dir(self, name: str) -> Path:
        """`DIR/<name>/`, where the stage writes everything."""
        return self.workdir / name

    def stage_record(self, name: str) -> dict[str, Any] | None:
        """The `stage.json` of a finished stage, else None."""
        return read_json(self.stage_dir(name) / "stage.json")

    def handoff_checkpoint(self, source: str) -> Path:
        """The checkpoint a handoff `<stage>` or `<stage>:best|last|averaged` names (the stage must have finished)."""
        name, _, which = source.partition(":")
        record = self.stage_record(name)
        if record is None:
            raise RuntimeError(f"stage '{name}' has not finished: its checkpoint cannot be handed on")
        # Without a choice: the stage's own checkpoint (averaged.ckpt where the stage averages weights, else best.ckpt).
        path = Path(record["checkpoint"]) if not which else self.stage_dir(name) / f"{which}.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"handoff checkpoint '{path}' of stage '{name}' is missing")
        return path

    def results(self) -> dict[str, Any]:
        """`{"stages": {name: {"kind", "checkpoint", "metrics"}}}` of the finished stages, in recipe order."""
        stages = {}
        for stage in self.recipe.stages:
            record = self.stage_record(stage.name)
            if record is not None:
                stages[stage.name] = {k: record[k] for k in ("kind", "checkpoint", "metrics")}
                if record.get("unavailable_metrics"):  # metrics that could not run, with the reason (never 0)
                    stages[stage.name]["unavailable_metrics"] = record["unavailable_metrics"]
        return {"recipe": self.recipe.name, "workdir": str(self.workdir), "stages": stages}

    # ------------------------------------------------------------------ running
    def check(self):
        """Every input the unfinished stages need (data, weights, text encoders, handoffs, Java, disk): a
        `PreflightReport` (`report.ok`, `report.format_table()`); see :mod:`aac_lightning.pipeline.check`."""
        from aac_lightning.pipeline.check import recipe_report

        return recipe_report(self)

    def run(self, check: bool = True) -> dict[str, Any]:
        """Run every unfinished stage in order; returns (and writes) `DIR/results.json`.

        With `check` (default), `check()` runs first, on every rank, and a missing input stops the run
        before the first stage with a `PreflightError` whose message is the table of every requirement.
        Then (always) every output folder of the unfinished stages is created and probed for writing
        (`aac_lightning.pipeline.check.preflight_output_dirs`): an `OutputDirError` names the first
        that fails, before anything trains.
        """
        from aac_lightning.pipeline.check import preflight_output_dirs

        if check:
            self.check().raise_if_missing()
        # Every folder any unfinished stage writes (test and ensemble stages included), before the first starts.
        preflight_output_dirs(self)
        # Under DDP the launcher re-runs this command on every rank: the files that rank 0 writes
        # here exist before the other ranks start, at the first stage's `trainer.fit`.
        # Launched by torchrun / SLURM, all ranks start together: the others wait for rank 0's files.
        if is_launcher_rank_zero():
            self._write_synthetic_data()
            state = pipeline_state(self.workdir, self.recipe.name, self.recipe.path)
        else:
            state = wait_for_pipeline_state(self.workdir, launcher_rank())
        for stage in self.recipe.stages:
            if self.stage_record(stage.name) is not None:
                print(f"=== stage {stage.name}: finished earlier, skipped ({self.stage_dir(stage.name) / 'stage.json'})")
                continue
            print(f"\n=== stage {stage.name} ({stage.kind})")
            started = time.time()
            if stage.kind in TRAINING_KINDS:
                record = self._run_training(stage, state["group"])
            else:
                record = self._run_ensemble(stage) if is_launcher_rank_zero() else None
            if is_launcher_rank_zero():
                record["seconds"] = round(time.time() - started, 1)
                record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                write_json(self.stage_dir(stage.name) / "stage.json", record)
                self._write_results()
            barrier()  # under DDP, the other ranks take the handoff only once stage.json exists
        results = self.results()
        if is_launcher_rank_zero():
            self._write_results()
            print("\n" + format_results(results))
        return results

    def _write_results(self) -> dict[str, Any]:
        results = self.results()
        write_json(self.workdir / "results.json", results)
        return results

    def _write_synthetic_data(self) -> None:
        spec = self.recipe.synthetic_data
        if spec is None:
            return
        from aac_lightning.data.synth import write_synthetic_clotho

        out = Path(spec["dir"])
        if (out / "CLOTHO_v2.1").is_dir():
            return
        clips = int(spec.get("clips", 400))
        print(f"writing {clips} synthetic clips to {out} ...")
        # Written into a temporary folder and renamed, so an interrupted write is never taken as data.
        tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_clotho(tmp, n_clips=clips, seed=int(spec.get("seed", 0)), sample_rate=int(spec.get("sample_rate", 32000)))
        out.mkdir(parents=True, exist_ok=True)
        for child in tmp.iterdir():
            child.rename(out / child.name)
        tmp.rmdir()

    def _cli_args(self, stage: Stage) -> list[str]:
        args: list[str] = []
        for config in stage.configs:
            args += ["--config", str(config)]
        for key, value in stage.set.items():
            args.append(f"--{key}={_cli_value(value)}")
        for key, source in stage.handoff.items():
            args.append(f"--{key}={self.handoff_checkpoint(source)}")
        args.append(f"--trainer.default_root_dir={self.stage_dir(stage.name)}")
        return args + self.overrides

    def _run_training(self, stage: Stage, group: str) -> dict[str, Any]:
        from aac_lightning.callbacks import EpochWeightAveraging, LatestCheckpoint
        from aac_lightning.lightning_cli import build_lightning_cli
        from aac_lightning.utils.preflight import preflight_trainer_outputs

        out = self.stage_dir(stage.name)
        out.mkdir(parents=True, exist_ok=True)
        cli = build_lightning_cli(self._cli_args(stage), run=False)
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_check=True))
        tags = [self.recipe.name, stage.kind, *architecture_tags(config), *stage.tags]
        specs = logger_specs(self.loggers, out, stage=stage.name, kind=stage.kind, group=group, project=self.wandb_project, tags=tags)
        # config.yaml records what the stage runs with, and reruns alone with `aac-lightning fit --config`.
        config["trainer"]["logger"] = specs
        config["trainer"]["callbacks"] = stage_callback_specs(config["trainer"].get("callbacks"), out / "checkpoints")
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

        # The pipeline owns where a stage writes: its checkpoints and logs go under DIR/<stage>/.
        # The config's monitored ModelCheckpoints keep the best epochs; `LatestCheckpoint` writes
        # `last.ckpt` after every epoch, which is what an interrupted stage resumes from.
        for callback in list(trainer.checkpoint_callbacks):
            if callback.monitor is None:  # an unmonitored one would only duplicate last.ckpt
                trainer.callbacks.remove(callback)
            else:
                callback.dirpath, callback.save_last = str(out / "checkpoints"), False
        monitored = list(trainer.checkpoint_callbacks)
        trainer.callbacks.append(LatestCheckpoint(out / "checkpoints"))
        trainer.loggers = [instantiate(spec) for spec in specs]
        update_wandb_config(trainer.loggers, {"stage": stage.name, "recipe": self.recipe.name, **flatten_config(config)})
        preflight_trainer_outputs(trainer)

        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"resuming stage {stage.name} from {last}")
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)

        best_path = Path(monitored[0].best_model_path) if monitored and monitored[0].best_model_path else last
        # A stage that averages its last epochs' weights (the SJTU captioners) hands on the average.
        averaged = next((cb.averaged_path for cb in trainer.callbacks if isinstance(cb, EpochWeightAveraging)), None)
        if trainer.is_global_zero:
            _link_or_copy(last, out / "last.ckpt")
            _link_or_copy(best_path, out / "best.ckpt")
            if averaged is not None:
                _link_or_copy(Path(averaged), out / "averaged.ckpt")
        trainer.strategy.barrier("pipeline-links")
        checkpoint = out / ("averaged.ckpt" if averaged is not None else "best.ckpt")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=str(checkpoint))
        metrics = normalize_metrics(stage.kind, results[0] if results else {})
        examples = self._examples(stage, model, datamodule) if trainer.is_global_zero else None
        if examples is not None:
            write_json(out / "examples.json", examples, ensure_ascii=False)
            log_tables(trainer.loggers, examples)
        finish_loggers(trainer.loggers)
        return {"kind": stage.kind, "checkpoint": str(checkpoint), "last": str(out / "last.ckpt"), "metrics": metrics,
                "unavailable_metrics": dict(getattr(model, "test_unavailable_metrics", None) or {})}

    def _examples(self, stage: Stage, model, datamodule) -> dict[str, Any] | None:
        """Sample captions (captioners) or top-5 retrieved files for a few captions (bi-encoders)."""
        if self.examples <= 0:
            return None
        if stage.kind in ("xe", "scst"):
            rows = [
                {"file": fname, "predicted": caption, "references": list(refs)}
                for fname, caption, refs in (getattr(model, "test_captions", None) or [])[: self.examples]
            ]
            return {"captions": rows}
        from aac_lightning.ensembles import RetrievalEnsemble

        records = datamodule.clips("test").records
        ensemble = RetrievalEnsemble([model.model], [stage.name], device=model.device)
        queries = [r.captions[0] for r in records[: self.examples]]
        sim = ensemble.score(queries, [r.path for r in records])  # (Q, A)
        return {"retrieval": retrieval_rows(queries, records[: self.examples], records, sim)}

    def _run_ensemble(self, stage: Stage) -> dict[str, Any]:
        """Evaluate the members together on `stage.clotho_root`; writes `metrics.json` and the DCASE `submission.csv`."""
        out = self.stage_dir(stage.name)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints = [str(self.handoff_checkpoint(member)) for member in stage.members]
        if stage.kind == "retrieval_ensemble":
            from aac_lightning.ensembles import evaluate_retrieval_ensemble, rank_from_similarity
            from aac_lightning.metrics.dcase import DCASE_NUM_RANKED, write_dcase_retrieval_csv

            result = evaluate_retrieval_ensemble(checkpoints, stage.clotho_root, stage.subset, relevance=stage.relevance)
            report = {key: result[key] for key in ("checkpoints", "clotho_root", "subset", "num_audio", "num_queries", "metrics")}
            (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            ranked, _ = rank_from_similarity(result["similarity"], result["fnames"], DCASE_NUM_RANKED)
            write_dcase_retrieval_csv(out / "submission.csv", result["captions"], ranked)
            metrics = {name: result["metrics"]["t2a"][name] for name in RETRIEVAL_METRICS}
            metrics.update({f"a2t/{name}": result["metrics"]["a2t"][name] for name in RETRIEVAL_METRICS})
            metrics.update({f"dcase2025/{name}": value for name, value in result["metrics"].get("dcase2025", {}).items()})
        else:
            from aac_lightning.ensembles import evaluate_caption_ensemble
            from aac_lightning.metrics.captioning import write_dcase_captioning_csv

            result = evaluate_caption_ensemble(checkpoints, stage.clotho_root, stage.subset, metrics=stage.metrics)
            write_json(out / "metrics.json", {"checkpoints": result["checkpoints"], "subset": stage.subset, "metrics": result["metrics"]})
            rows = result["captions"]
            write_dcase_captioning_csv(out / "submission.csv", [fname for fname, _, _ in rows], [caption for _, caption, _ in rows])
            metrics = result["metrics"]
        return {"kind": stage.kind, "checkpoint": None, "members": checkpoints, "metrics": normalize_metrics(stage.kind, metrics),
                "unavailable_metrics": dict(result.get("unavailable") or {})}


# ---------------------------------------------------------------------------------------------- helpers
def trainer_overrides(args: Sequence[str]) -> list[str]:
    """LightningCLI overrides as `--key=value`: `["--a", "1", "--b=2"]` -> `["--a=1", "--b=2"]`.

    Raises ValueError naming the first argument that is not an override or has no value.
    """
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --trainer.devices=2")
        if "=" in arg:
            overrides.append(arg)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            overrides.append(f"{arg}={args[i + 1]}")
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value")
        i += 1
    return overrides


def _cli_value(value: Any) -> str:
    """A value as jsonargparse reads it from the command line (JSON, which is YAML, for non-strings)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes a hard link to `source` (a copy where links are not possible)."""
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _is_model_checkpoint(spec: Any) -> bool:
    return isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("ModelCheckpoint")


def stage_callback_specs(specs: Any, checkpoint_dir: Path) -> list[Any]:
    """The config's callbacks as the pipeline runs them (mirrors what `_run_training` does to the trainer)."""
    out = []
    for spec in specs or []:
        if isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("LatestCheckpoint"):
            continue  # replaced by the pipeline's own, in the stage folder
        if _is_model_checkpoint(spec):
            init_args = dict(spec.get("init_args") or {})
            if not init_args.get("monitor"):
                continue
            spec = {**spec, "init_args": {**init_args, "dirpath": str(checkpoint_dir), "save_last": False}}
        out.append(spec)
    return out + [{"class_path": "aac_lightning.callbacks.LatestCheckpoint", "init_args": {"dirpath": str(checkpoint_dir)}}]


def retrieval_rows(queries: Sequence[str], query_records: Sequence[Any], records: Sequence[Any], sim) -> list[dict[str, Any]]:
    """examples.json rows of a retrieval stage: each query's top-5 files with scores, the target marked."""
    rows = []
    top = sim.topk(min(5, sim.shape[1]), dim=1)
    for q, (query, record) in enumerate(zip(queries, query_records)):
        ranked = [(records[int(i)].fname, float(s)) for s, i in zip(top.values[q], top.indices[q])]
        rows.append({"query": query, "target": record.fname, "ranked": [{"file": f, "score": round(s, 4), "correct": f == record.fname} for f, s in ranked]})
    return rows
