"""The notebooks: stored without outputs, clear about a missing work directory, and, run end to end on
a fast demo work directory, they compute what the package and the files say.

Each notebook's last cell prints a one-line JSON summary of what it computed; the tests check it
against values computed here independently (the CSV files read with the csv module, the package's
Captioner / Retriever run outside the notebook, counts by hand).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("inference.ipynb", "compare_runs.ipynb", "data_exploration.ipynb")
SUBSETS = ("development", "validation", "evaluation")
CELL_TIMEOUT_S = 600


def execute(name: str, workdir: str, cells: list | None = None) -> nbformat.NotebookNode:
    """Run a notebook (or only `cells` of it) in a fresh python3 kernel, cwd = notebooks/."""
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    if cells is not None:
        notebook.cells = cells(notebook)
    env = {**os.environ, "AAC_LIGHTNING_WORKDIR": workdir, "MPLBACKEND": "Agg"}
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute(env=env)
    return notebook


def summary_of(notebook: nbformat.NotebookNode) -> dict:
    """The JSON line the notebook's last code cell prints."""
    last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    text = "".join(o.text for o in last.outputs if o.output_type == "stream" and o.name == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def clotho_rows(data_root: Path, subset: str) -> list[dict[str, str]]:
    """Rows of a Clotho captions CSV, read with the csv module alone."""
    path = data_root / "CLOTHO_v2.1" / "clotho_csv_files" / f"clotho_captions_{subset}.csv"
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def csv_column(path: Path, column: str) -> list[float]:
    """The non-empty values of one column of a CSVLogger metrics file, in row order."""
    with open(path, newline="", encoding="utf-8") as file:
        return [float(row[column]) for row in csv.DictReader(file) if row.get(column)]


# ------------------------------------------------------------------------------------ stored notebooks


def test_notebooks_are_stored_without_outputs():
    stored = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert set(NOTEBOOKS) <= set(stored), f"missing notebooks: {set(NOTEBOOKS) - set(stored)}"
    for name in stored:
        notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3", name
        assert notebook.cells[0].cell_type == "markdown", f"{name}: the first cell should say what it shows"
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, name
        assert "AAC_LIGHTNING_WORKDIR" in code[0].source, f"{name}: the first code cell reads the work directory"
        for index, cell in enumerate(code):
            assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
            assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_stops_clearly_without_a_work_directory(name, tmp_path):
    missing = tmp_path / "no_such_workdir"

    def first_code_cell(notebook):
        return [next(cell for cell in notebook.cells if cell.cell_type == "code")]

    with pytest.raises(CellExecutionError) as err:
        execute(name, str(missing), cells=first_code_cell)
    message = str(err.value)
    assert "FileNotFoundError" in message
    assert "run `aac-lightning demo` first" in message
    assert str(missing) in message


def write_metrics_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([header, *rows])


def test_compare_runs_merges_resumed_versions(tmp_path):
    """A hand-made work directory: a stage resumed twice, a stage with no logs, an unfinished stage."""
    workdir = tmp_path / "run"
    header = ["epoch", "step", "train/loss", "val/t2a/mAP@10"]
    # version_9 was interrupted after step 3; its checkpoint was at step 2, so version_10 redoes steps 2-3
    write_metrics_csv(workdir / "a" / "logs" / "version_9" / "metrics.csv", header,
                      [[0, 0, 3.0, ""], [0, 1, 2.0, ""], [0, 1, "", 0.1], [1, 2, 1.5, ""], [1, 3, 1.4, ""]])
    write_metrics_csv(workdir / "a" / "logs" / "version_10" / "metrics.csv", header,
                      [[1, 2, 1.45, ""], [1, 3, 1.3, ""], [1, 3, "", 0.2]])
    write_metrics_csv(workdir / "c" / "logs" / "version_0" / "metrics.csv", ["epoch", "step", "val/cider_d"], [[0, 4, 0.05]])
    results = {
        "stages": {
            "a": {"kind": "contrastive", "checkpoint": "a/best.ckpt", "metrics": {"R@1": 0.5, "mAP@10": 0.25}},
            "b": {"kind": "xe", "checkpoint": "b/best.ckpt", "metrics": {"cider_d": 0.4}},
        }
    }
    (workdir / "results.json").write_text(json.dumps(results), encoding="utf-8")

    summary = summary_of(execute("compare_runs.ipynb", str(workdir)))

    assert summary["runs"] == ["run"]
    assert summary["stages"] == ["a", "b", "c"]  # results.json order, then the unfinished stage
    assert summary["table"] == [["run", "a", "contrastive", {"R@1": 0.5, "mAP@10": 0.25}], ["run", "b", "xe", {"cider_d": 0.4}]]
    # steps 0, 1 of version_9 and 2, 3 of version_10; the validation of step 1 and of step 3
    assert summary["points"]["run"] == {"a": {"train/loss": 4, "val/t2a/mAP@10": 2}, "c": {"val/cider_d": 1}}
    assert summary["last_value"]["run"] == {"a": {"train/loss": 1.3, "val/t2a/mAP@10": 0.2}, "c": {"val/cider_d": 0.05}}


# ------------------------------------------------------------------------ executed on a demo work dir


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> Path:
    """A finished `aac-lightning demo --fast` work directory, with the training loss logged every step."""
    from aac_lightning.cli import main

    workdir = tmp_path_factory.mktemp("notebook_demo")
    main(["demo", "--fast", "--workdir", str(workdir), "--loggers", "csv", "--trainer.log_every_n_steps=1"])
    assert (workdir / "results.json").is_file()
    return workdir


@pytest.mark.slow
def test_inference_notebook(demo_workdir):
    from aac_lightning import Captioner, Retriever

    summary = summary_of(execute("inference.ipynb", str(demo_workdir)))

    data_root = demo_workdir / "data"
    audio_dir = data_root / "CLOTHO_v2.1" / "clotho_audio_files" / "evaluation"
    rows = clotho_rows(data_root, "evaluation")
    clips = [row["file_name"] for row in rows[:6]]
    paths = [audio_dir / name for name in clips]
    queries = [row["caption_1"] for row in rows[:4]]
    assert summary["clips"] == clips
    assert summary["queries"] == queries

    # captions: the SCST checkpoint alone, the XE + SCST ensemble, and the array path
    scst = Captioner.from_checkpoint(demo_workdir / "scst" / "best.ckpt")
    assert summary["scst_captions"] == [caption for _, caption in scst.caption(paths)]
    ensemble = Captioner.from_checkpoint([demo_workdir / "xe" / "best.ckpt", demo_workdir / "scst" / "best.ckpt"])
    assert summary["ensemble_captions"] == [caption for _, caption in ensemble.caption(paths)]
    assert summary["caption_from_array"] == summary["scst_captions"][0]

    # search: the notebook's hits are the best files of an uncached retriever, up to float noise
    retriever = Retriever.from_checkpoint(demo_workdir / "contrastive_finetune" / "best.ckpt", use_cache=False)
    retriever.index(audio_dir)
    full = retriever.similarity(queries).numpy()  # (Q, A)
    column = {name: a for a, name in enumerate(retriever.names)}
    for q, (hits, scores) in enumerate(zip(summary["top_hits"], summary["top_scores"])):
        assert len(hits) == 5
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [full[q, column[h]] for h in hits], atol=1e-5)
        assert scores[0] >= full[q].max() - 1e-5  # the top hit is the best file (ties aside)
        assert scores[-1] >= np.sort(full[q])[-5] - 1e-5  # and the five are the five best
    assert (demo_workdir / "embedding_cache").is_dir()  # the notebook indexed through its cache

    similarity = retriever.similarity(queries, files=paths).numpy()
    assert np.asarray(summary["similarity"]).shape == (4, 6)
    np.testing.assert_allclose(summary["similarity"], similarity, atol=1e-5)

    # frame similarity: the query names the clip's first true event
    events = json.loads((data_root / "CLOTHO_v2.1" / "synth_events.json").read_text(encoding="utf-8"))["events"]
    first = events[f"evaluation/{clips[0]}"][0]
    assert summary["frame_clip"] == clips[0]
    assert summary["frame_query"] == f"a {first['attribute']} {first['kind']}"
    times, scores = retriever.frame_similarity(paths[0], summary["frame_query"])
    np.testing.assert_allclose(summary["frame_times"], times)
    np.testing.assert_allclose(summary["frame_scores"], scores, atol=1e-5)


@pytest.mark.slow
def test_compare_runs_notebook(demo_workdir, tmp_path):
    # A second, smaller run: the demo's XE stage alone (its logs and its results.json entry).
    second = tmp_path / "second_run"
    shutil.copytree(demo_workdir / "xe" / "logs", second / "xe" / "logs")
    results = json.loads((demo_workdir / "results.json").read_text(encoding="utf-8"))
    (second / "results.json").write_text(json.dumps({"stages": {"xe": results["stages"]["xe"]}}), encoding="utf-8")

    summary = summary_of(execute("compare_runs.ipynb", f"{demo_workdir}{os.pathsep}{second}"))

    first = demo_workdir.name
    assert summary["runs"] == [first, "second_run"]
    stages = list(results["stages"])
    assert stages == ["contrastive_pretrain", "contrastive_finetune", "xe", "scst"]
    assert summary["stages"] == stages
    expected_table = [[first, s, info["kind"], info["metrics"]] for s, info in results["stages"].items()]
    expected_table.append(["second_run", "xe", "xe", results["stages"]["xe"]["metrics"]])
    assert summary["table"] == expected_table

    for stage in stages:
        metrics_file = demo_workdir / stage / "logs" / "version_0" / "metrics.csv"
        losses = csv_column(metrics_file, "train/loss")
        assert len(losses) == 3  # --fast: 3 training batches, each logged
        val_column = "val/cider_d" if stage in ("xe", "scst") else "val/t2a/mAP@10"
        val = csv_column(metrics_file, val_column)
        assert summary["points"][first][stage]["train/loss"] == len(losses)
        assert summary["points"][first][stage][val_column] == len(val)
        assert math.isclose(summary["last_value"][first][stage]["train/loss"], losses[-1], rel_tol=1e-12)
        assert math.isclose(summary["last_value"][first][stage][val_column], val[-1], rel_tol=1e-12)
    assert summary["points"]["second_run"] == {"xe": summary["points"][first]["xe"]}
    assert summary["last_value"]["second_run"] == {"xe": summary["last_value"][first]["xe"]}


@pytest.mark.slow
def test_data_exploration_notebook(demo_workdir):
    summary = summary_of(execute("data_exploration.ipynb", str(demo_workdir)))

    data_root = demo_workdir / "data"
    rows = {subset: clotho_rows(data_root, subset) for subset in SUBSETS}
    assert summary["clips"] == {subset: len(r) for subset, r in rows.items()}
    total = sum(len(r) for r in rows.values())
    assert summary["duration_histogram_clips"] == total == 400
    assert summary["caption_histogram_captions"] == 5 * total
    assert summary["example"] == rows["development"][0]["file_name"]

    # the re-split: 9:1 of development + validation, the very lists every training stage wrote
    assert len(rows["development"]) + len(rows["validation"]) == 320
    assert summary["resplit"] == {"train": 288, "val": 32}
    split_files = sorted(demo_workdir.glob("*/logs/version_*/splits.json"))
    assert len(split_files) == 4
    assert summary["split_files"] == {str(p.relative_to(demo_workdir)): True for p in split_files}
    train_keys = json.loads(split_files[0].read_text(encoding="utf-8"))["splits"]["train"]
    assert len(train_keys) == summary["resplit"]["train"]

    # vocabulary of the training captions, counted by hand: the synthetic captions are plain
    # lower-case ASCII words once punctuation is dropped
    captions = {
        f"clotho/{subset}/{row['file_name']}": [row[f"caption_{i}"] for i in range(1, 6)]
        for subset in ("development", "validation")
        for row in rows[subset]
    }
    counts = Counter(word for key in train_keys for caption in captions[key] for word in re.findall(r"[a-z]+", caption.lower()))
    assert summary["vocabulary_size"] == len(counts) + 4  # + <pad> <bos> <eos> <unk>
    top = summary["top_words"]
    assert len(top) == 10
    assert [count for _, count in top] == sorted(counts.values(), reverse=True)[:10]
    assert all(counts[word] == count for word, count in top)
