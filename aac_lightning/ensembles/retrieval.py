"""Retrieval ensembles (report Sec. 3) as library functions.

An ensemble ranks audio for a text query by the *average of its members' cosine similarity
matrices*: each member (a trained bi-encoder, any architecture) embeds the texts and the audio in
its own space, computes its own ``(queries, audio)`` cosine matrix, and the matrices are averaged.
Members may differ in embedding size and in the sample rate their audio encoder expects; audio is
read once per distinct rate.

Clips are encoded in one way only: a zero-padded batch ``(B, T)`` with its true lengths ``(B,)``
goes to each member's ``BiEncoder.encode_audio``, which encodes every clip as if it were alone
(``aac_lightning.nn.audio_encoders.encode_clips``); embeddings never depend on the batch.

DCASE task 6b submission files: :mod:`aac_lightning.metrics.dcase`. Command line:
``aac-lightning retrieval-eval`` (:mod:`aac_lightning.commands.evaluate`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aac_lightning.checkpoints import HandoffError, checkpoint_kind, read_checkpoint
from aac_lightning.data.datamodules import pad_waveforms
from aac_lightning.data.datasets import CaptionDataset, Clotho
from aac_lightning.metrics.dcase import (
    DCASE_NUM_RANKED,
    RETRIEVAL_PROTOCOLS,
    check_retrieval_submission,
    check_texts,
    write_dcase2025_retrieval_csv,
    write_dcase_retrieval_csv,
)
from aac_lightning.metrics.relevance import dcase2025_metrics, read_relevance_file, relevance_targets
from aac_lightning.ensembles.waveforms import file_progress, read_waveforms
from aac_lightning.metrics.retrieval import (
    audio_to_text_metrics,
    average_similarities,
    retrieval_metrics,
    top_k_candidates,
)
from aac_lightning.modules.retrieval import ContrastiveRetrieval
from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.utils.devices import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "METRIC_NAMES",
    "RetrievalEnsemble",
    "caption_targets",
    "ensemble_metrics",
    "evaluate_retrieval_ensemble",
    "rank_from_similarity",
    "write_submission",
]

METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP@10")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_contrastive_checkpoint(path: Path) -> None:
    """Refuse a checkpoint of another stage (captioning) before building a model from it.

    The file is memory-mapped so that only its small metadata is read (retrieval checkpoints with
    optimizer state weigh gigabytes); files that cannot be mapped are read the ordinary way.
    """
    if path.is_dir():  # an exported model folder
        ckpt = read_checkpoint(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - read_checkpoint raises the explanatory error, or succeeds
            ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise HandoffError(f"'{path}' is not a Lightning checkpoint (no 'state_dict' entry)")
    kind = checkpoint_kind(ckpt)
    if kind != "contrastive":
        raise HandoffError(
            f"'{path}' is a checkpoint of stage kind {kind!r}; a retrieval ensemble needs retrieval "
            "(contrastive) checkpoints"
        )


class RetrievalEnsemble:
    """Several trained bi-encoders whose cosine similarity matrices are averaged.

    Args:
        models: the members (in eval mode after construction; their weights are not changed).
        names: one label per member (e.g. its checkpoint path), for messages and reports.
        device: where the members run; embeddings are returned on the CPU in float32.

    Usage::

        ensemble = RetrievalEnsemble.from_checkpoints(["a.ckpt", "b.ckpt"])
        metrics = ensemble.evaluate(Clotho(root, "evaluation"))
        fnames, scores = ensemble.rank(["a dog barks"], audio_paths, k=10)
    """

    def __init__(
        self,
        models: Sequence[BiEncoder],
        names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        models = list(models)
        if not models:
            raise ValueError("models is empty: an ensemble needs at least one member")
        for i, model in enumerate(models):
            if not isinstance(model, BiEncoder):
                raise TypeError(f"models[{i}] must be a BiEncoder, got {type(model).__name__}")
        names = [f"member {i}" for i in range(len(models))] if names is None else [str(n) for n in names]
        if len(names) != len(models):
            raise ValueError(f"names has {len(names)} entries for {len(models)} models")
        self.device = resolve_device(device)
        self.models = [model.to(self.device).eval() for model in models]
        self.names = names

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | os.PathLike], device: str | torch.device | None = None
    ) -> "RetrievalEnsemble":
        """Load retrieval checkpoints of any architectures (each alone: no downloads, no handoff files)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("paths is empty: give at least one retrieval checkpoint")
        for path in paths:  # check every file before spending time on building any model
            _check_contrastive_checkpoint(path)
        models = []
        for path in paths:
            module = ContrastiveRetrieval.load_for_inference(path, map_location="cpu")
            models.append(module.model)
            log.info("loaded %s (%s audio encoder at %d Hz)", path, module.hparams.audio_encoder, module.sample_rate)
        return cls(models, [str(p) for p in paths], device)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def sample_rates(self) -> list[int]:
        """The audio rate (Hz) each member's audio encoder expects."""
        return [int(model.audio_encoder.sample_rate) for model in self.models]

    @torch.inference_mode()
    def encode_waveforms(
        self, waveforms: Mapping[int, Sequence[Tensor]], members: Sequence[int] | None = None
    ) -> dict[int, Tensor]:
        """``{member: (B, E_m)}`` float32 CPU unit-norm embeddings of a batch of clips.

        ``waveforms`` maps each needed rate (see :attr:`sample_rates`) to the clips' mono ``(T_i,)``
        waveforms at that rate (same clips, same order). The clips are zero-padded into ``(B, T)``
        and passed with their true lengths to ``encode_audio``: the one way clips are encoded.
        ``members``: which members to run (default all).
        """
        members = range(len(self.models)) if members is None else list(members)
        padded: dict[int, tuple[Tensor, Tensor]] = {}
        out: dict[int, Tensor] = {}
        for index in members:
            rate = self.sample_rates[index]
            if rate not in padded:
                if rate not in waveforms:
                    raise ValueError(f"{self.names[index]}: no waveforms at its rate {rate} Hz (given: {sorted(waveforms)})")
                audio, lengths = pad_waveforms(list(waveforms[rate]))  # (B, T_max), (B,)
                padded[rate] = (audio.to(self.device), lengths.to(self.device))
            out[index] = self.models[index].encode_audio(*padded[rate]).float().cpu()  # (B, E_m)
        return out

    def encode_audio_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 16, progress: bool | None = None) -> list[Tensor]:
        """Audio embeddings of every member: a list of ``(A, E_m)`` float32 CPU tensors, unit norm.

        Each file is decoded once per distinct sample rate among the members (mono, resampled);
        ``batch_size`` files go through :meth:`encode_waveforms` at a time. ``progress``: a bar over
        the files on stderr (``None``: only when stderr is a terminal).
        """
        _check_batch_size(batch_size)
        if isinstance(paths, (str, os.PathLike)):
            raise ValueError("paths must be a sequence of audio file paths, got a single path")
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("paths is empty: no audio files to encode")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} audio files not found (first: {missing[:3]})")
        chunks: list[list[Tensor]] = [[] for _ in self.models]
        with file_progress(len(paths), "encoding audio", progress) as bar:
            for start in range(0, len(paths), batch_size):
                waveforms = read_waveforms(paths[start : start + batch_size], self.sample_rates, bar=bar)
                for index, emb in self.encode_waveforms(waveforms).items():
                    chunks[index].append(emb)
        return [torch.cat(parts) for parts in chunks]

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str], batch_size: int = 64) -> list[Tensor]:
        """Text embeddings of every member: a list of ``(Q, E_m)`` float32 CPU tensors, unit norm."""
        _check_batch_size(batch_size)
        captions = check_texts(captions, "captions")
        out = []
        for model in self.models:
            parts = [
                model.encode_text(captions[start : start + batch_size]).float().cpu()  # (B, E_m)
                for start in range(0, len(captions), batch_size)
            ]
            out.append(torch.cat(parts))
        return out

    def member_similarities(self, text_embs: Sequence[Tensor], audio_embs: Sequence[Tensor]) -> list[Tensor]:
        """Each member's cosine similarity matrix ``(Q, A)``."""
        text_embs, audio_embs = list(text_embs), list(audio_embs)
        if len(text_embs) != len(self.models) or len(audio_embs) != len(self.models):
            raise ValueError(
                f"need one text and one audio embedding matrix per member ({len(self.models)}), got "
                f"{len(text_embs)} and {len(audio_embs)}"
            )
        sims = []
        for i, (text, audio) in enumerate(zip(text_embs, audio_embs)):
            if text.ndim != 2 or audio.ndim != 2 or text.shape[1] != audio.shape[1]:
                raise ValueError(
                    f"member {i}: text (Q, E) and audio (A, E) embeddings must share E, got "
                    f"{tuple(text.shape)} and {tuple(audio.shape)}"
                )
            # normalised again so any embeddings give a true cosine (members already return unit norm)
            sims.append(F.normalize(text.float(), dim=-1) @ F.normalize(audio.float(), dim=-1).T)  # (Q, A)
        return sims

    def similarity(self, text_embs: Sequence[Tensor], audio_embs: Sequence[Tensor]) -> Tensor:
        """The ensemble's text-to-audio scores ``(Q, A)``: the mean of the members' cosine matrices."""
        return average_similarities(self.member_similarities(text_embs, audio_embs))

    def score(
        self,
        captions: Sequence[str],
        audio_paths: Sequence[str | os.PathLike],
        batch_size: int = 16,
        text_batch_size: int = 64,
    ) -> Tensor:
        """Encode captions and audio files (``batch_size`` files, ``text_batch_size`` captions per
        forward pass) and return the ensemble's ``(Q, A)`` similarity."""
        text_embs = self.encode_texts(captions, batch_size=text_batch_size)
        audio_embs = self.encode_audio_files(audio_paths, batch_size=batch_size)
        return self.similarity(text_embs, audio_embs)

    def evaluate(
        self, dataset: CaptionDataset, batch_size: int = 16, text_batch_size: int = 64
    ) -> dict[str, dict[str, float]]:
        """Retrieval metrics on a dataset: every caption is a query whose relevant item is its clip.

        Returns ``{"t2a": {R@1, R@5, R@10, mAP@10}, "a2t": {...}}``; audio-to-text queries have all
        the clip's captions as relevant (see :mod:`aac_lightning.metrics.retrieval`).
        """
        if not isinstance(dataset, CaptionDataset):
            raise TypeError(f"dataset must be a CaptionDataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name} has no clips")
        captions, targets = caption_targets(dataset.captions)
        audio_paths = [r.path for r in dataset.records]
        sim = self.score(captions, audio_paths, batch_size, text_batch_size)  # (Q, A)
        return ensemble_metrics(sim, targets)

    def rank(
        self,
        captions: Sequence[str],
        audio_paths: Sequence[str | os.PathLike],
        k: int = DCASE_NUM_RANKED,
        batch_size: int = 16,
        text_batch_size: int = 64,
    ) -> tuple[list[list[str]], Tensor]:
        """Top-``k`` audio file names per caption, best first, and their scores ``(Q, min(k, A))``."""
        audio_paths = [Path(p) for p in audio_paths]
        sim = self.score(captions, audio_paths, batch_size, text_batch_size)
        return rank_from_similarity(sim, [p.name for p in audio_paths], k)


# --------------------------------------------------------------------------------------- helpers


def caption_targets(captions_per_clip: Sequence[Sequence[str]]) -> tuple[list[str], Tensor]:
    """Flatten captions per clip into queries and the index (Q,) of each one's clip."""
    captions: list[str] = []
    targets: list[int] = []
    for clip_index, clip_captions in enumerate(captions_per_clip):
        if not clip_captions:
            raise ValueError(f"clip {clip_index} has no captions: every clip needs at least one")
        captions.extend(clip_captions)
        targets.extend([clip_index] * len(clip_captions))
    return captions, torch.tensor(targets, dtype=torch.long)


def ensemble_metrics(sim_t2a: Tensor, caption_to_audio: Tensor) -> dict[str, dict[str, float]]:
    """``{"t2a": ..., "a2t": ...}`` metrics of a ``(captions, audio)`` similarity matrix."""
    return {
        "t2a": retrieval_metrics(sim_t2a, caption_to_audio),
        "a2t": audio_to_text_metrics(sim_t2a.T, caption_to_audio),
    }


def rank_from_similarity(
    sim: Tensor, fnames: Sequence[str], k: int = DCASE_NUM_RANKED
) -> tuple[list[list[str]], Tensor]:
    """Top-``k`` names of the candidates (columns of ``sim`` (Q, A)) per query, and their scores."""
    fnames = list(fnames)
    if sim.ndim != 2 or sim.shape[1] != len(fnames):
        raise ValueError(f"sim must be (queries, {len(fnames)} candidates), got {tuple(sim.shape)}")
    if len(set(fnames)) != len(fnames):
        repeated = sorted({f for f in fnames if fnames.count(f) > 1})
        raise ValueError(f"audio file names must be unique to rank them, repeated: {repeated[:5]}")
    scores, indices = top_k_candidates(sim, k)  # (Q, k'), (Q, k')
    return [[fnames[i] for i in row] for row in indices.tolist()], scores


def evaluate_retrieval_ensemble(
    checkpoints: Sequence[str | os.PathLike],
    clotho_root: str | os.PathLike,
    subset: str = "evaluation",
    device: str | torch.device | None = None,
    *,
    batch_size: int = 16,
    text_batch_size: int = 64,
    csv_path: str | os.PathLike | None = None,
    relevance: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate retrieval checkpoints (several = ensemble) on a Clotho subset.

    Every caption is a text query whose relevant item is its clip. Returns
    ``{"checkpoints", "clotho_root", "subset", "num_audio", "num_queries",
    "metrics": {"t2a": {R@1, R@5, R@10, mAP@10}, "a2t": {...}}, "captions": [query, ...],
    "fnames": [clip file name, ...], "targets": (Q,) clip index of each query,
    "similarity": (Q, A) ensemble scores}``. ``device=None``: CUDA if available, else the CPU.
    ``csv_path``: also write the top-10 files per query there as a DCASE task 6b submission.
    ``relevance``: a DCASE 2025 relevance file (``query,audio_filenames``); its metrics (``mAP@16``,
    ``R@1/5/10`` over several relevant clips, :mod:`aac_lightning.metrics.relevance`) are added as
    ``metrics["dcase2025"]``. Its queries and clips are checked against the subset before encoding.
    """
    paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError("checkpoints is empty: give at least one retrieval checkpoint")
    relevance_file = read_relevance_file(relevance) if relevance is not None else None
    dataset = Clotho(clotho_root, subset, sample_rate=None)  # each file read at the members' own rates
    if len(dataset) == 0:
        raise ValueError(f"Clotho subset '{subset}' under '{clotho_root}' has no clips")
    captions, targets = caption_targets(dataset.captions)
    fnames = list(dataset.fnames)
    where = f"Clotho {subset} under '{clotho_root}'"
    if relevance_file is not None:
        relevance_targets(relevance_file, captions, fnames, where)  # unknown ids: fail before any encoding
    ensemble = RetrievalEnsemble.from_checkpoints(paths, device=device)
    audio_paths = [r.path for r in dataset.records]
    sim = ensemble.score(captions, audio_paths, batch_size, text_batch_size)  # (Q, A)
    metrics: dict[str, Any] = ensemble_metrics(sim, targets)
    if relevance_file is not None:
        metrics["dcase2025"] = dcase2025_metrics(sim, captions, fnames, relevance_file, where)
    if csv_path is not None:
        write_submission(csv_path, sim, captions, fnames)
    return {
        "checkpoints": paths,
        "clotho_root": str(clotho_root),
        "subset": subset,
        "num_audio": len(audio_paths),
        "num_queries": len(captions),
        "metrics": metrics,
        "captions": captions,
        "fnames": fnames,
        "targets": targets,
        "similarity": sim,
    }


def write_submission(
    path: str | os.PathLike, sim: Tensor, captions: Sequence[str], fnames: Sequence[str], protocol: str = "dcase2022"
) -> Path:
    """Write the DCASE retrieval submission of a ``(Q, A)`` similarity, then read it back and check it.

    ``protocol``: ``dcase2022`` / ``dcase2024`` (the top-10 ``fnames`` per caption) or ``dcase2025``
    (every score: ``index,<file>,...``); see :mod:`aac_lightning.metrics.dcase`.
    """
    if protocol not in RETRIEVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(RETRIEVAL_PROTOCOLS)}, got {protocol!r}")
    if protocol == "dcase2025":
        written = write_dcase2025_retrieval_csv(path, captions, fnames, sim)
    else:
        if len(fnames) < DCASE_NUM_RANKED:
            log.warning("only %d audio files: each query ranks all of them", len(fnames))
        ranked, _ = rank_from_similarity(sim, fnames, DCASE_NUM_RANKED)
        written = write_dcase_retrieval_csv(path, captions, ranked)
    check_retrieval_submission(written, captions, fnames, protocol)
    return written
