"""Captioning metrics through aac-metrics, offline, and the DCASE task 6a submission file.

:func:`caption_metrics` returns the scores under aac-metrics' names (``bleu_1`` ... ``bleu_4``,
``meteor``, ``rouge_l``, ``cider_d``, ``spice``, ``spider``, ``spider_fl``, ``fense``) after PTB
tokenisation of candidates and references (what aac-metrics' ``preprocess=True`` does: the
Stanford PTB tokenizer, lower case, punctuation removed).

A metric that cannot run here is left out of the result, never reported as 0: its name and the
reason are logged as a warning and listed by :func:`unavailable_metrics`. What each needs:

- ``bleu_*``, ``rouge_l``, ``cider_d``: nothing beyond aac-metrics (pure Python);
- PTB tokenisation, ``meteor``: a Java 8-13 runtime and the jars that
  :func:`~aac_lightning.metrics.java.prepare_java_resources` links from the pycocoevalcap wheel;
- ``spice`` (and so ``spider``, ``spider_fl``): additionally Stanford CoreNLP 3.6.0 in SPICE's
  ``lib`` folder, which no pip package ships (``aac-metrics-download`` fetches it);
- ``spider_fl``, ``fense``: the FENSE fluency-error checker checkpoint (and, for ``fense``, the
  Sentence-BERT model ``paraphrase-TinyBERT-L6-v2`` in the Hugging Face cache).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from aac_lightning.metrics.java import find_java, java_resource_problems, prepare_java_resources

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CAPTION_METRICS",
    "caption_metrics",
    "ptb_tokenize",
    "read_dcase_captioning_csv",
    "unavailable_metrics",
    "write_dcase_captioning_csv",
]

DEFAULT_CAPTION_METRICS: tuple[str, ...] = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "meteor",
    "rouge_l",
    "cider_d",
    "spice",
    "spider",
    "spider_fl",
    "fense",
)
_PURE_PYTHON = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")
SBERT_MODEL = "sentence-transformers/paraphrase-TinyBERT-L6-v2"
ECHECKER = "echecker_clotho_audiocaps_base"
# the punctuation tokens aac-metrics drops after PTB tokenisation (aac_metrics.utils.tokenization)
_PTB_PUNCTUATION = {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"
}


def _fense_model_problems() -> dict[str, str]:
    """Reasons the FENSE models are missing: keys ``echecker`` and ``sbert``."""
    problems = {}
    import torch

    data_home = Path(os.getenv("FENSE_DATA", os.path.join(torch.hub.get_dir(), "fense_data"))).expanduser()
    checkpoint = data_home / f"{ECHECKER}.ckpt"
    if not checkpoint.is_file():
        problems["echecker"] = f"missing the fluency-error checker {checkpoint} (aac-metrics downloads it from GitHub)"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(SBERT_MODEL, "config.json")
        if not isinstance(cached, str):
            problems["sbert"] = f"the Sentence-BERT model {SBERT_MODEL} is not in the Hugging Face cache"
    except ImportError:
        problems["sbert"] = "huggingface_hub is not installed"
    return problems


def unavailable_metrics(cache_dir: str | os.PathLike | None = None, java_path: str | None = None) -> dict[str, str]:
    """Metrics of :data:`DEFAULT_CAPTION_METRICS` that cannot run here, with the reason.

    ``ptb_tokenizer`` is listed too when the PTB tokenizer cannot run (then
    :func:`caption_metrics` falls back to a Python tokenisation and says so).
    """
    if importlib.util.find_spec("aac_metrics") is None:  # (importing it takes seconds)
        return {name: "aac-metrics is not installed" for name in DEFAULT_CAPTION_METRICS + ("ptb_tokenizer",)}
    cache = prepare_java_resources(cache_dir)
    java, java_reason = find_java(java_path)
    files = java_resource_problems(cache)
    reasons: dict[str, str] = {}
    for component, name in (("ptb", "ptb_tokenizer"), ("meteor", "meteor"), ("spice", "spice")):
        if java is None:
            reasons[name] = java_reason
        elif component in files:
            reasons[name] = files[component]
    fense_problems = _fense_model_problems()
    if "spice" in reasons:
        reasons["spider"] = reasons["spice"]  # SPIDEr is the mean of CIDEr-D and SPICE
        reasons["spider_fl"] = reasons["spice"]
    if "echecker" in fense_problems:
        reasons.setdefault("spider_fl", fense_problems["echecker"])
        reasons["fense"] = fense_problems["echecker"]
    if "sbert" in fense_problems:
        reasons.setdefault("fense", fense_problems["sbert"])
    return reasons


def _python_tokenize(sentence: str) -> str:
    """A close stand-in for PTB tokenisation: lower case, clitics split, punctuation dropped."""
    sentence = sentence.lower().replace("\u2019", "'")
    sentence = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1 \2", sentence)
    sentence = re.sub(r"[^\w\s']", " ", sentence)
    return " ".join(w for w in sentence.split() if w not in _PTB_PUNCTUATION)


def ptb_tokenize(
    sentences: list[str], *, cache_dir: str | os.PathLike | None = None, java_path: str | None = None
) -> list[str]:
    """PTB-tokenise sentences as aac-metrics' ``preprocess=True`` does (one Java run for all).

    Raises RuntimeError naming the reason when the tokenizer cannot run.
    """
    cache = prepare_java_resources(cache_dir)
    java, reason = find_java(java_path)
    if java is None:
        raise RuntimeError(f"PTB tokenizer unavailable: {reason}")
    problem = java_resource_problems(cache).get("ptb")
    if problem:
        raise RuntimeError(f"PTB tokenizer unavailable: {problem}")
    if not sentences:
        return []
    from aac_metrics.utils.tokenization import preprocess_mono_sents

    # the tokenizer works line by line: a newline inside a caption would shift every later one
    flat = [" ".join(s.splitlines()) for s in sentences]
    return preprocess_mono_sents(flat, cache_path=str(cache), java_path=java)


def _check_inputs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
        raise ValueError("candidates must be a list of str")
    if isinstance(references, str) or any(
        isinstance(refs, str) or not all(isinstance(ref, str) for ref in refs) for refs in references
    ):
        raise ValueError("references must be a list of lists of str")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates and references must have the same length, got {len(candidates)} and {len(references)}"
        )
    if any(len(r) == 0 for r in references):
        bad = next(i for i, r in enumerate(references) if len(r) == 0)
        raise ValueError(f"references[{bad}] is empty: every candidate needs at least one reference")
    if len(candidates) < 2:
        raise ValueError("aac-metrics needs at least 2 candidates (CIDEr-D document frequencies)")


def _groups(runnable: list[str]) -> list[tuple[str, set[str]]]:
    """aac-metrics calls to make and the requested names each provides (SPICE runs once)."""
    wanted = set(runnable)
    groups = []
    if "spider_fl" in wanted:
        groups.append(("spider_fl", wanted & {"spider_fl", "spider", "spice", "cider_d"}))
    elif "spider" in wanted:
        groups.append(("spider", wanted & {"spider", "spice", "cider_d"}))
    covered = set().union(*(names for _, names in groups)) if groups else set()
    for name in runnable:
        if name not in covered:
            groups.append((name, {name}))
            covered.add(name)
    return groups


def caption_metrics(
    candidates: list[str],
    references: list[list[str]],
    *,
    metrics: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    java_path: str | None = None,
    preprocess: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """Corpus scores of the candidates under aac-metrics' names; unavailable metrics left out.

    Args:
        candidates: one predicted caption per audio clip.
        references: the reference captions of each clip.
        metrics: names to compute (default :data:`DEFAULT_CAPTION_METRICS`).
        cache_dir: folder holding ``aac-metrics/...`` jars (see :mod:`aac_lightning.metrics.java`);
            filled from the jars on this machine if needed.
        java_path: Java 8-13 executable (default: found automatically).
        preprocess: PTB-tokenise first (the official evaluation). If the tokenizer cannot run,
            a Python tokenisation is used instead and a warning says so.
        device: where FENSE / SPIDEr-FL run their models.
    """
    _check_inputs(candidates, references)
    requested = list(DEFAULT_CAPTION_METRICS if metrics is None else metrics)
    unknown = [m for m in requested if m not in DEFAULT_CAPTION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(DEFAULT_CAPTION_METRICS)}")
    import aac_metrics  # slow import (it loads every metric's dependencies): only when used

    cache = prepare_java_resources(cache_dir)
    java, _ = find_java(java_path)
    reasons = unavailable_metrics(cache, java_path)

    if preprocess:
        sentences = list(candidates) + [r for refs in references for r in refs]
        if "ptb_tokenizer" in reasons:
            log.warning("PTB tokenizer unavailable (%s): captions tokenised in Python instead; "
                        "scores may differ slightly from the official ones", reasons["ptb_tokenizer"])
            tokenized = [_python_tokenize(s) for s in sentences]
        else:
            tokenized = ptb_tokenize(sentences, cache_dir=cache, java_path=java)
        counts = [len(refs) for refs in references]
        candidates, flat_refs = tokenized[: len(candidates)], tokenized[len(candidates):]
        references, start = [], 0
        for count in counts:  # the flat references back into their clips
            references.append(flat_refs[start : start + count])
            start += count

    skipped = {m: reasons[m] for m in requested if m in reasons and m not in _PURE_PYTHON}
    runnable = [m for m in requested if m not in skipped]
    results: dict[str, float] = {}
    for group, provides in _groups(runnable):
        try:
            corpus, _ = aac_metrics.evaluate(
                candidates, references, preprocess=False, metrics=[group], cache_path=str(cache),
                java_path=java, device=device,
            )
            results.update({name: float(corpus[name]) for name in provides})
        except Exception as err:  # a metric failing at run time must not lose the others
            for name in provides:
                skipped[name] = f"{group} failed: {type(err).__name__}: {err}"
    if skipped:
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped.items():
            by_reason.setdefault(reason, []).append(name)
        log.warning("caption metrics not computed: %s",
                    "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()))
    return {name: results[name] for name in requested if name in results}


def write_dcase_captioning_csv(path: str | os.PathLike, fnames: Sequence[str], captions: Sequence[str]) -> Path:
    """Write a DCASE task 6a submission: header ``file_name,caption_predicted``, one row per clip.

    Fields are CSV-quoted where needed (Clotho file names contain commas, quotes, spaces).
    """
    fnames, captions = list(fnames), list(captions)
    if len(fnames) != len(captions):
        raise ValueError(f"fnames and captions must have the same length, got {len(fnames)} and {len(captions)}")
    duplicates = sorted({f for f in fnames if fnames.count(f) > 1}) if len(set(fnames)) != len(fnames) else []
    if duplicates:
        raise ValueError(f"fnames must be unique, repeated: {duplicates[:5]}")
    for name, text in zip(fnames, captions):
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"fnames and captions must be str, got {type(name).__name__} / {type(text).__name__}")
        if "\n" in name or "\r" in name or "\n" in text or "\r" in text:
            raise ValueError(f"line breaks are not allowed in a submission row: {name!r}, {text!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption_predicted"])
        writer.writerows(zip(fnames, captions))
    return path


def read_dcase_captioning_csv(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read a file written by :func:`write_dcase_captioning_csv`: ``(fnames, captions)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no submission file at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["file_name", "caption_predicted"]:
        raise ValueError(f"{path}: expected the header 'file_name,caption_predicted', got {rows[:1]}")
    return [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
