"""The pipeline checks every output folder of every unfinished stage before its first stage starts.

A folder that cannot be created or written (here: a file stands where a folder must go) stops the
run in its first seconds with an `OutputDirError` naming the stage, what the folder is for and its
path, whether the folder belongs to the first stage, to a later training stage or its test, or to an
ensemble stage at the end; nothing trains and no stage is recorded as finished.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aac_lightning.cli import main
from aac_lightning.modules import ContrastiveRetrieval
from aac_lightning.pipeline import PipelineRunner
from aac_lightning.pipeline.check import output_dirs
from aac_lightning.utils.preflight import OutputDirError
from tests.test_pipeline import CONF, TINY_CAPTIONER, TRAINER, contrastive_stages, write_recipe


def _recipe(tmp_path: Path, synth_root: Path, tiny_text_encoder: str) -> Path:
    """pretrain -> finetune -> XE (feature cache in ${workdir}/features) -> a retrieval ensemble of finetune."""
    stages = contrastive_stages(synth_root, tiny_text_encoder) + [
        {
            "name": "xe",
            "configs": [str(CONF / "xe.yaml")],
            "set": {"data.init_args.clotho_root": str(synth_root), "model.init_args.feature_cache_dir": "${workdir}/features/xe", **TINY_CAPTIONER},
            "handoff": {"model.init_args.extractor_ckpt": "finetune"},
        },
        {"name": "ensemble", "kind": "retrieval_ensemble", "members": ["finetune"], "clotho_root": str(synth_root)},
    ]
    return write_recipe(tmp_path / "recipe.yaml", stages)


# Where a file blocks a folder -> the message the run must stop with.
BLOCKED = {
    "ensemble": ("ensemble", "stage ensemble: stage folder '{work}/ensemble' exists but is not a folder"),
    "xe_checkpoints": ("xe/checkpoints", "stage xe: checkpoint folder '{work}/xe/checkpoints' exists but is not a folder"),
    "xe_feature_cache": ("features", "stage xe: feature cache (model.init_args.feature_cache_dir) '{work}/features/xe' cannot be created"),
}


@pytest.mark.parametrize("blocked", sorted(BLOCKED))
def test_an_unwritable_output_folder_of_any_stage_stops_the_run_before_the_first_stage(
    synth_root: Path, tiny_text_encoder: str, tmp_path: Path, monkeypatch, blocked: str
):
    steps = []
    monkeypatch.setattr(ContrastiveRetrieval, "training_step", lambda self, *a, **k: steps.append(1))
    recipe = _recipe(tmp_path, synth_root, tiny_text_encoder)
    work = tmp_path / "work"
    where, message = BLOCKED[blocked]
    (work / where).parent.mkdir(parents=True, exist_ok=True)
    (work / where).write_text("not a folder")
    with pytest.raises(OutputDirError, match=re.escape(message.format(work=work))):
        main(["pipeline", str(recipe), "--workdir", str(work), "--loggers", "csv", "--trainer.max_epochs=1", *TRAINER])
    assert steps == []  # the first stage never trained
    assert not list(work.rglob("stage.json")) and not list(work.rglob("*.ckpt")) and not (work / "results.json").exists()


def test_output_dirs_lists_every_unfinished_stage_and_the_folders_its_config_names(synth_root: Path, tiny_text_encoder: str, tmp_path: Path):
    recipe = _recipe(tmp_path, synth_root, tiny_text_encoder)
    work = tmp_path / "work"
    runner = PipelineRunner(recipe, work, overrides=["--data.init_args.split_dir=" + str(tmp_path / "splits")], loggers=["csv"])
    listed = {(stage, purpose, Path(path)) for stage, purpose, path in output_dirs(runner)}
    expected = {("(run)", "work folder (--workdir)", work)}
    for name in ("pretrain", "finetune", "xe"):
        expected |= {
            (name, "stage folder", work / name),
            (name, "checkpoint folder", work / name / "checkpoints"),
            (name, "re-split lists (data.init_args.split_dir)", tmp_path / "splits"),
        }
    expected |= {("xe", "feature cache (model.init_args.feature_cache_dir)", work / "features" / "xe"), ("ensemble", "stage folder", work / "ensemble")}
    assert listed == expected
    # a finished stage is skipped by the run: its folders are not checked again
    (work / "pretrain").mkdir(parents=True)
    (work / "pretrain" / "stage.json").write_text('{"kind": "contrastive", "checkpoint": null, "metrics": {}}')
    assert not any(stage == "pretrain" for stage, _, _ in output_dirs(runner))
