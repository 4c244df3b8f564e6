"""Caption metric sets by name (DCASE 2022/2023/2024), Vocab, and FENSE / SPIDEr-FL models found offline.

The FENSE models are stood in for by tiny random BERTs saved in the real layouts (a folder the user
names, and the Hugging Face cache): the test checks that they are found and wired into aac-metrics'
FENSE, and that FENSE = mean_i sbert_sim_i * (1 - 0.9 * error_i) holds with the checker forced to
say "error" or "no error" for every caption.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from aac_lightning.metrics.captioning import caption_metrics, evaluate_captions, unavailable_metrics
from aac_lightning.metrics.fense import ECHECKER, FETCH_COMMAND, SBERT_MODEL, find_fense_models
from aac_lightning.metrics.sets import (
    ALL_CAPTION_METRICS,
    CAPTION_METRIC_SETS,
    DCASE_RANKING_METRIC,
    resolve_caption_metrics,
)

WORDS = ["a", "dog", "barks", "cat", "meows", "loudly", "bird", "sings", "rain", "falls"]


# ---------------------------------------------------------------------------------------------
# names
def test_sets_follow_the_challenge_editions() -> None:
    assert resolve_caption_metrics("dcase2022") == (
        "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider"
    )
    assert resolve_caption_metrics("dcase2023") == ("meteor", "cider_d", "spice", "spider", "spider_fl")
    assert resolve_caption_metrics("dcase2024") == ("meteor", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab")
    assert resolve_caption_metrics("all") == ALL_CAPTION_METRICS
    # the package's default is unchanged: the 2022 metrics plus SPIDEr-FL and FENSE where they can run
    assert resolve_caption_metrics(None) == CAPTION_METRIC_SETS["dcase2022"] + ("spider_fl", "fense")
    assert DCASE_RANKING_METRIC["dcase2022"] == "spider"
    assert DCASE_RANKING_METRIC["dcase2023"] == "spider_fl"
    assert DCASE_RANKING_METRIC["dcase2024"] == "fense"
    for year, ranked_by in DCASE_RANKING_METRIC.items():
        assert ranked_by in CAPTION_METRIC_SETS[year]


def test_single_names_mixed_with_sets_in_the_tables_spelling() -> None:
    assert resolve_caption_metrics("Vocab") == ("vocab",)
    assert resolve_caption_metrics("SPIDEr-FL, CIDEr-D") == ("cider_d", "spider_fl")  # fixed order
    assert resolve_caption_metrics(["BLEU-4", "dcase2023", "meteor"]) == (
        "bleu_4", "meteor", "cider_d", "spice", "spider", "spider_fl"
    )


def test_unknown_names_are_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown metric\(s\) or set\(s\) \['dcase2019', 'bleu5'\].*dcase2024.*vocab"):
        resolve_caption_metrics("dcase2019,bleu5")
    with pytest.raises(ValueError, match="no metric named"):
        resolve_caption_metrics(" , ")
    with pytest.raises(ValueError, match="must be names"):
        resolve_caption_metrics([3])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Vocab and unavailable metrics
def test_vocab_counts_distinct_candidate_words() -> None:
    pytest.importorskip("aac_metrics")
    # distinct words over both candidates: a, dog, barks, cat, meows -> 5 (references do not count)
    scores = caption_metrics(
        ["a dog barks", "a cat meows a cat"], [["a dog is barking"], ["the cat purrs loudly"]],
        metrics="Vocab", preprocess=False,
    )
    assert scores == {"vocab": 5.0}


def test_dcase2024_lists_what_cannot_run_with_reason_and_fetch_command(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("aac_metrics")
    monkeypatch.setenv("FENSE_DATA", str(tmp_path / "fense_data"))  # no echecker there
    candidates, references = ["a dog barks", "rain falls"], [["a dog barks loudly"], ["rain falls on a roof"]]
    with caplog.at_level(logging.WARNING, logger="aac_lightning.metrics.captioning"):
        result = evaluate_captions(candidates, references, metrics="dcase2024", preprocess=False,
                                   cache_dir=tmp_path / "cache", fense_dir=tmp_path / "no_such_folder")
    assert {"cider_d", "vocab"} <= set(result.scores)
    # never a 0 for what did not run: left out of the scores, listed with the reason
    assert "fense" in result.unavailable and "spider_fl" in result.unavailable
    assert not set(result.scores) & set(result.unavailable)
    assert set(result.scores) | set(result.unavailable) == set(resolve_caption_metrics("dcase2024"))
    assert FETCH_COMMAND in result.unavailable["fense"] and "no_such_folder" in result.unavailable["fense"]
    assert "fense" in caplog.text
    # the caches (no --fense-models): the missing checkpoint is named
    reasons = unavailable_metrics(tmp_path / "cache")
    assert f"{ECHECKER}.ckpt" in reasons["fense"] and FETCH_COMMAND in reasons["fense"]


# ---------------------------------------------------------------------------------------------
# FENSE models from a folder and from the Hugging Face cache
def _tiny_bert(path: Path, seed: int) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=80)
    BertModel(config).save_pretrained(path)
    return path


def _fense_models(root: Path, *, error: bool) -> dict[str, Path]:
    """The three models in the layout `--fense-models` reads; the checker says `error` for every caption."""
    from aac_metrics.functional.fer import BERTFlatClassifier
    from sentence_transformers import SentenceTransformer, models

    encoder = _tiny_bert(root / "bert-base-uncased", seed=1)
    checker = BERTFlatClassifier(model_type=str(encoder), num_classes=6)
    with torch.no_grad():
        checker.clf.weight.zero_()
        checker.clf.bias.fill_(-10.0)
        checker.clf.bias[5] = 10.0 if error else -10.0  # class 5 is "error": sigmoid(+-10) vs threshold 0.9
    ckpt = root / f"{ECHECKER}.ckpt"
    torch.save({"model_type": "bert-base-uncased", "num_classes": 6, "state_dict": checker.state_dict()}, ckpt)
    word_model = models.Transformer(str(_tiny_bert(root / "sbert_src", seed=2)))
    sbert = SentenceTransformer(modules=[word_model, models.Pooling(word_model.get_word_embedding_dimension())])
    sbert_dir = root / SBERT_MODEL.split("/")[-1]
    sbert.save(str(sbert_dir))
    return {"ckpt": ckpt, "encoder": encoder, "sbert": sbert_dir}


def _expected_fense(sbert_dir: Path, candidates: list[str], references: list[list[str]], error: bool) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(sbert_dir), device="cpu")
    per_clip = []
    for cand, refs in zip(candidates, references):
        emb = model.encode([cand, *refs], convert_to_tensor=True, normalize_embeddings=True)  # (1 + R, D)
        sim = float((emb[1:] @ emb[0]).mean())  # mean cosine to the references
        per_clip.append(sim * (1.0 - 0.9 * (1.0 if error else 0.0)))
    return sum(per_clip) / len(per_clip)


CANDIDATES = ["a dog barks loudly", "rain falls", "a bird sings"]
REFERENCES = [["a dog barks", "a dog barks loudly"], ["rain falls"], ["a cat meows", "a bird sings loudly"]]


@pytest.mark.parametrize("error", [False, True])
def test_fense_runs_offline_from_a_named_folder(tmp_path, error) -> None:
    pytest.importorskip("aac_metrics")
    paths = _fense_models(tmp_path / "fense", error=error)
    found = find_fense_models(tmp_path / "fense")
    assert found.problems == {}
    assert (found.echecker_ckpt, found.encoder_dir, found.sbert_dir) == (paths["ckpt"], paths["encoder"], paths["sbert"])
    result = evaluate_captions(CANDIDATES, REFERENCES, metrics="fense,vocab", preprocess=False,
                               fense_dir=tmp_path / "fense", cache_dir=tmp_path / "cache")
    assert result.unavailable == {}
    expected = _expected_fense(paths["sbert"], CANDIDATES, REFERENCES, error)
    assert result.scores["fense"] == pytest.approx(expected, abs=1e-5)
    assert result.scores["vocab"] == 8.0  # a, dog, barks, loudly, rain, falls, bird, sings


def test_fense_models_in_the_hugging_face_cache(tmp_path, monkeypatch) -> None:
    pytest.importorskip("aac_metrics")
    import huggingface_hub.constants as hf_constants

    paths = _fense_models(tmp_path / "made", error=False)
    hub = tmp_path / "hub"
    for repo_id, folder in ((SBERT_MODEL, paths["sbert"]), ("bert-base-uncased", paths["encoder"])):
        repo = hub / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
        (repo / "snapshots").mkdir()
        folder.rename(repo / "snapshots" / "abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("FENSE_DATA", str(paths["ckpt"].parent))
    found = find_fense_models()
    assert found.problems == {}
    assert found.sbert_dir == hub / "models--sentence-transformers--paraphrase-TinyBERT-L6-v2" / "snapshots" / "abc123"
    scores = caption_metrics(CANDIDATES, REFERENCES, metrics=["FENSE"], preprocess=False, cache_dir=tmp_path / "cache")
    sbert_dir = found.sbert_dir
    assert scores["fense"] == pytest.approx(_expected_fense(sbert_dir, CANDIDATES, REFERENCES, False), abs=1e-5)
    # the encoder missing from the cache: FENSE unavailable, the encoder named
    (hub / "models--bert-base-uncased" / "snapshots" / "abc123" / "config.json").unlink()
    reasons = unavailable_metrics(tmp_path / "cache")
    assert "bert-base-uncased" in reasons["fense"] and FETCH_COMMAND in reasons["fense"]


def test_captioning_stages_take_the_metric_sets_as_a_constructor_argument() -> None:
    from aac_lightning.modules import CaptioningSCST, CaptioningXE

    module = CaptioningXE(vocab_size=12, input_dim=8, test_metrics="dcase2024")
    assert module.hparams.test_metrics == "dcase2024" and module.hparams.fense_dir is None
    assert CaptioningXE(vocab_size=12, input_dim=8).hparams.test_metrics == "default"  # the recipe's numbers unchanged
    with pytest.raises(ValueError, match=r"unknown metric\(s\) or set\(s\) \['dcase2019'\]"):
        CaptioningXE(vocab_size=12, input_dim=8, test_metrics="dcase2019")
    import inspect

    assert inspect.signature(CaptioningSCST.__init__).parameters["test_metrics"].default == "default"
