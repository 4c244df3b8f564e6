"""The captioner's SJTU-fidelity options (issue 11): each checked against an independent truth.

The truths: PyTorch's own ``nn.TransformerDecoder`` / ``nn.GRU`` wired the way the authors' released
decoders are (github.com/wsntxxn/AudioCaption, ``captioning/models/decoder.py``), the authors'
scheduled-sampling loop re-implemented step by step without any cache, and the distributions that
the authors' initialisers draw from (bounds computed with PyTorch's own fan-in / fan-out rule).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from aac_lightning.nn.captioning import (
    BiGRUEncoder,
    CaptionModel,
    GRUAttentionDecoder,
    TransformerCaptionDecoder,
    build_caption_model,
    lengths_to_mask,
)
from tests.test_captioning_nn import random_batch

BOS = 1
VOCAB = 23
INPUT_DIM = 12

# The package's model before the fidelity options: what an old checkpoint needs.
LEGACY_COMMON = dict(encoder_dropout=0.2, encoder_input_dropout=0.0, scheduled_sampling="row")
LEGACY_DECODER = {
    "transformer": dict(
        memory_projection="linear",
        scale_embedding=False,
        double_embedding_dropout=False,
        positional_encoding="sinusoidal",
        weight_init="pytorch",
    ),
    "gru_attention": dict(output_dropout=None, weight_init="pytorch"),
}
TINY = {
    "transformer": dict(d_model=32, nhead=4, dim_feedforward=48, num_layers=2, max_length=40),
    "gru_attention": dict(hidden_size=24, embed_dim=16, attention_dim=20),
}


def tiny_model(decoder: str, seed: int = 0, legacy: bool = False, **overrides) -> CaptionModel:
    torch.manual_seed(seed)
    kwargs = dict(TINY[decoder], encoder_hidden_size=16, encoder_num_layers=2)
    if legacy:
        kwargs.update(LEGACY_COMMON, **LEGACY_DECODER[decoder])
    kwargs.update(overrides)
    return build_caption_model(decoder, VOCAB, INPUT_DIM, **kwargs)


def random_memory(batch_size: int = 3, frames: int = 8, dim: int = 32, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch_size, frames, dim, generator=generator)
    lengths = torch.tensor([frames, 3, 5][:batch_size])
    mask = lengths_to_mask(lengths, frames)
    memory = memory * mask.unsqueeze(-1)  # zeros after each length, like the encoder's memory
    clip_vector = memory.sum(1) / lengths.unsqueeze(1)
    return memory, mask, clip_vector


# --------------------------------------------------------------------------------------------------
# Encoder: dropout between GRU layers (0.5) and on the input features (0.2, training only)
# --------------------------------------------------------------------------------------------------


def test_encoder_defaults_are_the_authors():
    encoder = BiGRUEncoder(INPUT_DIM)
    assert encoder.gru.dropout == 0.5 and encoder.gru.num_layers == 3 and encoder.hidden_size == 256
    assert encoder.input_dropout.p == 0.2
    model = build_caption_model("transformer", VOCAB, INPUT_DIM)
    assert model.encoder.gru.dropout == 0.5 and model.encoder.input_dropout.p == 0.2
    # No parameters: the option leaves the state dict as it was.
    assert set(BiGRUEncoder(INPUT_DIM, input_dropout=0.0).state_dict()) == set(encoder.state_dict())
    with pytest.raises(ValueError, match="input_dropout"):
        BiGRUEncoder(INPUT_DIM, input_dropout=1.0)


def test_encoder_input_dropout_acts_on_the_features_in_training_only():
    torch.manual_seed(0)
    encoder = BiGRUEncoder(INPUT_DIM, hidden_size=8, num_layers=2, dropout=0.0, input_dropout=0.5)
    features, lengths, _ = random_batch(batch_size=3, frames=10)
    lengths = torch.tensor([10, 4, 7])
    encoder.eval()
    with torch.no_grad():
        clean = encoder(features, lengths).memory
        for row, length in enumerate(lengths.tolist()):  # eval: the GRU on the raw valid frames
            alone, _ = encoder.gru(features[row : row + 1, :length])
            torch.testing.assert_close(clean[row, :length], alone[0], atol=1e-5, rtol=1e-5)
        encoder.train()
        torch.manual_seed(7)
        noisy = encoder(features, lengths).memory
        torch.manual_seed(7)
        dropped = nn.functional.dropout(features, p=0.5, training=True)  # the same draw, done by hand
    assert (dropped == 0).float().mean() > 0.3
    assert not torch.allclose(noisy, clean)
    for row, length in enumerate(lengths.tolist()):
        alone, _ = encoder.gru(dropped[row : row + 1, :length])
        torch.testing.assert_close(noisy[row, :length], alone[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Transformer decoder: the authors' structure, built from PyTorch's own modules
# --------------------------------------------------------------------------------------------------


class AuthorsStyleTransformer(nn.Module):
    """The SJTU ``TransformerDecoder`` forward, from torch modules (eval-mode reference)."""

    def __init__(self, vocab: int, d: int, heads: int, ff: int, layers: int, memory_dim: int, table: Tensor):
        super().__init__()
        self.d = d
        self.embedding = nn.Embedding(vocab, d)
        self.register_buffer("table", table.clone())
        self.attn_proj = nn.Sequential(nn.Linear(memory_dim, d), nn.ReLU(), nn.Dropout(0.1), nn.LayerNorm(d))
        layer = nn.TransformerDecoderLayer(d, heads, ff, dropout=0.1, batch_first=True)  # post-norm, ReLU
        self.model = nn.TransformerDecoder(layer, layers)
        self.classifier = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        x = self.embedding(tokens) * math.sqrt(self.d) + self.table[: tokens.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        out = self.model(x, self.attn_proj(memory), tgt_mask=causal, memory_key_padding_mask=~memory_mask)
        return self.classifier(out)


def copy_into_reference(mine: TransformerCaptionDecoder, ref: AuthorsStyleTransformer) -> None:
    with torch.no_grad():
        ref.embedding.weight.copy_(mine.word_embedding.weight)
        ref.attn_proj[0].weight.copy_(mine.memory_projection.weight)
        ref.attn_proj[0].bias.copy_(mine.memory_projection.bias)
        ref.attn_proj[3].weight.copy_(mine.memory_norm.weight)
        ref.attn_proj[3].bias.copy_(mine.memory_norm.bias)
        ref.classifier.weight.copy_(mine.classifier.weight)
        ref.classifier.bias.copy_(mine.classifier.bias)
        for block, theirs in zip(mine.layers, ref.model.layers):
            theirs.self_attn.in_proj_weight.copy_(block.self_qkv.weight)
            theirs.self_attn.in_proj_bias.copy_(block.self_qkv.bias)
            theirs.self_attn.out_proj.weight.copy_(block.self_out.weight)
            theirs.self_attn.out_proj.bias.copy_(block.self_out.bias)
            theirs.multihead_attn.in_proj_weight.copy_(torch.cat([block.cross_query.weight, block.cross_key_value.weight]))
            theirs.multihead_attn.in_proj_bias.copy_(torch.cat([block.cross_query.bias, block.cross_key_value.bias]))
            theirs.multihead_attn.out_proj.weight.copy_(block.cross_out.weight)
            theirs.multihead_attn.out_proj.bias.copy_(block.cross_out.bias)
            theirs.linear1.weight.copy_(block.feedforward_in.weight)
            theirs.linear1.bias.copy_(block.feedforward_in.bias)
            theirs.linear2.weight.copy_(block.feedforward_out.weight)
            theirs.linear2.bias.copy_(block.feedforward_out.bias)
            for a, b in [(block.norm_self, theirs.norm1), (block.norm_cross, theirs.norm2), (block.norm_feedforward, theirs.norm3)]:
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)


def test_transformer_defaults_compute_the_authors_decoder():
    torch.manual_seed(0)
    decoder = TransformerCaptionDecoder(VOCAB, d_model=32, num_layers=2, nhead=4, dim_feedforward=48, memory_dim=20).eval()
    with torch.no_grad():  # LayerNorm parameters away from (1, 0), so that copying them matters
        decoder.memory_norm.weight.uniform_(0.5, 1.5)
        decoder.memory_norm.bias.uniform_(-0.5, 0.5)
    reference = AuthorsStyleTransformer(VOCAB, 32, 4, 48, 2, 20, decoder.positional_encoding).eval()
    copy_into_reference(decoder, reference)
    memory, mask, clip_vector = random_memory(dim=20)
    tokens = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mine, _ = decoder.forward_tokens(decoder.init_state(memory, mask, clip_vector), tokens)
        theirs = reference(tokens, memory, mask)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_transformer_random_positions_follow_the_authors_xavier_overwrite():
    d, max_length = 64, 100
    torch.manual_seed(0)
    decoder = TransformerCaptionDecoder(VOCAB, d_model=d, memory_dim=16, max_length=max_length)
    table = decoder.positional_encoding
    # The authors' table is a (max_len, 1, d_model) parameter that xavier_uniform_ overwrites.
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(max_length, 1, d))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert table.shape == (max_length, d)
    assert table.abs().max() <= bound and table.abs().max() > 0.95 * bound
    assert table.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # Saved with the weights, never trained.
    assert "positional_encoding" in decoder.state_dict()
    assert all(p is not table for p in decoder.parameters())
    other = TransformerCaptionDecoder(VOCAB, d_model=d, memory_dim=16, max_length=max_length)
    assert not torch.equal(other.positional_encoding, table)
    other.load_state_dict(decoder.state_dict())
    assert torch.equal(other.positional_encoding, table)
    # The old sinusoidal table stays out of the state dict, as before.
    sinusoidal = TransformerCaptionDecoder(VOCAB, d_model=d, memory_dim=16, positional_encoding="sinusoidal")
    assert "positional_encoding" not in sinusoidal.state_dict()
    assert sinusoidal.positional_encoding[0, 1].item() == 1.0  # cos(0)


def test_transformer_xavier_init_matches_the_authors_distributions():
    vocab, d, ff, memory_dim = 700, 64, 256, 96
    torch.manual_seed(0)
    decoder = TransformerCaptionDecoder(vocab, d_model=d, dim_feedforward=ff, memory_dim=memory_dim)

    def check_uniform(weight: Tensor, fan_in: int, fan_out: int) -> None:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max() <= bound + 1e-7 and weight.abs().max() > 0.9 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)

    check_uniform(decoder.word_embedding.weight, d, vocab)  # the embedding too: a 2-d parameter
    check_uniform(decoder.classifier.weight, d, vocab)
    check_uniform(decoder.memory_projection.weight, memory_dim, d)
    for block in decoder.layers:
        check_uniform(block.self_qkv.weight, d, 3 * d)  # nn.MultiheadAttention's in_proj_weight
        check_uniform(torch.cat([block.cross_query.weight, block.cross_key_value.weight]), d, 3 * d)
        check_uniform(block.self_out.weight, d, d)
        check_uniform(block.feedforward_in.weight, d, ff)
        check_uniform(block.feedforward_out.weight, ff, d)
        for linear in (block.self_qkv, block.self_out, block.cross_query, block.cross_key_value, block.cross_out):
            assert torch.all(linear.bias == 0)  # nn.MultiheadAttention zeroes its biases
        assert block.feedforward_in.bias.abs().max() > 0  # nn.Linear's default bias, left alone
        assert torch.all(block.norm_self.weight == 1)
    # PyTorch's default embedding init is N(0, 1): far from the xavier bound.
    legacy = TransformerCaptionDecoder(vocab, d_model=d, memory_dim=memory_dim, weight_init="pytorch")
    assert legacy.word_embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(("double", "scale"), [(True, True), (False, False), (True, False)])
def test_transformer_embedding_scale_and_double_dropout(double, scale):
    d = 32
    torch.manual_seed(0)
    decoder = TransformerCaptionDecoder(
        VOCAB, d_model=d, nhead=4, dim_feedforward=48, memory_dim=16, dropout=0.5,
        scale_embedding=scale, double_embedding_dropout=double,
    ).train()
    decoder.positional_encoding.zero_()  # isolate the word part
    captured = {}
    decoder.layers[0].register_forward_pre_hook(lambda module, args: captured.update(x=args[0].detach()))
    memory, mask, clip_vector = random_memory(dim=16)
    tokens = torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(4))
    decoder.forward_tokens(decoder.init_state(memory, mask, clip_vector), tokens)
    x = captured["x"]
    word = decoder.word_embedding(tokens).detach() * (math.sqrt(d) if scale else 1.0)
    keep = 0.25 if double else 0.5  # each dropout keeps half
    kept = x != 0
    assert kept.float().mean().item() == pytest.approx(keep, abs=0.03)
    torch.testing.assert_close(x[kept], word[kept] / keep)


def test_transformer_memory_projection_options():
    torch.manual_seed(0)
    decoder = TransformerCaptionDecoder(VOCAB, d_model=32, memory_dim=16, dropout=0.3).eval()
    memory, _, _ = random_memory(dim=16)
    linear = decoder.memory_projection
    expected = nn.functional.layer_norm(torch.relu(linear(memory)), (32,), decoder.memory_norm.weight, decoder.memory_norm.bias)
    torch.testing.assert_close(decoder.project_memory(memory), expected)
    assert decoder.memory_dropout.p == 0.3  # the authors' Dropout(dropout) between ReLU and LayerNorm
    old = TransformerCaptionDecoder(VOCAB, d_model=32, memory_dim=16, memory_projection="linear").eval()
    assert old.memory_norm is None
    torch.testing.assert_close(old.project_memory(memory), old.memory_projection(memory))


# --------------------------------------------------------------------------------------------------
# GRU attention decoder: the authors' BahAttnDecoder, built from torch modules
# --------------------------------------------------------------------------------------------------


def authors_bah_attn_logits(mine: GRUAttentionDecoder, tokens: Tensor, memory: Tensor, mask: Tensor, clip: Tensor) -> Tensor:
    """The SJTU ``BahAttnDecoder`` + ``Seq2SeqAttention`` step loop, with nn.GRU and their input order."""
    embed_dim = mine.word_embedding.embedding_dim
    gru = nn.GRU(3 * embed_dim, mine.hidden_size, batch_first=True)
    with torch.no_grad():
        # Theirs reads [word; projected context; projected clip], mine [word; clip; context].
        w = mine.cell.weight_ih
        gru.weight_ih_l0.copy_(torch.cat([w[:, :embed_dim], w[:, 2 * embed_dim :], w[:, embed_dim : 2 * embed_dim]], dim=1))
        gru.weight_hh_l0.copy_(mine.cell.weight_hh)
        gru.bias_ih_l0.copy_(mine.cell.bias_ih)
        gru.bias_hh_l0.copy_(mine.cell.bias_hh)
    h2attn_weight = torch.cat([mine.attention_query.weight, mine.attention_key.weight], dim=1)  # Linear([h; m])
    h2attn_bias = mine.attention_key.bias
    v = mine.attention_score.weight[0]
    state = torch.zeros(1, tokens.shape[0], mine.hidden_size)
    logits = []
    for t in range(tokens.shape[1]):
        query = state[0].unsqueeze(1).expand(-1, memory.shape[1], -1)
        attn_out = torch.tanh(nn.functional.linear(torch.cat([query, memory], dim=-1), h2attn_weight, h2attn_bias))
        score = (attn_out @ v).masked_fill(~mask, -1e10)
        context = (score.softmax(-1).unsqueeze(1) @ memory).squeeze(1)
        rnn_input = torch.cat(
            [mine.word_embedding(tokens[:, t]), mine.context_projection(context), mine.clip_projection(clip)], dim=-1
        )
        out, state = gru(rnn_input.unsqueeze(1), state)
        logits.append(mine.classifier(out))
    return torch.cat(logits, dim=1)


def test_gru_decoder_computes_the_authors_bah_attn_decoder():
    torch.manual_seed(0)
    decoder = GRUAttentionDecoder(VOCAB, hidden_size=24, embed_dim=16, memory_dim=32, attention_dim=20).eval()
    memory, mask, clip_vector = random_memory(dim=32)
    tokens = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mine, _ = decoder.forward_tokens(decoder.init_state(memory, mask, clip_vector), tokens)
        theirs = authors_bah_attn_logits(decoder, tokens, memory, mask, clip_vector)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("output_dropout", "dropped"), [(0.0, False), (None, True), (0.5, True)])
def test_gru_output_dropout(output_dropout, dropped):
    torch.manual_seed(0)
    decoder = GRUAttentionDecoder(VOCAB, hidden_size=64, embed_dim=16, memory_dim=32, attention_dim=20, dropout=0.5,
                                  output_dropout=output_dropout).train()
    captured = {}
    decoder.classifier.register_forward_pre_hook(lambda module, args: captured.update(x=args[0].detach()))
    memory, mask, clip_vector = random_memory(dim=32)
    _, state = decoder.forward_tokens(decoder.init_state(memory, mask, clip_vector), torch.full((3, 1), 5))
    hidden = state.cache["hidden"].detach()
    if dropped:  # the old behaviour (None: the same rate as the embedding dropout)
        kept = captured["x"][:, 0] != 0
        assert kept.float().mean().item() == pytest.approx(0.5, abs=0.15)
        torch.testing.assert_close(captured["x"][:, 0][kept], hidden[kept] * 2)
    else:  # the authors' classifier reads the GRU output as it is
        torch.testing.assert_close(captured["x"][:, 0], hidden)


def test_gru_kaiming_init_matches_the_authors_distributions():
    vocab, hidden, embed, memory_dim, attention = 700, 128, 96, 64, 256
    torch.manual_seed(0)
    decoder = GRUAttentionDecoder(vocab, hidden_size=hidden, embed_dim=embed, memory_dim=memory_dim, attention_dim=attention)

    def check_kaiming(weight: Tensor, fan_in: int) -> None:
        bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_ with its default a=0
        assert weight.abs().max() <= bound + 1e-7 and weight.abs().max() > 0.9 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)

    check_kaiming(decoder.word_embedding.weight, embed)  # fan-in of a (V, E) tensor is E
    check_kaiming(decoder.classifier.weight, hidden)
    check_kaiming(decoder.clip_projection.weight, memory_dim)
    check_kaiming(decoder.context_projection.weight, memory_dim)
    check_kaiming(torch.cat([decoder.attention_query.weight, decoder.attention_key.weight], dim=1), hidden + memory_dim)
    for linear in (decoder.classifier, decoder.clip_projection, decoder.context_projection, decoder.attention_key):
        assert torch.all(linear.bias == 0)
    assert decoder.attention_score.weight.std().item() == pytest.approx(1.0, rel=0.15)  # torch.randn
    legacy = GRUAttentionDecoder(vocab, hidden_size=hidden, embed_dim=embed, memory_dim=memory_dim, weight_init="pytorch")
    assert legacy.word_embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)


# --------------------------------------------------------------------------------------------------
# Scheduled sampling: one draw per step for the whole batch
# --------------------------------------------------------------------------------------------------


def authors_transformer_scheduled_sampling(model: CaptionModel, features, lengths, tokens, step_truth) -> Tensor:
    """The authors' loop: every step re-reads a whole prefix, the reference one or the greedy one."""
    own = [tokens[:, :1]]  # bos, then the argmax of each step
    logits = []
    for t in range(tokens.shape[1]):
        prefix = tokens[:, : t + 1] if t > 0 and step_truth[t - 1] else torch.cat(own, dim=1)
        step = model(features, lengths, prefix)[:, -1]  # one teacher-forced pass on that prefix, no cache
        logits.append(step)
        own.append(step.argmax(dim=-1, keepdim=True))
    return torch.stack(logits, dim=1)


def test_batch_scheduled_sampling_is_the_default():
    assert tiny_model("transformer").scheduled_sampling == "batch"
    assert tiny_model("gru_attention").scheduled_sampling == "batch"


def test_transformer_batch_scheduled_sampling_equals_the_authors_loop():
    model = tiny_model("transformer").eval()
    features, lengths, tokens = random_batch(batch_size=6, length=10)
    ratio = 0.5
    with torch.no_grad():
        mixed = model(features, lengths, tokens, ratio, generator=torch.Generator().manual_seed(5))
        step_truth = (torch.rand(9, generator=torch.Generator().manual_seed(5)) < ratio).tolist()
        assert any(step_truth) and not all(step_truth)
        expected = authors_transformer_scheduled_sampling(model, features, lengths, tokens, step_truth)
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
        # The draw is shared: at a reference step every row reads the reference prefix.
        teacher = model(features, lengths, tokens)
        own_prefix_steps = 0
        for t in range(1, tokens.shape[1]):
            if step_truth[t - 1]:
                torch.testing.assert_close(mixed[:, t], teacher[:, t], atol=1e-5, rtol=1e-5)
            else:
                own_prefix_steps += int(not torch.allclose(mixed[:, t], teacher[:, t], atol=1e-4))
        assert own_prefix_steps > 0  # the own prefix really differs from the reference


def test_gru_batch_scheduled_sampling_swaps_the_word_for_all_rows():
    model = tiny_model("gru_attention").eval()
    features, lengths, tokens = random_batch(batch_size=6, length=10)
    ratio = 0.5
    with torch.no_grad():
        mixed = model(features, lengths, tokens, ratio, generator=torch.Generator().manual_seed(5))
        step_truth = torch.rand(9, generator=torch.Generator().manual_seed(5)) < ratio  # (L - 1,)
        assert step_truth.any() and not step_truth.all()
        # The authors' Seq2SeqAttnModel: state carried, word = reference word or previous argmax.
        fed = torch.where(step_truth.unsqueeze(0), tokens[:, 1:], mixed[:, :-1].argmax(dim=-1))
        fed = torch.cat([tokens[:, :1], fed], dim=1)
        assert not torch.equal(fed, tokens)
        torch.testing.assert_close(mixed, model(features, lengths, fed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_batch_scheduled_sampling_with_ratio_one_is_teacher_forcing(decoder):
    model = tiny_model(decoder).eval()
    features, lengths, tokens = random_batch()
    with torch.no_grad():
        teacher = model(features, lengths, tokens)
        stepwise = model.scheduled_sampling_forward(features, lengths, tokens, teacher_forcing_ratio=1.0)
    if decoder == "transformer":
        assert torch.equal(stepwise, teacher)  # every step is a position of the one parallel pass
    else:
        torch.testing.assert_close(stepwise, teacher, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["batch", "row"])
@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_scheduled_sampling_with_ratio_zero_is_a_greedy_loop(decoder, scheme):
    model = tiny_model(decoder, scheduled_sampling=scheme).eval()
    features, lengths, tokens = random_batch()
    with torch.no_grad():
        free = torch.log_softmax(model(features, lengths, tokens, teacher_forcing_ratio=0.0), dim=-1)
        # Second implementation: greedy decoding, the whole prefix re-read at each step.
        initial = model.encode(features, lengths)
        prefix = tokens[:, :1]
        for t in range(tokens.shape[1]):
            log_probs, _ = model.step(initial, prefix)
            torch.testing.assert_close(free[:, t], log_probs, atol=1e-5, rtol=1e-5)
            prefix = torch.cat([prefix, log_probs.argmax(dim=-1, keepdim=True)], dim=1)


def test_transformer_batch_scheduled_sampling_trains_through_both_prefixes():
    model = tiny_model("transformer").train()
    features, lengths, tokens = random_batch(length=9)
    logits = model(features, lengths, tokens, 0.5, generator=torch.Generator().manual_seed(5))
    assert logits.shape == (4, 9, VOCAB)
    nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.roll(-1, 1).reshape(-1)).backward()
    assert model.encoder.gru.weight_ih_l0.grad.abs().sum() > 0
    assert model.decoder.word_embedding.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Old checkpoints and option checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_legacy_options_keep_the_old_state_dict(decoder):
    legacy = tiny_model(decoder, legacy=True)
    current = tiny_model(decoder)
    new_keys = {"transformer": {"decoder.memory_norm.weight", "decoder.memory_norm.bias", "decoder.positional_encoding"},
                "gru_attention": set()}[decoder]
    assert set(current.state_dict()) - set(legacy.state_dict()) == new_keys
    assert set(legacy.state_dict()) <= set(current.state_dict())
    tiny_model(decoder, seed=1, legacy=True).load_state_dict(legacy.state_dict())  # strict
    if new_keys:
        with pytest.raises(RuntimeError, match="Missing key"):
            current.load_state_dict(legacy.state_dict())
    assert legacy.scheduled_sampling == "row" and legacy.encoder.gru.dropout == 0.2
    assert legacy.encoder.input_dropout.p == 0.0


def test_options_reject_bad_values():
    for kwargs, match in [
        (dict(memory_projection="mlp"), "memory_projection"),
        (dict(positional_encoding="learned"), "positional_encoding"),
        (dict(weight_init="kaiming"), "weight_init"),
        (dict(scheduled_sampling="sample"), "scheduled_sampling"),
        (dict(encoder_input_dropout=-0.1), "input_dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_caption_model("transformer", VOCAB, INPUT_DIM, **kwargs)
    with pytest.raises(ValueError, match="output_dropout"):
        build_caption_model("gru_attention", VOCAB, INPUT_DIM, output_dropout=1.0)
    with pytest.raises(ValueError, match="weight_init"):
        build_caption_model("gru_attention", VOCAB, INPUT_DIM, weight_init="xavier")
