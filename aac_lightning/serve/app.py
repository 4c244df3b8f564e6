"""The Gradio page of ``aac-lightning serve``: a Caption tab and a Search tab over a :class:`DemoBackend`.

Requests queue (``concurrency`` run at once, at most ``max_queue`` waiting), so many users at once
keep the memory of ``concurrency`` requests. Gradio serves only its own upload cache and the searched
folder (``allowed_paths``); search results are files of that folder's index, nothing a request names.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aac_lightning.serve.backend import DemoBackend, ServeError
from aac_lightning.serve.figures import spectrogram_image

log = logging.getLogger(__name__)

__all__ = ["build_app", "launch", "require_gradio"]

WEB_EXTRA_HINT = "aac-lightning serve needs the web extra: pip install 'aac-lightning[web]'"


def require_gradio():
    """The gradio module, or ImportError saying which extra installs it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the server runs offline
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"{WEB_EXTRA_HINT} ({err})") from None
    return gradio


def _error(message: str) -> str:
    return f"**Error:** {message}"


def build_app(backend: DemoBackend, title: str = "aac_lightning", concurrency: int = 1) -> Any:
    """The page as a ``gradio.Blocks`` (not launched)."""
    gr = require_gradio()

    def caption(path: str | None, phrase: str):
        try:
            result = backend.caption(path, phrase)
        except ServeError as err:
            return "", None, _error(str(err))
        except Exception as err:  # a model failure on one request must not stop the server
            log.exception("serve: captioning failed")
            return "", None, _error(f"captioning failed: {type(err).__name__}: {err}")
        image = spectrogram_image(result.waveform, result.sample_rate, result.similarity, phrase.strip())
        seconds = len(result.waveform) / result.sample_rate
        notes = [f"{seconds:.1f} s at {result.sample_rate} Hz"] + result.notes
        return result.caption or "", image, " · ".join(notes)

    def search(query: str):
        hidden = [gr.Audio(value=None, visible=False) for _ in range(backend.top_k)]
        try:
            hits = backend.search(query)
        except ServeError as err:
            return [[]], _error(str(err)), *hidden
        except Exception as err:
            log.exception("serve: search failed")
            return [[]], _error(f"search failed: {type(err).__name__}: {err}"), *hidden
        rows = [[hit.rank, hit.name, round(hit.score, 4)] for hit in hits]
        players = [
            gr.Audio(value=str(hit.path), label=f"{hit.rank}. {hit.name} ({hit.score:.3f})", visible=True) for hit in hits
        ] + hidden[len(hits) :]
        return rows, f"{len(hits)} of {backend.searchable} clips", *players

    with gr.Blocks(title=title) as app:
        models = []
        if backend.captioner is not None:
            models.append(f"captioner: {len(backend.captioner.ensemble.captioners)} model(s)")
        if backend.retriever is not None:
            models.append(f"retrieval: {len(backend.retriever.ensemble)} model(s)")
        if backend.audio_dir is not None:
            models.append(f"folder: {backend.audio_dir.name}/ ({backend.searchable} clips)")
        gr.Markdown(f"## {title}\n" + " · ".join(models))
        with gr.Tab("Caption"):
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="caption-audio")
            phrase = gr.Textbox(label="Phrase (optional): where in the clip it fits", elem_id="caption-phrase")
            run = gr.Button("Caption", variant="primary", elem_id="caption-button")
            text = gr.Textbox(label="Caption", interactive=False, elem_id="caption-output")
            message = gr.Markdown(elem_id="caption-message")
            image = gr.Image(label="Log-mel spectrogram", type="numpy", interactive=False, elem_id="caption-spectrogram")
            run.click(caption, [audio, phrase], [text, image, message], concurrency_limit=concurrency, api_name="caption")
        with gr.Tab("Search"):
            query = gr.Textbox(label="Query", placeholder="a dog barks while cars pass", elem_id="search-query")
            go = gr.Button("Search", variant="primary", elem_id="search-button")
            status = gr.Markdown(elem_id="search-message")
            table = gr.Dataframe(headers=["rank", "file", "score"], interactive=False, elem_id="search-results")
            players = [gr.Audio(visible=False, interactive=False, elem_id=f"search-audio-{i}") for i in range(backend.top_k)]
            go.click(search, [query], [table, status, *players], concurrency_limit=concurrency, api_name="search")
            query.submit(search, [query], [table, status, *players], concurrency_limit=concurrency)
    return app


def launch(
    backend: DemoBackend,
    host: str = "127.0.0.1",
    port: int = 7860,
    concurrency: int = 1,
    max_queue: int = 64,
    block: bool = True,
) -> Any:
    """Start the page on ``host:port`` (loopback unless told otherwise); returns the running app."""
    app = build_app(backend, concurrency=concurrency)
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    allowed = [str(backend.audio_dir)] if backend.audio_dir is not None else []
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{backend.limits.max_upload_mb:g}mb",
        allowed_paths=allowed,
        prevent_thread_lock=not block,
        share=False,
        quiet=True,
    )
    return app
