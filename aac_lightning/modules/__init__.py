"""One LightningModule per stage: they wire losses, optimizers, schedules, metrics and logging."""

from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.retrieval import ContrastiveRetrieval

__all__ = ["CaptioningXE", "ContrastiveRetrieval"]
