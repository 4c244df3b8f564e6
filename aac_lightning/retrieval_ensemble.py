"""Retrieval ensembles and DCASE task 6b submissions (report Sec. 3).

An ensemble ranks audio for a text query by the *average of its members' cosine similarity
matrices*: each member (a trained bi-encoder, any architecture) embeds the texts and the audio in
its own space, computes its own ``(queries, audio)`` cosine matrix, and the matrices are averaged.
Members may differ in embedding size and in the sample rate their audio encoder expects; audio is
read once per distinct rate.

The submission of DCASE 2022 task 6b (language-based audio retrieval) is a CSV with one row per
text query: ``caption,fname_1,...,fname_10``, the ten best audio files, best first.

Command line: ``aac-lightning retrieval-eval`` (see :func:`retrieval_eval_command`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from aac_lightning.data.audio import list_audio_files, load_audio
from aac_lightning.data.datamodules import pad_waveforms
from aac_lightning.data.datasets import CaptionDataset, Clotho, check_caption, read_csv_rows
from aac_lightning.metrics.retrieval import (
    audio_to_text_metrics,
    average_similarities,
    retrieval_metrics,
    top_k_candidates,
)
from aac_lightning.checkpoints import HandoffError, checkpoint_kind, read_checkpoint
from aac_lightning.modules.retrieval import ContrastiveRetrieval
from aac_lightning.nn.bi_encoder import BiEncoder

log = logging.getLogger(__name__)

__all__ = [
    "DCASE_NUM_RANKED",
    "RetrievalEnsemble",
    "caption_targets",
    "ensemble_metrics",
    "rank_from_similarity",
    "read_dcase_retrieval_csv",
    "read_ensemble_config",
    "retrieval_eval_command",
    "write_dcase_retrieval_csv",
]

DCASE_NUM_RANKED = 10  # audio files per query in a task 6b submission
METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP@10")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_texts(texts: Sequence[str], argument: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{argument} must be a sequence of strings, got a single str")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{argument} is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{argument}[{i}] must be a non-empty string, got {text!r}")
    return texts


def _check_contrastive_checkpoint(path: Path) -> None:
    """Refuse a checkpoint of another stage (captioning) before building a model from it.

    The file is memory-mapped so that only its small metadata is read (retrieval checkpoints with
    optimizer state weigh gigabytes); files that cannot be mapped are read the ordinary way.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
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
        device: str | torch.device = "cpu",
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
        self.device = torch.device(device)
        self.models = [model.to(self.device).eval() for model in models]
        self.names = names

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu"
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
    def encode_audio_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 16) -> list[Tensor]:
        """Audio embeddings of every member: a list of ``(A, E_m)`` float32 CPU tensors, unit norm.

        Each file is decoded once per distinct sample rate among the members (mono, resampled), and
        a batch is zero-padded to its longest file with the true lengths passed to the encoders.
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
        members_by_rate: dict[int, list[int]] = {}
        for index, rate in enumerate(self.sample_rates):
            members_by_rate.setdefault(rate, []).append(index)
        chunks: list[list[Tensor]] = [[] for _ in self.models]
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            for rate, members in members_by_rate.items():
                waveforms = [load_audio(p, rate, mono=True)[0][0] for p in batch_paths]  # each (T_i,)
                waveform, lengths = pad_waveforms(waveforms)  # (B, T_max), (B,)
                waveform, lengths = waveform.to(self.device), lengths.to(self.device)
                for index in members:
                    emb = self.models[index].encode_audio(waveform, lengths)  # (B, E_m)
                    chunks[index].append(emb.float().cpu())
        return [torch.cat(parts) for parts in chunks]

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str], batch_size: int = 64) -> list[Tensor]:
        """Text embeddings of every member: a list of ``(Q, E_m)`` float32 CPU tensors, unit norm."""
        _check_batch_size(batch_size)
        captions = _check_texts(captions, "captions")
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


# ----------------------------------------------------------------------------- submission CSV


def write_dcase_retrieval_csv(
    path: str | os.PathLike, captions: Sequence[str], ranked_fnames: Sequence[Sequence[str]]
) -> Path:
    """Write a DCASE task 6b submission: header ``caption,fname_1,...,fname_N``, one row per query.

    ``N`` is the length of the ranked lists (the same for every query; the challenge asks for 10).
    Fields are CSV-quoted where needed: captions and Clotho file names contain commas and quotes.
    """
    captions = _check_texts(captions, "captions")
    ranked = [list(row) for row in ranked_fnames]
    if len(ranked) != len(captions):
        raise ValueError(f"captions and ranked_fnames must have the same length, got {len(captions)} and {len(ranked)}")
    num_ranked = len(ranked[0])
    if num_ranked == 0:
        raise ValueError("ranked_fnames[0] is empty: each query needs at least one ranked file name")
    for i, row in enumerate(ranked):
        if len(row) != num_ranked:
            raise ValueError(f"ranked_fnames[{i}] has {len(row)} names, ranked_fnames[0] has {num_ranked}")
        if len(set(row)) != len(row):
            raise ValueError(f"ranked_fnames[{i}] names a file twice: {row}")
        for name in row:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ranked_fnames[{i}] holds {name!r}: file names must be non-empty strings")
    if num_ranked != DCASE_NUM_RANKED:
        log.warning("writing %d ranked files per query; a DCASE task 6b submission has %d", num_ranked, DCASE_NUM_RANKED)
    for i, text in enumerate(captions):
        # the challenge's scoring reads one query per line
        if "\n" in text or "\r" in text or any("\n" in n or "\r" in n for n in ranked[i]):
            raise ValueError(f"line breaks are not allowed in a submission row (query {i}: {text!r})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["caption"] + [f"fname_{j}" for j in range(1, num_ranked + 1)])
        writer.writerows([caption, *row] for caption, row in zip(captions, ranked))
    return path


def read_dcase_retrieval_csv(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Read a file written by :func:`write_dcase_retrieval_csv`: ``(captions, ranked_fnames)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no submission file at '{path}'")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"'{path}' is empty: expected the header 'caption,fname_1,...'")
    header = rows[0]
    expected = ["caption"] + [f"fname_{j}" for j in range(1, len(header))]
    if len(header) < 2 or header != expected:
        raise ValueError(f"'{path}': expected the header 'caption,fname_1,...,fname_N', got {header}")
    captions, ranked = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"'{path}' line {line_no}: {len(row)} fields, the header has {len(header)}")
        captions.append(row[0])
        ranked.append(row[1:])
    return captions, ranked


# ------------------------------------------------------------------------------ command line


def _read_queries(path: str) -> list[str]:
    """Captions of a DCASE task 6b query file (a CSV with a ``caption`` column)."""
    rows = read_csv_rows(Path(path), ("caption",))
    if not rows:
        raise ValueError(f"query file '{path}' holds no captions")
    return [check_caption(row["caption"], f"'{path}' line {i}") for i, row in enumerate(rows, start=2)]


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per direction, one column per metric."""
    lines = ["direction " + "".join(f"{name:>9}" for name in METRIC_NAMES)]
    for direction in ("t2a", "a2t"):
        values = metrics[direction]
        lines.append(f"{direction:<10}" + "".join(f"{values[name]:>9.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aac-lightning retrieval-eval",
        description="Evaluate a retrieval model or an ensemble of them (the average of their cosine "
        "similarity matrices) on Clotho: every caption is a query, its clip the relevant item. Prints "
        "text-to-audio and audio-to-text R@1/R@5/R@10/mAP@10; optionally writes them as JSON and the "
        "top-10 ranking as a DCASE task 6b submission CSV. With --audio-dir and --queries instead of "
        "--clotho-root, ranks the audio of a folder for the captions of a query file (no metrics).",
    )
    parser.add_argument("checkpoints", nargs="*", help="retrieval checkpoints (.ckpt), in any number")
    parser.add_argument("--config", help="ensemble config YAML with 'checkpoints: [...]' (conf/retrieval/ensembles/)")
    parser.add_argument("--clotho-root", help="folder holding Clotho v2.1 (aac-datasets or Zenodo layout)")
    parser.add_argument("--subset", default="evaluation", help="Clotho subset (default: evaluation)")
    parser.add_argument("--audio-dir", help="folder of audio files to rank (with --queries; no metrics)")
    parser.add_argument("--queries", help="CSV with a 'caption' column: the text queries (with --audio-dir)")
    parser.add_argument("--batch-size", type=int, default=16, help="audio files per forward pass (default 16)")
    parser.add_argument("--text-batch-size", type=int, default=64, help="captions per forward pass (default 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="write the metrics and settings to this JSON file")
    parser.add_argument("--csv", help="write the top-10 files per query to this DCASE task 6b submission CSV")
    return parser


def retrieval_eval_command(args: Sequence[str]) -> None:
    """``aac-lightning retrieval-eval CKPT [CKPT ...] --clotho-root DIR [...]`` (see ``--help``)."""
    parser = _build_parser()
    ns = parser.parse_args(list(args))
    checkpoints = (read_ensemble_config(ns.config) if ns.config else []) + list(ns.checkpoints)
    if not checkpoints:
        parser.error("give at least one checkpoint, or --config with a 'checkpoints' list")
    query_mode = ns.audio_dir is not None or ns.queries is not None
    if query_mode and ns.clotho_root is not None:
        parser.error("use either --clotho-root, or --audio-dir with --queries, not both")
    if query_mode and (ns.audio_dir is None or ns.queries is None):
        parser.error("--audio-dir and --queries go together")
    if not query_mode and ns.clotho_root is None:
        parser.error("--clotho-root is required (or --audio-dir with --queries)")
    if query_mode and ns.out is not None:
        parser.error("--out writes metrics, which need ground truth: use --clotho-root")
    if ns.batch_size < 1 or ns.text_batch_size < 1:
        parser.error(f"--batch-size and --text-batch-size must be >= 1, got {ns.batch_size} and {ns.text_batch_size}")
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")

    ensemble = RetrievalEnsemble.from_checkpoints(checkpoints, device=device)
    if query_mode:
        captions = _read_queries(ns.queries)
        audio_paths = list_audio_files(ns.audio_dir)
        if not audio_paths:
            raise FileNotFoundError(f"no audio files under --audio-dir '{ns.audio_dir}'")
        source = f"{len(audio_paths)} audio files in '{ns.audio_dir}'"
        targets = None
    else:
        # each file is read at the members' own rates, not at the dataset's
        dataset = Clotho(ns.clotho_root, ns.subset, sample_rate=None)
        if len(dataset) == 0:
            raise ValueError(f"Clotho subset '{ns.subset}' under '{ns.clotho_root}' has no clips")
        captions, targets = caption_targets(dataset.captions)
        audio_paths = [r.path for r in dataset.records]
        source = f"{dataset.name}: {len(audio_paths)} clips"
    sim = ensemble.score(captions, audio_paths, ns.batch_size, ns.text_batch_size)  # (Q, A)
    print(f"ensemble of {len(ensemble)} model(s) on {source}, {len(captions)} caption queries")

    if targets is not None:
        metrics = ensemble_metrics(sim, targets)
        print(format_metrics_table(metrics))
        if ns.out:
            report: dict[str, Any] = {
                "checkpoints": checkpoints,
                "clotho_root": str(ns.clotho_root),
                "subset": ns.subset,
                "num_audio": len(audio_paths),
                "num_queries": len(captions),
                "metrics": metrics,
            }
            out = Path(ns.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"metrics written to {out}")
    if ns.csv:
        if len(audio_paths) < DCASE_NUM_RANKED:
            log.warning("only %d audio files: each query ranks all of them", len(audio_paths))
        ranked, _ = rank_from_similarity(sim, [Path(p).name for p in audio_paths], DCASE_NUM_RANKED)
        path = write_dcase_retrieval_csv(ns.csv, captions, ranked)
        print(f"submission written to {path}")
