"""Caption metrics through aac-metrics offline, Java/jar detection, the DCASE submission CSV."""

from __future__ import annotations

import csv
import json
import logging
import stat
from pathlib import Path

import pytest

from aac_lightning.metrics import java as java_module
from aac_lightning.metrics.captioning import (
    _python_tokenize,
    caption_metrics,
    read_dcase_captioning_csv,
    unavailable_metrics,
    write_dcase_captioning_csv,
)
from aac_lightning.metrics.java import (
    PTB_JAR,
    SPICE_DIR,
    find_java,
    java_major_version,
    java_resource_problems,
    prepare_java_resources,
)

FIXTURE = Path(__file__).parent / "data" / "real_format_captions.json"
OFFLINE_METRICS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"]


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return json.loads(FIXTURE.read_text())["clips"]


@pytest.fixture
def local_jars_only(monkeypatch):
    """Jars come from the pycocoevalcap wheel only, never from a full aac-metrics install."""
    monkeypatch.setattr(java_module, "_source_roots", lambda: [])


def _java_or_skip() -> str:
    pytest.importorskip("aac_metrics")
    java, reason = find_java()
    if java is None:
        pytest.skip(f"no usable Java: {reason}")
    return java


def test_offline_metrics_match_aac_metrics_and_spice_is_left_out(clips, tmp_path, local_jars_only, caplog):
    java = _java_or_skip()
    cache = prepare_java_resources(tmp_path / "cache")
    if java_resource_problems(cache).get("meteor"):
        pytest.skip("METEOR jars not available (pycocoevalcap missing)")
    # raw real-format captions: capitals, commas, final periods; first caption as the candidate
    candidates = [c["captions"][0] for c in clips[:25]]
    references = [c["captions"][1:] for c in clips[:25]]
    with caplog.at_level(logging.WARNING, logger="aac_lightning.metrics.captioning"):
        scores = caption_metrics(candidates, references, cache_dir=cache)
    assert list(scores) == OFFLINE_METRICS  # spice, spider, spider_fl, fense left out, not 0
    assert all(0.0 < scores[name] < 1.0 for name in OFFLINE_METRICS if name != "cider_d")
    assert 0.0 < scores["cider_d"] < 10.0
    assert scores["bleu_1"] > scores["bleu_2"] > scores["bleu_3"] > scores["bleu_4"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "spice" in warning and "stanford-corenlp-3.6.0.jar" in warning and "fense" in warning
    assert "spice" in unavailable_metrics(cache)

    import aac_metrics

    expected, _ = aac_metrics.evaluate(
        candidates, references, preprocess=True, metrics=OFFLINE_METRICS, cache_path=str(cache), java_path=java
    )
    for name in OFFLINE_METRICS:
        assert scores[name] == pytest.approx(float(expected[name]), abs=1e-9), name


def test_identical_captions_score_high_and_ptb_drops_punctuation(clips, tmp_path, local_jars_only):
    _java_or_skip()
    candidates = [c["captions"][0] for c in clips[:20]]
    references = [c["captions"][:3] for c in clips[:20]]  # each candidate is one of its references
    scores = caption_metrics(candidates, references, metrics=["bleu_4", "rouge_l", "cider_d"],
                             cache_dir=tmp_path / "cache")
    assert scores["bleu_4"] == pytest.approx(1.0)
    assert scores["rouge_l"] > 0.95 and scores["cider_d"] > 3.0
    # PTB tokenisation really ran: punctuation and capitals do not change the scores
    lowered = [c.lower().replace(",", " ").rstrip(".") for c in candidates]
    again = caption_metrics(lowered, references, metrics=["bleu_4", "rouge_l", "cider_d"], cache_dir=tmp_path / "cache")
    assert again == pytest.approx(scores)


def test_spice_alone_missing_gives_empty_result_and_reason(tmp_path, local_jars_only, caplog):
    pytest.importorskip("aac_metrics")
    with caplog.at_level(logging.WARNING, logger="aac_lightning.metrics.captioning"):
        scores = caption_metrics(["a dog barks", "rain falls"], [["a dog barks"], ["rain"]],
                                 metrics=["spice", "spider"], cache_dir=tmp_path / "cache", preprocess=False)
    assert scores == {}
    assert "spice, spider:" in caplog.text
    reasons = unavailable_metrics(tmp_path / "cache")
    assert reasons["spider"] == reasons["spice"]


def test_without_java_falls_back_to_python_tokenisation(tmp_path, monkeypatch, caplog):
    aac_metrics = pytest.importorskip("aac_metrics")
    from aac_lightning.metrics import captioning

    monkeypatch.setattr(captioning, "find_java", lambda java_path=None: (None, "no Java here"))
    candidates = ["A dog barks, loudly.", "Rain falls on the roof!", "The man's car passes."]
    references = [["a dog is barking"], ["rain falls on a tin roof"], ["a man's car drives by"]]
    with caplog.at_level(logging.WARNING, logger="aac_lightning.metrics.captioning"):
        scores = caption_metrics(candidates, references, metrics=["bleu_1", "cider_d", "meteor"], cache_dir=tmp_path)
    assert "PTB tokenizer unavailable (no Java here)" in caplog.text
    assert "meteor: no Java here" in caplog.text
    assert list(scores) == ["bleu_1", "cider_d"]
    expected, _ = aac_metrics.evaluate(
        [_python_tokenize(c) for c in candidates], [[_python_tokenize(r) for r in refs] for refs in references],
        preprocess=False, metrics=["bleu_1", "cider_d"],
    )
    assert scores["bleu_1"] == pytest.approx(float(expected["bleu_1"]))
    assert _python_tokenize("The man's dog, isn't it?") == "the man 's dog is n't it"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metric"):
        caption_metrics(["a", "b"], [["a"], ["b"]], metrics=["bleu_5"])
    with pytest.raises(ValueError, match="same length"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        caption_metrics(["a", "b"], [["a"], []])


# ---------------------------------------------------------------------------------------------
# Java and jar files


def _fake_java(tmp_path: Path, version_line: str) -> str:
    script = tmp_path / f"java_{abs(hash(version_line))}"
    script.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_java_version_parsing_and_range(tmp_path):
    java8 = _fake_java(tmp_path, 'openjdk version "1.8.0_292"')
    java17 = _fake_java(tmp_path, 'openjdk version "17.0.15" 2025-04-15')
    assert java_major_version(java8) == 8
    assert java_major_version(java17) == 17
    assert java_major_version(str(tmp_path / "does-not-exist")) is None
    assert find_java(java8) == (java8, "")
    path, reason = find_java(java17)
    assert path is None and "Java 17" in reason and "8-13" in reason


def test_prepare_java_resources_is_idempotent_and_keeps_existing_files(tmp_path, local_jars_only):
    pytest.importorskip("pycocoevalcap")
    cache = tmp_path / "cache"
    own_jar = cache / PTB_JAR
    own_jar.parent.mkdir(parents=True)
    own_jar.write_bytes(b"user's own jar")
    prepare_java_resources(cache)
    first = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    prepare_java_resources(cache)
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == first
    assert own_jar.read_bytes() == b"user's own jar"  # never overwritten
    assert (cache / "aac-metrics/meteor/meteor-1.5.jar").is_file()
    assert (cache / "aac-metrics/meteor/data/paraphrase-en.gz").is_file()
    assert (cache / SPICE_DIR / "cache").is_dir()
    problems = java_resource_problems(cache)
    assert set(problems) == {"spice"} and "stanford-corenlp-3.6.0-models.jar" in problems["spice"]
    assert set(java_resource_problems(tmp_path / "empty")) == {"ptb", "meteor", "spice"}


# ---------------------------------------------------------------------------------------------
# DCASE submission file


def test_dcase_csv_round_trips_awkward_names(tmp_path, clips):
    fnames = [c["file_name"] for c in clips[:8]] + ['a "quoted", name.wav', "plain.wav"]
    captions = [c["captions"][0] for c in clips[:8]] + ['a dog barks, "loudly"', "rain falls"]
    assert any("," in f for f in fnames) and any('"' in f for f in fnames)
    path = write_dcase_captioning_csv(tmp_path / "sub" / "task6a.csv", fnames, captions)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "file_name,caption_predicted"
    assert '"a ""quoted"", name.wav","a dog barks, ""loudly"""' in text.splitlines()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["file_name"] for r in rows] == fnames
    assert [r["caption_predicted"] for r in rows] == captions
    assert read_dcase_captioning_csv(path) == (fnames, captions)


def test_dcase_csv_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        write_dcase_captioning_csv(tmp_path / "a.csv", ["a.wav"], [])
    with pytest.raises(ValueError, match="unique"):
        write_dcase_captioning_csv(tmp_path / "a.csv", ["a.wav", "a.wav"], ["x", "y"])
    with pytest.raises(ValueError, match="line breaks"):
        write_dcase_captioning_csv(tmp_path / "a.csv", ["a.wav"], ["two\nlines"])
    with pytest.raises(FileNotFoundError, match="no submission file"):
        read_dcase_captioning_csv(tmp_path / "missing.csv")
