"""Self-critical sequence training (SCST) stage of the captioner: reinforcement with CIDEr-D rewards.

Starts from an XE (or SCST) checkpoint through `init_from`, which brings the captioner weights, the
frozen extractor and the vocabulary; the decoder architecture is read from that checkpoint too.

The defaults are the SJTU authors' SCST as released (`wsntxxn/AudioCaption`: `ScstWrapper` in
`captioning/models/rl_model.py`, `compute_batch_score` in `captioning/models/utils.py`, the runner
`captioning/pytorch_runners/run.py`, `configs/dcase2022/waveform/cnn14rnn_2trm_scst.yaml`): one sampled
caption per item of the batch (an item is one (clip, caption) pair, so a clip is met five times an
epoch), sampled with dropout on at temperature 1 for at most 20 words; baseline = CIDEr-D of the greedy
caption decoded in eval mode; CIDEr-D document frequencies from the references of the batch's distinct
clips; loss = mean over the batch of -advantage * sum of the sampled words' log-probabilities.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from aac_lightning.checkpoints import CHECKPOINT_UPGRADES, read_checkpoint
from aac_lightning.data.text import normalize_caption
from aac_lightning.metrics.cider import CiderDocumentFrequency, cider_d
from aac_lightning.modules.base import check_nonfinite_loss_mode
from aac_lightning.modules.captioner import CaptionerModule
from aac_lightning.modules.captioning import upgrade_captioner_hparams
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, greedy_decode, sample_decode
from aac_lightning.utils.distributed import is_distributed

BASELINES = ("greedy", "mean")
CIDER_DF_MODES = ("corpus", "batch")
SAMPLE_MODES = ("per_item", "per_clip")
DUPLICATE_REWARDS = ("own", "first")
# Captioner architecture arguments: `None` in the SCST config means "as in the `init_from` checkpoint".
ARCHITECTURE_ARGUMENTS = ("input_dim", "decoder", "decoder_kwargs", "encoder_kwargs")
XE_ARCHITECTURE_DEFAULTS = {"input_dim": 2048, "decoder": "transformer", "decoder_kwargs": None, "encoder_kwargs": None}
# `CaptioningXE` arguments that SCST checkpoints written before the XE/SCST split recorded although SCST never
# used them (SCST then accepted every XE argument): dropped when such a checkpoint is read.
XE_ONLY_ARGUMENTS = ("label_smoothing", "warmup_steps", "final_lr", "teacher_forcing_start", "teacher_forcing_end")


def scst_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Policy-gradient loss `mean_i( -advantage_i * sum_t log p(w_it) )` over the sampled captions.

    Args:
        log_probs: `(N, L)` log-probability of each sampled word (N = clips x samples).
        mask: `(N, L)` True up to and including each caption's end token.
        advantages: `(N,)` reward minus baseline of each caption (no gradient).

    Every clip has the same number of samples, so the mean over all N captions is also the mean over
    clips of the per-clip mean over its samples.
    """
    if log_probs.shape != mask.shape or log_probs.shape[0] != advantages.shape[0]:
        raise ValueError(f"shapes differ: log_probs {tuple(log_probs.shape)}, mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    caption_log_probs = (log_probs * mask.to(log_probs.dtype)).sum(dim=1)  # (N,)
    return -(advantages.detach().to(log_probs.dtype) * caption_log_probs).mean()


def first_occurrence_rows(keys: Sequence[Hashable]) -> list[int]:
    """For each position, the position of the first occurrence of its key (``[3, 5, 3] -> [0, 1, 0]``)."""
    first: dict[Hashable, int] = {}
    return [first.setdefault(key, row) for row, key in enumerate(keys)]


def leave_one_out_mean(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Baseline of each sample: the mean reward of the other samples of its clip. `rewards` is `(B * K,)`."""
    if num_samples < 2:
        raise ValueError(f"the mean-of-samples baseline needs num_samples >= 2, got {num_samples}")
    per_clip = rewards.view(-1, num_samples)  # (B, K)
    others = (per_clip.sum(dim=1, keepdim=True) - per_clip) / (num_samples - 1)  # (B, K)
    return others.reshape(-1)


class CaptioningSCST(CaptionerModule):
    """SCST fine-tuning of an XE captioner (report Section 2.2): reward = CIDEr-D of sampled captions.

    Which captions are sampled (`samples`): `num_samples` per item of the batch (`"per_item"`, the
    authors' way with `num_samples=1`: the training set has one item per (clip, caption), so a clip
    met twice in a batch is sampled twice), or `num_samples` per distinct clip of the batch
    (`"per_clip"`, this package's earlier way, with 5). Gradients flow through the samples'
    log-probabilities; sampling runs in the module's mode (training: dropout on, as the authors do).
    The baseline is the CIDEr-D of the greedy caption of the same item / clip decoded without
    gradients in eval mode (`baseline="greedy"`, the self-critical baseline, the authors') or the mean
    reward of the other samples of the item / clip (`baseline="mean"`). Rewards are CIDEr-D against
    all normalised references of the sample's own clip, with document frequencies computed from the
    references of the distinct clips of each batch, one document per clip however often it occurs
    (`cider_df="batch"`, the authors', as pycocoevalcap's `Cider` computes them on the batch's
    `key -> references` dict), or fixed once from the training references (`cider_df="corpus"`).
    Validation (beam search, `val/cider_d`), test and predict are `CaptionerModule`'s. The learning
    rate is constant (Adam).

    The authors' `compute_batch_score` scores only the first item of each clip of the batch and gives
    its reward to the clip's other items, whose own samples are never scored;
    `duplicate_reward="first"` reproduces that, `"own"` (default) scores every sample.

    Args:
        init_from: `xe` or `scst` checkpoint to start from (weights only); required to start a fit.
        input_dim, decoder, decoder_kwargs, encoder_kwargs: captioner architecture; `None` reads it from
            `init_from` (given values must match it).
        lr: constant learning rate of Adam (5e-5 in the paper); weight_decay: Adam's (the authors' SCST: 0).
        max_decode_length: longest sampled / greedy / beam-searched caption (the authors': 20).
        samples: `per_item` (authors) or `per_clip`.
        num_samples: captions sampled per item (`per_item`, authors 1) or per distinct clip (`per_clip`).
        baseline: `greedy` (authors) or `mean`.
        cider_df: `batch` (authors) or `corpus`.
        duplicate_reward: `own` or `first` (the authors' code; see above). Only matters with `per_item`.
        sample_temperature: temperature of the sampling distribution (authors 1.0).
        nonfinite_loss: `error` or `skip` a step whose loss is NaN/inf (see `AACModule`).
        Other arguments (extractor, vocabulary, feature cache, beam search, test_metrics, fense_dir) as in
            `CaptioningXE`.

    **XE configs.** `conf/captioning/scst.yaml` is merged after an XE config (`--config <xe>.yaml
    --config scst.yaml`); its `class_path` switches the model to this class, and LightningCLI
    (jsonargparse) then keeps only the merged init args this class accepts: the XE-only ones (label
    smoothing, warm-up, final rate, teacher forcing) are dropped, the architecture ones are kept and
    checked against `init_from`.
    """

    kind = "scst"

    def __init__(
        self,
        init_from: str | None = None,
        extractor_ckpt: str | None = None,
        extractor: dict[str, Any] | None = None,
        input_dim: int | None = None,
        decoder: str | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        vocabulary: list[str] | None = None,
        caption_hyphens: str = "keep",
        feature_cache_dir: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        beam_size: int = 3,
        max_decode_length: int = DEFAULT_MAX_LENGTH,
        beam_finished: str = "collect",
        length_penalty: float = 1.0,
        samples: str = "per_item",
        num_samples: int = 1,
        baseline: str = "greedy",
        cider_df: str = "batch",
        duplicate_reward: str = "own",
        sample_temperature: float = 1.0,
        nonfinite_loss: str = "error",
        test_metrics: str | list[str] = "default",
        fense_dir: str | None = None,
    ):
        check_nonfinite_loss_mode(nonfinite_loss)  # before init_from is read
        if samples not in SAMPLE_MODES:
            raise ValueError(f"samples must be one of {list(SAMPLE_MODES)}, got {samples!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if duplicate_reward not in DUPLICATE_REWARDS:
            raise ValueError(f"duplicate_reward must be one of {list(DUPLICATE_REWARDS)}, got {duplicate_reward!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
        if baseline == "mean" and num_samples < 2:
            raise ValueError(f"baseline='mean' needs num_samples >= 2, got {num_samples}")
        if cider_df not in CIDER_DF_MODES:
            raise ValueError(f"cider_df must be one of {list(CIDER_DF_MODES)}, got {cider_df!r}")
        if not sample_temperature > 0.0:
            raise ValueError(f"sample_temperature must be > 0, got {sample_temperature}")
        given = {"input_dim": input_dim, "decoder": decoder, "decoder_kwargs": decoder_kwargs, "encoder_kwargs": encoder_kwargs}
        arch = self._architecture(init_from, given)
        # The base records the resolved architecture (not the config's `None`s) as hyper-parameters.
        super().__init__(
            extractor_ckpt=extractor_ckpt,
            extractor=extractor,
            input_dim=arch["input_dim"],
            decoder=arch["decoder"],
            decoder_kwargs=arch["decoder_kwargs"],
            encoder_kwargs=arch["encoder_kwargs"],
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
        self._document_frequency: CiderDocumentFrequency | None = None
        self._train_references: list[list[str]] | None = None

    @staticmethod
    def _architecture(init_from: str | None, given: dict[str, Any]) -> dict[str, Any]:
        """Captioner architecture: from `init_from`'s hyper-parameters where not given; given values must match."""
        if init_from is None:
            return {name: XE_ARCHITECTURE_DEFAULTS[name] if given[name] is None else given[name] for name in ARCHITECTURE_ARGUMENTS}
        hparams = read_checkpoint(init_from).get("hyper_parameters") or {}
        arch = {}
        for name in ARCHITECTURE_ARGUMENTS:
            recorded = hparams.get(name, XE_ARCHITECTURE_DEFAULTS[name])
            if given[name] is not None and given[name] != recorded:
                raise ValueError(f"{name}={given[name]!r} differs from the {name} of init_from '{init_from}': {recorded!r}")
            arch[name] = recorded
        return arch

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "clips"):
            raise ValueError("CaptioningSCST needs a datamodule with `clips(split)` for the references of the training clips")
        self._train_references = [[normalize_caption(c, self.vocab.hyphens) for c in caps] for caps in datamodule.clips("train").captions]
        if self.hparams.cider_df == "corpus":
            # Standard SCST practice: document frequencies of the training references, fixed once.
            self._document_frequency = CiderDocumentFrequency.from_references(self._train_references)

    def on_fit_start(self) -> None:
        # Checked here, not in `setup`: Lightning restores a `ckpt_path` (and sets `trainer.ckpt_path`)
        # only after `setup`, so a resumed run (whose checkpoint hyperparameters clear `init_from`) is
        # told apart from one that starts from nothing only now.
        super().on_fit_start()
        if self.hparams.init_from is None and self.trainer.ckpt_path is None:
            raise ValueError("CaptioningSCST starts from an XE checkpoint: pass init_from (or resume with ckpt_path)")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ rewards
    def cider_rewards(
        self, candidates: list[str], references: list[list[str]], clip_ids: list[int] | None = None
    ) -> torch.Tensor:
        """CIDEr-D `(N,)` of normalised candidates against their references, with the configured frequencies.

        In batch mode the document frequencies come from the references of the distinct clips of the
        batch, one document per clip however many candidates it has: clips told apart by `clip_ids`
        (one per candidate) when given, else by their reference lists. Under DDP the batch is the
        global one: the ranks' references are gathered first (a collective: every rank calls this).
        """
        if self.hparams.cider_df == "corpus":
            if self._document_frequency is None:
                raise ValueError("cider_df='corpus' but no document frequencies were built (setup('fit') not run)")
            frequency = self._document_frequency
        elif is_distributed():
            # The global batch's clips, as one process holding the whole batch would count them.
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (references, clip_ids))
            all_references = [refs for part, _ in gathered for refs in part]
            all_ids = None if clip_ids is None else [c for _, ids in gathered for c in ids]
            frequency = batch_document_frequency(all_references, all_ids)
        else:
            frequency = batch_document_frequency(references, clip_ids)
        _, scores = cider_d(candidates, references, document_frequency=frequency)
        return scores.to(torch.float32)

    def _captions(self, tokens: torch.Tensor) -> list[str]:
        return [normalize_caption(c, self.vocab.hyphens) for c in self.vocab.decode_batch(tokens)]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._train_references is None:
            raise ValueError("the training references are not loaded (setup('fit') not run)")
        feats, lengths = self.features(batch)  # (B, T', D), (B,)
        item_clips: list[int] = batch["clip_ids"].tolist()
        if self.hparams.samples == "per_item":
            rows = list(range(len(item_clips)))  # every item, a clip met twice included
        else:  # per_clip: a clip met several times in a batch (one item per caption) is sampled once
            rows = sorted(set(first_occurrence_rows(item_clips)))
            feats, lengths = feats[rows], lengths[rows]  # (C, T', D), (C,)
        clip_ids = [item_clips[r] for r in rows]  # (R,) one per sampled row group
        references = [self._train_references[c] for c in clip_ids]
        k = self.hparams.num_samples
        ids = dict(bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, pad_id=self.vocab.pad_id)

        sampled = sample_decode(
            self.model, feats, lengths, max_length=self.hparams.max_decode_length,
            num_samples=k, temperature=self.hparams.sample_temperature, **ids,
        )  # tokens / log_probs / mask: (R * K, L), samples of a row adjacent
        sample_clips = [c for c in clip_ids for _ in range(k)]
        sample_refs = [refs for refs in references for _ in range(k)]
        reward_sample = self.cider_rewards(self._captions(sampled.tokens), sample_refs, sample_clips).to(self.device)  # (R * K,)
        # The authors' compute_batch_score: a clip's later items get its first item's reward.
        first = first_occurrence_rows(clip_ids) if self.hparams.duplicate_reward == "first" else list(range(len(clip_ids)))
        if first != list(range(len(clip_ids))):
            source = torch.tensor([first[r] * k + j for r in range(len(clip_ids)) for j in range(k)], device=reward_sample.device)
            reward_sample = reward_sample.index_select(0, source)

        if self.hparams.baseline == "greedy":
            was_training = self.model.training
            self.model.eval()  # the test-time policy: no dropout
            with torch.no_grad():
                greedy = greedy_decode(self.model, feats, lengths, max_length=self.hparams.max_decode_length, **ids)  # (R, L')
            self.model.train(was_training)
            reward_greedy = self.cider_rewards(self._captions(greedy), references, clip_ids).to(self.device)  # (R,)
            reward_greedy = reward_greedy.index_select(0, torch.tensor(first, device=reward_greedy.device))
            baseline = reward_greedy.repeat_interleave(k)  # (R * K,)
            self.log("train/reward_greedy", reward_greedy.mean(), batch_size=len(clip_ids))
        else:
            baseline = leave_one_out_mean(reward_sample, k)

        advantages = reward_sample - baseline  # (R * K,)
        loss = self.checked_loss(scst_loss(sampled.log_probs, sampled.mask, advantages), batch_idx)
        if self.skipping_step:  # non-finite on some rank, nonfinite_loss="skip": a zero stand-in
            return loss
        size = len(clip_ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/reward_sample", reward_sample.mean(), prog_bar=True, batch_size=size)
        self.log("train/advantage", advantages.mean(), batch_size=size)
        return loss


def batch_document_frequency(references: list[list[str]], clip_ids: list[int] | None = None) -> CiderDocumentFrequency:
    """CIDEr-D document frequencies of a batch: one document per distinct clip, in first-seen order.

    As pycocoevalcap's `Cider` computes them from the `key -> references` dict that the authors' SCST
    builds per batch: an n-gram's frequency is the number of distinct clips with a reference holding
    it, and `N` is the number of distinct clips. Clips are told apart by `clip_ids` (one per entry of
    `references`) when given, else by their reference lists.
    """
    if clip_ids is not None and len(clip_ids) != len(references):
        raise ValueError(f"clip_ids has {len(clip_ids)} entries for {len(references)} reference lists")
    keys = clip_ids if clip_ids is not None else [tuple(refs) for refs in references]
    distinct = sorted(set(first_occurrence_rows(keys)))
    return CiderDocumentFrequency.from_references([list(references[i]) for i in distinct])


def upgrade_scst_hparams(ckpt: dict[str, Any]) -> list[str]:
    """`upgrade_captioner_hparams`, then drop the XE-only arguments older SCST checkpoints recorded."""
    filled = upgrade_captioner_hparams(ckpt)
    hparams = ckpt["hyper_parameters"]
    for name in XE_ONLY_ARGUMENTS:
        hparams.pop(name, None)
    return filled


CHECKPOINT_UPGRADES["scst"] = upgrade_scst_hparams
