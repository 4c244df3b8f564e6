"""Recipes choose what their ensemble stages report: `metrics` (caption metric sets) on a
`caption_ensemble`, `relevance` (the DCASE 2025 file, adding mAP@16) on a `retrieval_ensemble`.

The retrieval case runs the pipeline's ensemble stage on a finished member and checks the mAP@16 in
`results.json` against AP@16 computed here from the stage's own similarity matrix, walking down each
query's ranking (a second implementation of the definition).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from aac_lightning.data.datasets import Clotho
from aac_lightning.ensembles import evaluate_retrieval_ensemble
from aac_lightning.pipeline import PipelineRunner
from aac_lightning.pipeline.recipe import RecipeError, load_recipe
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, ensemble: dict, data: str = "data") -> Path:
    recipe = {
        "name": "ensemble_options",
        "stages": [
            {"name": "pretrain", "configs": [str(REPO / "conf/demo/contrastive_pretrain.yaml")]},
            {"name": "xe", "configs": [str(REPO / "conf/demo/xe.yaml")], "handoff": {"model.init_args.extractor_ckpt": "pretrain"}},
            {"name": "ensemble", "members": ["pretrain"], "clotho_root": data, "kind": "retrieval_ensemble", **ensemble},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_checks_the_ensemble_options(tmp_path: Path):
    load_recipe(_recipe(tmp_path, {"relevance": "metadata_eval.csv"}), tmp_path / "w")
    caption = {"kind": "caption_ensemble", "members": ["xe"], "metrics": "dcase2024,vocab"}
    assert load_recipe(_recipe(tmp_path, caption), tmp_path / "w").stages[-1].metrics == "dcase2024,vocab"
    with pytest.raises(RecipeError, match=r"stage 'ensemble'.*'metrics'.*nope"):
        load_recipe(_recipe(tmp_path, {**caption, "metrics": "dcase2024,nope"}), tmp_path / "w")
    with pytest.raises(RecipeError, match="'relevance' .* belongs to retrieval_ensemble"):
        load_recipe(_recipe(tmp_path, {**caption, "metrics": None, "relevance": "x.csv"}), tmp_path / "w")
    with pytest.raises(RecipeError, match="'metrics' .* belongs to caption_ensemble"):
        load_recipe(_recipe(tmp_path, {"metrics": "dcase2024"}), tmp_path / "w")


def _ap_at_16(scores: list[float], relevant: set[int]) -> float:
    order = sorted(range(len(scores)), key=lambda a: -scores[a])
    hits, total = 0, 0.0
    for position, clip in enumerate(order[:16], start=1):
        if clip in relevant:
            hits += 1
            total += hits / position
    return total / len(relevant)


def test_retrieval_ensemble_stage_reports_map_at_16_from_the_relevance_file(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    records = Clotho(synth_root, "evaluation").records
    names = [r.path.name for r in records]
    relevance = tmp_path / "metadata_eval.csv"
    chosen = {records[0].captions[0]: [names[0], names[3]], records[1].captions[1]: [names[1]], records[2].captions[0]: [names[2], names[4], names[5]]}
    with open(relevance, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "audio_filenames"])
        for query, files in chosen.items():
            writer.writerow([query, repr(files)])
    workdir = tmp_path / "work"
    (workdir / "pretrain").mkdir(parents=True)
    (workdir / "pretrain" / "stage.json").write_text(json.dumps({"kind": "contrastive", "checkpoint": str(retrieval_ckpt), "metrics": {}}))
    recipe = _recipe(tmp_path, {"relevance": str(relevance)}, data=str(synth_root))
    recipe_data = yaml.safe_load(recipe.read_text())
    recipe_data["stages"] = [s for s in recipe_data["stages"] if s["name"] != "xe"]
    recipe.write_text(yaml.safe_dump(recipe_data))
    PipelineRunner(recipe, workdir, loggers=["csv"]).run()
    metrics = json.loads((workdir / "results.json").read_text())["stages"]["ensemble"]["metrics"]

    result = evaluate_retrieval_ensemble([retrieval_ckpt], synth_root, "evaluation")
    sim, captions, fnames = result["similarity"], result["captions"], [Path(f).name for f in result["fnames"]]
    expected = []
    for query, files in chosen.items():
        row = sim[captions.index(query)].tolist()
        expected.append(_ap_at_16(row, {fnames.index(f) for f in files}))
    assert metrics["dcase2025/mAP@16"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert metrics["mAP@10"] == pytest.approx(result["metrics"]["t2a"]["mAP@10"], abs=1e-6)  # the 2022 metrics beside them
    saved = json.loads((workdir / "ensemble" / "metrics.json").read_text())["metrics"]
    assert saved["dcase2025"]["mAP@16"] == pytest.approx(metrics["dcase2025/mAP@16"])
