"""Caption metric sets by name: what each DCASE edition reported, and how to ask for them.

A metrics specification is a set name, a single metric name, a comma-separated mix of both, or a
list of them; :func:`resolve_caption_metrics` turns it into metric names (aac-metrics' names, in
a fixed order, each once). Names are case-insensitive and ``-`` stands for ``_``, so ``SPIDEr-FL``,
``CIDEr-D``, ``Vocab`` and ``BLEU-4`` work as written in the challenge's tables.

| set | metrics | DCASE ranked by |
|---|---|---|
| ``dcase2022`` (= ``dcase2020``, ``dcase2021``) | BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr | SPIDEr |
| ``dcase2023`` | METEOR, CIDEr-D, SPICE, SPIDEr, SPIDEr-FL | SPIDEr-FL |
| ``dcase2024`` | METEOR, CIDEr-D, SPICE, SPIDEr, SPIDEr-FL, FENSE, Vocab | FENSE |
| ``all`` | every metric this package knows | |
| ``default`` | ``dcase2022`` plus SPIDEr-FL and FENSE (what the package always reported) | |

The 2023 and 2024 sets list the scores aac-metrics' own ``dcase2023`` / ``dcase2024`` sets return
(its ``spider_fl`` brings CIDEr-D, SPICE and SPIDEr along). ``vocab`` is the number of distinct
words over all candidates (aac-metrics' ``vocab.cands``), after the same tokenisation as the others.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ALL_CAPTION_METRICS",
    "CAPTION_METRIC_SETS",
    "DCASE_RANKING_METRIC",
    "DEFAULT_METRICS_SPEC",
    "resolve_caption_metrics",
]

_BLEU = ("bleu_1", "bleu_2", "bleu_3", "bleu_4")
_DCASE2022 = (*_BLEU, "meteor", "rouge_l", "cider_d", "spice", "spider")
_DCASE2023 = ("meteor", "cider_d", "spice", "spider", "spider_fl")

# every metric name caption_metrics computes, in the order results are listed
ALL_CAPTION_METRICS: tuple[str, ...] = (*_BLEU, "meteor", "rouge_l", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab")

CAPTION_METRIC_SETS: dict[str, tuple[str, ...]] = {
    "dcase2020": _DCASE2022,
    "dcase2021": _DCASE2022,
    "dcase2022": _DCASE2022,
    "dcase2023": _DCASE2023,
    "dcase2024": (*_DCASE2023, "fense", "vocab"),
    "all": ALL_CAPTION_METRICS,
    "default": (*_DCASE2022, "spider_fl", "fense"),
}

# the metric each edition's captioning task ranked its systems by
DCASE_RANKING_METRIC: dict[str, str] = {
    "dcase2020": "spider",
    "dcase2021": "spider",
    "dcase2022": "spider",
    "dcase2023": "spider_fl",
    "dcase2024": "fense",
}

DEFAULT_METRICS_SPEC = "default"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_caption_metrics(spec: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Metric names of a specification: set names and metric names, comma-separated or as a list.

    ``None`` is the ``default`` set. The result follows :data:`ALL_CAPTION_METRICS`' order, each
    name once. Raises ValueError naming what is unknown, the known sets and the known metrics.
    """
    if spec is None:
        spec = DEFAULT_METRICS_SPEC
    if not isinstance(spec, str) and any(not isinstance(item, str) for item in spec):
        raise ValueError(f"metrics must be names (str), got {list(spec)!r}")
    parts = spec.split(",") if isinstance(spec, str) else [p for item in spec for p in item.split(",")]
    wanted: set[str] = set()
    unknown: list[str] = []
    for part in parts:
        name = _canonical(part)
        if not name:
            continue
        if name in CAPTION_METRIC_SETS:
            wanted.update(CAPTION_METRIC_SETS[name])
        elif name in ALL_CAPTION_METRICS:
            wanted.add(name)
        else:
            unknown.append(part.strip())
    if unknown:
        raise ValueError(
            f"unknown metric(s) or set(s) {unknown}; sets: {sorted(CAPTION_METRIC_SETS)}; "
            f"metrics: {list(ALL_CAPTION_METRICS)}"
        )
    if not wanted:
        raise ValueError(f"no metric named in {spec!r}")
    return tuple(name for name in ALL_CAPTION_METRICS if name in wanted)
