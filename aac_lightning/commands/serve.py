"""`aac-lightning serve MODEL... [--audio-dir DIR]`: the browser demo. Argument parsing and printing only."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def serve_command(args: Sequence[str]) -> None:
    """`aac-lightning serve MODEL... [--audio-dir DIR] [--host 127.0.0.1] [--port 7860] ...`."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning serve",
        description="A browser demo (Gradio, the 'web' extra): the Caption tab captions an uploaded or "
        "recorded clip and draws its log-mel spectrogram with a phrase's frame-level similarity; the "
        "Search tab ranks the clips of --audio-dir for a text query. Captioners (XE / SCST) and "
        "retrieval models may be mixed; several of a kind form an ensemble. Listens on 127.0.0.1 only "
        "unless --host says otherwise; only files under --audio-dir are ever served.",
    )
    parser.add_argument("models", nargs="+", help="checkpoints (.ckpt) or exported folders (aac-lightning export)")
    parser.add_argument("--audio-dir", help="folder of audio to search (needs a retrieval model); embeddings cached in it")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam width of captioning (default 3)")
    parser.add_argument("--top-k", type=int, default=5, help="clips a search returns (default 5)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="longest clip captioned, in seconds (default 60)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests run at once; the others queue (default 1)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more are refused (default 64)")
    ns = parser.parse_args(list(args))
    from aac_lightning.serve import DemoBackend, ServeLimits, launch
    from aac_lightning.serve.app import require_gradio

    require_gradio()  # before loading models: say which extra is missing at once
    limits = ServeLimits(max_upload_mb=ns.max_upload_mb, max_seconds=ns.max_seconds)
    backend = DemoBackend.from_models(ns.models, ns.audio_dir, ns.device, limits, ns.beam_size, ns.top_k)
    print(f"serving on http://{ns.host}:{ns.port} (Ctrl+C stops)", flush=True)
    launch(backend, ns.host, ns.port, ns.concurrency, ns.max_queue)
