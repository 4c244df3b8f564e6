"""Time and peak memory of the retrieval evaluation at Clotho size and at a large size.

Cases (random unit-norm embeddings; text query j describes audio j // captions_per_audio):

- Clotho evaluation size, text-to-audio: 5225 text queries x 1045 audio clips, D = 1024, from
  the embeddings block by block, and from a precomputed similarity matrix;
- Clotho size, audio-to-text: 1045 audio queries x 5225 captions (5 relevant each);
- large, text-to-audio from embeddings: 100k queries x 20k candidates, D = 256 by default (the
  full float32 matrix would take 8 GB; the chunked evaluation never builds it).

Peak memory is the process's resident-set high-water mark during the case, above what it used
before (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere the
``resource`` maximum RSS, which cannot be reset, so later cases may read 0).

Usage::

    python bench/bench_retrieval_eval.py [--large-queries 100000] [--large-candidates 20000]
        [--large-dim 256] [--chunk-size 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
from functools import partial
import time
from pathlib import Path
from typing import Callable

import torch


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(fn: Callable[[], dict]) -> tuple[dict, float, float]:
    """Run ``fn`` once; returns (its result, seconds, peak MiB above the RSS before)."""
    resettable = _reset_peak_rss()
    before = _rss_mib("VmRSS") if resettable else _rss_mib("VmHWM")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, max(_rss_mib("VmHWM") - before, 0.0)


def unit_embeddings(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(num, dim, generator=generator), dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clotho-audio", type=int, default=1045)
    parser.add_argument("--captions-per-audio", type=int, default=5)
    parser.add_argument("--clotho-dim", type=int, default=1024)
    parser.add_argument("--large-queries", type=int, default=100_000)
    parser.add_argument("--large-candidates", type=int, default=20_000)
    parser.add_argument("--large-dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aac_lightning.metrics.retrieval import (
        audio_to_text_metrics,
        retrieval_metrics,
        retrieval_metrics_from_embeddings,
    )

    generator = torch.Generator().manual_seed(0)
    rows = []

    # --- Clotho size
    num_audio, per_audio = args.clotho_audio, args.captions_per_audio
    audio = unit_embeddings(num_audio, args.clotho_dim, generator)  # (A, D)
    caption_to_audio = torch.arange(num_audio).repeat_interleave(per_audio)  # (C,)
    # noise of norm ~sqrt(D)/3 leaves the right item ~3 noise std ahead: metrics well inside (0, 1)
    text = torch.nn.functional.normalize(audio[caption_to_audio] + args.clotho_dim**0.5 / 3.0 * unit_embeddings(
        len(caption_to_audio), args.clotho_dim, generator), dim=1)  # (C, D)
    size = f"{len(text)} x {num_audio}, D={args.clotho_dim}"

    result, seconds, peak = measure(partial(retrieval_metrics_from_embeddings, text, audio, caption_to_audio, chunk_size=args.chunk_size))
    rows.append(("text-to-audio, embeddings", size, seconds, peak, result))

    sim_t2a = text @ audio.T  # (C, A)
    result, seconds, peak = measure(partial(retrieval_metrics, sim_t2a, caption_to_audio, chunk_size=args.chunk_size))
    rows.append(("text-to-audio, similarity matrix", size, seconds, peak, result))

    sim_a2t = sim_t2a.T.contiguous()  # (A, C)
    del sim_t2a
    result, seconds, peak = measure(partial(audio_to_text_metrics, sim_a2t, caption_to_audio))
    size = f"{num_audio} x {len(text)}, {per_audio} relevant"
    rows.append(("audio-to-text, similarity matrix", size, seconds, peak, result))
    del sim_a2t, audio, text

    # --- large
    if not args.skip_large:
        candidates = unit_embeddings(args.large_candidates, args.large_dim, generator)  # (C, D)
        targets = torch.randint(0, args.large_candidates, (args.large_queries,), generator=generator)
        queries = torch.nn.functional.normalize(candidates[targets] + args.large_dim**0.5 / 3.5 * unit_embeddings(
            args.large_queries, args.large_dim, generator), dim=1)  # (Q, D)
        full_gib = args.large_queries * args.large_candidates * 4 / 2**30
        result, seconds, peak = measure(lambda: retrieval_metrics_from_embeddings(
            queries, candidates, targets, chunk_size=args.chunk_size))
        rows.append((f"text-to-audio, embeddings (full matrix {full_gib:.1f} GiB)",
                     f"{args.large_queries} x {args.large_candidates}, D={args.large_dim}", seconds, peak, result))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk_size={args.chunk_size}")
    print(f"{'case':52s} {'size':34s} {'seconds':>8s} {'peak MiB':>9s}  metrics")
    for name, size, seconds, peak, result in rows:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in result.items())
        print(f"{name:52s} {size:34s} {seconds:8.2f} {peak:9.0f}  {metrics}")


if __name__ == "__main__":
    main()
