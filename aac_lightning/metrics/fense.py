"""The models FENSE and SPIDEr-FL need, found offline: in a folder the user names, or in the caches.

Both metrics run two models besides aac-metrics' code:

- the fluency-error checker ``echecker_clotho_audiocaps_base.ckpt`` (a BERT classifier; the
  checkpoint records its encoder architecture, ``bert-base-uncased``, as ``model_type``), used by
  FENSE and SPIDEr-FL;
- the Sentence-BERT model ``paraphrase-TinyBERT-L6-v2``, used by FENSE only.

Where they are looked for:

- ``fense_dir`` (``--fense-models DIR``): ``DIR/echecker_clotho_audiocaps_base.ckpt``,
  ``DIR/bert-base-uncased/`` (the echecker's encoder: a Hugging Face model folder with config,
  weights and tokenizer) and ``DIR/paraphrase-TinyBERT-L6-v2/`` (a sentence-transformers folder);
- otherwise where aac-metrics puts them: the checkpoint in ``$FENSE_DATA`` (default
  ``<torch hub dir>/fense_data``), both Hugging Face models in the Hugging Face cache.

Nothing is downloaded: a missing model makes the metrics that need it unavailable, with the reason
and :data:`FETCH_COMMAND`, the command that fetches them where the internet is reachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ECHECKER", "FETCH_COMMAND", "FenseModels", "SBERT_MODEL", "find_fense_models", "load_fense_models"]

ECHECKER = "echecker_clotho_audiocaps_base"
ECHECKER_ENCODER = "bert-base-uncased"  # the `model_type` the echecker checkpoint records
SBERT_MODEL = "sentence-transformers/paraphrase-TinyBERT-L6-v2"
FETCH_COMMAND = (
    "aac-metrics-download --ptb_tokenizer false --meteor false --spice false --bert_score false --clap false"
)
FETCH_HINT = (
    f"fetch them with `{FETCH_COMMAND}` on a machine with internet access (then copy the Hugging Face "
    f"cache and $FENSE_DATA), or name a folder holding them (--fense-models DIR / fense_dir)"
)


@dataclass(frozen=True)
class FenseModels:
    """Where the models are: local paths, or None for a missing one (``problems`` says why)."""

    echecker_ckpt: Path | None
    encoder_dir: Path | None
    sbert_dir: Path | None
    problems: dict[str, str]  # "echecker" and/or "sbert" -> reason


def _echecker_encoder_name(ckpt: Path) -> str:
    """The encoder the echecker checkpoint records (`model_type`), read without loading its weights."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
        return str(state.get("model_type") or ECHECKER_ENCODER)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when the metric loads it
        return ECHECKER_ENCODER


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of a model, or None when it is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def find_fense_models(fense_dir: str | os.PathLike | None = None) -> FenseModels:
    """Locate the echecker checkpoint, its encoder and the Sentence-BERT model (see the module docstring)."""
    problems: dict[str, str] = {}
    if fense_dir is not None:
        root = Path(fense_dir).expanduser()
        if not root.is_dir():
            reason = f"the FENSE models folder '{root}' does not exist; {FETCH_HINT}"
            return FenseModels(None, None, None, {"echecker": reason, "sbert": reason})
        ckpt = root / f"{ECHECKER}.ckpt"
        sbert = root / SBERT_MODEL.split("/")[-1]
        encoder = root / Path(_echecker_encoder_name(ckpt)).name if ckpt.is_file() else None
        where = f"in '{root}'"
    else:
        import torch

        data_home = Path(os.getenv("FENSE_DATA", os.path.join(torch.hub.get_dir(), "fense_data"))).expanduser()
        ckpt = data_home / f"{ECHECKER}.ckpt"
        sbert = _cached_snapshot(SBERT_MODEL)
        encoder_name = _echecker_encoder_name(ckpt) if ckpt.is_file() else ECHECKER_ENCODER
        encoder = _cached_snapshot(encoder_name) if ckpt.is_file() else None
        where = "in the Hugging Face cache"
    if not ckpt.is_file():
        problems["echecker"] = f"missing the fluency-error checker {ckpt}; {FETCH_HINT}"
        encoder = None
    elif encoder is None or not (encoder / "config.json").is_file():
        name = Path(_echecker_encoder_name(ckpt)).name
        problems["echecker"] = f"missing the echecker's encoder '{name}' {where}; {FETCH_HINT}"
        encoder = None
    if sbert is None or not (sbert / "config.json").is_file():
        problems["sbert"] = f"missing the Sentence-BERT model '{SBERT_MODEL}' {where}; {FETCH_HINT}"
        sbert = None
    return FenseModels(ckpt if "echecker" not in problems else None, encoder, sbert, problems)


def load_fense_models(models: FenseModels, *, need_sbert: bool, device: str = "cpu") -> dict[str, Any]:
    """aac-metrics keyword arguments (``echecker``, ``echecker_tokenizer``, ``sbert_model``) with the models loaded.

    Raises RuntimeError naming the missing model when ``models`` lacks one that is needed.
    """
    import torch
    from aac_metrics.functional.fer import BERTFlatClassifier
    from transformers import AutoTokenizer

    if models.echecker_ckpt is None or models.encoder_dir is None:
        raise RuntimeError(models.problems.get("echecker", "the fluency-error checker is missing"))
    state = torch.load(models.echecker_ckpt, map_location="cpu", weights_only=True)
    echecker = BERTFlatClassifier(model_type=str(models.encoder_dir), num_classes=int(state["num_classes"]))
    weights = dict(state["state_dict"])
    expected = echecker.state_dict()
    # transformers > 4.31 no longer keeps `position_ids` as a weight (aac-metrics drops it too)
    weights = {k: v for k, v in weights.items() if k in expected or k != "encoder.embeddings.position_ids"}
    echecker.load_state_dict(weights)
    kwargs: dict[str, Any] = {
        "echecker": echecker.eval().to(device),
        "echecker_tokenizer": AutoTokenizer.from_pretrained(str(models.encoder_dir)),
    }
    if need_sbert:
        if models.sbert_dir is None:
            raise RuntimeError(models.problems.get("sbert", "the Sentence-BERT model is missing"))
        from sentence_transformers import SentenceTransformer

        kwargs["sbert_model"] = SentenceTransformer(str(models.sbert_dir), device=device)
    return kwargs
