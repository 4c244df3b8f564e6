"""`export_pretrained`: write a checkpoint as a self-contained folder (weights, config, vocabulary, text encoder files, card)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aac_lightning import __version__
from aac_lightning.checkpoints import (
    CONFIG_FILE,
    METADATA_KEY,
    PRETRAINED_FORMAT,
    PRETRAINED_FORMAT_VERSION,
    PRETRAINED_KEY,
    VOCABULARY_FILE,
    WEIGHTS_FILE,
    HandoffError,
    checkpoint_kind,
    read_checkpoint,
)
from aac_lightning.config import count_parameters, import_class, init_argument_names
from aac_lightning.nn.text_encoders import TextEncoder
from aac_lightning.pretrained.card import CARD_FILE, TEXT_ENCODER_DIR, model_card
from aac_lightning.pretrained.runs import RunResults, display_path, find_run_results, read_stage_config
from aac_lightning.utils.preflight import OutputDirError

__all__ = ["ExportReport", "export_pretrained"]

# Init arguments naming places on the exporting machine that play no part in the model.
LOCAL_ARGUMENTS = ("feature_cache_dir",)


@dataclass
class ExportReport:
    """What `export_pretrained` wrote."""

    out_dir: Path
    kind: str
    class_path: str
    files: list[str]
    parameters: int
    sample_rate: int | None
    results: RunResults


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"'{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputDirError(f"'{out_dir}' exists and is not empty; pass --overwrite to replace an earlier export")
        if not (out_dir / CONFIG_FILE).is_file() or not (out_dir / WEIGHTS_FILE).is_file():
            raise OutputDirError(f"'{out_dir}' is not an earlier export (no {CONFIG_FILE} and {WEIGHTS_FILE}): not replaced, even with --overwrite")


def _json_init_args(init_args: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(init_args, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise HandoffError(f"the hyper-parameters of '{checkpoint}' cannot be written as JSON: {err}") from err


def export_pretrained(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, results: str | os.PathLike | None = None, overwrite: bool = False
) -> ExportReport:
    """Write `checkpoint` (a .ckpt of this package, or an exported folder) as a self-contained folder `out_dir`.

    The model is rebuilt from the checkpoint alone first (so a checkpoint that cannot be rebuilt offline
    is refused before anything is written); the folder is written next to `out_dir` and renamed into
    place only once it loads back with every tensor equal. `results`: the `results.json` (or
    `stage.json`) with the metrics for the model card (default: looked up from the checkpoint's
    folder, see `find_run_results`). `overwrite` replaces an earlier export, never another folder.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    ckpt = read_checkpoint(checkpoint)
    meta = ckpt.get(METADATA_KEY) or {}
    kind, class_path = checkpoint_kind(ckpt), meta.get("class_path")
    if kind is None or not class_path:
        raise HandoffError(f"'{checkpoint}' records no stage kind and class (not a checkpoint written by aac-lightning)")
    cls = import_class(class_path)
    module = cls.load_for_inference(checkpoint, map_location="cpu")
    run = find_run_results(checkpoint, results)

    # As Lightning's `load_from_checkpoint`: only the arguments the class takes (a later stage's
    # checkpoint may record its predecessor's training arguments too).
    accepted = init_argument_names(cls)
    hparams = {
        k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_") and (accepted is None or k in accepted)
    }
    original = dict(hparams)
    source_config = ckpt.get(PRETRAINED_KEY) or {}
    handoff = dict(meta.get("handoff") or (source_config.get("source") or {}).get("handoff") or {})
    handoff.update({name: original[name] for name in getattr(cls, "handoff_arguments", ()) if original.get(name)})
    hparams.update(cls.offline_build_overrides(hparams))
    for name in LOCAL_ARGUMENTS:
        if name in hparams:
            hparams[name] = None
    vocabulary = hparams.pop("vocabulary", None)
    text_encoder = getattr(getattr(module, "model", None), "text_encoder", None)
    path_arguments: dict[str, str] = {}
    text_encoder_name = (source_config.get("source") or {}).get("text_encoder") or original.get("text_encoder")
    if isinstance(text_encoder, TextEncoder) and "text_encoder" in hparams:
        hparams["text_encoder"] = TEXT_ENCODER_DIR  # resolved against the folder when read
        path_arguments["text_encoder"] = TEXT_ENCODER_DIR
    sample_rate = getattr(module, "sample_rate", None)
    workdir = run.results_file.parent if run.results_file is not None else None
    config: dict[str, Any] = {
        "format": PRETRAINED_FORMAT,
        "format_version": PRETRAINED_FORMAT_VERSION,
        "package_version": __version__,
        "kind": kind,
        "class_path": class_path,
        "sample_rate": int(sample_rate) if sample_rate is not None else None,
        "init_args": _json_init_args(hparams, checkpoint),
        "path_arguments": path_arguments,
        "vocabulary_file": VOCABULARY_FILE if vocabulary is not None else None,
        "source": {
            "checkpoint": display_path(checkpoint, workdir),
            "checkpoint_version": meta.get("version"),
            "stage": run.stage,
            "recipe": run.recipe,
            "handoff": {k: display_path(v, workdir) for k, v in handoff.items() if v},
            "text_encoder": text_encoder_name if path_arguments else None,
        },
    }
    if source_config:  # re-exporting a folder: keep where it came from
        config["source"]["checkpoint"] = (source_config.get("source") or {}).get("checkpoint") or checkpoint.name
    parameters, _ = count_parameters(module)

    from safetensors.torch import save_file

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # Cloned: tied weights share storage, which safetensors refuses; loading ties them again.
        state = {k: v.detach().clone().contiguous() for k, v in ckpt["state_dict"].items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if vocabulary is not None:
            (tmp / VOCABULARY_FILE).write_text(json.dumps(list(vocabulary), ensure_ascii=False, indent=0), encoding="utf-8")
        if path_arguments:
            text_dir = tmp / TEXT_ENCODER_DIR
            text_encoder.model.config.save_pretrained(text_dir)
            try:
                text_encoder.tokenizer.save_pretrained(text_dir)
            except OSError as err:  # the tokenizer must be on this machine to be shipped with the model
                raise HandoffError(f"cannot export the tokenizer of text encoder {text_encoder_name!r}: {err}") from err
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(config, run, read_stage_config(run, checkpoint), parameters), encoding="utf-8")
        _verify(cls, tmp, ckpt["state_dict"])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return ExportReport(out_dir, kind, class_path, files, parameters, config["sample_rate"], run)


def _verify(cls: type, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """The written folder rebuilds the model with every tensor equal to the checkpoint's."""
    rebuilt = cls.load_for_inference(folder, map_location="cpu").state_dict()
    differing = [k for k, v in state_dict.items() if k not in rebuilt or not torch.equal(rebuilt[k], v)]
    if differing:
        raise HandoffError(f"the exported folder does not reproduce the checkpoint's weights: {differing[:5]}")
