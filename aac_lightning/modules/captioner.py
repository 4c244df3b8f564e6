"""What the captioning stages (XE and SCST) share: the frozen extractor, the vocabulary, the feature cache, decoding and evaluation.

`CaptionerModule` is the base of `CaptioningXE` (`modules/captioning.py`) and `CaptioningSCST`
(`modules/scst.py`); each of them adds only its own training arguments, `training_step` and
`configure_optimizers`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from aac_lightning.checkpoints import HandoffError, extract_submodule_state, load_state_dict_strict
from aac_lightning.data.feature_cache import FeatureCache, state_dict_sha256
from aac_lightning.data.text import Vocabulary, normalize_caption, tokenize_caption
from aac_lightning.metrics.cider import cider_d
from aac_lightning.modules.base import AACModule
from aac_lightning.nn.audio_encoders import FrozenExtractor, load_audio_encoder
from aac_lightning.nn.captioning import build_caption_model
from aac_lightning.nn.decoding import FINISHED_RULES, beam_search
from aac_lightning.utils.distributed import is_distributed

log = logging.getLogger(__name__)


class TestCaption(NamedTuple):
    """One evaluated clip: its file name, the decoded caption and its reference captions.

    Unpacks as `file, caption, references = item`.
    """

    __test__ = False  # not a pytest test class

    file: str
    caption: str
    references: list[str]


class CaptionPrediction(NamedTuple):
    """One predicted clip (`predict_step`): its file name and decoded caption."""

    file: str
    caption: str


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


def beam_search_captions(
    models: nn.Module | Sequence[nn.Module],
    vocab: Vocabulary,
    features: torch.Tensor | Sequence[torch.Tensor],
    lengths: torch.Tensor | Sequence[torch.Tensor],
    *,
    beam_size: int,
    max_length: int,
    finished: str,
    length_penalty: float,
    renormalize: bool = True,
) -> list[str]:
    """Captions by beam search with the vocabulary's special ids: the one decoding entry of the captioners and ensembles.

    `models`: one captioner model, or several decoding in one shared beam (features and lengths one
    per model: `(B, T'_m, D_m)`, `(B,)`); see `aac_lightning.nn.decoding.beam_search` for the rules.
    """
    tokens = beam_search(
        models,
        features,
        lengths,
        beam_size=beam_size,
        max_length=max_length,
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        finished=finished,
        length_penalty=length_penalty,
        ensemble_renormalize=renormalize,
    )  # (B, L)
    return vocab.decode_batch(tokens)


class CaptionerModule(AACModule):
    """Base of the captioning stages: a BiGRU-encoder captioner on a frozen audio extractor.

    The audio goes through the frozen audio encoder of a retrieval checkpoint (or features cached
    from it); its frame features feed a BiGRU encoder and a Transformer or GRU-attention decoder. The
    checkpoint carries the vocabulary and the extractor (architecture and weights), so
    `load_from_checkpoint` works alone. Subclasses pass their resolved architecture and add their
    training (`training_step`, `configure_optimizers`); see `CaptioningXE` for the shared arguments.

    Evaluation: validation logs `val/cider_d` of the beam-searched captions; test logs the caption
    metrics of `test_metrics` (sets such as `dcase2024` and/or names, see `aac_lightning.metrics.sets`)
    as `test/*`, keeps those that could not run, with the reason, in `test_unavailable_metrics` (never
    logged as 0), and keeps the decoded clips in `test_captions`, a list of `TestCaption(file,
    caption, references)` sorted by file name under DDP (every rank holds the whole list).
    Prediction (`predict_step`): a list of `CaptionPrediction(file, caption)` per batch.

    **Vocabulary.** A vocabulary that comes with the model (from `init_from`, from the checkpoint a fit
    resumes (`ckpt_path`), or the `vocabulary` argument) is authoritative: the datamodule encodes the
    captions with it (`datamodule.use_vocabulary`), words it lacks become `<unk>`, and how many caption
    words that concerns is logged once. A vocabulary the datamodule was given explicitly
    (`data.vocabulary_path`) must equal it, else setup raises an error naming both sources, their
    sizes and the first differing entries. Without one, the model takes the datamodule's vocabulary
    (built from the training captions).
    """

    handoff_arguments = ("init_from", "extractor_ckpt")
    # Init arguments that the base resolves (from handoffs): recorded as resolved, whatever the config said.
    resolved_arguments = ("extractor", "input_dim", "decoder", "decoder_kwargs", "encoder_kwargs", "vocabulary", "caption_hyphens")

    def __init__(
        self,
        *,
        extractor_ckpt: str | None,
        extractor: dict[str, Any] | None,
        input_dim: int,
        decoder: str,
        decoder_kwargs: dict[str, Any] | None,
        encoder_kwargs: dict[str, Any] | None,
        vocab_size: int | None,
        vocabulary: list[str] | None,
        caption_hyphens: str,
        feature_cache_dir: str | None,
        beam_size: int,
        max_decode_length: int,
        beam_finished: str,
        length_penalty: float,
        init_from: str | None,
        nonfinite_loss: str,
        test_metrics: str | list[str] = "default",
        fense_dir: str | None = None,
    ):
        super().__init__(nonfinite_loss=nonfinite_loss)
        from aac_lightning.metrics.sets import resolve_caption_metrics

        resolve_caption_metrics(test_metrics)  # a misspelt metric fails now, not after a whole training
        if beam_finished not in FINISHED_RULES:
            raise ValueError(f"beam_finished must be one of {list(FINISHED_RULES)}, got {beam_finished!r}")
        extractor_state, extractor_source = None, extractor_ckpt
        init_ckpt = self.load_handoff(init_from, expected_kinds=("xe", "scst")) if init_from is not None else None
        if extractor_ckpt is not None:
            arch, extractor_state = extractor_from_checkpoint(extractor_ckpt, self)
            extractor_source = f"'{extractor_ckpt}' (model.audio_encoder.*)"
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
        # Collects this frame's and the subclass's init arguments (LightningCLI: the config's init args).
        self.save_hyperparameters()
        resolved = dict(extractor=extractor, input_dim=input_dim, decoder=decoder, decoder_kwargs=decoder_kwargs,
                        encoder_kwargs=encoder_kwargs, vocabulary=vocabulary, caption_hyphens=caption_hyphens)
        for name in self.resolved_arguments:  # the checkpoint records what was actually built
            self.hparams[name] = resolved[name]
        self.extractor: FrozenExtractor | None = None
        if extractor is not None:
            encoder = load_audio_encoder(extractor["audio_encoder"], None, **dict(extractor.get("audio_encoder_kwargs") or {}))
            if extractor_state is not None:
                load_state_dict_strict(encoder, extractor_state, extractor_source)
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
        # Set by the CLI when `--ckpt_path` will restore this module: `setup` then leaves the feature
        # cache to `on_load_checkpoint`, which knows the restored extractor weights.
        self.restoring_from: str | None = None
        self._deferred_cache_stage: str | None = None
        self._eval_outputs: list[TestCaption] = []
        self.test_captions: list[TestCaption] = []
        self.test_unavailable_metrics: dict[str, str] = {}
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
                raise ValueError(f"{type(self).__name__} needs `vocabulary` or a datamodule with a `vocabulary`")
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
            if self.restoring_from is not None:
                # The restore brings the extractor weights after `setup`: extract with those (in
                # `on_load_checkpoint`), not with the weights the module was built with.
                self._deferred_cache_stage = stage
            else:
                self._prepare_feature_cache(datamodule, stage)

    def on_fit_start(self) -> None:
        """A feature cache left for a restore that did not bring a checkpoint is built now."""
        super().on_fit_start()
        if self._deferred_cache_stage is not None:
            stage, self._deferred_cache_stage = self._deferred_cache_stage, None
            self._prepare_feature_cache(self.trainer.datamodule, stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (`ckpt_path`): the checkpoint's vocabulary replaces one taken from the datamodule,
        and the feature cache follows the checkpoint's extractor."""
        super().on_load_checkpoint(checkpoint)
        self._follow_checkpoint_extractor(checkpoint)
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

    def _follow_checkpoint_extractor(self, checkpoint: dict[str, Any]) -> None:
        """Use the features of the checkpoint's extractor when a restore brings other extractor weights.

        `fit --ckpt_path` through LightningCLI builds the module from the checkpoint's hyperparameters,
        where the handoff `extractor_ckpt` / `init_from` are cleared: its extractor starts from random
        weights, and `setup` (which Lightning runs before restoring) filled the cache with their
        features. The restore then brings the real extractor weights; without this the resumed run
        would train on the random extractor's features. Load the checkpoint's extractor now and switch
        to the cache of those weights (built if missing: rank 0 extracts, the others wait).
        """
        deferred, self._deferred_cache_stage = self._deferred_cache_stage, None
        if (self.feature_cache is None and deferred is None) or self.extractor is None or self._trainer is None:
            return
        prefix = "extractor."
        state = {k[len(prefix):]: v for k, v in (checkpoint.get("state_dict") or {}).items() if k.startswith(prefix)}
        current = self.extractor.state_dict()
        same = state.keys() == current.keys() and all(torch.equal(v.cpu(), current[k].cpu()) for k, v in state.items())
        if state and not same:
            load_state_dict_strict(self.extractor, state, "the checkpoint's extractor (extractor.*)")
        elif deferred is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self._prepare_feature_cache(datamodule, deferred or str(getattr(self.trainer.state.fn, "value", self.trainer.state.fn)))

    def _share_vocabulary(self, datamodule, stage: str) -> None:
        """Make the datamodule encode captions with the model's vocabulary (or check its explicit one)."""
        explicit_path = getattr(datamodule, "vocabulary_path", None)
        if explicit_path is not None or not hasattr(datamodule, "use_vocabulary"):
            given = datamodule.vocabulary
            if given != self.vocab:
                if explicit_path is not None:
                    data_source = f"data.vocabulary_path '{explicit_path}'"
                    hint = "; leave data.vocabulary_path unset to encode the data with the model's vocabulary"
                else:
                    data_source, hint = f"the datamodule {type(datamodule).__name__}", ""
                raise ValueError(vocabulary_mismatch_message(given, data_source, self.vocab, self._vocabulary_source or "the model") + hint)
            return
        # The datamodule would build its own vocabulary from the training captions: it encodes with the model's.
        datamodule.use_vocabulary(self.vocab)
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

    # ------------------------------------------------------------------ features
    def frontend_settings(self) -> dict[str, Any]:
        """What determines the features besides the weights."""
        return {**dict(self.hparams.extractor), "sample_rate": self.extractor.sample_rate}

    def _prepare_feature_cache(self, datamodule, stage: str) -> None:
        if self.extractor is None:
            raise ValueError("feature_cache_dir is set but the module has no extractor (extractor_ckpt)")
        cache = FeatureCache(self.hparams.feature_cache_dir, state_dict_sha256(self.extractor.state_dict()), self.frontend_settings())
        predict_split = getattr(datamodule, "predict_split", "test")
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": (predict_split,)}.get(stage, ())
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
        if splits and hasattr(datamodule, "features_only"):
            datamodule.features_only()

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features `(B, T', D)` and lengths `(B,)`: from the cache when set, else the extractor."""
        if self.feature_cache is not None and "keys" in batch:
            feats, lengths = self.feature_cache.batch(batch["keys"])
            return feats.to(self.device), lengths.to(self.device)
        if self.extractor is None:
            raise ValueError("no extractor and no feature cache: cannot compute features from audio")
        if batch["audio"].shape[-1] == 0:
            raise ValueError("the batch holds no audio (the datamodule serves features only) and no feature cache is set")
        out = self.extractor(batch["audio"], batch["audio_lengths"])
        return out["frames"], out["frame_lengths"]

    # ------------------------------------------------------------------ decoding and evaluation
    @torch.no_grad()
    def decode(self, feats: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Beam-search captions of a batch of features."""
        return beam_search_captions(
            self.model,
            self.vocab,
            feats,
            lengths,
            beam_size=self.hparams.beam_size,
            max_length=self.hparams.max_decode_length,
            finished=self.hparams.beam_finished,
            length_penalty=self.hparams.length_penalty,
        )

    def _eval_step(self, batch: dict[str, Any]) -> None:
        feats, lengths = self.features(batch)
        captions = self.decode(feats, lengths)
        self._eval_outputs.extend(TestCaption(f, c, list(r)) for f, c, r in zip(batch["fnames"], captions, batch["references"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[CaptionPrediction]:
        """Beam-search captions of a batch of clips: one `CaptionPrediction(file, caption)` per clip."""
        feats, lengths = self.features(batch)
        return [CaptionPrediction(f, c) for f, c in zip(batch["fnames"], self.decode(feats, lengths))]

    def _gather_outputs(self) -> list[TestCaption]:
        outputs, self._eval_outputs = self._eval_outputs, []
        if is_distributed():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            # The sharded evaluation sampler gives every clip to exactly one rank, interleaved:
            # sort by file name so every rank holds the same list in the same order.
            outputs = sorted((TestCaption(*o) for part in gathered for o in part), key=lambda o: o.file)
        return outputs

    def on_validation_epoch_end(self) -> None:
        outputs = self._gather_outputs()
        if len(outputs) < 2:  # CIDEr-D's document frequencies need at least two clips
            return
        candidates = [normalize_caption(o.caption, self.vocab.hyphens) for o in outputs]
        references = [[normalize_caption(r, self.vocab.hyphens) for r in o.references] for o in outputs]
        score, _ = cider_d(candidates, references)
        self.log("val/cider_d", score, prog_bar=True, sync_dist=False, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        from aac_lightning.metrics.captioning import evaluate_captions

        outputs = self._gather_outputs()
        if not outputs:
            return
        candidates = [o.caption for o in outputs]
        references = [list(o.references) for o in outputs]
        metrics, self.test_unavailable_metrics = evaluate_captions(
            candidates, references, metrics=self.hparams.get("test_metrics", "default"),
            fense_dir=self.hparams.get("fense_dir"), device=str(self.device),
        )
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
