"""One LightningModule per stage: they wire losses, optimizers, schedules, metrics and logging."""

from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.retrieval import ContrastiveRetrieval
from aac_lightning.modules.scst import CaptioningSCST

__all__ = ["CaptioningSCST", "CaptioningXE", "ContrastiveRetrieval"]
