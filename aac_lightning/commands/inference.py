"""`aac-lightning caption` and `aac-lightning search`: argparse and printing only.

The work is done by :class:`aac_lightning.inference.Captioner` and
:class:`aac_lightning.inference.Retriever`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from aac_lightning.checkpoints import HandoffError, is_pretrained_folder
from aac_lightning.data.audio import AudioError
from aac_lightning.inference import CACHE_DIR_NAME, ON_BAD_AUDIO, Captioner, Retriever, expand_audio_paths
from aac_lightning.metrics.captioning import write_dcase_captioning_csv
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH


def _is_model(item: str) -> bool:
    """A checkpoint (`.ckpt`) or an exported model folder (a folder with a config.json)."""
    return item.lower().endswith(".ckpt") or is_pretrained_folder(item)


def _split_checkpoints(items: Sequence[str]) -> tuple[list[str], list[str]]:
    checkpoints = [a for a in items if _is_model(a)]
    rest = [a for a in items if not _is_model(a)]
    return checkpoints, rest


def caption_command(args: Sequence[str]) -> None:
    """``aac-lightning caption CKPT [CKPT ...] AUDIO [AUDIO ...]`` (see ``--help``)."""

    parser = argparse.ArgumentParser(
        prog="aac-lightning caption",
        description="Caption audio files with a captioning checkpoint (XE or SCST) or an ensemble. "
        "Arguments ending in .ckpt and exported model folders (aac-lightning export) are models (several = "
        "ensemble); the others are audio files or "
        "folders (searched recursively). Prints 'file<TAB>caption' lines, files as given or relative "
        "to the folder given.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CKPT_OR_AUDIO", help="checkpoints (.ckpt) or exported folders, then audio files / folders")
    parser.add_argument("--out", help="also write the DCASE 2022 task 6a submission CSV (file_name,caption_predicted)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam width (default 3)")
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"longest caption in words (default {DEFAULT_MAX_LENGTH}, the authors')"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips decoded at once (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--on-bad-audio", choices=ON_BAD_AUDIO, default="error",
                        help="a file that cannot be decoded stops the run (error, default) or is skipped and counted (skip)")
    ns = parser.parse_intermixed_args(list(args))  # options may sit between positionals
    checkpoints, audio = _split_checkpoints(ns.inputs)
    if not checkpoints:
        parser.error("give at least one captioning checkpoint (a file ending in .ckpt, or an exported model folder)")
    if not audio:
        parser.error("give at least one audio file or folder")
    for name in ("beam_size", "max_length", "batch_size"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    try:
        items = expand_audio_paths(audio)  # fail on a missing path before loading any model
        captioner = Captioner.from_checkpoint(checkpoints, device=ns.device, beam_size=ns.beam_size, max_length=ns.max_length)
        label = {str(path): name for path, name in items}
        results = captioner.caption([path for path, _ in items], batch_size=ns.batch_size, on_bad_audio=ns.on_bad_audio)
    except (AudioError, HandoffError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aac-lightning caption: error: {err}") from err
    for path, text in results:
        print(f"{label[path]}\t{text}")
    if captioner.last_skipped:  # each one was logged with its reason as it was met
        print(f"skipped {len(captioner.last_skipped)} of {len(items)} audio files", file=sys.stderr)
    if ns.out:
        try:
            write_dcase_captioning_csv(ns.out, [label[p] for p, _ in results], [t for _, t in results])
        except ValueError as err:
            raise SystemExit(f"aac-lightning caption: error: cannot write '{ns.out}': {err}") from err
        print(f"submission written to {ns.out}", file=sys.stderr)
    if not results:
        raise SystemExit("aac-lightning caption: error: no audio file could be captioned")


def search_command(args: Sequence[str]) -> None:
    """``aac-lightning search CKPT [CKPT ...] --audio-dir DIR QUERY [QUERY ...]`` (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning search",
        description="Rank the audio files of a folder for text queries with a retrieval checkpoint or an "
        "ensemble (mean of the cosine similarity matrices). Arguments ending in .ckpt and exported model "
        "folders (aac-lightning export) are models, "
        "the others queries. Audio embeddings are cached (DIR/.aac_lightning_cache by default) and "
        "recomputed only for added or changed files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CKPT_OR_QUERY", help="checkpoints (.ckpt) or exported folders, then text queries")
    parser.add_argument("--audio-dir", required=True, help="folder of audio files (searched recursively)")
    parser.add_argument("-k", type=int, default=10, help="files listed per query (default 10)")
    parser.add_argument("--cache-dir", help=f"embedding cache folder (default: AUDIO_DIR/{CACHE_DIR_NAME})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    parser.add_argument("--batch-size", type=int, default=16, help="audio files encoded at once (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--on-bad-audio", choices=ON_BAD_AUDIO, default="error",
                        help="a file that cannot be decoded stops the run (error, default) or is skipped and counted (skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text lines")
    ns = parser.parse_intermixed_args(list(args))  # options may sit between positionals
    checkpoints, queries = _split_checkpoints(ns.inputs)
    if not checkpoints:
        parser.error("give at least one retrieval checkpoint (a file ending in .ckpt, or an exported model folder)")
    if not queries:
        parser.error("give at least one text query")
    if any(not q.strip() for q in queries):
        parser.error("queries must not be empty")
    if ns.k < 1:
        parser.error(f"-k must be >= 1, got {ns.k}")
    if ns.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {ns.batch_size}")
    if not Path(ns.audio_dir).is_dir():
        parser.error(f"--audio-dir '{ns.audio_dir}' is not a folder")
    try:
        retriever = Retriever.from_checkpoint(
            checkpoints, device=ns.device, cache_dir=ns.cache_dir, use_cache=not ns.no_cache, batch_size=ns.batch_size
        )
        retriever.index(ns.audio_dir, on_bad_audio=ns.on_bad_audio)
        results = retriever.search(queries, k=ns.k)
    except (AudioError, HandoffError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aac-lightning search: error: {err}") from err
    relative = dict(zip(retriever.files, retriever.names))
    if retriever.last_skipped:  # each one was logged with its reason as it was met
        total = len(retriever.files) + len(retriever.last_skipped)
        print(f"skipped {len(retriever.last_skipped)} of {total} audio files", file=sys.stderr)
    if ns.json:
        payload = {
            "audio_dir": str(ns.audio_dir),
            "checkpoints": checkpoints,
            "num_files": len(retriever.files),
            "results": [
                {
                    "query": query,
                    "ranking": [{"rank": r, "score": score, "file": relative[path]} for r, (path, score) in enumerate(ranked, 1)],
                }
                for query, ranked in zip(queries, results)
            ],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    for n, (query, ranked) in enumerate(zip(queries, results)):
        if n:
            print()
        print(f"# {query}")
        for r, (path, score) in enumerate(ranked, start=1):
            print(f"{r}\t{score:.4f}\t{relative[path]}")
