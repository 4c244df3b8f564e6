"""Captioning metrics through aac-metrics, offline, and the DCASE task 6a submission file.

:func:`caption_metrics` returns the scores under aac-metrics' names (``bleu_1`` ... ``bleu_4``,
``meteor``, ``rouge_l``, ``cider_d``, ``spice``, ``spider``, ``spider_fl``, ``fense``, and ``vocab``
for aac-metrics' ``vocab.cands``) after PTB tokenisation of candidates and references (what
aac-metrics' ``preprocess=True`` does: the Stanford PTB tokenizer, lower case, punctuation removed).
Which metrics: a set name (``dcase2022``, ``dcase2023``, ``dcase2024``, ``all``, ``default``) or
metric names, see :mod:`aac_lightning.metrics.sets`.

A metric that cannot run here is left out of the result, never reported as 0: its name and the
reason are logged as a warning, listed by :func:`unavailable_metrics` and returned by
:func:`evaluate_captions`. What each needs:

- ``bleu_*``, ``rouge_l``, ``cider_d``, ``vocab``: nothing beyond aac-metrics (pure Python);
- PTB tokenisation, ``meteor``: a Java 8-13 runtime and the jars that
  :func:`~aac_lightning.metrics.java.prepare_java_resources` links from the pycocoevalcap wheel;
- ``spice`` (and so ``spider``, ``spider_fl``): additionally Stanford CoreNLP 3.6.0 in SPICE's
  ``lib`` folder, which no pip package ships (``aac-metrics-download`` fetches it);
- ``spider_fl``, ``fense``: the FENSE fluency-error checker and (``fense``) the Sentence-BERT model,
  from a folder the user names or the caches (:mod:`aac_lightning.metrics.fense`).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from aac_lightning.metrics.fense import find_fense_models, load_fense_models
from aac_lightning.metrics.java import find_java, java_resource_problems, prepare_java_resources
from aac_lightning.metrics.sets import ALL_CAPTION_METRICS, CAPTION_METRIC_SETS, resolve_caption_metrics

log = logging.getLogger(__name__)

__all__ = [
    "CaptionEvaluation",
    "DEFAULT_CAPTION_METRICS",
    "caption_metrics",
    "evaluate_captions",
    "ptb_tokenize",
    "read_dcase_captioning_csv",
    "unavailable_metrics",
    "write_dcase_captioning_csv",
]

DEFAULT_CAPTION_METRICS: tuple[str, ...] = CAPTION_METRIC_SETS["default"]
_PURE_PYTHON = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "vocab")
# the punctuation tokens aac-metrics drops after PTB tokenisation (aac_metrics.utils.tokenization)
_PTB_PUNCTUATION = {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"
}


class CaptionEvaluation(NamedTuple):
    """Scores of the metrics that ran, and the reason for each requested metric that did not."""

    scores: dict[str, float]
    unavailable: dict[str, str]


def unavailable_metrics(
    cache_dir: str | os.PathLike | None = None,
    java_path: str | None = None,
    fense_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Metrics of :data:`~aac_lightning.metrics.sets.ALL_CAPTION_METRICS` that cannot run here, with the reason.

    ``ptb_tokenizer`` is listed too when the PTB tokenizer cannot run (then
    :func:`caption_metrics` falls back to a Python tokenisation and says so). ``fense_dir``: the
    folder holding the FENSE models (see :mod:`aac_lightning.metrics.fense`); default: the caches.
    """
    if importlib.util.find_spec("aac_metrics") is None:  # (importing it takes seconds)
        return {name: "aac-metrics is not installed" for name in ALL_CAPTION_METRICS + ("ptb_tokenizer",)}
    cache = prepare_java_resources(cache_dir)
    java, java_reason = find_java(java_path)
    files = java_resource_problems(cache)
    reasons: dict[str, str] = {}
    for component, name in (("ptb", "ptb_tokenizer"), ("meteor", "meteor"), ("spice", "spice")):
        if java is None:
            reasons[name] = java_reason
        elif component in files:
            reasons[name] = files[component]
    fense_problems = find_fense_models(fense_dir).problems
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


_AAC_KEYS = {"vocab": "vocab.cands"}  # our name -> the key aac-metrics returns it under


class _Scorer:
    """Runs one aac-metrics call per group; loads the FENSE models once, when first needed."""

    def __init__(self, cache: Path, java: str | None, device: str, fense_dir, need_sbert: bool):
        self.cache, self.java, self.device = cache, java, device
        self.fense_dir, self.need_sbert = fense_dir, need_sbert
        self._fense_kwargs: dict | None = None

    def __call__(self, group: str, candidates: list[str], references: list[list[str]]) -> dict:
        import aac_metrics

        if group not in ("fense", "spider_fl"):
            corpus, _ = aac_metrics.evaluate(
                candidates, references, preprocess=False, metrics=[group], cache_path=str(self.cache),
                java_path=self.java, device=self.device,
            )
            return corpus
        from aac_metrics.functional import fense, spider_fl

        if self._fense_kwargs is None:
            models = find_fense_models(self.fense_dir)
            self._fense_kwargs = load_fense_models(models, need_sbert=self.need_sbert, device=self.device)
        kwargs = dict(self._fense_kwargs)
        if group == "fense":
            corpus, _ = fense(candidates, references, return_all_scores=True, device=self.device, **kwargs)
        else:
            kwargs.pop("sbert_model", None)
            corpus, _ = spider_fl(
                candidates, references, return_all_scores=True, cache_path=str(self.cache), java_path=self.java,
                device=self.device, **kwargs,
            )
        return corpus


def evaluate_captions(
    candidates: list[str],
    references: list[list[str]],
    *,
    metrics: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    java_path: str | None = None,
    fense_dir: str | os.PathLike | None = None,
    preprocess: bool = True,
    device: str = "cpu",
) -> CaptionEvaluation:
    """Corpus scores of the candidates, and why each requested metric that could not run did not.

    Args: as :func:`caption_metrics`.
    """
    _check_inputs(candidates, references)
    requested = list(resolve_caption_metrics(metrics))

    cache = prepare_java_resources(cache_dir)
    java, _ = find_java(java_path)
    reasons = unavailable_metrics(cache, java_path, fense_dir)
    if reasons.get("bleu_1") == "aac-metrics is not installed":
        return CaptionEvaluation({}, {m: reasons[m] for m in requested})

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
    score = _Scorer(cache, java, device, fense_dir, need_sbert="fense" in runnable)
    results: dict[str, float] = {}
    for group, provides in _groups(runnable):
        try:
            corpus = score(group, list(candidates), [list(r) for r in references])
            results.update({name: float(corpus[_AAC_KEYS.get(name, name)]) for name in provides})
        except Exception as err:  # a metric failing at run time must not lose the others
            for name in provides:
                skipped[name] = f"{group} failed: {type(err).__name__}: {err}"
    if skipped:
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped.items():
            by_reason.setdefault(reason, []).append(name)
        log.warning("caption metrics not computed: %s",
                    "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()))
    scores = {name: results[name] for name in requested if name in results}
    return CaptionEvaluation(scores, {name: skipped[name] for name in requested if name in skipped})


def caption_metrics(
    candidates: list[str],
    references: list[list[str]],
    *,
    metrics: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    java_path: str | None = None,
    fense_dir: str | os.PathLike | None = None,
    preprocess: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """Corpus scores of the candidates under aac-metrics' names; unavailable metrics left out.

    Args:
        candidates: one predicted caption per audio clip.
        references: the reference captions of each clip.
        metrics: set names and/or metric names (``"dcase2024"``, ``["dcase2022", "vocab"]``,
            ``"bleu_4,SPIDEr-FL"``; see :mod:`aac_lightning.metrics.sets`); default the ``default`` set.
        cache_dir: folder holding ``aac-metrics/...`` jars (see :mod:`aac_lightning.metrics.java`);
            filled from the jars on this machine if needed.
        java_path: Java 8-13 executable (default: found automatically).
        fense_dir: folder holding the FENSE / SPIDEr-FL models (see :mod:`aac_lightning.metrics.fense`);
            default: the Hugging Face cache and ``$FENSE_DATA``.
        preprocess: PTB-tokenise first (the official evaluation). If the tokenizer cannot run,
            a Python tokenisation is used instead and a warning says so.
        device: where FENSE / SPIDEr-FL run their models.
    """
    return evaluate_captions(
        candidates, references, metrics=metrics, cache_dir=cache_dir, java_path=java_path, fense_dir=fense_dir,
        preprocess=preprocess, device=device,
    ).scores


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
