"""`aac-lightning pack OUT_DIR --clotho-root ...`: store the datasets' audio once at the model's rate (HDF5)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def pack_command(args: Sequence[str]) -> None:
    """Parse the arguments, pack every subset found of the datasets given, print what was written."""
    from aac_lightning.data.pack import pack_sources

    parser = argparse.ArgumentParser(
        prog="aac-lightning pack",
        description="Decode and resample every clip of the given datasets once and store it in HDF5 shards "
        "under OUT_DIR, for training with data.init_args.packed_dir=OUT_DIR. Resumable: rerun after a kill; "
        "clips whose source file changed are re-packed, the rest is kept.",
    )
    parser.add_argument("out_dir", help="folder of the packs (created if needed)")
    parser.add_argument("--clotho-root", help="Clotho v2.1 root (all of development, validation, evaluation found)")
    parser.add_argument("--audiocaps-root", help="AudioCaps root (all of train, val, test found)")
    parser.add_argument("--macs-root", help="MACS root")
    parser.add_argument("--sample-rate", type=int, default=32000, help="the model's sample rate in Hz (default 32000: CNN14)")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="storage type (default int16)")
    parser.add_argument("--on-missing", choices=("error", "skip"), default="error", help="clips whose audio file is missing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ns = parser.parse_args(args)
    roots = {"clotho": ns.clotho_root, "audiocaps": ns.audiocaps_root, "macs": ns.macs_root}
    if not any(roots.values()):
        parser.error("give at least one of --clotho-root, --audiocaps-root, --macs-root")
    counts = pack_sources(ns.out_dir, roots, ns.sample_rate, ns.dtype, on_missing=ns.on_missing, progress=not ns.no_progress)
    for name, (clips, written) in counts.items():
        print(f"{name}: {clips} clips, {written} packed now, {clips - written} already packed")
    print(f"packs at {ns.sample_rate} Hz {ns.dtype} in {ns.out_dir}")
