"""aac_lightning: audio captioning and text-to-audio retrieval with PyTorch Lightning."""

__version__ = "0.1.0"
