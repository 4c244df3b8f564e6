"""Retrieval metrics, fast CIDEr-D, and caption metrics through aac-metrics."""

from aac_lightning.metrics.captioning import caption_metrics, unavailable_metrics, write_dcase_captioning_csv
from aac_lightning.metrics.dcase import read_dcase_retrieval_csv, write_dcase_retrieval_csv
from aac_lightning.metrics.cider import CiderD, CiderDocumentFrequency, cider_d
from aac_lightning.metrics.java import prepare_java_resources
from aac_lightning.metrics.retrieval import (
    RetrievalRanks,
    audio_to_text_metrics,
    average_similarities,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    top_k_candidates,
)

__all__ = [
    "CiderD",
    "CiderDocumentFrequency",
    "RetrievalRanks",
    "audio_to_text_metrics",
    "average_similarities",
    "caption_metrics",
    "cider_d",
    "prepare_java_resources",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "top_k_candidates",
    "unavailable_metrics",
    "write_dcase_captioning_csv",
    "read_dcase_retrieval_csv",
    "write_dcase_retrieval_csv",
]
