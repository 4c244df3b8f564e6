"""Contrastive audio-text stage: pre-training and Clotho fine-tuning of the bi-encoder (one class, two configs)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from aac_lightning.metrics.relevance import RelevanceFile, dcase2025_metrics, read_relevance_file
from aac_lightning.metrics.retrieval import audio_to_text_metrics, retrieval_metrics
from aac_lightning.modules.base import AACModule
from aac_lightning.checkpoints import extract_submodule_state, load_state_dict_strict
from aac_lightning.modules.schedules import check_warmup, step_budget, warmup_cosine
from aac_lightning.nn.audio_encoders import load_audio_encoder
from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.nn.contrastive import ContrastiveLoss
from aac_lightning.nn.text_encoders import TextEncoder
from aac_lightning.utils.distributed import all_gather_sizes, all_gather_tensor, is_distributed

log = logging.getLogger(__name__)


class ContrastiveRetrieval(AACModule):
    """Bi-encoder trained with the report's symmetric InfoNCE (eq. 6); evaluated by text-to-audio retrieval.

    Args:
        audio_encoder: `cnn14`, `wavegram_logmel_cnn14` or `ast`.
        audio_encoder_kwargs: constructor arguments of the audio encoder (sizes, front end).
        audio_checkpoint: official PANNs / AST weights to start the audio encoder from.
        text_encoder: hub id, local directory or alias (`minilm-l6`) of the text encoder.
        text_pretrained: start the text encoder from its pretrained weights (else random, offline).
        text_max_length: tokens per caption after truncation (special tokens included); 30 as the
            authors' `max_text_length` (configs/data.json of wsntxxn/DCASE2022T6_CLAP).
        text_pooling: `cls` (first token, the report's choice) or `mean`.
        embed_dim: size of the shared embedding space.
        init_temperature: initial softmax temperature (trainable, logit scale clamped at 100).
        lr: peak learning rate of Adam (1e-4 pre-training, 2e-5 fine-tuning).
        text_lr: peak learning rate of the text encoder's parameters (`None`: `lr`, the report's
            setting). Lower it when the audio encoder starts from scratch at a high `lr`, so the
            pretrained text encoder is not washed out (the demo: 1e-3 and 5e-5).
        weight_decay: Adam weight decay (never applied to the temperature).
        warmup_epochs: epochs of linear warm-up before the cosine decay.
        gather_negatives: under DDP, use the global batch as negatives.
        mask_same_clip: captions of the same clip in a batch are not each other's negatives
            (taken out of the softmax). False: plain diagonal targets, as eq. 6 and the authors' code.
        loss_direction_reduction: `mean` averages the audio-to-text and text-to-audio losses, as the
            authors' code (`models/loss.py`); `sum` adds them, as eq. 6 of the report (twice the value;
            the same training under Adam up to its epsilon).
        init_from: a contrastive checkpoint whose weights start this run (fine-tuning; weights only,
            strict). Resuming the same run uses the trainer's `ckpt_path` instead.
        nonfinite_loss: `error` (raise on a NaN/inf training loss) or `skip` (skip the step, counted
            and logged); see `AACModule`.
        test_relevance: a DCASE 2025 relevance file (CSV `query,audio_filenames`, several relevant clips
            per caption): the test step then also logs `test/dcase2025/mAP@16` and `test/dcase2025/R@k`
            against it, next to the 2022 metrics (`None`: the 2022 metrics only). Its queries and clips
            must be among the test split's captions and files (else an error names them).

    The logged `train/loss` is the mean over DDP ranks, i.e. eq. 6 on the global batch.
    """

    kind = "contrastive"
    handoff_arguments = ("init_from", "audio_checkpoint")

    def __init__(
        self,
        audio_encoder: str = "cnn14",
        audio_encoder_kwargs: dict[str, Any] | None = None,
        audio_checkpoint: str | None = None,
        text_encoder: str = "bert-base-uncased",
        text_pretrained: bool = True,
        text_max_length: int = 30,
        text_pooling: str = "cls",
        embed_dim: int = 1024,
        init_temperature: float = 0.07,
        lr: float = 1e-4,
        text_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_epochs: float = 1.0,
        gather_negatives: bool = True,
        mask_same_clip: bool = False,
        loss_direction_reduction: str = "mean",
        init_from: str | None = None,
        nonfinite_loss: str = "error",
        test_relevance: str | None = None,
    ):
        super().__init__(nonfinite_loss=nonfinite_loss)
        self.save_hyperparameters()
        audio = load_audio_encoder(audio_encoder, audio_checkpoint, **(audio_encoder_kwargs or {}))
        text = TextEncoder(text_encoder, pretrained=text_pretrained, max_length=text_max_length, pooling=text_pooling)
        self.model = BiEncoder(audio, text, embed_dim=embed_dim, init_temperature=init_temperature)
        self.loss_fn = ContrastiveLoss(gather=gather_negatives, direction_reduction=loss_direction_reduction)
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        self._eval_texts: list[tuple[list[str], list[list[str]]]] = []  # (fnames, captions) per test batch
        self._relevance: RelevanceFile | None = None
        if init_from is not None:
            ckpt = self.load_handoff(init_from, expected_kinds=("contrastive",))
            load_state_dict_strict(self.model, extract_submodule_state(ckpt["state_dict"], "model."), f"'{init_from}'")
            log.info("initialised from %s", init_from)

    @classmethod
    def offline_build_overrides(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        return {**super().offline_build_overrides(init_args), "text_pretrained": False}

    @property
    def sample_rate(self) -> int:
        return self.model.audio_encoder.sample_rate

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["audio"], batch["captions"], batch["audio_lengths"])
        clip_ids = batch["clip_ids"] if self.hparams.mask_same_clip else None
        loss = self.checked_loss(self.loss_fn(out["audio_emb"], out["text_emb"], out["logit_scale"], clip_ids), batch_idx)
        if self.skipping_step:  # non-finite on some rank, nonfinite_loss="skip": a zero stand-in
            return loss
        batch_size = len(batch["captions"])
        # Each rank's loss is its share of the gathered InfoNCE; their mean is the global-batch loss.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/temperature", 1.0 / out["logit_scale"].detach(), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.clamp_logit_scale()

    def configure_optimizers(self):
        no_decay = set(self.model.no_weight_decay_parameter_names(prefix="model."))
        text_lr = self.hparams.lr if self.hparams.text_lr is None else self.hparams.text_lr
        groups = []
        for is_text, lr in ((False, self.hparams.lr), (True, text_lr)):
            params = [(n, p) for n, p in self.named_parameters() if p.requires_grad and n.startswith("model.text_encoder.") == is_text]
            groups += [
                {"params": [p for n, p in params if n not in no_decay], "weight_decay": self.hparams.weight_decay, "lr": lr},
                {"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0, "lr": lr},
            ]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=self.hparams.lr)
        # Over the optimizer steps the run really takes: the same on any number of devices (global batch).
        budget = step_budget(self.trainer)
        if getattr(self.trainer, "accumulate_grad_batches", 1) > 1:
            rank_zero_warn(
                f"accumulate_grad_batches={self.trainer.accumulate_grad_batches}: each InfoNCE term sees the negatives "
                "of its micro-batch only, not of the whole global batch"
            )
        total = budget.total
        warmup = int(round(self.hparams.warmup_epochs * budget.steps_per_epoch))
        check_warmup(f"warmup_epochs={self.hparams.warmup_epochs}", warmup, budget, self.trainer)
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any]) -> None:
        audio_emb = self.model.encode_audio(batch["audio"], batch["audio_lengths"])  # (B, E)
        captions = [c for refs in batch["references"] for c in refs]
        caption_clip = torch.tensor(
            [cid for cid, refs in zip(batch["clip_ids"].tolist(), batch["references"]) for _ in refs], device=self.device
        )
        text_emb = self.model.encode_text(captions)  # (sum of captions, E)
        if self._relevance is not None and self.trainer.testing:  # the DCASE 2025 metrics match by text
            self._eval_texts.append((list(batch["fnames"]), [list(refs) for refs in batch["references"]]))
        self._eval_outputs.append(
            {"audio_emb": audio_emb.float(), "clip_ids": batch["clip_ids"].to(self.device), "text_emb": text_emb.float(), "caption_clip": caption_clip}
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_start(self) -> None:
        path = self.hparams.get("test_relevance")
        self._relevance = read_relevance_file(path) if path is not None else None  # a bad file fails before testing

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def gather_eval_embeddings(self) -> dict[str, torch.Tensor]:
        """This epoch's evaluation embeddings from all ranks (each clip exactly once), then cleared."""
        outputs, self._eval_outputs = self._eval_outputs, []
        emb_dim = self.hparams.embed_dim
        cat = {
            key: torch.cat([o[key] for o in outputs]) if outputs else torch.zeros((0, emb_dim) if "emb" in key else (0,), device=self.device)
            for key in ("audio_emb", "clip_ids", "text_emb", "caption_clip")
        }
        if is_distributed():
            # Every rank's local row counts, taken before any tensor is replaced by its gathered version.
            clip_sizes = all_gather_sizes(cat["audio_emb"].shape[0], self.device)
            caption_sizes = all_gather_sizes(cat["text_emb"].shape[0], self.device)
            for key, sizes in (("audio_emb", clip_sizes), ("clip_ids", clip_sizes), ("text_emb", caption_sizes), ("caption_clip", caption_sizes)):
                cat[key] = all_gather_tensor(cat[key].contiguous(), sizes)
        return cat

    def _gather_eval_texts(self) -> tuple[list[str], list[str]]:
        """The test clips' file names (in `gather_eval_embeddings`' clip order) and captions (its caption order)."""
        parts, self._eval_texts = self._eval_texts, []
        if is_distributed():  # rank by rank, as all_gather_tensor concatenates the embeddings
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, parts)
            parts = [part for rank_parts in gathered for part in rank_parts]
        fnames = [name for names, _ in parts for name in names]
        captions = [caption for _, refs in parts for clip_refs in refs for caption in clip_refs]
        return fnames, captions

    def _log_retrieval(self, prefix: str) -> None:
        emb = self.gather_eval_embeddings()
        if emb["audio_emb"].shape[0] == 0:
            return
        # Sort clips by id so the ranks' interleaved shards line up; the target of each caption is its clip's row.
        order = torch.argsort(emb["clip_ids"])
        audio_emb, clip_ids = emb["audio_emb"][order], emb["clip_ids"][order]
        targets = torch.searchsorted(clip_ids, emb["caption_clip"])
        sim_t2a = emb["text_emb"] @ audio_emb.T  # (captions, clips) cosine
        t2a = retrieval_metrics(sim_t2a, targets)
        # The authors keep the checkpoint with the best geometric mean of R@1, R@5 and R@10 (CLAP configs/base.json).
        t2a["geomean_R@1_R@5_R@10"] = (float(t2a["R@1"]) * float(t2a["R@5"]) * float(t2a["R@10"])) ** (1.0 / 3.0)
        metrics = {f"{prefix}/t2a/{k}": v for k, v in t2a.items()}
        metrics.update({f"{prefix}/a2t/{k}": v for k, v in audio_to_text_metrics(sim_t2a.T, targets).items()})
        if prefix == "test" and self._relevance is not None:
            fnames, captions = self._gather_eval_texts()
            fnames = [fnames[i] for i in order.tolist()]  # the columns of sim_t2a
            found = dcase2025_metrics(sim_t2a, captions, fnames, self._relevance, "the test split")
            metrics.update({f"{prefix}/dcase2025/{k}": v for k, v in found.items()})
        # Every rank holds the same global numbers: no further reduction.
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Clip embeddings of a batch (`aac-lightning predict`): `{"fnames": [...], "audio_emb": (B, E) on the CPU}`.

        `aac_lightning.callbacks.PredictionWriter` writes them to a `.pt` / `.npz` file.
        """
        return {"fnames": batch["fnames"], "audio_emb": self.model.encode_audio(batch["audio"], batch["audio_lengths"]).cpu()}
