"""Cross-entropy (XE) captioning stage: a BiGRU-encoder captioner on the frozen audio encoder of a retrieval checkpoint."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from aac_lightning.data.text import Vocabulary, normalize_caption, tokenize_caption
from aac_lightning.features import FeatureCache, state_dict_sha256
from aac_lightning.metrics.cider import cider_d
from aac_lightning.modules.base import AACModule
from aac_lightning.checkpoints import CHECKPOINT_UPGRADES, HandoffError, extract_submodule_state, load_state_dict_strict, package_version
from aac_lightning.modules.schedules import check_warmup, step_budget, warmup_exponential
from aac_lightning.nn.audio_encoders import AudioEncoder, load_audio_encoder
from aac_lightning.nn.captioning import build_caption_model
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, FINISHED_RULES, beam_search
from aac_lightning.utils.distributed import is_distributed

log = logging.getLogger(__name__)


class FrozenExtractor(nn.Module):
    """An audio encoder frozen for real: no gradients, and always in eval mode (BatchNorm, dropout)."""

    def __init__(self, encoder: AudioEncoder):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    @property
    def frame_dim(self) -> int:
        return self.encoder.frame_dim

    def train(self, mode: bool = True) -> FrozenExtractor:
        # Lightning switches the whole module to training mode each epoch; the extractor stays in eval.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.encoder(audio, lengths)


def extractor_from_checkpoint(path: str, module: AACModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The audio-encoder architecture `{"audio_encoder", "audio_encoder_kwargs"}` and weights of a retrieval checkpoint."""
    ckpt = module.load_handoff(path, expected_kinds=("contrastive",))
    hparams = ckpt.get("hyper_parameters") or {}
    if "audio_encoder" not in hparams:
        raise HandoffError(f"'{path}' records no 'audio_encoder' hyper-parameter: cannot rebuild its audio encoder")
    arch = {"audio_encoder": hparams["audio_encoder"], "audio_encoder_kwargs": dict(hparams.get("audio_encoder_kwargs") or {})}
    state = extract_submodule_state(ckpt["state_dict"], "model.audio_encoder.")
    if not state:
        raise HandoffError(f"'{path}' holds no 'model.audio_encoder.*' weights")
    return arch, state


def vocabulary_mismatch_message(first: Vocabulary, first_source: str, second: Vocabulary, second_source: str) -> str:
    """What differs between two vocabularies: both sources, their sizes and the first differing entries."""
    differing = [
        f"#{i} {first.words[i] if i < len(first) else None!r} vs {second.words[i] if i < len(second) else None!r}"
        for i in range(max(len(first), len(second)))
        if i >= len(first) or i >= len(second) or first.words[i] != second.words[i]
    ]
    return (
        f"the vocabulary of {first_source} ({len(first)} words) differs from the vocabulary of {second_source} "
        f"({len(second)} words); first differing entries: {', '.join(differing[:5])}"
    )


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


class CaptioningXE(AACModule):
    """Captioner trained with label-smoothed cross-entropy and scheduled sampling (report Section 2.2).

    The audio goes through the frozen audio encoder of a retrieval checkpoint; its frame features
    feed a BiGRU encoder and a Transformer or GRU-attention decoder. The checkpoint carries the
    vocabulary and the extractor (architecture and weights), so `load_from_checkpoint` works alone.

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

    **Vocabulary.** A vocabulary that comes with the model (from `init_from`, from the checkpoint a fit
    resumes (`ckpt_path`), or the `vocabulary` argument) is authoritative: the datamodule encodes the
    captions with it, words it lacks become `<unk>`, and how many caption words that concerns is
    logged once. A vocabulary the datamodule was given explicitly (`data.vocabulary_path`) must equal
    it, else setup raises an error naming both sources, their sizes and the first differing entries.
    Without one, the model takes the datamodule's vocabulary (built from the training captions).
    """

    kind = "xe"
    handoff_arguments = ("init_from", "extractor_ckpt")

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
    ):
        super().__init__(nonfinite_loss=nonfinite_loss)
        if beam_finished not in FINISHED_RULES:
            raise ValueError(f"beam_finished must be one of {list(FINISHED_RULES)}, got {beam_finished!r}")
        for name, value in (("teacher_forcing_start", teacher_forcing_start), ("teacher_forcing_end", teacher_forcing_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 < final_lr <= lr:
            raise ValueError(f"final_lr must lie in (0, lr={lr}], got {final_lr}")
        extractor_state, extractor_source = None, extractor_ckpt
        init_ckpt = self.load_handoff(init_from, expected_kinds=("xe", "scst")) if init_from is not None else None
        if extractor_ckpt is not None:
            arch, extractor_state = extractor_from_checkpoint(extractor_ckpt, self)
        elif init_ckpt is not None and init_ckpt["hyper_parameters"].get("extractor") is not None:
            # A later stage (SCST) keeps the frozen extractor of the captioner it starts from.
            arch = init_ckpt["hyper_parameters"]["extractor"]
            extractor_state = extract_submodule_state(init_ckpt["state_dict"], "extractor.encoder.")
            extractor_source = f"'{init_from}' (extractor.encoder.*)"
        else:
            arch = None
        if arch is not None:
            if extractor is not None and extractor != arch:
                raise ValueError(f"extractor={extractor} differs from the architecture of the handed-over checkpoint: {arch}")
            extractor = arch
        # Where the model's vocabulary comes from, for messages ("checkpoint '...'" marks a checkpoint's).
        self._vocabulary_source: str | None = "the model argument `vocabulary`" if vocabulary is not None else None
        if vocabulary is None and init_ckpt is not None:
            vocabulary = init_ckpt["hyper_parameters"].get("vocabulary")
            if vocabulary is not None:
                self._vocabulary_source = f"checkpoint '{init_from}'"
                caption_hyphens = init_ckpt["hyper_parameters"].get("caption_hyphens", "split")
        self.save_hyperparameters()
        self.hparams["caption_hyphens"] = caption_hyphens
        self.hparams["vocabulary"] = vocabulary
        self.hparams["extractor"] = extractor
        self.extractor: FrozenExtractor | None = None
        if extractor is not None:
            encoder = load_audio_encoder(extractor["audio_encoder"], None, **dict(extractor.get("audio_encoder_kwargs") or {}))
            if extractor_state is not None:
                source = f"'{extractor_ckpt}' (model.audio_encoder.*)" if extractor_ckpt is not None else extractor_source
                load_state_dict_strict(encoder, extractor_state, source)
            self.extractor = FrozenExtractor(encoder)
            if self.extractor.frame_dim != input_dim:
                raise ValueError(f"input_dim={input_dim} but the extractor's frames have {self.extractor.frame_dim} channels")
        self.vocab: Vocabulary | None = None
        self.model: nn.Module | None = None
        if vocabulary is not None:
            self._build_captioner(Vocabulary(vocabulary, hyphens=caption_hyphens))
        elif vocab_size is not None:
            self._build_captioner(None, vocab_size)
        self.feature_cache: FeatureCache | None = None
        self._eval_outputs: list[tuple[str, str, list[str]]] = []
        if init_ckpt is not None:
            if self.model is None:
                raise HandoffError(f"'{init_from}' records no vocabulary; pass `vocabulary`")
            load_state_dict_strict(self.model, extract_submodule_state(init_ckpt["state_dict"], "model."), f"'{init_from}'")

    def _build_captioner(self, vocab: Vocabulary | None, vocab_size: int | None = None) -> None:
        self.vocab = vocab
        size = len(vocab) if vocab is not None else vocab_size
        if vocab is not None and self.hparams.vocab_size not in (None, size):
            raise ValueError(f"vocab_size={self.hparams.vocab_size} but the vocabulary has {size} words")
        self.model = build_caption_model(
            self.hparams.decoder,
            size,
            self.hparams.input_dim,
            **dict(self.hparams.encoder_kwargs or {}),
            **dict(self.hparams.decoder_kwargs or {}),
        )

    @property
    def sample_rate(self) -> int | None:
        """Rate the extractor expects (the datamodule reads audio at it)."""
        return self.extractor.sample_rate if self.extractor is not None else None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.vocab is None:
            # A fit that resumes a checkpoint replaces this vocabulary with the checkpoint's in
            # `on_load_checkpoint` (Lightning restores the checkpoint after `setup`).
            if datamodule is None or not hasattr(datamodule, "vocabulary"):
                raise ValueError("CaptioningXE needs `vocabulary` or a datamodule with a `vocabulary`")
            vocab, self._vocabulary_source = datamodule.vocabulary, "the datamodule"
            if self.model is None:
                self._build_captioner(vocab)
            elif self.model.vocab_size != len(vocab):  # built from `vocab_size` alone
                raise ValueError(f"vocab_size={self.model.vocab_size} but the datamodule's vocabulary has {len(vocab)} words")
            self.vocab = vocab
            self.hparams["vocabulary"] = list(vocab.words)  # the checkpoint carries it
            self.hparams["caption_hyphens"] = vocab.hyphens
            self.hparams["vocab_size"] = len(vocab)
        elif datamodule is not None and hasattr(datamodule, "vocabulary"):
            # The model already has a vocabulary (handoff, argument, an earlier fit): the data follow it.
            self._share_vocabulary(datamodule, stage)
        if self.hparams.feature_cache_dir is not None and datamodule is not None:
            self._prepare_feature_cache(datamodule, stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (`ckpt_path`): the checkpoint's vocabulary replaces one taken from the datamodule."""
        super().on_load_checkpoint(checkpoint)
        words = (checkpoint.get("hyper_parameters") or {}).get("vocabulary")
        if words is None or self.vocab is None:
            return
        recorded = checkpoint.get("hyper_parameters") or {}
        vocab = Vocabulary(words, hyphens=recorded.get("caption_hyphens", "split"))
        if vocab == self.vocab:
            return
        if "caption_hyphens" not in recorded and vocab.words == self.vocab.words:
            # A checkpoint from before `caption_hyphens`: the same words, cut with hyphens split.
            self.vocab = vocab
            self.hparams["caption_hyphens"] = vocab.hyphens
            return
        trainer = self._trainer
        source = f"checkpoint '{trainer.ckpt_path}'" if trainer is not None and trainer.ckpt_path is not None else "the checkpoint"
        if self._vocabulary_source != "the datamodule":  # the model's own vocabulary cannot change
            raise HandoffError(vocabulary_mismatch_message(vocab, source, self.vocab, self._vocabulary_source or "the model"))
        # Called before the weights are loaded and the optimizer is built: rebuild the captioner for them.
        self.hparams["vocab_size"] = None
        self._build_captioner(vocab)
        self._vocabulary_source = source
        self.hparams["vocabulary"] = list(vocab.words)
        self.hparams["caption_hyphens"] = vocab.hyphens
        self.hparams["vocab_size"] = len(vocab)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "vocabulary"):
            self._share_vocabulary(datamodule, "fit" if trainer.state.fn == "fit" else "evaluation")

    def _share_vocabulary(self, datamodule, stage: str) -> None:
        """Make the datamodule encode captions with the model's vocabulary (or check its explicit one)."""
        explicit_path = getattr(datamodule, "vocabulary_path", None)
        if explicit_path is not None or not hasattr(datamodule, "_vocabulary"):
            given = datamodule.vocabulary
            if given != self.vocab:
                if explicit_path is not None:
                    data_source = f"data.vocabulary_path '{explicit_path}'"
                    hint = "; leave data.vocabulary_path unset to encode the data with the model's vocabulary"
                else:
                    data_source, hint = f"the datamodule {type(datamodule).__name__}", ""
                raise ValueError(vocabulary_mismatch_message(given, data_source, self.vocab, self._vocabulary_source or "the model") + hint)
            return
        # The datamodule would build its own vocabulary from the training captions: it encodes with the
        # model's instead (CaptioningDataModule caches its vocabulary in `_vocabulary`).
        datamodule._vocabulary = self.vocab
        if stage == "fit" and hasattr(datamodule, "clips"):
            self._report_unknown_words(datamodule.clips("train").captions)

    def _report_unknown_words(self, captions: list[list[str]]) -> tuple[int, int]:
        """Count (and log once) the training caption words missing from the model's vocabulary."""
        counts = Counter(word for caps in captions for caption in caps for word in tokenize_caption(caption, self.vocab.hyphens))
        unknown = Counter({word: n for word, n in counts.items() if word not in self.vocab.index})
        missing, total = sum(unknown.values()), sum(counts.values())
        self.unknown_caption_words = (missing, total)
        if missing and (self._trainer is None or self.trainer.is_global_zero):
            kind = "checkpoint" if (self._vocabulary_source or "").startswith("checkpoint") else "model"
            examples = ", ".join(repr(w) for w, _ in sorted(unknown.items(), key=lambda item: (-item[1], item[0]))[:5])
            log.warning(
                "%d of %d caption words are not in the %s vocabulary (e.g. %s; %d distinct) and are encoded as <unk>; "
                "vocabulary of %s, %d words",
                missing, total, kind, examples, len(unknown), self._vocabulary_source, len(self.vocab),
            )
        return missing, total

    def frontend_settings(self) -> dict[str, Any]:
        """What determines the features besides the weights."""
        return {**dict(self.hparams.extractor), "sample_rate": self.extractor.sample_rate}

    def _prepare_feature_cache(self, datamodule, stage: str) -> None:
        if self.extractor is None:
            raise ValueError("feature_cache_dir is set but the module has no extractor (extractor_ckpt)")
        cache = FeatureCache(self.hparams.feature_cache_dir, state_dict_sha256(self.extractor.state_dict()), self.frontend_settings())
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        # `setup` runs before the strategy moves the module: extract on the run's device already.
        self.extractor.to(self.trainer.strategy.root_device)
        if self.trainer.is_global_zero:  # written once: rank 0 extracts, the others wait
            for split in splits:
                clips = datamodule.clips(split)
                keys = [r.key for r in clips.records]
                paths = [r.path for r in clips.records]
                count = cache.build(self.extractor, keys, paths, clips.load_audio, device=self.trainer.strategy.root_device)
                log.info("feature cache %s: %d %s clips extracted", cache.path, count, split)
        self.trainer.strategy.barrier("feature_cache")
        self.feature_cache = cache
        if splits:
            datamodule.load_audio = False

    # ------------------------------------------------------------------ features
    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features `(B, T', D)` and lengths `(B,)`: from the cache when set, else the extractor."""
        if self.feature_cache is not None and "keys" in batch:
            feats, lengths = self.feature_cache.batch(batch["keys"])
            return feats.to(self.device), lengths.to(self.device)
        if self.extractor is None:
            raise ValueError("no extractor and no feature cache: cannot compute features from audio")
        if batch["audio"].shape[-1] == 0:
            raise ValueError("the batch holds no audio (datamodule.load_audio is False) and no feature cache is set")
        out = self.extractor(batch["audio"], batch["audio_lengths"])
        return out["frames"], out["frame_lengths"]

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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def decode(self, feats: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Beam-search captions of a batch of features."""
        vocab = self.vocab
        tokens = beam_search(
            self.model,
            feats,
            lengths,
            beam_size=self.hparams.beam_size,
            max_length=self.hparams.max_decode_length,
            bos_id=vocab.bos_id,
            eos_id=vocab.eos_id,
            pad_id=vocab.pad_id,
            finished=self.hparams.beam_finished,
            length_penalty=self.hparams.length_penalty,
        )
        return vocab.decode_batch(tokens)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        feats, lengths = self.features(batch)
        captions = self.decode(feats, lengths)
        self._eval_outputs.extend(zip(batch["fnames"], captions, batch["references"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _gather_outputs(self) -> list[tuple[str, str, list[str]]]:
        outputs, self._eval_outputs = self._eval_outputs, []
        if is_distributed():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            # The sharded evaluation sampler gives every clip to exactly one rank, interleaved:
            # sort by file name so every rank holds the same list in the same order.
            outputs = sorted((o for part in gathered for o in part), key=lambda o: o[0])
        return outputs

    def on_validation_epoch_end(self) -> None:
        outputs = self._gather_outputs()
        if len(outputs) < 2:  # CIDEr-D's document frequencies need at least two clips
            return
        candidates = [normalize_caption(c, self.vocab.hyphens) for _, c, _ in outputs]
        references = [[normalize_caption(r, self.vocab.hyphens) for r in refs] for _, _, refs in outputs]
        score, _ = cider_d(candidates, references)
        self.log("val/cider_d", score, prog_bar=True, sync_dist=False, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        from aac_lightning.metrics.captioning import caption_metrics

        outputs = self._gather_outputs()
        if not outputs:
            return
        candidates = [c for _, c, _ in outputs]
        references = [list(refs) for _, _, refs in outputs]
        metrics = caption_metrics(candidates, references)
        self.log_dict({f"test/{k}": float(v) for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)
        for fname, caption, refs in outputs[:5]:
            log.info("%s -> %r (reference: %r)", fname, caption, refs[0])
        self.test_captions = outputs

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint["hyper_parameters"]
        # The extractor's architecture (`extractor`) and weights (state dict) are in the checkpoint,
        # so the handoff files are recorded as provenance only and not re-read by `load_from_checkpoint`.
        checkpoint["aac_lightning"]["handoff"] = {name: hparams.get(name) for name in self.handoff_arguments}
        for name in self.handoff_arguments:
            hparams[name] = None
        if self.vocab is not None:
            hparams["vocabulary"] = list(self.vocab.words)
            hparams["caption_hyphens"] = self.vocab.hyphens
            hparams["vocab_size"] = len(self.vocab)


CHECKPOINT_UPGRADES["xe"] = upgrade_captioner_hparams
CHECKPOINT_UPGRADES["scst"] = upgrade_captioner_hparams
