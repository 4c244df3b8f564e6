"""Retrieval metrics (2022 and 2025 protocols), fast CIDEr-D, caption metrics through aac-metrics, submission files."""

from aac_lightning.metrics.captioning import (
    caption_metrics,
    evaluate_captions,
    unavailable_metrics,
    write_dcase_captioning_csv,
)
from aac_lightning.metrics.dcase import (
    read_dcase2025_retrieval_csv,
    read_dcase_retrieval_csv,
    write_dcase2025_retrieval_csv,
    write_dcase_retrieval_csv,
)
from aac_lightning.metrics.relevance import dcase2025_metrics, multi_relevant_metrics, read_relevance_file
from aac_lightning.metrics.sets import CAPTION_METRIC_SETS, DCASE_RANKING_METRIC, resolve_caption_metrics
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
    "CAPTION_METRIC_SETS",
    "DCASE_RANKING_METRIC",
    "CiderD",
    "CiderDocumentFrequency",
    "RetrievalRanks",
    "audio_to_text_metrics",
    "average_similarities",
    "caption_metrics",
    "cider_d",
    "dcase2025_metrics",
    "evaluate_captions",
    "multi_relevant_metrics",
    "prepare_java_resources",
    "read_relevance_file",
    "resolve_caption_metrics",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "top_k_candidates",
    "unavailable_metrics",
    "write_dcase_captioning_csv",
    "read_dcase2025_retrieval_csv",
    "read_dcase_retrieval_csv",
    "write_dcase2025_retrieval_csv",
    "write_dcase_retrieval_csv",
]
