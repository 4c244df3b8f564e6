"""Requests per second and latency of `aac-lightning serve` under load, side by side with one at a time.

Starts the page in this process on a loopback port, then sends `--requests` caption requests through
Gradio's client: first one after another, then all at once from as many threads. Prints the requests
per second and median / 95th-percentile latency of both, the ratio, whether every concurrent answer
equals the sequential answer for the same clip (exits non-zero if not), and the process's peak
resident memory before and after the load (bounded: requests queue, `--concurrency` run at once).

Models: `--models CKPT...` (a captioner, optionally a retrieval model), else a `demo --fast` run is
made in a temporary folder first (about a minute on a CPU).

    .venv/bin/python bench/bench_serve.py [--requests 16] [--concurrency 1] [--seconds 5] [--models ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def demo_models(workdir: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "aac_lightning", "demo", "--fast", "--workdir", str(workdir), "--loggers", "csv"], check=True, capture_output=True)
    return [str(workdir / "scst" / "best.ckpt")]


def timed(client, clip: str) -> tuple[str, float]:
    from gradio_client import handle_file

    start = time.perf_counter()
    caption = client.predict(handle_file(clip), "", api_name="/caption")[0]
    return caption, time.perf_counter() - start


def summary(latencies: list[float], wall: float) -> str:
    p95 = float(np.percentile(latencies, 95))
    return f"{len(latencies) / wall:6.2f} req/s, median {statistics.median(latencies):.3f} s, p95 {p95:.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=1, help="requests the server runs at once")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--models", nargs="*", help="checkpoints or exported folders (default: a demo --fast run)")
    parser.add_argument("--device", default=None)
    ns = parser.parse_args()
    from gradio_client import Client

    from aac_lightning.serve import DemoBackend
    from aac_lightning.serve.app import launch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = ns.models or demo_models(tmp / "demo")
        backend = DemoBackend.from_models(models, device=ns.device)
        rng = np.random.default_rng(0)
        clips = []
        for k in range(8):
            t = np.arange(int(ns.seconds * 32000)) / 32000
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(t.shape)
            sf.write(tmp / f"clip{k}.wav", x.astype(np.float32), 32000, subtype="PCM_16")
            clips.append(str(tmp / f"clip{k}.wav"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app = launch(backend, port=port, concurrency=ns.concurrency, max_queue=max(64, ns.requests), block=False)
        try:
            client = Client(app.local_url, verbose=False)
            order = [clips[k % len(clips)] for k in range(ns.requests)]
            timed(client, clips[0])  # warm-up
            rss_before = peak_rss_mb()
            start = time.perf_counter()
            sequential = [timed(client, clip) for clip in order]
            sequential_wall = time.perf_counter() - start
            with concurrent.futures.ThreadPoolExecutor(ns.requests) as pool:
                start = time.perf_counter()
                concurrent_answers = list(pool.map(lambda clip: timed(client, clip), order))
                concurrent_wall = time.perf_counter() - start
            rss_after = peak_rss_mb()
        finally:
            app.close()
    same = [a for a, _ in concurrent_answers] == [a for a, _ in sequential]
    print(f"models: {', '.join(models) if ns.models else 'demo --fast SCST captioner'}; {ns.requests} requests of {ns.seconds:g} s clips; server concurrency {ns.concurrency}")
    print(f"one at a time : {summary([s for _, s in sequential], sequential_wall)}")
    print(f"all at once   : {summary([s for _, s in concurrent_answers], concurrent_wall)}")
    print(f"throughput ratio (all at once / one at a time): {sequential_wall / concurrent_wall:.2f}x")
    print(f"peak memory of the process: {rss_before:.0f} MB before the load, {rss_after:.0f} MB after")
    print(f"every concurrent answer equals the sequential one: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
