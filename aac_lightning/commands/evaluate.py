"""`aac-lightning caption-eval` and `aac-lightning retrieval-eval`: argparse and printing only.

The work is done by :func:`aac_lightning.ensembles.evaluate_caption_ensemble` and
:func:`aac_lightning.ensembles.evaluate_retrieval_ensemble`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP@10")


def caption_eval_command(args: Sequence[str]) -> None:
    """`aac-lightning caption-eval`: caption a Clotho subset with one captioner or an ensemble and score it."""
    from aac_lightning.config import read_ensemble_config
    from aac_lightning.ensembles.captioning import evaluate_caption_ensemble
    from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, FINISHED_RULES

    parser = argparse.ArgumentParser(
        prog="aac-lightning caption-eval",
        description="Caption a Clotho subset with one captioner or an ensemble (per-step mean of "
        "log-probabilities in one beam, renormalised) and compute the caption metrics.",
    )
    parser.add_argument("checkpoints", nargs="*", help="XE / SCST checkpoints (several = ensemble)")
    parser.add_argument("--config", help="ensemble config with a 'checkpoints' list (e.g. conf/captioning/ensembles/system2.yaml)")
    parser.add_argument("--clotho-root", required=True, help="folder holding Clotho (or the synthetic data)")
    parser.add_argument("--subset", default="evaluation", help="Clotho subset (default: evaluation)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="longest caption in words (default: 20, the authors')")
    parser.add_argument("--no-renormalize", action="store_true", help="search on the plain mean of the members' log-probabilities (default: log_softmax of the mean, the authors')")
    parser.add_argument("--finished", choices=FINISHED_RULES, default="collect", help="beam rule for finished hypotheses (default: collect, the authors'; keep: they stay in the beam)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="final choice by score / length**p (default: 1, the authors'; 0: raw sum)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--csv", help="write the DCASE task 6a submission CSV here")
    ns = parser.parse_args(list(args))
    paths = (read_ensemble_config(ns.config) if ns.config else []) + list(ns.checkpoints)
    if not paths:
        parser.error("give checkpoints or --config")
    result = evaluate_caption_ensemble(
        paths,
        ns.clotho_root,
        ns.subset,
        device=ns.device,
        beam_size=ns.beam_size,
        max_length=ns.max_length,
        renormalize=not ns.no_renormalize,
        finished=ns.finished,
        length_penalty=ns.length_penalty,
        batch_size=ns.batch_size,
        csv_path=ns.csv,
    )
    for name, value in result["metrics"].items():
        print(f"{name:<10} {value:.4f}")
    if ns.out:
        payload = {"checkpoints": result["checkpoints"], "subset": ns.subset, "metrics": result["metrics"]}
        Path(ns.out).write_text(json.dumps(payload, indent=2), encoding="utf-8")


def read_queries(path: str) -> list[str]:
    """Captions of a DCASE task 6b query file (a CSV with a ``caption`` column)."""
    from aac_lightning.data.datasets import check_caption, read_csv_rows

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


def _retrieval_parser() -> argparse.ArgumentParser:
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
    from aac_lightning.config import read_ensemble_config

    parser = _retrieval_parser()
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

    from aac_lightning.data.audio import list_audio_files
    from aac_lightning.ensembles.retrieval import RetrievalEnsemble, evaluate_retrieval_ensemble, write_submission

    device = ns.device
    if query_mode:
        ensemble = RetrievalEnsemble.from_checkpoints(checkpoints, device=device)
        captions = read_queries(ns.queries)
        audio_paths = list_audio_files(ns.audio_dir)
        if not audio_paths:
            raise FileNotFoundError(f"no audio files under --audio-dir '{ns.audio_dir}'")
        sim = ensemble.score(captions, audio_paths, ns.batch_size, ns.text_batch_size)  # (Q, A)
        print(f"ensemble of {len(ensemble)} model(s) on {len(audio_paths)} audio files in '{ns.audio_dir}', {len(captions)} caption queries")
        if ns.csv:
            path = write_submission(ns.csv, sim, captions, [Path(p).name for p in audio_paths])
            print(f"submission written to {path}")
    else:
        result = evaluate_retrieval_ensemble(
            checkpoints, ns.clotho_root, ns.subset, device=device, batch_size=ns.batch_size,
            text_batch_size=ns.text_batch_size, csv_path=ns.csv,
        )
        print(
            f"ensemble of {len(checkpoints)} model(s) on Clotho {ns.subset}: {result['num_audio']} clips, "
            f"{result['num_queries']} caption queries"
        )
        print(format_metrics_table(result["metrics"]))
        if ns.out:
            report: dict[str, Any] = {
                key: result[key] for key in ("checkpoints", "clotho_root", "subset", "num_audio", "num_queries", "metrics")
            }
            out = Path(ns.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"metrics written to {out}")
        if ns.csv:
            print(f"submission written to {ns.csv}")
