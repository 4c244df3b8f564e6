"""Items/s per core of the contrastive stage's training crop (10 s at 32 kHz), three ways, side by side.

Generates clips in Clotho's real format (44.1 kHz 16-bit mono WAV, 15-30 s) in a temporary folder and
times, on one core (torch and the resampler single-threaded):

- (a) the old path: decode the whole clip, resample all of it, crop (called directly),
- (b) the windowed read: seek to the crop, read it with 20 ms of context, resample only that,
- (c) the packed window: the crop sliced from the int16 pack at 32 kHz (`aac-lightning pack`),

then the training loader's throughput (RetrievalDataModule from the packs, 2 workers, batch 128) and
the number of workers that would feed 2,500 pairs/s (a paper-size contrastive step on one H100/H200
at 40% of its bf16 peak, issue 14) for each path.

    .venv/bin/python bench/bench_data_loading.py [--clips 40] [--items 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from aac_lightning.data.audio import load_audio
from aac_lightning.data.batches import crop_waveform
from aac_lightning.data.datamodules import RetrievalDataModule
from aac_lightning.data.datasets import Clotho
from aac_lightning.data.pack import PackedAudio, pack_dataset

TARGET_PAIRS_PER_S = 2500
SECONDS = 10.0
RATE = 32000


def write_real_format_clotho(root: Path, n_clips: int, seed: int = 0) -> None:
    """Clotho layout: development subset of 44.1 kHz 16-bit mono WAVs, 15-30 s, five captions each."""
    rng = np.random.default_rng(seed)
    audio_dir = root / "CLOTHO_v2.1" / "clotho_audio_files" / "development"
    csv_dir = root / "CLOTHO_v2.1" / "clotho_csv_files"
    audio_dir.mkdir(parents=True, exist_ok=True)
    csv_dir.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5"]
    for k in range(n_clips):
        seconds = float(rng.uniform(15, 30))
        t = np.arange(int(seconds * 44100)) / 44100
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
        name = f"clip {k:04d}, real format.wav"
        sf.write(audio_dir / name, x.astype(np.float32), 44100, subtype="PCM_16")
        lines.append(f'"{name}"' + "".join(f",a sound number {k} variant {j}" for j in range(5)))
    (csv_dir / "clotho_captions_development.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def items_per_s(read, n_items: int, n_clips: int) -> float:
    read(0)  # warm-up (imports, first file open)
    start = time.perf_counter()
    for i in range(n_items):
        read(i % n_clips)
    return n_items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40, help="generated clips (default 40)")
    parser.add_argument("--items", type=int, default=200, help="items timed per path (default 200; the old path reads a quarter)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    parser.add_argument("--batches", type=int, default=6, help="loader batches of 128 timed (default 6)")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    max_samples = int(SECONDS * RATE)
    with tempfile.TemporaryDirectory() as tmp:
        root, packs = Path(tmp) / "clotho", Path(tmp) / "packs"
        write_real_format_clotho(root, ns.clips)
        clips = Clotho(root, "development", sample_rate=RATE)
        t0 = time.perf_counter()
        pack_dataset(clips, packs, "int16", progress=False)
        pack_s = time.perf_counter() - t0
        packed_clips = Clotho(root, "development", sample_rate=RATE)
        packed = PackedAudio(packs, RATE, "int16")
        packed.check(packed_clips.records)
        packed_clips.use_pack(packed)

        def old(i: int) -> torch.Tensor:  # what CaptionPairs did before issue 14
            return crop_waveform(load_audio(clips.records[i].path, RATE)[0][0], max_samples, None)

        rows = [
            ("(a) decode whole + resample + crop (old path)", items_per_s(old, max(20, ns.items // 4), ns.clips)),
            ("(b) windowed read + resample (seek)", items_per_s(lambda i: clips.load_crop(i, max_samples), ns.items, ns.clips)),
            ("(c) packed window (int16, 32 kHz)", items_per_s(lambda i: packed_clips.load_crop(i, max_samples), ns.items * 5, ns.clips)),
        ]
        base = rows[0][1]
        print(f"{ns.clips} clips of 15-30 s, 44.1 kHz 16-bit mono WAV; 10 s crop at 32 kHz; one core; pack took {pack_s:.1f} s")
        print(f"| path | items/s per core | vs old | workers for {TARGET_PAIRS_PER_S} pairs/s |")
        print("|---|---|---|---|")
        for name, rate in rows:
            print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x | {math.ceil(TARGET_PAIRS_PER_S / rate)} |")

        dm = RetrievalDataModule(
            clotho_root=str(root), resplit=False, val_source="clotho", sample_rate=RATE, global_batch_size=128,
            num_workers=ns.workers, pin_memory=False, packed_dir=str(packs), train_max_seconds=SECONDS,
        )
        dm.clips("train")
        dm._clips = {"train": dm.clips("train")}  # only the training split is timed (no validation subset here)
        dm._use_packs(RATE)
        loader = dm.train_dataloader()
        pairs, start, seen = 0, None, 0
        while seen < ns.batches + 1:
            for batch in loader:
                seen += 1
                if start is None:  # first batch: worker start-up, not counted
                    start = time.perf_counter()
                    continue
                pairs += batch["audio"].shape[0]
                if seen >= ns.batches + 1:
                    break
        loader_rate = pairs / (time.perf_counter() - start)
        print(
            f"\nloader (packed, {ns.workers} workers, batch 128): {loader_rate:,.0f} pairs/s; "
            f"workers for {TARGET_PAIRS_PER_S} pairs/s at that rate: {math.ceil(TARGET_PAIRS_PER_S / (loader_rate / ns.workers))}"
        )


if __name__ == "__main__":
    main()
