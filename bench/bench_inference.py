"""Clips/s of `search`'s folder indexing, batched vs one clip at a time, on the same folder.

Builds the demo-sized retrieval model (conf/demo/contrastive_pretrain.yaml: small CNN14 + MiniLM-L6,
random audio weights, no download) or loads `--ckpt`, writes a folder of 10 s clips (16 kHz mono WAV
by default), indexes it through the one encoding path (`Retriever.index` -> `encode_waveforms` ->
`encode_clips`) with `batch_size` clips per forward pass and with one, and prints both rates, the
largest embedding difference and whether the rankings of a few queries are identical (exits non-zero
if not). `caption` reads a folder through the same batched reader (`read_batches`).

    .venv/bin/python bench/bench_inference.py [--clips 48] [--batch-size 16] [--device cpu] [--ckpt CKPT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from aac_lightning.config import build_model_offline, read_configs
from aac_lightning.ensembles.retrieval import RetrievalEnsemble
from aac_lightning.inference import Retriever

REPO = Path(__file__).resolve().parent.parent
QUERIES = ["a dog barks", "rain falls on a roof", "a car passes by", "birds are singing"]


def demo_ensemble(device: str) -> RetrievalEnsemble:
    torch.manual_seed(0)
    module = build_model_offline(read_configs([str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml")]))
    return RetrievalEnsemble([module.model.eval()], device=device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", help="a retrieval checkpoint instead of the random demo-sized model")
    ns = parser.parse_args()
    ensemble = RetrievalEnsemble.from_checkpoints([ns.ckpt], device=ns.device) if ns.ckpt else demo_ensemble(ns.device)
    rate = ensemble.sample_rates[0]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        for k in range(ns.clips):
            t = np.arange(int(ns.seconds * rate)) / rate
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * np.exp(-t * rng.uniform(0, 1)) + 0.02 * rng.standard_normal(t.shape)
            sf.write(folder / f"clip {k:03d}.wav", x.astype(np.float32), rate, subtype="PCM_16")
        results = {}
        for batch_size in (ns.batch_size, 1):
            retriever = Retriever(ensemble, ["bench"], use_cache=False, batch_size=batch_size)
            retriever.index(folder, on_bad_audio="error")  # warm-up
            start = time.perf_counter()
            retriever.index(folder)
            elapsed = time.perf_counter() - start
            results[batch_size] = (ns.clips / elapsed, retriever.similarity(QUERIES), retriever.search(QUERIES, k=5))
    (fast, sim_b, top_b), (slow, sim_1, top_1) = results[ns.batch_size], results[1]
    diff = float((sim_b - sim_1).abs().max())
    same = [[n for n, _ in q] for q in top_b] == [[n for n, _ in q] for q in top_1]
    print(f"{ns.clips} clips of {ns.seconds:g} s at {rate} Hz, device {ns.device}, demo-sized retrieval model")
    print("| mode | clips/s |")
    print("|---|---|")
    print(f"| batched ({ns.batch_size} per forward pass) | {fast:.1f} |")
    print(f"| one clip at a time | {slow:.1f} |")
    print(f"speed-up {fast / slow:.2f}x; max |similarity difference| {diff:.2e}; identical rankings: {same}")
    return 0 if same and diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
