"""`aac-lightning pipeline RECIPE --workdir DIR`: run a multi-stage recipe (`stages/*.yaml`), resumably.

A recipe lists stages in order. A training stage names its LightningCLI configs (merged in order),
values to set, and which earlier stage's checkpoint feeds which init argument (`handoff`); an
ensemble stage names earlier stages whose checkpoints it evaluates together. Every stage writes
under `DIR/<stage>/`:

    config.yaml          the merged config the stage ran with (LightningCLI's own format)
    checkpoints/         ModelCheckpoint's files (best-*.ckpt, last.ckpt)
    best.ckpt last.ckpt  the checkpoints later stages and users take (hard links when possible)
    averaged.ckpt        where the stage averages its last epochs (`EpochWeightAveraging`): the mean
                         weights, which are then the stage's checkpoint (tested, handed on)
    logs/                CSV (and TensorBoard) logs; wandb/ holds the W&B run files
    examples.json        sample captions or retrieval examples of the test set
    stage.json           written last: kind, checkpoint, test metrics; its presence marks the stage done

A rerun skips stages with a `stage.json` and resumes an interrupted one from its `last.ckpt`
(optimizer, schedule and loop state included). `DIR/results.json` gathers every finished stage.

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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

TRAINING_KINDS = ("contrastive", "xe", "scst")
ENSEMBLE_KINDS = ("retrieval_ensemble", "caption_ensemble")
KIND_BY_CLASS = {"ContrastiveRetrieval": "contrastive", "CaptioningXE": "xe", "CaptioningSCST": "scst"}
LOGGER_CHOICES = ("wandb", "csv", "tensorboard")
HANDOFF_CHOICES = ("best", "last", "averaged")
STAGE_KEYS = {"name", "kind", "configs", "set", "handoff", "members", "clotho_root", "subset", "tags", "description"}
RECIPE_KEYS = {"name", "description", "variables", "synthetic_data", "stages"}
SYNTH_KEYS = {"dir", "clips", "seed", "sample_rate"}
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "mAP@10")


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


# ---------------------------------------------------------------------------------------------- recipe
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


def _config_kind(configs: Sequence[Path]) -> str | None:
    """The stage kind implied by the last `model.class_path` among the configs."""
    kind = None
    for path in configs:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        class_path = ((data.get("model") or {}) if isinstance(data, dict) else {}).get("class_path")
        if class_path:
            kind = KIND_BY_CLASS.get(str(class_path).rpartition(".")[2], kind)
    return kind


def load_recipe(path: str | Path, workdir: str | Path, variables: dict[str, str] | None = None) -> Recipe:
    """Read and check a recipe. Errors name the file, the stage and the field.

    `${workdir}` becomes the absolute `workdir`, `${recipe_dir}` the recipe's folder, and `${NAME}` a
    value of the recipe's `variables:` mapping, which `variables` (e.g. from `--var NAME=VALUE`) overrides.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe '{path}' not found")
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
    stages: list[Stage] = []
    for index, entry in enumerate(stages_raw):
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
        if any(s.name == name for s in stages):
            raise RecipeError(f"{where}: the name is used twice")
        earlier = {s.name: s for s in stages}
        configs = entry.get("configs") or []
        if isinstance(configs, str):
            configs = [configs]
        config_paths = [(path.parent / c).resolve() for c in configs]
        for c in config_paths:
            if not c.is_file():
                raise RecipeError(f"{where}: config '{c}' not found")
        kind = entry.get("kind") or (_config_kind(config_paths) if config_paths else None)
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
            tags=[str(t) for t in entry.get("tags") or []],
            description=str(entry.get("description") or ""),
        )
        if kind in TRAINING_KINDS:
            if not config_paths:
                raise RecipeError(f"{where}: a training stage needs 'configs'")
            if stage.members or stage.clotho_root:
                raise RecipeError(f"{where}: 'members' and 'clotho_root' belong to ensemble stages")
            for key, source in stage.handoff.items():
                source_name = source.split(":")[0]
                if source_name not in earlier:
                    raise RecipeError(f"{where}: handoff '{key}' names '{source}', which is not an earlier stage ({sorted(earlier)})")
                if source.count(":") > 1 or (":" in source and source.split(":")[1] not in HANDOFF_CHOICES):
                    raise RecipeError(
                        f"{where}: handoff '{key}': use '<stage>' or '<stage>:best', '<stage>:last' or '<stage>:averaged', got {source!r}"
                    )
        else:
            if not stage.members:
                raise RecipeError(f"{where}: an ensemble stage needs 'members' (earlier stage names)")
            for member in stage.members:
                if member not in earlier or earlier[member].kind not in TRAINING_KINDS:
                    raise RecipeError(f"{where}: member '{member}' is not an earlier training stage")
                wanted = ("contrastive",) if kind == "retrieval_ensemble" else ("xe", "scst")
                if earlier[member].kind not in wanted:
                    raise RecipeError(f"{where}: member '{member}' is a {earlier[member].kind} stage; a {kind} takes {list(wanted)}")
            if not stage.clotho_root:
                raise RecipeError(f"{where}: an ensemble stage needs 'clotho_root' (the data to evaluate on)")
        stages.append(stage)
    return Recipe(
        name=str(raw.get("name") or path.stem),
        path=path,
        stages=stages,
        description=str(raw.get("description") or ""),
        synthetic_data=synthetic,
    )


# ---------------------------------------------------------------------------------------------- helpers
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


def _architecture_tags(config: dict[str, Any]) -> list[str]:
    """Short tags naming the architecture of a stage (audio/text encoders, decoder)."""
    init = ((config.get("model") or {}).get("init_args") or {}) if isinstance(config.get("model"), dict) else {}
    tags = []
    for key in ("audio_encoder", "text_encoder", "decoder"):
        value = init.get(key)
        if isinstance(value, str) and value:
            # a local folder or hub id counts by its last part; W&B tags hold at most 64 characters
            tags.append(f"{key}:{Path(value).name or value}"[:64])
    return tags


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}." if prefix or key else ""))
        return out
    return {prefix.rstrip("."): config if isinstance(config, (int, float, str, bool, type(None))) else str(config)}


# ---------------------------------------------------------------------------------------------- runner
class PipelineRunner:
    """Runs a recipe in a work directory; see the module docstring.

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
        return self.workdir / name

    def stage_record(self, name: str) -> dict[str, Any] | None:
        """The `stage.json` of a finished stage, else None."""
        path = self.stage_dir(name) / "stage.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _pipeline_state(self) -> dict[str, Any]:
        """`DIR/pipeline.json`: the W&B group of this work directory, kept across reruns."""
        path = self.workdir / "pipeline.json"
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
        else:
            state = {"recipe": self.recipe.name, "group": f"{self.recipe.name}-{uuid.uuid4().hex[:8]}", "created": time.time()}
        state["recipe_path"] = str(self.recipe.path.resolve())
        path.write_text(json.dumps(state, indent=2), encoding="utf-8")
        return state

    def _wait_for_pipeline_state(self, timeout_s: float = 3600.0) -> dict[str, Any]:
        path = self.workdir / "pipeline.json"
        deadline = time.time() + timeout_s
        while not path.is_file():
            if time.time() > deadline:
                raise TimeoutError(f"rank {_rank()} waited {timeout_s:.0f} s for rank 0 to write '{path}'")
            time.sleep(1.0)
        return json.loads(path.read_text(encoding="utf-8"))

    def handoff_checkpoint(self, source: str) -> Path:
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
        return {"recipe": self.recipe.name, "workdir": str(self.workdir), "stages": stages}

    # ------------------------------------------------------------------ running
    def run(self) -> dict[str, Any]:
        """Run every unfinished stage in order; returns (and writes) `DIR/results.json`."""
        from aac_lightning.utils.preflight import check_output_dir

        self.workdir.mkdir(parents=True, exist_ok=True)
        check_output_dir(self.workdir)
        # Under DDP the launcher re-runs this command on every rank: the files that rank 0 writes
        # here exist before the other ranks start, at the first stage's `trainer.fit`.
        # Launched by torchrun / SLURM, all ranks start together: the others wait for rank 0's files.
        if _is_rank_zero():
            self._write_synthetic_data()
            state = self._pipeline_state()
        else:
            state = self._wait_for_pipeline_state()
        for stage in self.recipe.stages:
            if self.stage_record(stage.name) is not None:
                print(f"=== stage {stage.name}: finished earlier, skipped ({self.stage_dir(stage.name) / 'stage.json'})")
                continue
            print(f"\n=== stage {stage.name} ({stage.kind})")
            started = time.time()
            if stage.kind in TRAINING_KINDS:
                record = self._run_training(stage, state["group"])
            else:
                record = self._run_ensemble(stage) if _is_rank_zero() else None
            if _is_rank_zero():
                record["seconds"] = round(time.time() - started, 1)
                record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                (self.stage_dir(stage.name) / "stage.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
                self._write_results()
            _barrier()  # under DDP, the other ranks take the handoff only once stage.json exists
        results = self.results()
        if _is_rank_zero():
            self._write_results()
            print("\n" + format_results(results))
        return results

    def _write_results(self) -> dict[str, Any]:
        results = self.results()
        (self.workdir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
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

    def _logger_specs(self, stage: Stage, group: str, config: dict[str, Any]) -> list[dict[str, Any]]:
        """The stage's loggers as LightningCLI `class_path` / `init_args` entries."""
        out = str(self.stage_dir(stage.name))
        specs: list[dict[str, Any]] = []
        if "csv" in self.loggers:
            specs.append({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": out, "name": "logs"}})
        if "tensorboard" in self.loggers:
            specs.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": out, "name": "tensorboard"}})
        if "wandb" in self.loggers:
            # One W&B run per stage, grouped by the work directory's pipeline run; a resumed stage
            # continues its own run (same id).
            id_file = self.stage_dir(stage.name) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else f"{group}-{stage.name}"[-64:]
            id_file.write_text(run_id)
            init_args = {
                "project": self.wandb_project,
                "name": stage.name,
                "group": group,
                "job_type": stage.kind,
                "tags": [self.recipe.name, stage.kind, *_architecture_tags(config), *stage.tags],
                "save_dir": out,
                "id": run_id,
                "resume": "allow",
                "mode": wandb_mode(),
            }
            specs.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args})
        return specs

    def _run_training(self, stage: Stage, group: str) -> dict[str, Any]:
        from aac_lightning.callbacks import EpochWeightAveraging, LatestCheckpoint
        from aac_lightning.lightning_cli import build_lightning_cli
        from aac_lightning.utils.preflight import preflight_trainer_outputs

        out = self.stage_dir(stage.name)
        out.mkdir(parents=True, exist_ok=True)
        cli = build_lightning_cli(self._cli_args(stage), run=False)
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_check=True))
        logger_specs = self._logger_specs(stage, group, config)
        # config.yaml records what the stage runs with, and reruns alone with `aac-lightning fit --config`.
        config["trainer"]["logger"] = logger_specs
        config["trainer"]["callbacks"] = _pipeline_callback_specs(config["trainer"].get("callbacks"), out / "checkpoints")
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
        trainer.loggers = [_instantiate(spec) for spec in logger_specs]
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update({"stage": stage.name, "recipe": self.recipe.name, **_flatten(config)}, allow_val_change=True)
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
            (out / "examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False), encoding="utf-8")
            _log_tables(trainer.loggers, examples)
        for logger in trainer.loggers:
            logger.finalize("success")
        _finish_wandb(trainer.loggers)
        return {"kind": stage.kind, "checkpoint": str(checkpoint), "last": str(out / "last.ckpt"), "metrics": metrics}

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
        from aac_lightning.retrieval_ensemble import RetrievalEnsemble

        records = datamodule.clips("test").records
        ensemble = RetrievalEnsemble([model.model], [stage.name], device=model.device)
        queries = [r.captions[0] for r in records[: self.examples]]
        sim = ensemble.score(queries, [r.path for r in records])  # (Q, A)
        return {"retrieval": _retrieval_rows(queries, records[: self.examples], records, sim)}

    def _run_ensemble(self, stage: Stage) -> dict[str, Any]:
        out = self.stage_dir(stage.name)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints = [str(self.handoff_checkpoint(member)) for member in stage.members]
        metrics_file = out / "metrics.json"
        if stage.kind == "retrieval_ensemble":
            from aac_lightning.retrieval_ensemble import retrieval_eval_command

            retrieval_eval_command([*checkpoints, "--clotho-root", stage.clotho_root, "--subset", stage.subset, "--out", str(metrics_file), "--csv", str(out / "submission.csv")])
            report = json.loads(metrics_file.read_text(encoding="utf-8"))["metrics"]
            metrics = {name: report["t2a"][name] for name in RETRIEVAL_METRICS}
            metrics.update({f"a2t/{name}": report["a2t"][name] for name in RETRIEVAL_METRICS})
        else:
            from aac_lightning.captioning_ensemble import caption_eval_command

            caption_eval_command([*checkpoints, "--clotho-root", stage.clotho_root, "--subset", stage.subset, "--out", str(metrics_file), "--csv", str(out / "submission.csv")])
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))["metrics"]
        return {"kind": stage.kind, "checkpoint": None, "members": checkpoints, "metrics": normalize_metrics(stage.kind, metrics)}


def _is_model_checkpoint(spec: Any) -> bool:
    return isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("ModelCheckpoint")


def _pipeline_callback_specs(specs: Any, checkpoint_dir: Path) -> list[Any]:
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


def _rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def _is_rank_zero() -> bool:
    """Rank 0 of a distributed run (or a single process): the one that writes the pipeline's files."""
    return _rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _instantiate(spec: dict[str, Any]) -> Any:
    from aac_lightning.config import import_class

    return import_class(spec["class_path"])(**spec["init_args"])


def _retrieval_rows(queries: Sequence[str], query_records: Sequence[Any], records: Sequence[Any], sim) -> list[dict[str, Any]]:
    rows = []
    top = sim.topk(min(5, sim.shape[1]), dim=1)
    for q, (query, record) in enumerate(zip(queries, query_records)):
        ranked = [(records[int(i)].fname, float(s)) for s, i in zip(top.values[q], top.indices[q])]
        rows.append({"query": query, "target": record.fname, "ranked": [{"file": f, "score": round(s, 4), "correct": f == record.fname} for f, s in ranked]})
    return rows


def _log_tables(loggers: Sequence[Any], examples: dict[str, Any]) -> None:
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


def _finish_wandb(loggers: Sequence[Any]) -> None:
    """Close the stage's W&B run, so the next stage starts its own run in the same process."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def format_results(results: dict[str, Any]) -> str:
    """A plain table of every stage's test metrics."""
    lines = [f"{'stage':<28} {'kind':<18} {'metric':<14} value"]
    for stage, info in results["stages"].items():
        for name, value in info["metrics"].items():
            lines.append(f"{stage:<28} {info['kind']:<18} {name:<14} {value:.4f}")
    return "\n".join(lines)


def build_parser(prog: str = "aac-lightning pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a multi-stage recipe (stages/*.yaml): each stage's checkpoints, config, logs and "
        "test metrics go to WORKDIR/<stage>/, and WORKDIR/results.json gathers them. Rerunning skips "
        "finished stages and resumes an interrupted one from its last checkpoint. Any other "
        "'--key=value' argument (e.g. --trainer.devices=4 --trainer.precision=bf16-mixed) is passed to "
        "every training stage.",
    )
    parser.add_argument("recipe", help="recipe YAML (e.g. stages/sjtu_retrieval.yaml)")
    parser.add_argument("--workdir", required=True, help="output folder of the run")
    parser.add_argument(
        "--loggers", default="wandb,csv", help="comma-separated from wandb, csv, tensorboard (default wandb,csv; W&B is offline unless logged in or WANDB_MODE=online)"
    )
    parser.add_argument("--wandb-project", default="aac_lightning", help="W&B project (default aac_lightning)")
    parser.add_argument("--examples", type=int, default=8, help="test examples kept per stage (default 8)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a recipe variable, e.g. --var data_root=/data (repeatable)")
    return parser


def parse_variables(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """`["a=1", "b=2"]` -> `{"a": "1", "b": "2"}`."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--var takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def parse_overrides(parser: argparse.ArgumentParser, args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the pipeline's options; the rest must be LightningCLI `--key=value` / `--key value` overrides."""
    ns, rest = parser.parse_known_args(list(args))
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            parser.error(f"unexpected argument {arg!r}: overrides look like --trainer.devices=2")
        if "=" in arg:
            overrides.append(arg)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{arg}={rest[i + 1]}")
            i += 1
        else:
            parser.error(f"override {arg!r} has no value")
        i += 1
    return ns, overrides


def pipeline_command(args: Sequence[str]) -> None:
    """`aac-lightning pipeline RECIPE --workdir DIR [--loggers ...] [--key=value ...]`."""
    parser = build_parser()
    ns, overrides = parse_overrides(parser, args)
    loggers = [name.strip() for name in ns.loggers.split(",") if name.strip()]
    runner = PipelineRunner(ns.recipe, ns.workdir, overrides, loggers, ns.wandb_project, ns.examples, parse_variables(parser, ns.var))
    runner.run()
    print(f"results written to {runner.workdir / 'results.json'}")
