"""`aac-lightning serve`: a browser demo of trained models (Gradio, the ``web`` extra).

:mod:`.backend` holds what a request does and every check of its input (no web framework);
:mod:`.figures` draws the spectrogram; :mod:`.app` is the Gradio page. Python::

    from aac_lightning.serve import DemoBackend, launch

    backend = DemoBackend.from_models(["runs/scst/best.ckpt", "runs/finetune/best.ckpt"], audio_dir="recordings/")
    launch(backend, port=7860)
"""

from aac_lightning.serve.backend import CaptionResult, DemoBackend, SearchHit, ServeError, ServeLimits, split_by_kind

__all__ = ["CaptionResult", "DemoBackend", "SearchHit", "ServeError", "ServeLimits", "launch", "split_by_kind"]


def launch(*args, **kwargs):
    """Start the page (see :func:`aac_lightning.serve.app.launch`); imports Gradio only when called."""
    from aac_lightning.serve.app import launch as _launch

    return _launch(*args, **kwargs)
