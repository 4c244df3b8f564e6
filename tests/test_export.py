"""`aac-lightning export`: a self-contained folder (safetensors, config, vocabulary, model card) that every loader takes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from aac_lightning import Captioner, Retriever
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.cli import main
from aac_lightning.data.datasets import Clotho
from aac_lightning.ensembles.captioning import load_captioner
from aac_lightning.pretrained import export_pretrained, find_run_results
from aac_lightning.utils.preflight import OutputDirError
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)

CAPTIONER_FILES = {"README.md", "config.json", "model.safetensors", "vocabulary.json"}
QUERIES = ["a high beep then a low siren", "loud knocking"]


def _refuse(*args, **kwargs):
    raise AssertionError("loading an exported folder must not unpickle anything")


@contextlib.contextmanager
def no_unpickling():
    """`torch.load`, `pickle.load` and `pickle.loads` raise while the block runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", _refuse)
        mp.setattr(pickle, "load", _refuse)
        mp.setattr(pickle, "loads", _refuse)
        yield


def _run_cli(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def clips(synth_root: Path) -> list[Path]:
    return [r.path for r in Clotho(synth_root, "evaluation").records][:6]


@pytest.fixture(scope="module")
def run_dir(xe_ckpt: Path, tmp_path_factory) -> Path:  # noqa: F811
    """A pipeline work directory holding the XE checkpoint as its stage 'xe' and a results.json."""
    work = tmp_path_factory.mktemp("work")
    (work / "xe" / "checkpoints").mkdir(parents=True)
    shutil.copy(xe_ckpt, work / "xe" / "checkpoints" / "best-epoch=00.ckpt")
    shutil.copy(xe_ckpt, work / "xe" / "averaged.ckpt")  # what the stage evaluated (EpochWeightAveraging)
    os.link(work / "xe" / "averaged.ckpt", work / "xe" / "best.ckpt")  # the pipeline links its stage checkpoints
    results = {
        "recipe": "tiny",
        "workdir": str(work),
        "stages": {
            "retrieval": {"kind": "contrastive", "checkpoint": str(work / "retrieval" / "best.ckpt"), "metrics": {"mAP@10": 0.5}},
            "xe": {"kind": "xe", "checkpoint": str(work / "xe" / "averaged.ckpt"), "metrics": {"bleu_1": 0.4321, "cider_d": 0.1234}},
        },
    }
    (work / "results.json").write_text(json.dumps(results), encoding="utf-8")
    config = {"trainer": {"max_epochs": 3}, "data": {"init_args": {"train_sources": ["clotho", "audiocaps"], "val_source": "clotho", "global_batch_size": 8}}}
    (work / "xe" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def captioner_folder(run_dir: Path) -> Path:
    out = run_dir.parent / "export_xe"
    output = _run_cli(["export", str(run_dir / "xe" / "averaged.ckpt"), str(out)])
    assert "test metrics of stage 'xe'" in output and "found next to the checkpoint" in output
    return out


@pytest.fixture(scope="module")
def retrieval_folder(retrieval_ckpt: Path, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "retrieval"
    report = export_pretrained(retrieval_ckpt, out)
    assert report.kind == "contrastive" and not report.results.metrics
    return out


# ---------------------------------------------------------------------------------------------- same model
def test_captioner_folder_holds_its_files_and_captions_as_the_checkpoint(captioner_folder: Path, xe_ckpt: Path, clips):  # noqa: F811
    assert {p.name for p in captioner_folder.iterdir()} == CAPTIONER_FILES
    config = json.loads((captioner_folder / "config.json").read_text())
    assert config["kind"] == "xe" and config["init_args"]["extractor_ckpt"] is None and config["init_args"]["feature_cache_dir"] is None
    assert config["source"]["handoff"]["extractor_ckpt"]  # the stage handoff is provenance only
    words = json.loads((captioner_folder / "vocabulary.json").read_text())
    assert words == read_checkpoint(xe_ckpt)["hyper_parameters"]["vocabulary"]
    reference = Captioner.from_checkpoint(xe_ckpt).caption(clips)
    with no_unpickling():  # rebuilt from the folder alone: no handoff file, no checkpoint, no pickle
        captioner = Captioner.from_pretrained(captioner_folder)
        assert captioner.caption(clips) == reference
    module = load_captioner(captioner_folder)
    assert not module.training
    for key, value in read_checkpoint(xe_ckpt)["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key


def test_retrieval_folder_holds_its_files_and_scores_as_the_checkpoint(retrieval_folder: Path, retrieval_ckpt: Path, clips):  # noqa: F811
    top = {p.name for p in retrieval_folder.iterdir()}
    assert top == {"README.md", "config.json", "model.safetensors", "text_encoder"}
    text_files = {p.name for p in (retrieval_folder / "text_encoder").iterdir()}
    assert "config.json" in text_files and {"tokenizer.json", "tokenizer_config.json"} <= text_files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for name in text_files)
    config = json.loads((retrieval_folder / "config.json").read_text())
    assert config["init_args"]["text_pretrained"] is False and config["path_arguments"] == {"text_encoder": "text_encoder"}
    reference = Retriever.from_checkpoint(retrieval_ckpt, use_cache=False)
    with no_unpickling():
        retriever = Retriever.from_pretrained(retrieval_folder, use_cache=False)
        sim = retriever.similarity(QUERIES, clips)  # (Q, A)
    assert torch.allclose(sim, reference.similarity(QUERIES, clips), atol=1e-6, rtol=0)
    assert retriever.model_keys == reference.model_keys  # same weights: the embedding cache is shared


def test_commands_take_the_folder(captioner_folder: Path, retrieval_folder: Path, retrieval_ckpt: Path, xe_ckpt: Path, clips, tmp_path: Path):  # noqa: F811
    audio = [str(c) for c in clips[:3]]
    assert _run_cli(["caption", str(captioner_folder), *audio]) == _run_cli(["caption", str(xe_ckpt), *audio])
    folder = tmp_path / "audio"
    folder.mkdir()
    for clip in clips:
        shutil.copy(clip, folder / clip.name)
    searched = _run_cli(["search", str(retrieval_folder), "--audio-dir", str(folder), "--no-cache", "-k", "3", *QUERIES])
    assert searched == _run_cli(["search", str(retrieval_ckpt), "--audio-dir", str(folder), "--no-cache", "-k", "3", *QUERIES])
    assert searched.count("\n# ") == len(QUERIES) - 1


def test_from_pretrained_takes_folders_only(xe_ckpt: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(NotADirectoryError, match="not an exported model folder"):
        Captioner.from_pretrained(xe_ckpt)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Retriever.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- model card
def test_model_card_carries_the_run_metrics_data_and_recipe(captioner_folder: Path):
    card = (captioner_folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "aac-lightning" and "audio-captioning" in front["tags"]
    assert front["datasets"] == ["audiocaps", "clotho"] and front["metrics"] == ["bleu_1", "cider_d"]
    assert "| cider_d | 0.1234 |" in card and "| bleu_1 | 0.4321 |" in card
    assert "recipe `tiny`, stage `xe`" in card and "epochs: 3" in card and "global batch size: 8" in card
    assert str(captioner_folder.parent) not in card  # no local paths in a card meant for a hub


def test_results_given_or_absent(run_dir: Path, xe_ckpt: Path, tmp_path: Path):  # noqa: F811
    # An epoch checkpoint of the stage: its metrics, said to be the stage's averaged.ckpt's.
    run = find_run_results(run_dir / "xe" / "checkpoints" / "best-epoch=00.ckpt")
    assert find_run_results(run_dir / "xe" / "best.ckpt").note.endswith("(found next to the checkpoint)")  # a link: the same file
    assert run.stage == "xe" and run.metrics["cider_d"] == 0.1234 and "averaged.ckpt" in run.note
    stage_json = tmp_path / "stage.json"
    stage_json.write_text(json.dumps({"kind": "xe", "metrics": {"spider": 0.25}}))
    assert find_run_results(xe_ckpt, stage_json).metrics == {"spider": 0.25}
    with pytest.raises(ValueError, match="has no stage for checkpoint"):
        find_run_results(xe_ckpt, run_dir / "results.json")
    absent = find_run_results(xe_ckpt)
    assert not absent.metrics and "pass --results" in absent.note
    output = _run_cli(["export", str(xe_ckpt), str(tmp_path / "out"), "--results", str(stage_json)])
    assert "metrics from" in output and "| spider | 0.2500 |" in (tmp_path / "out" / "README.md").read_text()


def test_export_never_replaces_another_folder(captioner_folder: Path, xe_ckpt: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(OutputDirError, match="--overwrite"):
        export_pretrained(xe_ckpt, captioner_folder)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not an earlier export"):
        export_pretrained(xe_ckpt, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    copy = tmp_path / "again"
    shutil.copytree(captioner_folder, copy)
    report = export_pretrained(xe_ckpt, copy, overwrite=True)
    assert set(report.files) == CAPTIONER_FILES and not any(p.name.startswith(".") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- broken folders
def _edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _first_decoder_key(state: dict) -> str:
    return sorted(k for k in state if k.startswith("model.") and k.endswith(".weight"))[0]


BROKEN = {
    "no weights": (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, r"model\.safetensors"),
    "no vocabulary": (lambda f: (f / "vocabulary.json").unlink(), FileNotFoundError, r"vocabulary\.json"),
    "no config": (lambda f: (f / "config.json").unlink(), FileNotFoundError, r"config\.json"),
    "config not json": (lambda f: (f / "config.json").write_text("{oops"), HandoffError, r"config\.json' is not valid JSON"),
    "newer format": (lambda f: _edit_config(f, lambda c: c.update(format_version=99)), HandoffError, r"config\.json' has format_version 99"),
    "other format": (lambda f: _edit_config(f, lambda c: c.update(format="something")), HandoffError, r"config\.json' is not an aac-lightning export"),
    "short vocabulary": (
        lambda f: (f / "vocabulary.json").write_text(json.dumps(json.loads((f / "vocabulary.json").read_text())[:-1])),
        HandoffError,
        r"vocabulary\.json' holds \d+ words but .*config\.json' records vocab_size",
    ),
    "wrong shape": (
        lambda f: _edit_weights(f, lambda s: s.update({_first_decoder_key(s): torch.zeros(3, 3)})),
        HandoffError,
        r"model\.safetensors' do not fit the model; shape mismatches: model\.",
    ),
    "extra key": (
        lambda f: _edit_weights(f, lambda s: s.update({"model.surprise": torch.zeros(2)})),
        HandoffError,
        r"model\.safetensors' do not fit the model; unexpected keys: model\.surprise",
    ),
    "missing key": (
        lambda f: _edit_weights(f, lambda s: s.pop(_first_decoder_key(s))),
        HandoffError,
        r"model\.safetensors' do not fit the model; missing keys: model\.",
    ),
    "not safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"not a tensor file"), HandoffError, r"cannot read .*model\.safetensors"),
    "kind of another class": (
        lambda f: _edit_config(f, lambda c: c.update(class_path="aac_lightning.modules.scst.CaptioningSCST")),
        HandoffError,
        r"config\.json' records a model of stage kind 'xe' \(aac_lightning\.modules\.scst\.CaptioningSCST\), but CaptioningSCST loads kind 'scst'",
    ),
    "retrieval kind": (lambda f: _edit_config(f, lambda c: c.update(kind="contrastive")), HandoffError, r"stage kind 'contrastive', not a captioner"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folder_is_an_error_naming_the_file(captioner_folder: Path, tmp_path: Path, case: str):
    breaks, error, message = BROKEN[case]
    folder = tmp_path / "broken"
    shutil.copytree(captioner_folder, folder)
    breaks(folder)
    with pytest.raises(error, match=message):
        Captioner.from_pretrained(folder)


def test_broken_folder_on_the_command_line_is_one_line(captioner_folder: Path, tmp_path: Path, clips, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(captioner_folder, folder)
    (folder / "vocabulary.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(folder), str(clips[0])], report_errors=True)
    assert "vocabulary.json" in str(exit_info.value.code) + capsys.readouterr().err


def test_a_folder_hands_over_to_a_training_stage(captioner_folder: Path, xe_ckpt: Path):  # noqa: F811
    from aac_lightning.modules import CaptioningSCST

    module = CaptioningSCST(init_from=str(captioner_folder))  # SCST from an exported XE captioner
    for key, value in read_checkpoint(xe_ckpt)["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key
