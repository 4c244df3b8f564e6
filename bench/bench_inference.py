"""Files/s of `search`'s folder indexing and of `caption`, batched vs one clip at a time, on the same folder.

Builds the demo-sized retrieval model (conf/demo/contrastive_pretrain.yaml: small CNN14 + MiniLM-L6,
random audio weights, no download) or loads `--ckpt`, writes a folder of 10 s clips (16 kHz mono WAV
by default), indexes it through the one encoding path (`Retriever.index` -> `encode_waveforms` ->
`encode_clips`) with `batch_size` clips per forward pass and with one, and prints both rates, the
largest embedding difference and whether the rankings of a few queries are identical (exits non-zero
if not). Then `caption`: the demo-sized XE captioner (conf/demo/xe.yaml's Transformer on the demo
CNN14 extractor, random weights, a 500-word vocabulary) or `--caption-ckpt`, through `Captioner.caption`
on the same folder with `batch_size` clips per batch and with one, the same model for both; prints
both files/s and whether the captions are identical (exits non-zero if not).

    .venv/bin/python bench/bench_inference.py [--clips 48] [--batch-size 16] [--device cpu] [--ckpt CKPT] [--caption-ckpt CKPT]
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
from aac_lightning.ensembles.captioning import CaptionEnsemble
from aac_lightning.inference import Captioner, Retriever

REPO = Path(__file__).resolve().parent.parent
QUERIES = ["a dog barks", "rain falls on a roof", "a car passes by", "birds are singing"]


def demo_ensemble(device: str) -> RetrievalEnsemble:
    torch.manual_seed(0)
    module = build_model_offline(read_configs([str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml")]))
    return RetrievalEnsemble([module.model.eval()], device=device)


def demo_captioner(device: str) -> Captioner:
    """conf/demo/xe.yaml's captioner on the demo extractor, random weights (nothing read from disk)."""
    from aac_lightning.modules.captioning import CaptioningXE

    torch.manual_seed(0)
    pretrain = read_configs([str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml")])["model"]["init_args"]
    xe = read_configs([str(REPO / "conf" / "demo" / "xe.yaml")])["model"]["init_args"]
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"word{i}" for i in range(496)]
    module = CaptioningXE(
        extractor={"audio_encoder": pretrain["audio_encoder"], "audio_encoder_kwargs": pretrain["audio_encoder_kwargs"]},
        input_dim=xe["input_dim"], decoder=xe["decoder"], decoder_kwargs=xe["decoder_kwargs"], encoder_kwargs=xe["encoder_kwargs"],
        vocabulary=words, beam_size=xe["beam_size"], max_decode_length=xe["max_decode_length"],
    ).eval()
    return Captioner(CaptionEnsemble([module.to(device)], names=["bench"]))


def bench_caption(folder: Path, clips: int, batch_size: int, device: str, ckpt: str | None) -> bool:
    captioner = Captioner.from_checkpoint([ckpt], device=device) if ckpt else demo_captioner(device)
    results = {}
    for size in (batch_size, 1):
        captioner.caption(folder, batch_size=size)  # warm-up
        start = time.perf_counter()
        captions = captioner.caption(folder, batch_size=size)
        results[size] = (clips / (time.perf_counter() - start), captions)
    (fast, first), (slow, second) = results[batch_size], results[1]
    same = first == second
    print(f"caption: {clips} files, {'--caption-ckpt' if ckpt else 'demo-sized XE captioner (random weights)'}")
    print("| mode | files/s |")
    print("|---|---|")
    print(f"| batched ({batch_size} per batch) | {fast:.1f} |")
    print(f"| one file at a time | {slow:.1f} |")
    print(f"speed-up {fast / slow:.2f}x; identical captions: {same}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", help="a retrieval checkpoint instead of the random demo-sized model")
    parser.add_argument("--caption-ckpt", help="an XE/SCST checkpoint instead of the random demo-sized captioner")
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
        captions_same = bench_caption(folder, ns.clips, ns.batch_size, ns.device, ns.caption_ckpt)
    (fast, sim_b, top_b), (slow, sim_1, top_1) = results[ns.batch_size], results[1]
    diff = float((sim_b - sim_1).abs().max())
    same = [[n for n, _ in q] for q in top_b] == [[n for n, _ in q] for q in top_1]
    print(f"{ns.clips} clips of {ns.seconds:g} s at {rate} Hz, device {ns.device}, demo-sized retrieval model")
    print("| mode | clips/s |")
    print("|---|---|")
    print(f"| batched ({ns.batch_size} per forward pass) | {fast:.1f} |")
    print(f"| one clip at a time | {slow:.1f} |")
    print(f"speed-up {fast / slow:.2f}x; max |similarity difference| {diff:.2e}; identical rankings: {same}")
    return 0 if same and diff < 1e-4 and captions_same else 1


if __name__ == "__main__":
    sys.exit(main())
