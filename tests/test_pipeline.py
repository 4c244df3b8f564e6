"""The pipeline runner: recipes, checkpoint handoff, results.json, skipping finished stages, resuming.

Stages run the demo configs (`conf/demo/*.yaml`) shrunk by the recipe's `set` values to tiny models on
the session's synthetic dataset, so every code path is the real one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aac_lightning.cli import main
from aac_lightning.commands.pipeline import build_parser, parse_overrides
from aac_lightning.pipeline import PipelineRunner, RecipeError, load_recipe, normalize_metrics
from aac_lightning.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "demo"
TINY_AUDIO = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmax=8000, channels=[4, 8, 8, 8, 8, 16], embed_dim=16)
TINY_RETRIEVAL = {
    "model.init_args.audio_encoder_kwargs": TINY_AUDIO,
    "model.init_args.embed_dim": 8,
    "model.init_args.warmup_epochs": 0.0,  # runs of 3 steps: a warm-up of a whole epoch would never end
    "data.init_args.global_batch_size": 4,
    "data.init_args.eval_batch_size": 8,
}
TINY_CAPTIONER = {
    "model.init_args.input_dim": 16,
    "model.init_args.decoder_kwargs": {"d_model": 16, "num_layers": 1, "nhead": 2, "dim_feedforward": 32, "dropout": 0.1},
    "model.init_args.encoder_kwargs": {"encoder_hidden_size": 8, "encoder_num_layers": 1, "encoder_dropout": 0.0},
    "model.init_args.warmup_steps": 0,
    "data.init_args.global_batch_size": 4,
    "data.init_args.eval_batch_size": 8,
}
# The captioning stages of the full run: 2 epochs, both averaged (EpochWeightAveraging -> averaged.ckpt).
CAPTIONER_RUN = {
    "trainer.max_epochs": 2,
    "trainer.callbacks": [
        {"class_path": "aac_lightning.callbacks.EpochWeightAveraging", "init_args": {"last_epochs": 2}},
        {"class_path": "aac_lightning.callbacks.LatestCheckpoint"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/cider_d", "mode": "max", "filename": "best-{epoch:02d}"}},
    ],
}
TRAINER = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def contrastive_stages(data_root: Path, text_encoder: str | None = None) -> list[dict]:
    """Pre-training -> fine-tuning; `text_encoder` (a local folder) replaces the demo's MiniLM."""
    data = {"data.init_args.clotho_root": str(data_root)}
    model = {**TINY_RETRIEVAL, **({"model.init_args.text_encoder": text_encoder} if text_encoder else {})}
    return [
        {"name": "pretrain", "configs": [str(CONF / "contrastive_pretrain.yaml")], "set": {**data, **model}},
        {"name": "finetune", "configs": [str(CONF / "contrastive_finetune.yaml")], "set": {**data, **model}, "handoff": {"model.init_args.init_from": "pretrain"}},
    ]


def write_recipe(path: Path, stages: list[dict], name: str = "tiny") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(synth_root: Path, tiny_text_encoder: str, tmp_path_factory) -> Path:
    """All stage kinds: pre-train -> fine-tune -> XE -> SCST, plus a retrieval and a caption 'ensemble' of one."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = {"data.init_args.clotho_root": str(synth_root)}
    cache = {"model.init_args.feature_cache_dir": "${workdir}/feature_cache"}
    stages = contrastive_stages(synth_root, tiny_text_encoder) + [
        {"name": "xe", "configs": [str(CONF / "xe.yaml")], "set": {**data, **cache, **TINY_CAPTIONER, **CAPTIONER_RUN}, "handoff": {"model.init_args.extractor_ckpt": "finetune"}},
        {"name": "scst", "configs": [str(CONF / "scst.yaml")], "set": {**data, **cache, **CAPTIONER_RUN, "data.init_args.global_batch_size": 4}, "handoff": {"model.init_args.init_from": "xe"}},
        {"name": "retrieval_single", "kind": "retrieval_ensemble", "members": ["finetune"], "clotho_root": str(synth_root)},
        {"name": "caption_single", "kind": "caption_ensemble", "members": ["scst"], "clotho_root": str(synth_root)},
    ]
    for stage in stages[:2]:
        stage["set"]["trainer.max_epochs"] = 1
    recipe = write_recipe(tmp / "recipe.yaml", stages)
    main(["pipeline", str(recipe), "--workdir", str(tmp / "work"), "--loggers", "csv", *TRAINER])
    return tmp / "work"


def test_results_json_has_every_stage_with_kind_checkpoint_and_named_metrics(full_run: Path):
    results = json.loads((full_run / "results.json").read_text(encoding="utf-8"))
    stages = results["stages"]
    assert list(stages) == ["pretrain", "finetune", "xe", "scst", "retrieval_single", "caption_single"]
    assert [s["kind"] for s in stages.values()] == ["contrastive", "contrastive", "xe", "scst", "retrieval_ensemble", "caption_ensemble"]
    for name in ("pretrain", "finetune", "xe", "scst"):
        # the captioners average their last epochs: the average is the stage's checkpoint
        own = "averaged.ckpt" if name in ("xe", "scst") else "best.ckpt"
        assert Path(stages[name]["checkpoint"]) == full_run / name / own
        assert (full_run / name / "last.ckpt").is_file() and (full_run / name / "config.yaml").is_file()
        assert list((full_run / name / "logs").glob("version_*/metrics.csv")), name
        assert read_checkpoint(full_run / name / own)["aac_lightning"]["kind"] == stages[name]["kind"]
    for name in ("pretrain", "finetune", "retrieval_single"):
        assert {"R@1", "R@5", "R@10", "mAP@10", "a2t/R@1"} <= set(stages[name]["metrics"])
        assert 0.0 <= stages[name]["metrics"]["R@1"] <= stages[name]["metrics"]["R@5"] <= stages[name]["metrics"]["R@10"] <= 1.0
    for name in ("xe", "scst", "caption_single"):
        assert {"bleu_1", "rouge_l", "cider_d"} <= set(stages[name]["metrics"]), stages[name]["metrics"]
    examples = json.loads((full_run / "xe" / "examples.json").read_text(encoding="utf-8"))["captions"]
    assert examples and {"file", "predicted", "references"} <= set(examples[0])
    ranked = json.loads((full_run / "pretrain" / "examples.json").read_text(encoding="utf-8"))["retrieval"]
    scores = [e["score"] for e in ranked[0]["ranked"]]
    assert scores == sorted(scores, reverse=True)


def test_checkpoints_are_handed_to_the_init_arguments_the_recipe_names(full_run: Path):
    def init_args(stage: str) -> dict:
        return yaml.safe_load((full_run / stage / "config.yaml").read_text(encoding="utf-8"))["model"]["init_args"]

    assert init_args("finetune")["init_from"] == str(full_run / "pretrain" / "best.ckpt")
    assert init_args("xe")["extractor_ckpt"] == str(full_run / "finetune" / "best.ckpt")
    assert init_args("scst")["init_from"] == str(full_run / "xe" / "averaged.ckpt")  # the averaged XE weights, as the authors
    averaged, last = (read_checkpoint(full_run / "xe" / f"{name}.ckpt")["state_dict"] for name in ("averaged", "last"))
    assert any(not torch.equal(v, last[k]) for k, v in averaged.items() if k.startswith("model."))
    assert init_args("xe")["feature_cache_dir"] == str(full_run / "feature_cache")
    # the XE stage's frozen extractor is the fine-tuned audio encoder, bit for bit
    finetune = read_checkpoint(full_run / "finetune" / "best.ckpt")["state_dict"]
    xe = read_checkpoint(full_run / "xe" / "best.ckpt")["state_dict"]
    audio = {k[len("model.audio_encoder.") :]: v for k, v in finetune.items() if k.startswith("model.audio_encoder.")}
    extractor = {k[len("extractor.encoder.") :]: v for k, v in xe.items() if k.startswith("extractor.encoder.")}
    shared = set(audio) & set(extractor)
    assert shared and all(torch.equal(audio[k], extractor[k]) for k in shared)


def test_an_ensemble_of_one_reproduces_the_stage_test_metrics(full_run: Path):
    """Two independent evaluation paths (the LightningModule's test loop, the ensemble evaluator) agree."""
    stages = json.loads((full_run / "results.json").read_text(encoding="utf-8"))["stages"]
    for name in ("R@1", "R@5", "R@10", "mAP@10"):
        assert stages["retrieval_single"]["metrics"][name] == pytest.approx(stages["finetune"]["metrics"][name], abs=1e-4)
    assert stages["caption_single"]["metrics"]["cider_d"] == pytest.approx(stages["scst"]["metrics"]["cider_d"], abs=1e-4)


def test_a_rerun_skips_finished_stages(full_run: Path, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in full_run.glob("*/stage.json")}

    def must_not_run(self, *args):
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr(PipelineRunner, "_run_training", must_not_run)
    monkeypatch.setattr(PipelineRunner, "_run_ensemble", must_not_run)
    recipe = full_run.parent / "recipe.yaml"
    main(["pipeline", str(recipe), "--workdir", str(full_run), "--loggers", "csv"])
    assert {p: p.stat().st_mtime_ns for p in full_run.glob("*/stage.json")} == before
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6


def _pipeline_command(recipe: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "aac_lightning", "pipeline", str(recipe), "--workdir", str(workdir), "--loggers", "csv", "--trainer.max_epochs=3", *TRAINER]


@pytest.mark.slow
def test_killed_mid_stage_the_rerun_resumes_and_ends_with_the_uninterrupted_weights(synth_root: Path, tiny_text_encoder: str, tmp_path: Path):
    recipe = write_recipe(tmp_path / "recipe.yaml", contrastive_stages(synth_root, tiny_text_encoder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    reference = tmp_path / "reference"
    subprocess.run(_pipeline_command(recipe, reference), check=True, cwd=REPO, env=env, capture_output=True)

    work = tmp_path / "work"
    proc = subprocess.Popen(_pipeline_command(recipe, work), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage2_last = work / "finetune" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not stage2_last.exists():  # the second stage has finished its first epoch and goes on
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "finetune" / "stage.json").exists()
    stage1 = {p: p.stat().st_mtime_ns for p in (work / "pretrain").rglob("*") if p.is_file()}

    rerun = subprocess.run(_pipeline_command(recipe, work), cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "pretrain: finished earlier, skipped" in rerun.stdout
    assert "resuming stage finetune" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in (work / "pretrain").rglob("*") if p.is_file()} == stage1
    resumed = read_checkpoint(work / "finetune" / "last.ckpt")
    uninterrupted = read_checkpoint(reference / "finetune" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    different = [k for k, v in uninterrupted["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not different, different[:5]


# ---------------------------------------------------------------------------------------------- recipe errors
@pytest.mark.parametrize(
    "stages,message",
    [
        ([{"name": "a", "configs": ["missing.yaml"]}], "config '"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")], "epochs": 3}], "unknown key(s) ['epochs']"),
        ([{"name": "a b", "configs": [str(CONF / "xe.yaml")]}], "folder-safe name"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")], "handoff": {"model.init_args.init_from": "b"}}], "not an earlier stage"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")]}, {"name": "a", "configs": [str(CONF / "xe.yaml")]}], "used twice"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")], "kind": "magic"}], "'kind' must be one of"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")]}, {"name": "e", "kind": "retrieval_ensemble", "members": ["a"], "clotho_root": "x"}], "is a xe stage"),
        ([{"name": "a", "configs": [str(CONF / "xe.yaml")], "set": {"data.init_args.clotho_root": "${data_dir}"}}], "unknown variable ${data_dir}"),
    ],
)
def test_recipe_errors_name_the_file_stage_and_field(tmp_path: Path, stages: list, message: str):
    recipe = write_recipe(tmp_path / "bad.yaml", stages)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, tmp_path / "work")
    assert message in str(info.value) and str(recipe) in str(info.value)


def test_recipe_yaml_syntax_and_encoding_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  - name: a\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad, tmp_path)
    bad.write_bytes("name: caf\xe9\nstages: []\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not valid UTF-8"):
        load_recipe(bad, tmp_path)


def test_shipped_recipes_parse_and_hand_checkpoints_to_earlier_stages(tmp_path: Path):
    for path in sorted((REPO / "stages").glob("*.yaml")):
        recipe = load_recipe(path, tmp_path)
        names = [s.name for s in recipe.stages]
        for index, stage in enumerate(recipe.stages):
            for source in list(stage.handoff.values()) + stage.members:
                assert names.index(source.split(":")[0]) < index, (path, stage.name)


def test_kind_is_read_from_the_configs_and_metrics_get_results_names(tmp_path: Path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", contrastive_stages(tmp_path)), tmp_path)
    assert [s.kind for s in recipe.stages] == ["contrastive", "contrastive"]
    raw = {"test/t2a/R@1": 0.5, "test/a2t/mAP@10": 0.25}
    assert normalize_metrics("contrastive", raw) == {"R@1": 0.5, "a2t/mAP@10": 0.25}
    assert normalize_metrics("xe", {"test/cider_d": 0.3}) == {"cider_d": 0.3}


def test_trainer_overrides_are_collected_for_every_stage():
    ns, overrides = parse_overrides(build_parser(), ["r.yaml", "--workdir", "w", "--trainer.devices", "2", "--trainer.precision=bf16-mixed"])
    assert ns.workdir == "w" and overrides == ["--trainer.devices=2", "--trainer.precision=bf16-mixed"]
    with pytest.raises(SystemExit):
        parse_overrides(build_parser(), ["r.yaml", "--workdir", "w", "stray"])


def test_wandb_offline_run_per_stage_with_group_job_type_config_and_tables(synth_root: Path, tiny_text_encoder: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write_recipe(tmp_path / "recipe.yaml", contrastive_stages(synth_root, tiny_text_encoder)[:1], name="wandbcheck")
    work = tmp_path / "work"
    main(["pipeline", str(recipe), "--workdir", str(work), "--loggers", "wandb,csv", "--trainer.max_epochs=1", *TRAINER])
    group = json.loads((work / "pipeline.json").read_text(encoding="utf-8"))["group"]
    assert group.startswith("wandbcheck-")
    runs = list((work / "pretrain" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    expected = (group, "contrastive", "pretrain", "audio_encoder:cnn14", f"text_encoder:{Path(tiny_text_encoder).name}", "model.init_args.embed_dim")
    # W&B's service process may still be writing the offline run file when `wandb.finish()` returns on
    # a loaded machine: wait (bounded) for the records instead of reading a half-written file.
    deadline = time.monotonic() + 60
    while True:
        records = next(runs[0].glob("run-*.wandb")).read_bytes()
        missing = [item for item in expected if item.encode() not in records]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    table = next(runs[0].glob("files/media/table/test/retrieval_examples*.table.json"))
    data = json.loads(table.read_text(encoding="utf-8"))
    assert data["columns"] == ["query", "target", "rank", "file", "score", "correct"] and data["data"]
    # the CSV log is written next to it, and config.yaml names the loggers the stage ran with
    assert list((work / "pretrain" / "logs").glob("version_*/metrics.csv"))
    loggers = yaml.safe_load((work / "pretrain" / "config.yaml").read_text(encoding="utf-8"))["trainer"]["logger"]
    assert [spec["class_path"].rpartition(".")[2] for spec in loggers] == ["CSVLogger", "WandbLogger"]
    assert loggers[1]["init_args"]["group"] == group and loggers[1]["init_args"]["job_type"] == "contrastive"


@pytest.mark.ddp
def test_pipeline_under_lightning_ddp_with_two_cpu_processes(synth_root: Path, tiny_text_encoder: str, tmp_path: Path):
    """Lightning's launcher re-runs the command per rank; rank 0 writes, the others follow the handoffs."""
    data = {"data.init_args.clotho_root": str(synth_root)}
    stages = contrastive_stages(synth_root, tiny_text_encoder) + [
        {"name": "xe", "configs": [str(CONF / "xe.yaml")], "set": {**data, "model.init_args.feature_cache_dir": "${workdir}/cache", **TINY_CAPTIONER}, "handoff": {"model.init_args.extractor_ckpt": "finetune"}},
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", stages)
    command = [*_pipeline_command(recipe, tmp_path / "work"), "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in run.stderr + run.stdout  # it really ran two processes
    results = json.loads((tmp_path / "work" / "results.json").read_text(encoding="utf-8"))["stages"]
    assert list(results) == ["pretrain", "finetune", "xe"]
    assert yaml.safe_load((tmp_path / "work" / "xe" / "config.yaml").read_text(encoding="utf-8"))["model"]["init_args"]["extractor_ckpt"] == str(tmp_path / "work" / "finetune" / "best.ckpt")
    assert read_checkpoint(tmp_path / "work" / "finetune" / "last.ckpt")["epoch"] == 0
    assert len(list((tmp_path / "work" / "cache").glob("*.h5"))) == 1
