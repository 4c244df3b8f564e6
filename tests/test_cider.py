"""CIDEr-D: equality with aac-metrics and pycocoevalcap, hand-computed corpus mode, input errors."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from aac_lightning.metrics.cider import CiderD, CiderDocumentFrequency, cider_d

FIXTURE = Path(__file__).parent / "data" / "real_format_captions.json"


def _normalise(caption: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", caption.lower()).split())


@pytest.fixture(scope="module")
def clips() -> list[list[str]]:
    data = json.loads(FIXTURE.read_text())
    return [[_normalise(c) for c in clip["captions"]] for clip in data["clips"]]


def _varied_batch(clips: list[list[str]], seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Candidates covering the edge cases, each with a reference set of 1 to 5 captions."""
    rng = random.Random(seed)
    vocabulary = sorted({w for refs in clips for c in refs for w in c.split()})
    candidates, references = [], []
    for i, refs in enumerate(clips):
        refs = refs[: 1 + i % 5]  # different numbers of references per clip
        source = rng.choice(refs).split()
        kind = i % 8
        if kind == 0:
            cand = ""  # empty candidate
        elif kind == 1:
            cand = " ".join(source[:2])  # shorter than n
        elif kind == 2:
            cand = " ".join([source[0]] * 6)  # repeated words
        elif kind == 3:
            cand = rng.choice(refs)  # identical to a reference
        elif kind == 4:
            cand = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 15)))  # unrelated
        elif kind == 5:
            cand = source[0] + " zzunseen " + " ".join(source[1:])  # word never in any reference
        else:
            cand = " ".join(w for w in source if rng.random() > 0.2)  # a plausible sample
        candidates.append(cand)
        references.append(refs)
    return candidates, references


def test_equals_aac_metrics_on_every_candidate(clips):
    aac = pytest.importorskip("aac_metrics.functional")
    candidates, references = _varied_batch(clips)
    expected_corpus, expected = aac.cider_d(candidates, references)
    corpus, scores = cider_d(candidates, references)
    assert scores.dtype == torch.float64 and scores.shape == (len(candidates),)
    np.testing.assert_allclose(scores.numpy(), expected["cider_d"].numpy(), rtol=0, atol=1e-6)
    assert corpus == pytest.approx(float(expected_corpus["cider_d"]), abs=1e-6)
    # the cases really are varied: zeros (empty), high scores (identical), and everything between
    assert scores[0] == 0.0 and scores[3] > 1.0 and len(set(scores.tolist())) > 50


def test_equals_pycocoevalcap_on_every_candidate(clips):
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    candidates, references = _varied_batch(clips, seed=1)
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    expected_corpus, expected = cider_module.Cider().compute_score(gts, res)
    corpus, scores = cider_d(candidates, references)
    np.testing.assert_allclose(scores.numpy(), np.asarray(expected), rtol=0, atol=1e-6)
    assert corpus == pytest.approx(expected_corpus, abs=1e-6)


@pytest.mark.parametrize("n,sigma,scale", [(1, 6.0, 10.0), (2, 3.0, 1.0), (3, 6.0, 10.0), (5, 10.0, 10.0)])
def test_equals_aac_metrics_other_settings(clips, n, sigma, scale):
    aac = pytest.importorskip("aac_metrics.functional")
    candidates, references = _varied_batch(clips[:40], seed=n)
    _, expected = aac.cider_d(candidates, references, n=n, sigma=sigma, scale=scale)
    _, scores = cider_d(candidates, references, n=n, sigma=sigma, scale=scale)
    np.testing.assert_allclose(scores.numpy(), expected["cider_d"].numpy(), rtol=0, atol=1e-6)


def test_scst_batch_with_repeated_reference_sets_equals_aac_metrics(clips):
    """Repeated reference sets count once per candidate in the document frequencies."""
    aac = pytest.importorskip("aac_metrics.functional")
    rng = random.Random(3)
    candidates, references = [], []
    for refs in clips[:16]:
        for _ in range(5):
            words = rng.choice(refs).split()
            candidates.append(" ".join(w for w in words if rng.random() > 0.3))
            references.append(refs)  # the same list object, as an SCST batch has it
    _, expected = aac.cider_d(candidates, references)
    _, scores = cider_d(candidates, references)
    np.testing.assert_allclose(scores.numpy(), expected["cider_d"].numpy(), rtol=0, atol=1e-6)
    # equal content in distinct list objects is the same reference set
    _, copies = cider_d(candidates, [list(r) for r in references])
    np.testing.assert_array_equal(copies.numpy(), scores.numpy())


def test_duplicate_reference_inside_a_set_equals_aac_metrics():
    aac = pytest.importorskip("aac_metrics.functional")
    candidates = ["a dog barks loudly", "rain falls on a roof", "a car passes"]
    references = [
        ["a dog barks", "a dog barks", "the dog is barking loudly"],
        ["rain falls on a tin roof", "heavy rain"],
        ["a car passes by quickly"],
    ]
    _, expected = aac.cider_d(candidates, references)
    _, scores = cider_d(candidates, references)
    np.testing.assert_allclose(scores.numpy(), expected["cider_d"].numpy(), rtol=0, atol=1e-6)


def test_corpus_mode_hand_computed():
    """Two training documents: 'a b' and 'a c'. N = 2, idf(x) = log 2 - log max(1, df(x))."""
    df = CiderDocumentFrequency.from_references([["a b"], ["a c"]], n=2)
    assert df.num_documents == 2 and df.log_num_documents == pytest.approx(math.log(2))
    sigma = 6.0
    # 'b b a' vs 'a b': unigrams a (idf 0), b: cand 2 log2, ref log2 -> clipped dot log2^2,
    # norms 2 log2 and log2 -> cosine 1/2. Bigrams 'b b', 'b a' vs 'a b': no overlap -> 0.
    # Lengths in bigrams 2 vs 1 -> penalty exp(-1 / (2 sigma^2)).
    expected_1 = 10.0 * math.exp(-1.0 / (2 * sigma**2)) * (0.5 + 0.0) / 2
    # 'a b' vs ['a b', 'c']: identical reference -> cosines 1, 1; 'c' shares nothing -> 0.
    expected_2 = 10.0 * (1.0 + 0.0) / 2
    # 'd' (never seen: idf log 2) vs 'd': unigram cosine 1, no bigrams; lengths 0 and 0.
    expected_3 = 10.0 * (1.0 + 0.0) / 2
    corpus, scores = cider_d(
        ["b b a", "a b", "d"], [["a b"], ["a b", "c"], ["d"]], n=2, sigma=sigma, document_frequency=df
    )
    np.testing.assert_allclose(scores.numpy(), [expected_1, expected_2, expected_3], rtol=0, atol=1e-12)
    assert corpus == pytest.approx((expected_1 + expected_2 + expected_3) / 3)
    # one candidate is fine with fixed document frequencies
    _, single = cider_d(["b b a"], [["a b"]], n=2, document_frequency=df)
    assert single.tolist() == pytest.approx([expected_1])


def test_corpus_mode_with_own_references_equals_default(clips):
    candidates, references = _varied_batch(clips, seed=5)
    df = CiderDocumentFrequency.from_references(references)
    _, default = cider_d(candidates, references)
    _, corpus = cider_d(candidates, references, document_frequency=df)
    np.testing.assert_allclose(corpus.numpy(), default.numpy(), rtol=0, atol=1e-12)


def test_corpus_mode_other_corpus_differs_and_scorer_matches_function(clips, tmp_path):
    candidates, references = _varied_batch(clips[:50], seed=6)
    df = CiderDocumentFrequency.from_references(clips[50:])
    _, default = cider_d(candidates, references)
    _, corpus = cider_d(candidates, references, document_frequency=df)
    assert not np.allclose(corpus.numpy(), default.numpy())  # the idf really comes from the corpus
    scorer = CiderD(document_frequency=df)
    np.testing.assert_array_equal(scorer(candidates, references)[1].numpy(), corpus.numpy())
    path = tmp_path / "df.npz"
    df.save(str(path))
    reloaded = CiderDocumentFrequency.load(str(path))
    np.testing.assert_array_equal(cider_d(candidates, references, document_frequency=reloaded)[1].numpy(),
                                  corpus.numpy())


def test_document_frequency_counts_each_clip_once():
    df = CiderDocumentFrequency.from_references([["a b", "a a"], ["b c"], ["a"]], n=2)
    index = {w: i for i, w in enumerate(df.words)}
    assert df.frequencies[0][index["a"]] == 2  # in clips 0 and 2, twice in clip 0
    assert df.frequencies[0][index["b"]] == 2
    assert df.frequencies[0][index["c"]] == 1
    assert sorted(df.frequencies[1].tolist()) == [1.0, 1.0, 1.0]  # 'a b', 'a a', 'b c'


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same length"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        cider_d(["a"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="list of lists"):
        cider_d(["a", "b"], "a b")
    with pytest.raises(ValueError, match="candidates must contain str"):
        cider_d(["a", 3], [["a"], ["b"]])
    with pytest.raises(ValueError, match="n must be"):
        cider_d(["a", "b"], [["a"], ["b"]], n=0)
    df = CiderDocumentFrequency.from_references([["a b"]], n=2)
    with pytest.raises(ValueError, match="n=2"):
        cider_d(["a", "b"], [["a"], ["b"]], n=4, document_frequency=df)


def test_all_empty_sentences_score_zero_in_both_modes():
    # (aac-metrics itself fails on this input: it takes the max of no document frequencies)
    corpus, scores = cider_d(["", ""], [[""], ["", ""]])
    assert corpus == 0.0 and scores.tolist() == [0.0, 0.0]
    empty_df = CiderDocumentFrequency.from_references([[""], [""]])
    # 'a b' vs 'a b', nothing in the corpus: 1- and 2-gram cosines 1, no 3- or 4-grams -> 10 * 2 / 4
    assert cider_d(["", "a b"], [[""], ["a b"]], document_frequency=empty_df)[1].tolist() == [0.0, 5.0]
