"""Tests of the captioning modules: encoder, decoders, incremental decoding, scheduled sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aac_lightning.nn.captioning import (
    BiGRUEncoder,
    CaptionModel,
    DecodingState,
    GRUAttentionDecoder,
    TransformerCaptionDecoder,
    TransformerDecoderBlock,
    build_caption_model,
    lengths_to_mask,
    sinusoidal_positional_encoding,
)

BOS, EOS, PAD = 1, 2, 0
VOCAB = 23
INPUT_DIM = 12


def tiny_model(decoder: str, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    if decoder == "transformer":
        kwargs = dict(d_model=32, nhead=4, dim_feedforward=48, num_layers=2, max_length=40)
    else:
        kwargs = dict(hidden_size=24, embed_dim=16, attention_dim=20)
    return build_caption_model(decoder, VOCAB, INPUT_DIM, encoder_hidden_size=16, encoder_num_layers=2, **kwargs)


def random_batch(batch_size: int = 4, frames: int = 9, length: int = 7, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, frames, INPUT_DIM, generator=generator)
    lengths = torch.randint(1, frames + 1, (batch_size,), generator=generator)
    lengths[0] = frames
    tokens = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    tokens[:, 0] = BOS
    return features, lengths, tokens


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Parameter counts (report, Table 1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoder", "kwargs", "hand_count", "report_millions"),
    [
        # The authors' decoder: the memory projection ends with a LayerNorm (2 * 256 parameters).
        ("transformer", {"num_layers": 2}, 10_386_448 + 512, 10.4),
        ("transformer", {"num_layers": 4}, 12_493_328 + 512, 12.5),
        # The package's earlier decoder: a single Linear memory projection.
        ("transformer", {"num_layers": 2, "memory_projection": "linear"}, 10_386_448, 10.4),
        ("transformer", {"num_layers": 4, "memory_projection": "linear"}, 12_493_328, 12.5),
        ("gru_attention", {}, 14_584_080, 14.6),
    ],
)
def test_parameter_counts_match_report_table1(decoder, kwargs, hand_count, report_millions):
    model = build_caption_model(decoder, vocab_size=4368, input_dim=2048, **kwargs)
    total = count(model)
    # Encoder by hand: 2 directions * 3 gates * 256 * (in + 256 + 2 biases), in = 2048 then 512.
    assert count(model.encoder) == 2 * 3 * 256 * (2048 + 256 + 2) + 2 * 2 * 3 * 256 * (512 + 256 + 2)
    assert total == hand_count
    assert round(total / 1e6, 1) == report_millions


def test_transformer_layer_parameter_count_by_hand():
    d, f = 256, 1024
    block = TransformerDecoderBlock(d, 4, f, 0.1)
    assert count(block) == 2 * 4 * (d * d + d) + (d * f + f) + (f * d + d) + 3 * 2 * d == 1_053_440


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


def test_bigru_encoder_ignores_padding_and_averages_valid_frames():
    torch.manual_seed(0)
    encoder = BiGRUEncoder(INPUT_DIM, hidden_size=8, num_layers=3, dropout=0.0).eval()
    features, lengths, _ = random_batch(batch_size=3, frames=10)
    lengths = torch.tensor([10, 4, 7])
    memory, out_lengths, clip_vector = encoder(features, lengths)
    assert memory.shape == (3, 10, 16) and clip_vector.shape == (3, 16)
    assert torch.equal(out_lengths, lengths)
    for row, length in enumerate(lengths.tolist()):
        # Second implementation: the unpacked GRU on the clip's valid frames only.
        alone, _ = encoder.gru(features[row : row + 1, :length])
        torch.testing.assert_close(memory[row, :length], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.all(memory[row, length:] == 0)
        torch.testing.assert_close(clip_vector[row], alone[0].mean(dim=0), atol=1e-5, rtol=1e-5)
    # Garbage in the padding changes nothing.
    noisy = features.clone()
    noisy[1, 4:] = 1e3
    torch.testing.assert_close(encoder(noisy, lengths).memory, memory)


def test_bigru_encoder_rejects_bad_input():
    encoder = BiGRUEncoder(INPUT_DIM, hidden_size=8)
    features = torch.randn(2, 5, INPUT_DIM)
    with pytest.raises(ValueError, match="dimension"):
        encoder(torch.randn(2, 5, INPUT_DIM + 1), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="feature_lengths"):
        encoder(features, torch.tensor([6, 5]))
    with pytest.raises(ValueError, match="feature_lengths"):
        encoder(features, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="entries"):
        encoder(features, torch.tensor([5]))
    with pytest.raises(ValueError, match="features"):
        encoder(torch.randn(5, INPUT_DIM), torch.tensor([5]))


# --------------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------------


def test_sinusoidal_positional_encoding_hand_values():
    table = sinusoidal_positional_encoding(5, 6)
    assert table.shape == (5, 6)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert table[3, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert table[3, 1].item() == pytest.approx(math.cos(3.0), abs=1e-6)
    assert table[3, 2].item() == pytest.approx(math.sin(3.0 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[4, 5].item() == pytest.approx(math.cos(4.0 / 10000 ** (4 / 6)), abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positional_encoding(5, 7)


def test_decoder_block_equals_torch_transformer_decoder_layer():
    torch.manual_seed(0)
    d, heads, ff = 16, 4, 24
    block = TransformerDecoderBlock(d, heads, ff, dropout=0.1).eval()
    reference = nn.TransformerDecoderLayer(d, heads, ff, dropout=0.1, batch_first=True).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(block.self_qkv.weight)
        reference.self_attn.in_proj_bias.copy_(block.self_qkv.bias)
        reference.self_attn.out_proj.weight.copy_(block.self_out.weight)
        reference.self_attn.out_proj.bias.copy_(block.self_out.bias)
        reference.multihead_attn.in_proj_weight.copy_(
            torch.cat([block.cross_query.weight, block.cross_key_value.weight])
        )
        reference.multihead_attn.in_proj_bias.copy_(torch.cat([block.cross_query.bias, block.cross_key_value.bias]))
        reference.multihead_attn.out_proj.weight.copy_(block.cross_out.weight)
        reference.multihead_attn.out_proj.bias.copy_(block.cross_out.bias)
        reference.linear1.weight.copy_(block.feedforward_in.weight)
        reference.linear1.bias.copy_(block.feedforward_in.bias)
        reference.linear2.weight.copy_(block.feedforward_out.weight)
        reference.linear2.bias.copy_(block.feedforward_out.bias)
        for mine, theirs in [
            (block.norm_self, reference.norm1),
            (block.norm_cross, reference.norm2),
            (block.norm_feedforward, reference.norm3),
        ]:
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    x = torch.randn(3, 6, d)
    memory = torch.randn(3, 5, d)
    memory_lengths = torch.tensor([5, 2, 4])
    memory_mask = lengths_to_mask(memory_lengths, 5)
    keys, values = block.project_memory(memory)
    mine, _, _ = block(x, keys, values, memory_mask)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    theirs = reference(x, memory, tgt_mask=causal, memory_key_padding_mask=~memory_mask)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Incremental decoding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_step_with_and_without_cache_equals_teacher_forcing(decoder):
    model = tiny_model(decoder).eval()
    features, lengths, tokens = random_batch()
    with torch.no_grad():
        parallel = torch.log_softmax(model(features, lengths, tokens), dim=-1)  # (B, L, V)
        initial = model.encode(features, lengths)
        state = initial
        for position in range(tokens.shape[1]):
            cached, state = model.step(state, tokens[:, : position + 1])
            assert state.num_tokens == position + 1
            uncached, _ = model.step(initial, tokens[:, : position + 1])
            torch.testing.assert_close(cached, parallel[:, position], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(uncached, parallel[:, position], atol=1e-5, rtol=1e-5)
        # A cache covering part of a prefix: the remaining tokens are processed together.
        _, half = model.step(initial, tokens[:, :3])
        rest, _ = model.step(half, tokens)
        torch.testing.assert_close(rest, parallel[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_decoding_is_independent_of_batch_padding(decoder):
    model = tiny_model(decoder).eval()
    features, lengths, tokens = random_batch(batch_size=3, frames=8)
    lengths = torch.tensor([8, 3, 5])
    with torch.no_grad():
        batched = model(features, lengths, tokens)
        for row, length in enumerate(lengths.tolist()):
            alone = model(features[row : row + 1, :length], lengths[row : row + 1], tokens[row : row + 1])
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_gru_attention_gives_no_weight_to_padded_frames():
    model = tiny_model("gru_attention").eval()
    features, _, _ = random_batch(batch_size=2, frames=6)
    state = model.encode(features, torch.tensor([6, 2]))
    hidden = torch.randn(2, model.decoder.hidden_size)
    weights = model.decoder.attend(hidden, state.clip)  # (2, 6)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert torch.all(weights[1, 2:] == 0) and torch.all(weights[1, :2] > 0)


def test_step_rejects_a_prefix_already_covered_by_the_cache():
    model = tiny_model("transformer").eval()
    features, lengths, tokens = random_batch()
    _, state = model.step(model.encode(features, lengths), tokens[:, :3])
    with pytest.raises(ValueError, match="already covers 3"):
        model.step(state, tokens[:, :3])
    with pytest.raises(ValueError, match="max_length"):
        model(features, lengths, torch.ones(4, 41, dtype=torch.long))


def test_decoding_state_row_operations():
    state = DecodingState(
        clip={"memory": torch.arange(3.0).view(3, 1)}, cache={"hidden": torch.arange(3.0).view(3, 1) * 10}, num_tokens=2
    )
    repeated = state.repeat_interleave(2)
    assert repeated.batch_size == 6 and repeated.num_tokens == 2
    assert repeated.clip["memory"].flatten().tolist() == [0, 0, 1, 1, 2, 2]
    assert repeated.cache["hidden"].flatten().tolist() == [0, 0, 10, 10, 20, 20]
    selected = state.index_select(torch.tensor([2, 0]))
    assert selected.clip["memory"].flatten().tolist() == [2, 0]
    assert selected.cache["hidden"].flatten().tolist() == [20, 0]
    reordered = state.reorder_cache(torch.tensor([1, 1, 0]))
    assert reordered.clip["memory"] is state.clip["memory"]
    assert reordered.cache["hidden"].flatten().tolist() == [10, 10, 0]
    assert state.without_cache().cache == {} and state.without_cache().num_tokens == 0
    with pytest.raises(ValueError, match="repeats"):
        state.repeat_interleave(0)


# --------------------------------------------------------------------------------------------------
# Scheduled sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_scheduled_sampling_with_ratio_one_equals_teacher_forcing(decoder):
    model = tiny_model(decoder).eval()
    features, lengths, tokens = random_batch()
    with torch.no_grad():
        teacher_forced = model(features, lengths, tokens, teacher_forcing_ratio=1.0)
        stepwise = model.scheduled_sampling_forward(features, lengths, tokens, teacher_forcing_ratio=1.0)
    torch.testing.assert_close(stepwise, teacher_forced, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_scheduled_sampling_with_ratio_zero_feeds_back_the_argmax(decoder):
    model = tiny_model(decoder).eval()
    features, lengths, tokens = random_batch()
    with torch.no_grad():
        free_running = model(features, lengths, tokens, teacher_forcing_ratio=0.0)
        # The inputs it must have used: bos, then the argmax of each previous step.
        fed = torch.cat([tokens[:, :1], free_running[:, :-1].argmax(dim=-1)], dim=1)
        assert not torch.equal(fed, tokens)
        torch.testing.assert_close(free_running, model(features, lengths, fed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_scheduled_sampling_mixes_truth_and_predictions_per_row_and_step(decoder):
    model = tiny_model(decoder).eval()
    model.scheduled_sampling = "row"  # the package's earlier scheme (the authors' is tested elsewhere)
    features, lengths, tokens = random_batch(batch_size=6, length=9)
    ratio = 0.5
    with torch.no_grad():
        mixed = model(features, lengths, tokens, ratio, generator=torch.Generator().manual_seed(3))
        again = model(features, lengths, tokens, ratio, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(mixed, again)
        # Replay the draws: one uniform number per row and step after the first.
        replay = torch.Generator().manual_seed(3)
        use_truth = torch.stack([torch.rand(6, generator=replay) < ratio for _ in range(8)], dim=1)  # (B, L-1)
        assert use_truth.any() and not use_truth.all()
        fed = torch.where(use_truth, tokens[:, 1:], mixed[:, :-1].argmax(dim=-1))
        fed = torch.cat([tokens[:, :1], fed], dim=1)
        torch.testing.assert_close(mixed, model(features, lengths, fed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_scheduled_sampling_trains_encoder_and_decoder(decoder):
    model = tiny_model(decoder).train()
    features, lengths, tokens = random_batch()
    logits = model(features, lengths, tokens, teacher_forcing_ratio=0.7)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert model.encoder.gru.weight_ih_l0.grad.abs().sum() > 0
    assert model.decoder.word_embedding.weight.grad.abs().sum() > 0
    assert model.decoder.classifier.weight.grad.abs().sum() > 0


def test_forward_rejects_bad_arguments():
    model = tiny_model("transformer")
    features, lengths, tokens = random_batch()
    with pytest.raises(ValueError, match="teacher_forcing_ratio"):
        model(features, lengths, tokens, teacher_forcing_ratio=1.5)
    with pytest.raises(ValueError, match="tokens"):
        model(features, lengths, tokens[:2])
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_caption_model("lstm", VOCAB, INPUT_DIM)
    with pytest.raises(ValueError, match="memory_dim"):
        build_caption_model("transformer", VOCAB, INPUT_DIM, memory_dim=100)
    with pytest.raises(ValueError, match="divisible"):
        TransformerCaptionDecoder(VOCAB, d_model=30, nhead=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GRUAttentionDecoder(0)
