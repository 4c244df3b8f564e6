"""`aac-lightning synth OUT_DIR`: write the synthetic dataset in the Clotho layout."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def synth_command(args: Sequence[str]) -> None:
    """Parse the arguments, write the dataset, print what was written."""
    from aac_lightning.data.synth import write_synthetic_clotho

    parser = argparse.ArgumentParser(
        prog="aac-lightning synth",
        description="Write the synthetic dataset (sound-event sequences with captions) in the Clotho "
        "layout under OUT_DIR, readable with aac_lightning.data.Clotho(OUT_DIR, subset).",
    )
    parser.add_argument("out_dir", help="output folder (CLOTHO_v2.1/ is created inside)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--clips", type=int, default=400, help="total clips, split 60/20/20 into dev/val/eval (default 400)")
    parser.add_argument("--sample-rate", type=int, default=32000, help="sample rate of the WAV files (default 32000)")
    ns = parser.parse_args(args)
    counts = write_synthetic_clotho(ns.out_dir, n_clips=ns.clips, seed=ns.seed, sample_rate=ns.sample_rate)
    print(f"wrote {sum(counts.values())} clips to {ns.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
