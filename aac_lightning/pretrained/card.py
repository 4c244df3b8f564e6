"""The model card (`README.md`) of an exported folder: hub front matter, use, architecture, training data, recipe, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from aac_lightning.checkpoints import CONFIG_FILE, VOCABULARY_FILE, WEIGHTS_FILE
from aac_lightning.pretrained.runs import RunResults

__all__ = ["CARD_FILE", "TEXT_ENCODER_DIR", "model_card"]

CARD_FILE = "README.md"
TEXT_ENCODER_DIR = "text_encoder"
KIND_TITLES = {
    "contrastive": "Text-to-audio retrieval bi-encoder",
    "xe": "Audio captioner, cross-entropy stage",
    "scst": "Audio captioner, SCST stage",
}
KIND_TAGS = {"contrastive": ["text-to-audio-retrieval", "audio-text-retrieval", "clap"], "xe": ["audio-captioning"], "scst": ["audio-captioning"]}
TRAINING_ARGUMENTS = (
    "lr", "text_lr", "weight_decay", "warmup_epochs", "warmup_steps", "final_lr", "label_smoothing",
    "teacher_forcing_start", "teacher_forcing_end", "samples", "num_samples", "baseline", "init_temperature",
)


def _training_data(stage_config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """`(dataset names for the front matter, lines for the card)` from a stage config's `data` section."""
    data = stage_config.get("data") or {}
    args = data.get("init_args") or {} if isinstance(data, dict) else {}
    if not args:
        return [], ["Not recorded: the checkpoint was not found in a pipeline work directory (no stage `config.yaml`)."]
    sources = [str(s) for s in (args.get("train_sources") or ["clotho"])]
    synthetic = False
    root = args.get("clotho_root")
    if root and (Path(str(root)) / "CLOTHO_v2.1" / "synth_events.json").is_file():
        synthetic = True
    lines = [f"- training sources: {', '.join(sources)}"]
    for key in ("val_source", "test_source"):
        if args.get(key):
            lines.append(f"- {key.replace('_source', '')} source: {args[key]}")
    if args.get("resplit"):
        lines.append(f"- Clotho development + validation re-split per clip, train fraction {args.get('resplit_train_fraction')}, seed {args.get('resplit_seed')}")
    if synthetic:
        lines.append("- **synthetic data**: the Clotho root is the synthetic dataset of `aac-lightning synth` (a demo, not a real model)")
    names = [] if synthetic else sorted({*sources, *(str(args[k]) for k in ("val_source", "test_source") if args.get(k))})
    return names, lines


def _architecture(kind: str, init_args: dict[str, Any], text_encoder_name: str | None) -> list[str]:
    if kind == "contrastive":
        return [
            f"- audio encoder: `{init_args.get('audio_encoder')}` {json.dumps(init_args.get('audio_encoder_kwargs') or {})}",
            f"- text encoder: `{text_encoder_name}` (pooling `{init_args.get('text_pooling')}`, at most {init_args.get('text_max_length')} tokens)",
            f"- shared embedding size: {init_args.get('embed_dim')}; cosine similarity, learned temperature",
        ]
    extractor = init_args.get("extractor") or {}
    return [
        f"- frozen audio extractor: `{extractor.get('audio_encoder')}` {json.dumps(extractor.get('audio_encoder_kwargs') or {})}",
        f"- encoder: BiGRU {json.dumps(init_args.get('encoder_kwargs') or {})}",
        f"- decoder: `{init_args.get('decoder')}` {json.dumps(init_args.get('decoder_kwargs') or {})}",
        f"- vocabulary: {init_args.get('vocab_size')} words (`{VOCABULARY_FILE}`), hyphens `{init_args.get('caption_hyphens')}`",
        f"- decoding: beam {init_args.get('beam_size')}, at most {init_args.get('max_decode_length')} words",
    ]


def model_card(config: dict[str, Any], run: RunResults, stage_config: dict[str, Any], parameters: int) -> str:
    """The folder's README.md: hub front matter (library_name, tags, datasets, metrics) and the card."""
    kind = config["kind"]
    init_args = config["init_args"]
    datasets, data_lines = _training_data(stage_config)
    front: dict[str, Any] = {
        "library_name": "aac-lightning",
        "tags": ["audio", *KIND_TAGS.get(kind, []), "dcase2022-task6", "pytorch-lightning", "aac-lightning"],
    }
    if datasets:
        front["datasets"] = datasets
    if run.metrics:
        front["metrics"] = sorted(run.metrics)
    title = KIND_TITLES.get(kind, kind)
    use = (
        "from aac_lightning import Captioner\n\ncaptioner = Captioner.from_pretrained(\"path/to/this/folder\")\n"
        "print(captioner.caption([\"clip.wav\"]))  # [(file, caption)]"
        if kind in ("xe", "scst")
        else "from aac_lightning import Retriever\n\nretriever = Retriever.from_pretrained(\"path/to/this/folder\")\n"
        "retriever.index(\"recordings/\")\nprint(retriever.search(\"a dog barks\", k=5))  # [[(file, score)]]"
    )
    command = "aac-lightning caption FOLDER clip.wav" if kind in ("xe", "scst") else "aac-lightning search FOLDER --audio-dir recordings/ \"a dog barks\""
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title} ({config['class_path'].rsplit('.', 1)[-1]})",
        "",
        f"Exported with aac-lightning {config['package_version']} from `{config['source']['checkpoint']}`"
        + (f", stage `{run.stage}` of the recipe `{run.recipe}`." if run.stage else "."),
        "A reproduction of the SJTU system for DCASE 2022 Task 6 (automated audio captioning and language-based audio retrieval).",
        "",
        "## Use",
        "",
        "```python",
        use,
        "```",
        "",
        f"or on the command line: `{command}` (the folder works wherever a checkpoint does).",
        "Loading reads `config.json`, `model.safetensors` and the JSON/tokenizer files only: nothing is unpickled.",
        "",
        "## Model",
        "",
        f"- stage kind: `{kind}`, class `{config['class_path']}`",
        f"- parameters: {parameters:,}",
        f"- audio sample rate: {config.get('sample_rate')} Hz (any input is resampled)",
        *_architecture(kind, init_args, config.get("source", {}).get("text_encoder")),
        "",
        "## Training data",
        "",
        *data_lines,
        "",
        "## Recipe",
        "",
    ]
    recipe_lines = []
    if run.recipe:
        recipe_lines.append(f"- recipe `{run.recipe}`, stage `{run.stage}`")
    trainer = stage_config.get("trainer") or {}
    if trainer.get("max_epochs") is not None:
        recipe_lines.append(f"- epochs: {trainer['max_epochs']}")
    batch = ((stage_config.get("data") or {}).get("init_args") or {}).get("global_batch_size")
    if batch is not None:
        recipe_lines.append(f"- global batch size: {batch}")
    training = {k: init_args[k] for k in TRAINING_ARGUMENTS if init_args.get(k) is not None}
    if training:
        recipe_lines.append("- " + ", ".join(f"{k} {v}" for k, v in training.items()))
    for name, path in (config["source"].get("handoff") or {}).items():
        recipe_lines.append(f"- started from (`{name}`): `{path}`")
    lines += recipe_lines or ["Not recorded."]
    lines += ["", "## Metrics", ""]
    if run.metrics:
        lines.append(f"{run.card_note}.")
        if kind == "contrastive":
            lines.append("Text-to-audio retrieval; names starting with `a2t/` are audio-to-text.")
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in run.metrics.items()]
    else:
        lines.append(f"None recorded: {run.card_note}.")
    lines += ["", "## Files", "", f"- `{CONFIG_FILE}`: what rebuilds the model (stage kind, class, init arguments)", f"- `{WEIGHTS_FILE}`: the weights"]
    if config.get("vocabulary_file"):
        lines.append(f"- `{VOCABULARY_FILE}`: the word list, in id order")
    if config.get("path_arguments"):
        lines.append(f"- `{TEXT_ENCODER_DIR}/`: the text encoder's Hugging Face config and tokenizer")
    return "\n".join(lines) + "\n"
