"""The GPU suite of issue 14 in one run: does the data path feed the step, and which options pay?

Prints one table (`| section | setting | value | unit | note |`) with:

- contrastive step at paper size (CNN14 + BERT-base, global batch 128, 10 s at 32 kHz, random
  weights built offline from conf/retrieval/cnn14_bert_base.yaml; the text side is fed token ids,
  no tokenizer offline): fp32 and bf16-mixed pairs/s and MFU (FLOPs of forward + backward counted
  with `torch.utils.flop_counter.FlopCounterMode`, peak from the device-name table below), and the
  options channels-last (the CNN), fused Adam and `torch.compile`;
- the training loader's pairs/s from an int16 pack (generated 44.1 kHz WAVs, `--workers`) beside it;
- feature extraction (the audio encoder's forward, no gradients) clips/s;
- XE and SCST step times of the BiGRU(256)x3 + Transformer(256)x2 captioner (batch 64, 2048-d
  CNN14 frames; SCST: 5 samples per clip + greedy baseline, rewards random: CIDEr-D is timed by
  bench_cider.py);
- batched beam search (beam 3) at batch 64.

`--tiny` runs the same code at tiny sizes on the CPU (tests/test_bench_gpu_tiny.py, well under a
minute) so the suite cannot rot; its figures mean nothing. On a GPU: `make bench-gpu`.

    .venv/bin/python bench/bench_gpu.py [--tiny] [--device cuda] [--steps 10] [--no-compile]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import contextlib
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contrastive_step import Case, build_module, contrastive_loss, make_batch  # noqa: E402
from bench_data_loading import write_real_format_clotho  # noqa: E402

from aac_lightning.nn.captioning import build_caption_model  # noqa: E402
from aac_lightning.nn.decoding import beam_search, greedy_decode, sample_decode  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}
# Dense peak FLOP/s by device name (vendor data sheets, SXM parts): (bf16 tensor, fp32 as run: TF32 off).
PEAKS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "A10G": (70e12, 31.2e12)}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, section: str, setting: str, value: float | None, unit: str, note: str = "") -> None:
        shown = "n/a" if value is None else (f"{value:,.1f}" if value >= 10 else f"{value:.3g}")
        self.rows.append((section, setting, shown, unit, note))
        print(f"| {section} | {setting} | {shown} | {unit} | {note} |", flush=True)


def contrastive(args: argparse.Namespace, device: torch.device, table: Table) -> float:
    """Contrastive step rows; returns the best pairs/s (what the loader must keep up with)."""
    if args.tiny:
        case = Case("demo", [str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml")], True)
    else:
        case = Case("cnn14_bert_base", [str(REPO / "conf" / "retrieval" / "cnn14_bert_base.yaml")], False)
    torch.manual_seed(0)
    base = build_module(case)
    batch = make_batch(base, args.batch_size, args.seconds, "tokens", 20, device, seed=0)
    settings = [("fp32", {}), ("bf16-mixed", {"bf16": True})]
    settings += [("bf16-mixed + channels-last", {"bf16": True, "channels_last": True})]
    settings += [("bf16-mixed + fused Adam", {"bf16": True, "fused": True})]
    settings += [("bf16-mixed + torch.compile", {"bf16": True, "compile": True})]
    best = 0.0
    for name, opts in settings:
        if opts.get("compile") and not args.compile:
            table.add("contrastive step", name, None, "pairs/s", "skipped (--no-compile / --tiny)")
            continue
        module = copy.deepcopy(base).to(device).train()
        if opts.get("channels_last"):
            module.model.audio_encoder.to(memory_format=torch.channels_last)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4, fused=bool(opts.get("fused")) and device.type == "cuda")
        loss_of = torch.compile(contrastive_loss) if opts.get("compile") else contrastive_loss
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if opts.get("bf16") else contextlib.nullcontext

        def forward_backward() -> None:
            with autocast():
                loss = loss_of(module, batch)
            loss.backward()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()
            module.model.clamp_logit_scale()

        seconds = median_seconds(step, device, args.warmup + (2 if opts.get("compile") else 0), args.steps)
        pairs = args.batch_size / seconds
        best = max(best, pairs)
        note = ""
        if name in ("fp32", "bf16-mixed"):
            counter = FlopCounterMode(display=False)
            with counter:
                forward_backward()
            flops = counter.get_total_flops()
            peak = peak_flops(device, "bf16" if opts.get("bf16") else "fp32")
            mfu = None if peak is None else 100 * flops / seconds / peak
            note = f"{flops / args.batch_size / 1e9:.1f} GFLOP/pair; MFU " + ("n/a (no peak for this device)" if mfu is None else f"{mfu:.1f}%")
        table.add("contrastive step", name, pairs, "pairs/s", f"{1000 * seconds:.1f} ms/step; {note}".rstrip("; "))
    return best


def loader(args: argparse.Namespace, step_pairs: float, table: Table) -> None:
    from aac_lightning.data.datamodules import RetrievalDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root, packs = Path(tmp) / "clotho", Path(tmp) / "packs"
        write_real_format_clotho(root, args.loader_clips)
        dm = RetrievalDataModule(
            clotho_root=str(root), resplit=False, sample_rate=32000, global_batch_size=args.batch_size,
            num_workers=args.workers, pin_memory=torch.cuda.is_available(), packed_dir=str(packs), train_max_seconds=args.seconds,
        )
        dm._clips = {"train": dm.clips("train")}  # only the training split is timed
        dm._use_packs(32000)
        pairs, start, seen = 0, None, 0
        while seen < args.loader_batches + 1:
            for batch in dm.train_dataloader():
                seen += 1
                if start is None:
                    start = time.perf_counter()  # worker start-up not counted
                    continue
                pairs += batch["audio"].shape[0]
                if seen >= args.loader_batches + 1:
                    break
        rate = pairs / (time.perf_counter() - start)
    keeps_up = "keeps up" if rate >= step_pairs else f"does not keep up; ~{math.ceil(step_pairs / (rate / args.workers))} workers would"
    table.add("data loader", f"packed int16, {args.workers} workers", rate, "pairs/s", f"step consumes {step_pairs:,.0f} pairs/s: {keeps_up}")


def extraction(args: argparse.Namespace, device: torch.device, table: Table) -> None:
    case = Case("demo", [str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml")], True) if args.tiny else Case(
        "cnn14_bert_base", [str(REPO / "conf" / "retrieval" / "cnn14_bert_base.yaml")], False)
    encoder = build_module(case).model.audio_encoder.to(device).eval()
    rate = int(getattr(encoder, "sample_rate", 32000))
    audio = 0.1 * torch.randn(args.batch_size, int(args.seconds * rate), device=device)
    lengths = torch.full((args.batch_size,), audio.shape[1], device=device)
    for name, autocast in (("fp32", contextlib.nullcontext), ("bf16-mixed", lambda: torch.autocast(device.type, dtype=torch.bfloat16))):
        def run() -> None:
            with torch.inference_mode(), autocast():
                encoder(audio, lengths)
        seconds = median_seconds(run, device, args.warmup, args.steps)
        table.add("feature extraction", name, args.batch_size / seconds, "clips/s", f"batch {args.batch_size}")


def captioning(args: argparse.Namespace, device: torch.device, table: Table) -> None:
    vocab, dim, frames, batch = (50, 16, 5, 2) if args.tiny else (4368, 2048, 31, 64)
    torch.manual_seed(0)
    model = build_caption_model("transformer", vocab_size=vocab, input_dim=dim).to(device)
    features = torch.randn(batch, frames, dim, device=device)
    lengths = torch.full((batch,), frames, device=device)
    tokens = torch.randint(3, vocab, (batch, 22), device=device)
    tokens[:, 0] = IDS["bos_id"]
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def xe() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(features, lengths, tokens[:, :-1])  # (B, L-1, V)
        F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1), label_smoothing=0.1).backward()
        optimizer.step()

    def scst() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            greedy_decode(model, features, lengths, max_length=args.max_words, **IDS)
        model.train()
        sampled = sample_decode(model, features, lengths, max_length=args.max_words, num_samples=5, **IDS)
        advantage = torch.randn(sampled.tokens.shape[0], device=device)  # rewards: CIDEr-D timed elsewhere
        (-(advantage[:, None] * sampled.log_probs * sampled.mask).sum() / sampled.mask.sum()).backward()
        optimizer.step()

    model.train()
    table.add("XE step", f"batch {batch}", 1000 * median_seconds(xe, device, args.warmup, args.steps), "ms/step")
    table.add("SCST step", f"batch {batch} x 5 samples", 1000 * median_seconds(scst, device, args.warmup, args.steps), "ms/step", "sampling + greedy baseline; CIDEr-D not included")
    model.eval()

    def beams() -> None:
        with torch.inference_mode():
            beam_search(model, features, lengths, beam_size=3, max_length=args.max_words, **IDS)

    seconds = median_seconds(beams, device, min(1, args.warmup), max(1, args.steps // 2))
    table.add("beam search", f"batch {batch}, beam 3", batch / seconds, "clips/s", f"{1000 * seconds:.1f} ms/batch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (the test of this suite)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        args.batch_size, args.seconds, args.warmup, args.steps = 2, 0.5, 0, args.steps or 1
        args.compile, args.workers, args.loader_clips, args.loader_batches = False, args.workers or 1, 4, 2
        args.max_words = 6
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        args.batch_size, args.seconds, args.warmup, args.steps = 128, 10.0, 3, args.steps or 10
        args.max_words = 20
        args.workers, args.loader_clips, args.loader_batches = args.workers or min(16, os.cpu_count() or 1), 200, 6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_gpu: {'tiny' if args.tiny else 'paper'} sizes on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| section | setting | value | unit | note |")
    print("|---|---|---|---|---|")
    table = Table()
    step_pairs = contrastive(args, device, table)
    loader(args, step_pairs, table)
    extraction(args, device, table)
    captioning(args, device, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
