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


def _caption_parser() -> argparse.ArgumentParser:
    from aac_lightning.metrics.sets import CAPTION_METRIC_SETS, DCASE_RANKING_METRIC
    from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, FINISHED_RULES

    parser = argparse.ArgumentParser(
        prog="aac-lightning caption-eval",
        description="Caption a Clotho subset with one captioner or an ensemble (per-step mean of "
        "log-probabilities in one beam, renormalised) and compute the caption metrics. With --audio-dir "
        "instead of --clotho-root, captions a folder without references (the challenge's evaluation "
        "set) and writes the submission CSV only.",
    )
    parser.add_argument("checkpoints", nargs="*", help="XE / SCST checkpoints (several = ensemble)")
    parser.add_argument("--config", help="ensemble config with a 'checkpoints' list (e.g. conf/captioning/ensembles/system2.yaml)")
    parser.add_argument("--clotho-root", help="folder holding Clotho (or the synthetic data)")
    parser.add_argument("--subset", default="evaluation", help="Clotho subset (default: evaluation)")
    parser.add_argument("--audio-dir", help="caption the audio files of this folder (no metrics; needs --csv)")
    ranked = ", ".join(f"{year}: {name}" for year, name in DCASE_RANKING_METRIC.items() if year in CAPTION_METRIC_SETS)
    parser.add_argument(
        "--metrics", default="default",
        help=f"metric sets and/or names, comma-separated: {', '.join(sorted(CAPTION_METRIC_SETS))}, or names such as "
        f"bleu_4, cider_d, spider_fl, fense, vocab (default: 'default', the 2022 metrics plus SPIDEr-FL and FENSE). "
        f"Ranked by: {ranked}",
    )
    parser.add_argument("--fense-models", help="folder holding the FENSE / SPIDEr-FL models (default: the Hugging Face cache and $FENSE_DATA)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="longest caption in words (default: 20, the authors')")
    parser.add_argument("--no-renormalize", action="store_true", help="search on the plain mean of the members' log-probabilities (default: log_softmax of the mean, the authors')")
    parser.add_argument("--finished", choices=FINISHED_RULES, default="collect", help="beam rule for finished hypotheses (default: collect, the authors'; keep: they stay in the beam)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="final choice by score / length**p (default: 1, the authors'; 0: raw sum)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="write the metrics (and the unavailable ones, with reasons) as JSON here")
    parser.add_argument("--csv", help="write the DCASE captioning submission CSV (file_name,caption_predicted) here")
    return parser


def caption_eval_command(args: Sequence[str]) -> None:
    """`aac-lightning caption-eval`: caption a Clotho subset with one captioner or an ensemble and score it."""
    from aac_lightning.config import read_ensemble_config
    from aac_lightning.ensembles.captioning import caption_audio_folder, evaluate_caption_ensemble
    from aac_lightning.metrics.sets import resolve_caption_metrics

    parser = _caption_parser()
    ns = parser.parse_args(list(args))
    paths = (read_ensemble_config(ns.config) if ns.config else []) + list(ns.checkpoints)
    if not paths:
        parser.error("give checkpoints or --config")
    if (ns.audio_dir is None) == (ns.clotho_root is None):
        parser.error("give either --clotho-root (captions and metrics) or --audio-dir (a submission for a folder)")
    if ns.audio_dir is not None and (ns.csv is None or ns.out is not None):
        parser.error("--audio-dir writes a submission only: give --csv, and no --out (no references, no metrics)")
    try:
        resolve_caption_metrics(ns.metrics)
    except ValueError as err:
        parser.error(f"--metrics: {err}")
    decoding = dict(
        beam_size=ns.beam_size, max_length=ns.max_length, renormalize=not ns.no_renormalize, finished=ns.finished,
        length_penalty=ns.length_penalty,
    )
    if ns.audio_dir is not None:
        done = caption_audio_folder(paths, ns.audio_dir, ns.csv, device=ns.device, batch_size=ns.batch_size, **decoding)
        print(f"{len(done['captions'])} files of '{ns.audio_dir}' captioned; submission written to {done['csv']} (read back: ok)")
        return
    result = evaluate_caption_ensemble(
        paths, ns.clotho_root, ns.subset, device=ns.device, batch_size=ns.batch_size, csv_path=ns.csv,
        metrics=ns.metrics, fense_dir=ns.fense_models, **decoding,
    )
    for name, value in result["metrics"].items():
        print(f"{name:<10} {value:.4f}")
    for name, reason in result["unavailable"].items():
        print(f"{name:<10} unavailable: {reason}")
    if ns.out:
        payload = {"checkpoints": result["checkpoints"], "subset": ns.subset, "metrics": result["metrics"],
                   "unavailable": result["unavailable"]}
        Path(ns.out).write_text(json.dumps(payload, indent=2), encoding="utf-8")


def read_queries(path: str) -> list[str]:
    """Captions of a DCASE task 6b query file (a CSV with a ``caption`` column)."""
    from aac_lightning.data.datasets import check_caption, read_csv_rows

    rows = read_csv_rows(Path(path), ("caption",))
    if not rows:
        raise ValueError(f"query file '{path}' holds no captions")
    return [check_caption(row["caption"], f"'{path}' line {i}") for i, row in enumerate(rows, start=2)]


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per direction, one column per metric; the DCASE 2025 metrics below."""
    lines = ["direction " + "".join(f"{name:>9}" for name in METRIC_NAMES)]
    for direction in ("t2a", "a2t"):
        values = metrics[direction]
        lines.append(f"{direction:<10}" + "".join(f"{values[name]:>9.4f}" for name in METRIC_NAMES))
    if "dcase2025" in metrics:  # text-to-audio against the relevance file's several relevant clips
        values = metrics["dcase2025"]
        lines.append("dcase2025 " + "".join(f"{name:>9}" for name in values))
        lines.append(f"{'t2a':<10}" + "".join(f"{value:>9.4f}" for value in values.values()))
    return "\n".join(lines)


def _retrieval_parser() -> argparse.ArgumentParser:
    from aac_lightning.metrics.dcase import RETRIEVAL_PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="aac-lightning retrieval-eval",
        description="Evaluate a retrieval model or an ensemble of them (the average of their cosine "
        "similarity matrices) on Clotho: every caption is a query, its clip the relevant item. Prints "
        "text-to-audio and audio-to-text R@1/R@5/R@10/mAP@10 (with --protocol dcase2025 --relevance FILE, "
        "also mAP@16 against several relevant clips); optionally writes them as JSON and the DCASE "
        "submission CSV. With --audio-dir and --queries instead of --clotho-root, ranks the audio of a "
        "folder for the captions of a query file (no metrics) and writes the submission.",
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
    parser.add_argument("--csv", help="write the submission CSV of --protocol here (read back and checked)")
    parser.add_argument(
        "--protocol", choices=RETRIEVAL_PROTOCOLS, default="dcase2022",
        help="dcase2022 / dcase2024: R@1/5/10 and mAP@10 with one relevant clip per caption, submission = the "
        "top-10 files per query; dcase2025: also mAP@16 (and R@k) against --relevance, submission = every score",
    )
    parser.add_argument("--relevance", help="DCASE 2025 relevance file (CSV 'query,audio_filenames') for --protocol dcase2025")
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
    if ns.relevance is not None and (query_mode or ns.protocol != "dcase2025"):
        parser.error("--relevance goes with --protocol dcase2025 and --clotho-root (the annotated captions)")
    if ns.protocol == "dcase2025" and not query_mode and ns.relevance is None:
        parser.error("--protocol dcase2025 needs --relevance FILE (the task's relevance annotations)")
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
            path = write_submission(ns.csv, sim, captions, [Path(p).name for p in audio_paths], ns.protocol)
            print(f"{ns.protocol} submission written to {path} (read back: ok)")
    else:
        result = evaluate_retrieval_ensemble(
            checkpoints, ns.clotho_root, ns.subset, device=device, batch_size=ns.batch_size,
            text_batch_size=ns.text_batch_size, relevance=ns.relevance,
        )
        if ns.csv:
            write_submission(ns.csv, result["similarity"], result["captions"], result["fnames"], ns.protocol)
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
            print(f"{ns.protocol} submission written to {ns.csv} (read back: ok)")
