"""Captioning and retrieval ensembles as library functions (no argparse, no printing).

- :mod:`~aac_lightning.ensembles.captioning`: :class:`CaptionEnsemble` (one shared beam on the
  members' mean log-probabilities), :func:`load_captioner`, :func:`evaluate_caption_ensemble`.
- :mod:`~aac_lightning.ensembles.retrieval`: :class:`RetrievalEnsemble` (mean of the members'
  cosine similarity matrices), :func:`evaluate_retrieval_ensemble`.
"""

from aac_lightning.ensembles.captioning import CaptionEnsemble, evaluate_caption_ensemble, load_captioner
from aac_lightning.ensembles.retrieval import (
    RetrievalEnsemble,
    caption_targets,
    ensemble_metrics,
    evaluate_retrieval_ensemble,
    rank_from_similarity,
)

__all__ = [
    "CaptionEnsemble",
    "RetrievalEnsemble",
    "caption_targets",
    "ensemble_metrics",
    "evaluate_caption_ensemble",
    "evaluate_retrieval_ensemble",
    "load_captioner",
    "rank_from_similarity",
]
