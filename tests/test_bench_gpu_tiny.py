"""The GPU suite (bench/bench_gpu.py) runs at tiny sizes on the CPU, so it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_gpu_tiny_prints_every_row() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--tiny"], capture_output=True, text=True, timeout=240, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    settings = {tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows}
    for expected in [
        ("contrastive step", "fp32"),
        ("contrastive step", "bf16-mixed"),
        ("contrastive step", "bf16-mixed + channels-last"),
        ("contrastive step", "bf16-mixed + fused Adam"),
        ("contrastive step", "bf16-mixed + torch.compile"),
        ("data loader", "packed int16, 1 workers"),
        ("feature extraction", "fp32"),
        ("feature extraction", "bf16-mixed"),
        ("XE step", "batch 2"),
        ("SCST step", "batch 2 x 5 samples"),
        ("beam search", "batch 2, beam 3"),
    ]:
        assert expected in settings, (expected, done.stdout)
    assert "GFLOP/pair" in done.stdout  # FLOPs counted with FlopCounterMode
