"""aac_lightning: audio captioning and text-to-audio retrieval with PyTorch Lightning."""

__version__ = "0.2.0"

__all__ = ["Captioner", "Retriever", "__version__"]

# Inference classes are imported on first access, so `import aac_lightning` stays light (no torch).
_LAZY = {"Captioner": "aac_lightning.inference", "Retriever": "aac_lightning.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    raise AttributeError(f"module 'aac_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
