"""Batched vs per-clip beam search on the real-size BiGRU(256)x3 + Transformer(256)x2 captioner.

Random weights, 4368-word vocabulary, 2048-d features with 31 frames (10 s of CNN14 features),
batch 64, beam 3, at most 20 words. Prints the time per batch of:

- ``beam_search`` (batched, with the self-attention cache),
- ``beam_search`` with ``use_cache=False`` (batched, whole prefix recomputed at every step),
- ``beam_search_single`` clip after clip (the plain reference),

checks that all three return the same captions, and exits non-zero if they differ.

    .venv/bin/python bench/bench_beam_search.py [--device cuda] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from aac_lightning.nn.captioning import build_caption_model
from aac_lightning.nn.decoding import beam_search, beam_search_single

SPECIAL_IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device: torch.device, repeats: int):
    """Best wall time in seconds over ``repeats`` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        result = function()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the batched searches (best is kept)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_caption_model("transformer", vocab_size=4368, input_dim=2048).to(device).eval()
    features = torch.randn(args.batch_size, args.frames, 2048, device=device)
    # Varied clip lengths, as in a real batch of padded clips.
    lengths = torch.randint(args.frames // 2, args.frames + 1, (args.batch_size,), device=device)
    lengths[0] = args.frames
    options = dict(beam_size=args.beam_size, max_length=args.max_length, **SPECIAL_IDS)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} beam={args.beam_size} "
        f"max_length={args.max_length} frames={args.frames} "
        f"parameters={sum(p.numel() for p in model.parameters()):,}"
    )

    with torch.inference_mode():
        beam_search(model, features[:2], lengths[:2], **options)  # warm-up
        batched_time, batched = _timed(lambda: beam_search(model, features, lengths, **options), device, args.repeats)
        no_cache_time, no_cache = _timed(
            lambda: beam_search(model, features, lengths, use_cache=False, **options), device, args.repeats
        )

        def per_clip():
            return [
                beam_search_single(model, features[index, : lengths[index]], **options)
                for index in range(args.batch_size)
            ]

        per_clip_time, references = _timed(per_clip, device, 1)

    width = batched.shape[1]
    padded = torch.stack(
        [torch.nn.functional.pad(r, (0, width - r.shape[0]), value=SPECIAL_IDS["pad_id"]) for r in references]
    ) if all(r.shape[0] <= width for r in references) else None
    same_as_reference = padded is not None and torch.equal(padded, batched)
    same_without_cache = torch.equal(no_cache, batched)
    caption_lengths = (batched != SPECIAL_IDS["pad_id"]).sum(dim=1).float()

    print(f"batched beam search (cache)     : {1000 * batched_time:9.1f} ms / batch")
    print(f"batched beam search (no cache)  : {1000 * no_cache_time:9.1f} ms / batch")
    print(f"per-clip reference beam search  : {1000 * per_clip_time:9.1f} ms / batch")
    print(f"speed-up batched vs per-clip    : {per_clip_time / batched_time:9.1f}x")
    print(f"speed-up from the cache alone   : {no_cache_time / batched_time:9.1f}x")
    print(f"mean caption length             : {caption_lengths.mean().item():9.1f} words")
    print(f"captions identical (reference)  : {same_as_reference}")
    print(f"captions identical (no cache)   : {same_without_cache}")
    return 0 if same_as_reference and same_without_cache else 1


if __name__ == "__main__":
    sys.exit(main())
