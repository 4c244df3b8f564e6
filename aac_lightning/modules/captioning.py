"""Cross-entropy (XE) captioning stage: a BiGRU-encoder captioner on the frozen audio encoder of a retrieval checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from aac_lightning.checkpoints import CHECKPOINT_UPGRADES, package_version
from aac_lightning.data.text import Vocabulary
from aac_lightning.modules.captioner import (
    CaptionerModule,
    CaptionPrediction,
    TestCaption,
    extractor_from_checkpoint,
    vocabulary_mismatch_message,
)
from aac_lightning.modules.schedules import check_warmup, step_budget, warmup_exponential
from aac_lightning.nn.audio_encoders import FrozenExtractor
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH

__all__ = [
    "CaptionPrediction",
    "CaptioningXE",
    "FrozenExtractor",
    "TestCaption",
    "extractor_from_checkpoint",
    "upgrade_captioner_hparams",
    "vocabulary_mismatch_message",
]

log = logging.getLogger(__name__)


# What the captioners of package versions before 0.2 were, where later options changed the defaults
# (the SJTU-fidelity options): their checkpoints record neither the options nor these values.
LEGACY_ENCODER_KWARGS = {"encoder_dropout": 0.2, "encoder_input_dropout": 0.0, "scheduled_sampling": "row"}
LEGACY_DECODER_KWARGS = {
    "transformer": {
        "memory_projection": "linear",
        "scale_embedding": False,
        "double_embedding_dropout": False,
        "positional_encoding": "sinusoidal",
        "weight_init": "pytorch",
    },
    "gru_attention": {"output_dropout": None, "weight_init": "pytorch"},
}


def upgrade_captioner_hparams(ckpt: dict[str, Any]) -> list[str]:
    """Fill the hyper-parameters a captioner checkpoint from before version 0.2 lacks; returns their names."""
    if package_version(ckpt) >= (0, 2):
        return []
    hparams = ckpt["hyper_parameters"]
    filled = []
    encoder = dict(hparams.get("encoder_kwargs") or {})
    decoder = dict(hparams.get("decoder_kwargs") or {})
    given = set(encoder) | set(decoder)
    for name, value in LEGACY_ENCODER_KWARGS.items():
        if name not in given:
            encoder[name] = value
    for name, value in LEGACY_DECODER_KWARGS.get(hparams.get("decoder", "transformer"), {}).items():
        decoder.setdefault(name, value)
    if encoder != (hparams.get("encoder_kwargs") or {}):
        hparams["encoder_kwargs"] = encoder
        filled.append("encoder_kwargs")
    if decoder != (hparams.get("decoder_kwargs") or {}):
        hparams["decoder_kwargs"] = decoder
        filled.append("decoder_kwargs")
    if "caption_hyphens" not in hparams:
        hparams["caption_hyphens"] = "split"
        filled.append("caption_hyphens")
    return filled


class CaptioningXE(CaptionerModule):
    """Captioner trained with label-smoothed cross-entropy and scheduled sampling (report Section 2.2).

    The audio goes through the frozen audio encoder of a retrieval checkpoint; its frame features
    feed a BiGRU encoder and a Transformer or GRU-attention decoder. The checkpoint carries the
    vocabulary and the extractor (architecture and weights), so `load_from_checkpoint` works alone.
    The extractor, vocabulary, feature cache, decoding and evaluation are `CaptionerModule`'s.

    Args:
        extractor_ckpt: retrieval (`contrastive`) checkpoint whose audio encoder is the frozen extractor.
        extractor: architecture of the extractor, `{"audio_encoder": name, "audio_encoder_kwargs": {...}}`;
            filled from `extractor_ckpt` (recorded so the checkpoint rebuilds it alone).
        input_dim: feature size the captioner reads (checked against the extractor's `frame_dim`).
        decoder: `transformer` or `gru_attention`.
        decoder_kwargs: arguments of the decoder (e.g. `num_layers: 4`).
        encoder_kwargs: arguments of the BiGRU encoder (`encoder_hidden_size`, `encoder_num_layers`, `encoder_dropout`).
        vocab_size: number of words when no vocabulary is given (parameter counts only).
        vocabulary: the word list; `None` takes the datamodule's at setup.
        caption_hyphens: how `vocabulary` cuts captions into words, `keep` (PTB, the authors') or
            `split`; recorded from the vocabulary actually used (a checkpoint without it used `split`).
        feature_cache_dir: folder of the extractor's feature cache; `None` runs the extractor online.
        label_smoothing: label smoothing of the cross-entropy.
        lr: peak learning rate of Adam; warmup_steps: optimizer steps of linear warm-up (one step = one
            global batch, whatever the number of devices); final_lr: rate at the last step.
        weight_decay: Adam's L2 weight decay (SJTU recipe: 1e-6, the authors' XE config; 0 turns it off).
        teacher_forcing_start / teacher_forcing_end: teacher-forcing probability, linear over training.
        beam_size: beam of the evaluation decoding; max_decode_length: longest decoded caption (the
            authors' 20).
        beam_finished, length_penalty: the beam search's rule (see `beam_search`): `collect` takes a
            finished hypothesis out of the beam and the live ones go on; the best is chosen by
            `score / length ** length_penalty` (the authors': `collect`, 1.0); `keep`, 0.0 is the raw
            sum with finished beams competing in the beam (this package before 0.2).
        init_from: an `xe` / `scst` checkpoint whose captioner weights start this run (weights only, strict);
            without `extractor_ckpt` its frozen extractor and, without `vocabulary`, its vocabulary are kept.
        nonfinite_loss: `error` (raise on a NaN/inf training loss) or `skip` (skip the step, counted
            and logged); see `AACModule`.
        test_metrics: caption metrics of the test step: set names (`dcase2022`, `dcase2023`,
            `dcase2024`, `all`, `default`) and/or metric names (`fense`, `vocab`, ...), see
            `aac_lightning.metrics.sets`; `default` (the 2022 metrics plus SPIDEr-FL and FENSE where
            their resources exist) is what the package always reported.
        fense_dir: folder holding the FENSE / SPIDEr-FL models (`None`: the Hugging Face cache and
            `$FENSE_DATA`); see `aac_lightning.metrics.fense`.

    The vocabulary rules (which of the model's and the datamodule's wins) are `CaptionerModule`'s.
    """

    kind = "xe"

    def __init__(
        self,
        extractor_ckpt: str | None = None,
        extractor: dict[str, Any] | None = None,
        input_dim: int = 2048,
        decoder: str = "transformer",
        decoder_kwargs: dict[str, Any] | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        vocabulary: list[str] | None = None,
        caption_hyphens: str = "keep",
        feature_cache_dir: str | None = None,
        label_smoothing: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        warmup_steps: int = 3000,
        final_lr: float = 5e-7,
        teacher_forcing_start: float = 1.0,
        teacher_forcing_end: float = 0.7,
        beam_size: int = 3,
        max_decode_length: int = DEFAULT_MAX_LENGTH,
        beam_finished: str = "collect",
        length_penalty: float = 1.0,
        init_from: str | None = None,
        nonfinite_loss: str = "error",
        test_metrics: str | list[str] = "default",
        fense_dir: str | None = None,
    ):
        for name, value in (("teacher_forcing_start", teacher_forcing_start), ("teacher_forcing_end", teacher_forcing_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 < final_lr <= lr:
            raise ValueError(f"final_lr must lie in (0, lr={lr}], got {final_lr}")
        super().__init__(
            extractor_ckpt=extractor_ckpt,
            extractor=extractor,
            input_dim=input_dim,
            decoder=decoder,
            decoder_kwargs=decoder_kwargs,
            encoder_kwargs=encoder_kwargs,
            vocab_size=vocab_size,
            vocabulary=vocabulary,
            caption_hyphens=caption_hyphens,
            feature_cache_dir=feature_cache_dir,
            beam_size=beam_size,
            max_decode_length=max_decode_length,
            beam_finished=beam_finished,
            length_penalty=length_penalty,
            init_from=init_from,
            nonfinite_loss=nonfinite_loss,
            test_metrics=test_metrics,
            fense_dir=fense_dir,
        )

    def teacher_forcing_ratio(self) -> float:
        """Teacher-forcing probability at the current step: linear from start to end over training."""
        start, end = self.hparams.teacher_forcing_start, self.hparams.teacher_forcing_end
        total = max(1, int(self.trainer.estimated_stepping_batches) - 1) if self._trainer is not None else 1
        progress = min(1.0, self.global_step / total)
        return start + (end - start) * progress

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        feats, lengths = self.features(batch)
        tokens = batch["tokens"].to(self.device)  # (B, L) <bos> w .. <eos> <pad>..
        ratio = self.teacher_forcing_ratio()
        logits = self.model(feats, lengths, tokens[:, :-1], teacher_forcing_ratio=ratio)  # (B, L-1, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            tokens[:, 1:].reshape(-1),
            ignore_index=Vocabulary.pad_id,
            label_smoothing=self.hparams.label_smoothing,
        )
        loss = self.checked_loss(loss, batch_idx)
        if self.skipping_step:  # non-finite on some rank, nonfinite_loss="skip": a zero stand-in
            return loss
        batch_size = tokens.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/teacher_forcing", ratio, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # Over the optimizer steps the run really takes: the same on any number of devices (global batch).
        budget = step_budget(self.trainer)
        total = budget.total
        warmup, peak, final = self.hparams.warmup_steps, self.hparams.lr, self.hparams.final_lr
        check_warmup(f"warmup_steps={warmup}", warmup, budget, self.trainer)
        scheduler = LambdaLR(optimizer, lambda step: warmup_exponential(step, warmup, total, peak, final))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


CHECKPOINT_UPGRADES["xe"] = upgrade_captioner_hparams
