"""The recipe check (`pipeline RECIPE --check`, and automatically before stage 1) lists every missing input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aac_lightning.cli import main
from aac_lightning.data.synth import write_synthetic_clotho

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "conf" / "demo"


def _recipe(tmp_path: Path, third_root: Path) -> Path:
    data = tmp_path / "data"
    write_synthetic_clotho(data, n_clips=12, seed=0, sample_rate=16000)
    recipe = {
        "name": "three",
        "stages": [
            {"name": "pretrain", "configs": [str(DEMO / "contrastive_pretrain.yaml")], "set": {"data.init_args.clotho_root": str(data)}},
            {"name": "finetune", "configs": [str(DEMO / "contrastive_finetune.yaml")], "set": {"data.init_args.clotho_root": str(data)}, "handoff": {"model.init_args.init_from": "pretrain"}},
            {"name": "xe", "configs": [str(DEMO / "xe.yaml")], "set": {"data.init_args.clotho_root": str(third_root)}, "handoff": {"model.init_args.extractor_ckpt": "finetune"}},
        ],
    }
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_run_stops_before_stage_1_naming_the_third_stages_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_clotho"
    recipe = _recipe(tmp_path, missing)
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(recipe), "--workdir", str(workdir), "--loggers", "csv"], report_errors=True)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert str(missing) in err and "xe" in err and "clotho data (development)" in err
    assert "made by stage pretrain" in err and "made by stage finetune" in err
    assert not (workdir / "pretrain").exists()  # nothing trained


def test_check_only_lists_and_exits(tmp_path, capsys):
    recipe = _recipe(tmp_path, tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        main(["pipeline", str(recipe), "--workdir", str(tmp_path / "w"), "--check"])
    out = capsys.readouterr().out
    assert info.value.code in (0, 2)  # 2 only where Java / METEOR is missing on this machine
    assert "made by stage finetune" in out and "text encoder" in out and "free disk" in out
    assert not (tmp_path / "w" / "pretrain").exists()


def test_finished_stage_is_not_rechecked_but_its_handoff_is(tmp_path, capsys):
    from aac_lightning.pipeline import PipelineRunner

    recipe = _recipe(tmp_path, tmp_path / "data")
    runner = PipelineRunner(recipe, tmp_path / "w")
    stage = runner.stage_dir("pretrain")
    stage.mkdir(parents=True)
    (stage / "best.ckpt").write_bytes(b"x")
    (stage / "stage.json").write_text(json.dumps({"kind": "contrastive", "checkpoint": str(stage / "best.ckpt"), "metrics": {}}))
    rows = runner.check().requirements
    assert [r.what for r in rows if r.stage == "pretrain"] == ["stage"]
    handoff = [r for r in rows if r.stage == "finetune" and "init_from" in r.what]
    assert handoff and handoff[0].status == "present" and str(stage / "best.ckpt") in handoff[0].target
    (stage / "best.ckpt").unlink()
    rows = runner.check().requirements
    assert any(r.stage == "finetune" and r.status == "MISSING" and "delete" in r.fix for r in rows)


def test_fense_models_are_an_optional_row_when_the_metrics_ask_for_them(tmp_path):
    import shutil

    from aac_lightning.pipeline.check import fense_requirements
    from aac_lightning.utils.preflight import PRESENT, WARNING
    from tests.test_metric_sets import _fense_models

    pytest.importorskip("aac_metrics", reason="the eval extra (aac-metrics) is not installed")
    assert fense_requirements("xe", "dcase2022") == []  # no FENSE, no SPIDEr-FL: no row
    empty = tmp_path / "empty"
    empty.mkdir()
    (row,) = fense_requirements("xe", "dcase2024", str(empty))
    assert row.status == WARNING and not row.blocking and row.key == "model.init_args.fense_dir"
    assert row.fix.startswith("fense, spider_fl will be reported unavailable") and "aac-metrics-download" in row.fix
    models = _fense_models(tmp_path / "models", error=False)
    (row,) = fense_requirements("xe", "dcase2024", str(tmp_path / "models"))
    assert row.status == PRESENT and row.fix == ""
    shutil.rmtree(models["sbert"])  # SPIDEr-FL needs the checker only; FENSE needs Sentence-BERT too
    assert fense_requirements("xe", "spider_fl", str(tmp_path / "models"))[0].status == PRESENT
    (row,) = fense_requirements("xe", "fense", str(tmp_path / "models"))
    assert row.status == WARNING and "Sentence-BERT" in row.fix
