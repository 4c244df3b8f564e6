"""Time of one XE training epoch on cached features vs with the frozen extractor run online.

Both runs are the real `CaptioningXE` under a Lightning `Trainer` on the same synthetic Clotho-layout
data (written to a temporary folder), with the same captioner and the same extractor:

- `cached`: `feature_cache_dir` set. The cache is built first (its extraction time is printed
  separately: it is paid once, not per epoch); the timed epoch reads features from the HDF5 file and
  decodes no audio (`CaptioningDataModule.load_audio` is turned off by the module).
- `online`: no cache. Every step decodes the batch's audio and runs the frozen extractor on it.

Only the training epochs are timed (`on_train_epoch_start` -> `on_train_epoch_end`, validation off),
`--epochs` of them per run (default 3); the mean and the best epoch are printed.

The redundancy is stated, not hidden: an epoch visits every (clip, caption) pair, 5 per clip, so the
online path runs the extractor 5 times per clip per epoch (counted and printed), while the cached
path extracts each clip once, ever. An estimate with one extraction per clip per epoch is printed beside the measured ratio.

Extractors (`--preset`): `demo` (the CNN14 of `conf/demo/contrastive_pretrain.yaml`, 16 kHz,
frames of 512) or `paper` (full CNN14, 32 kHz, frames of 2048), random weights written as a
retrieval checkpoint. The captioner is the report's Transformer 256x2.

    python bench/bench_xe_epoch.py                      # paper CNN14, 20 clips of 15 s, 3 epochs (a few minutes on 1 CPU thread)
    python bench/bench_xe_epoch.py --preset demo --clips 40 --seconds 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import soundfile as sf
import torch

from aac_lightning.data.datamodules import CaptioningDataModule
from aac_lightning.data.synth import write_synthetic_clotho
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.nn.audio_encoders import load_audio_encoder

PRESETS = {
    "demo": dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmin=50, fmax=8000, channels=[16, 32, 64, 128, 256, 512], embed_dim=512),
    "paper": dict(),
}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    calls: dict[str, int] | None = None  # the extractor's clip counter (set by run_epochs)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._calls_at_start = self.calls["clips"] if self.calls else 0
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        if self.calls is not None:
            self.calls["in_epochs"] = self.calls.get("in_epochs", 0) + self.calls["clips"] - self._calls_at_start


def write_retrieval_checkpoint(path: Path, encoder_kwargs: dict) -> int:
    """A retrieval-stage checkpoint holding a random CNN14 (what the XE stage reads); returns its frame size."""
    torch.manual_seed(0)
    encoder = load_audio_encoder("cnn14", **encoder_kwargs)
    torch.save(
        {
            "state_dict": {f"model.audio_encoder.{k}": v for k, v in encoder.state_dict().items()},
            "hyper_parameters": {"audio_encoder": "cnn14", "audio_encoder_kwargs": encoder_kwargs},
            "aac_lightning": {"kind": "contrastive", "version": "bench"},
        },
        path,
    )
    return encoder.frame_dim


def stretch_clips(root: Path, seconds: float) -> None:
    """Loop every synthetic clip to `seconds` (Clotho clips last 15-30 s)."""
    for path in root.rglob("*.wav"):
        audio, rate = sf.read(path, dtype="float32")
        reps = int(np.ceil(seconds * rate / len(audio)))
        sf.write(path, np.tile(audio, reps)[: int(seconds * rate)], rate)


def run_epochs(ckpt: Path, root: Path, frame_dim: int, sample_rate: int, cache_dir: str | None, batch_size: int, epochs: int) -> tuple[float, list[float], int, int]:
    """(seconds of setup and the cache build, seconds of each training epoch, clips extracted per epoch, training clips)."""
    pl.seed_everything(0)
    module = CaptioningXE(extractor_ckpt=str(ckpt), input_dim=frame_dim, feature_cache_dir=cache_dir, warmup_steps=1)
    calls = {"clips": 0}
    forward = module.extractor.forward

    def counting_forward(audio, *args, **kwargs):
        calls["clips"] += int(audio.shape[0])
        return forward(audio, *args, **kwargs)

    module.extractor.forward = counting_forward
    dm = CaptioningDataModule(clotho_root=str(root), sample_rate=sample_rate, batch_size=batch_size)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        default_root_dir=str(ckpt.parent / "run"),  # the re-split lists go there, not to the working directory
    )
    timer.calls = calls
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - started
    in_epochs = calls.pop("in_epochs", 0)
    return total - sum(timer.seconds), timer.seconds, in_epochs // epochs, len(dm.clips("train").records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--clips", type=int, default=20, help="synthetic clips (60%% of them train)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of every clip (Clotho: 15-30 s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder_kwargs = PRESETS[args.preset]
    sample_rate = encoder_kwargs.get("sample_rate", 32000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_clotho(tmp / "data", n_clips=args.clips, seed=0, sample_rate=sample_rate)
        stretch_clips(tmp / "data", args.seconds)
        frame_dim = write_retrieval_checkpoint(tmp / "retrieval.ckpt", encoder_kwargs)
        build, cached, cached_calls, clips = run_epochs(tmp / "retrieval.ckpt", tmp / "data", frame_dim, sample_rate, str(tmp / "cache"), args.batch_size, args.epochs)
        _, online, online_calls, _ = run_epochs(tmp / "retrieval.ckpt", tmp / "data", frame_dim, sample_rate, None, args.batch_size, args.epochs)
    mean = {name: sum(t) / len(t) for name, t in (("cached", cached), ("online", online))}
    print(f"preset={args.preset} clips={args.clips} ({clips} train) seconds={args.seconds} batch={args.batch_size} threads={args.threads} epochs={args.epochs}")
    print(f"setup + cache build (once): {build:.2f} s")
    print(f"epoch with cached features : mean {mean['cached']:.2f} s, best {min(cached):.2f} s; extractor calls per epoch: {cached_calls} clips")
    print(f"epoch with online extractor: mean {mean['online']:.2f} s, best {min(online):.2f} s; extractor calls per epoch: {online_calls} clips "
          f"({online_calls / max(clips, 1):.1f} per training clip: one per (clip, caption) pair)")
    print(f"ratio online / cached (mean epoch): {mean['online'] / mean['cached']:.1f}x")
    if online_calls:
        # Estimate, not measured: the online epoch if each clip were extracted once per epoch (the
        # extraction share of the epoch, online - cached, scaled by clips / extractor calls).
        once = mean["cached"] + (mean["online"] - mean["cached"]) * clips / online_calls
        print(f"estimated ratio with one extraction per clip per epoch: {once / mean['cached']:.1f}x")

if __name__ == "__main__":
    main()
