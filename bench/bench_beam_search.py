"""Batched vs one-clip-at-a-time beam search on the real-size BiGRU(256)x3 + Transformer(256)x2 captioner.

Random weights with the end token's bias set so that captions end at varied lengths (random weights
alone never emit it, and every caption would run to the maximum), 4368-word vocabulary, 2048-d
features with up to 31 frames (10 s of CNN14 features), batch 64, beam 3, at most 20 words. Prints
the best-of-`--repeats` time per batch of:

- ``beam_search`` on the whole batch (with the self-attention cache),
- ``beam_search`` on the whole batch with ``use_cache=False`` (prefix recomputed at every step),
- the same ``beam_search`` at batch 1, looping over the clips (the baseline: same function, same weights,
  same repeats),

and the batched-vs-loop ratio measured side by side in this run; exits non-zero unless all three give
the same captions.

    .venv/bin/python bench/bench_beam_search.py [--device cuda] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from aac_lightning.nn.captioning import build_caption_model
from aac_lightning.nn.decoding import beam_search

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


def _end_captions_at_varied_lengths(model, features, lengths, options) -> float:
    """Raise the end token's bias until the captions of a few clips end at several lengths; returns it."""
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 4368][-1]
    eos = SPECIAL_IDS["eos_id"]
    base = classifier.bias[eos].item()
    best, best_spread = 0.0, -1
    for shift in [0.5 * k for k in range(0, 25)]:
        classifier.bias.data[eos] = base + shift
        tokens = beam_search(model, features[:8], lengths[:8], **options)
        spread = len(set(((tokens != SPECIAL_IDS["pad_id"]).sum(dim=1)).tolist()))
        if spread > best_spread:
            best, best_spread = shift, spread
    classifier.bias.data[eos] = base + best
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each search (best is kept), the loop included")
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
        shift = _end_captions_at_varied_lengths(model, features, lengths, options)
        beam_search(model, features[:2], lengths[:2], **options)  # warm-up
        batched_time, batched = _timed(lambda: beam_search(model, features, lengths, **options), device, args.repeats)
        no_cache_time, no_cache = _timed(
            lambda: beam_search(model, features, lengths, use_cache=False, **options), device, args.repeats
        )

        def one_at_a_time():
            return [
                beam_search(model, features[index : index + 1], lengths[index : index + 1], **options)[0]
                for index in range(args.batch_size)
            ]

        loop_time, singles = _timed(one_at_a_time, device, args.repeats)

    width = max(batched.shape[1], *(r.shape[0] for r in singles))
    padded = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=SPECIAL_IDS["pad_id"]) for r in singles])
    batched_padded = torch.nn.functional.pad(batched, (0, width - batched.shape[1]), value=SPECIAL_IDS["pad_id"])
    same_as_loop = torch.equal(padded, batched_padded)
    same_without_cache = torch.equal(no_cache, batched)
    caption_lengths = (batched != SPECIAL_IDS["pad_id"]).sum(dim=1).float()
    ended = int((batched == SPECIAL_IDS["eos_id"]).any(dim=1).sum())

    print(f"end-token bias raised by {shift:.1f}: caption lengths {int(caption_lengths.min())}-{int(caption_lengths.max())} "
          f"(mean {caption_lengths.mean().item():.1f}, {len(set(caption_lengths.tolist()))} distinct), "
          f"{ended} of {args.batch_size} end before the limit")
    print(f"batched beam search (cache)     : {1000 * batched_time:9.1f} ms / batch")
    print(f"batched beam search (no cache)  : {1000 * no_cache_time:9.1f} ms / batch")
    print(f"beam_search at batch 1, looped  : {1000 * loop_time:9.1f} ms / batch")
    print(f"ratio loop / batched            : {loop_time / batched_time:9.1f}x")
    print(f"ratio no cache / cache          : {no_cache_time / batched_time:9.1f}x")
    print(f"captions identical (loop)       : {same_as_loop}")
    print(f"captions identical (no cache)   : {same_without_cache}")
    return 0 if same_as_loop and same_without_cache else 1

if __name__ == "__main__":
    sys.exit(main())
