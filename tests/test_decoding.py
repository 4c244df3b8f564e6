"""Tests of greedy decoding, sampling and (batched, ensembled) beam search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from aac_lightning.nn.captioning import CaptionModel, DecodingState, build_caption_model
from aac_lightning.nn.decoding import beam_search, beam_search_single, greedy_decode, sample_decode

PAD, BOS, EOS = 0, 1, 2
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
VOCAB = 19
INPUT_DIM = 10


def tiny_model(decoder: str, seed: int = 0, input_dim: int = INPUT_DIM) -> CaptionModel:
    """Tiny random captioner whose end token is likely enough that captions end at varied lengths."""
    torch.manual_seed(seed)
    if decoder == "transformer":
        kwargs = dict(d_model=24, nhead=2, dim_feedforward=32, num_layers=2)
    else:
        kwargs = dict(hidden_size=24, embed_dim=12, attention_dim=12)
    # The decoding tests only need lively tiny models: build the package's earlier architecture (its
    # options, where this version of the model has them) so that the seeds below keep their captions.
    kwargs.update(_legacy_options(decoder))
    model = build_caption_model(decoder, VOCAB, input_dim, encoder_hidden_size=12, encoder_num_layers=2, **kwargs)
    # Random tiny models tend to ignore the audio and to end at once or never: sharpen the word
    # distributions (beams then disagree with greedy), strengthen the audio path, favour the end token.
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(8.0)
        if decoder == "transformer":
            model.decoder.memory_projection.weight.mul_(4.0)
            model.decoder.classifier.bias[EOS] += 0.5
        else:
            model.decoder.clip_projection.weight.mul_(4.0)
            model.decoder.cell.weight_ih.mul_(3.0)  # a livelier recurrence
            model.decoder.cell.weight_hh.mul_(3.0)
            model.decoder.classifier.bias[EOS] += 1.2
    return model.eval()


def _legacy_options(decoder: str) -> dict:
    """The earlier model's options (see ``build_caption_model``) that the installed model accepts."""
    import inspect

    from aac_lightning.nn import captioning

    legacy = {
        "transformer": dict(memory_projection="linear", scale_embedding=False, double_embedding_dropout=False,
                            positional_encoding="sinusoidal", weight_init="pytorch"),
        "gru_attention": dict(output_dropout=None, weight_init="pytorch"),
    }[decoder]
    decoder_class = {"transformer": "TransformerCaptionDecoder", "gru_attention": "GRUAttentionDecoder"}[decoder]
    accepted = set(inspect.signature(getattr(captioning, decoder_class)).parameters)
    options = {k: v for k, v in legacy.items() if k in accepted}
    builder = set(inspect.signature(captioning.build_caption_model).parameters)
    for name, value in [("encoder_dropout", 0.2), ("encoder_input_dropout", 0.0)]:
        if name in builder:
            options[name] = value
    return options


def random_features(batch_size: int, frames: int, seed: int, input_dim: int = INPUT_DIM) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, frames, input_dim, generator=generator)
    lengths = torch.randint(1, frames + 1, (batch_size,), generator=generator)
    lengths[0] = frames
    return features, lengths


def pad_to(rows: list[Tensor], width: int) -> Tensor:
    assert all(r.shape[0] <= width for r in rows)
    return torch.stack([nn.functional.pad(r, (0, width - r.shape[0]), value=PAD) for r in rows])


def caption_lengths(tokens: Tensor) -> list[int]:
    return (tokens != PAD).sum(dim=1).tolist()


class BigramModel(nn.Module):
    """Fake captioner: the next word's log-probabilities depend only on the previous word (a table)."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 5) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        probabilities = torch.full((vocab_size, vocab_size), 1e-9)  # pad (id 0) is near impossible
        for previous, row in table.items():
            for word, probability in row.items():
                probabilities[previous, word] = probability
        self.register_buffer("log_table", probabilities.log())

    def encode(self, features: Tensor, feature_lengths: Tensor) -> DecodingState:
        return DecodingState(clip={"rows": torch.zeros(features.shape[0], 1)})

    def step(self, state: DecodingState, prev_tokens: Tensor) -> tuple[Tensor, DecodingState]:
        return self.log_table[prev_tokens[:, -1]], state


class MeanOfModels(nn.Module):
    """Second implementation of an ensemble for the per-clip reference: mean of log-probabilities,
    renormalised (probabilities divided by their sum, then the log) when ``renormalize``."""

    def __init__(self, models: list[CaptionModel], renormalize: bool = False) -> None:
        super().__init__()
        self.models = models
        self.vocab_size = models[0].vocab_size
        self.renormalize = renormalize

    def encode(self, features_per_model, lengths):
        return [m.encode(f, lengths) for m, f in zip(self.models, features_per_model)]

    def step(self, states, prev_tokens):
        log_probs = [m.step(s, prev_tokens)[0] for m, s in zip(self.models, states)]
        mean = sum(log_probs) / len(log_probs)
        if self.renormalize:
            probabilities = mean.double().exp()
            mean = (probabilities / probabilities.sum(dim=-1, keepdim=True)).log().float()
        return mean, states


A, B = 3, 4  # the two words of the hand-crafted vocabulary (pad, bos, eos, A, B)


# --------------------------------------------------------------------------------------------------
# Beam search against hand-computed answers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", ["collect", "keep"])
def test_beam_search_beats_greedy_on_hand_crafted_bigram(finished):
    # P(.|bos) A .5, B .4, eos .1;  P(.|A) A .4, B .32, eos .28;  P(.|B) eos .9, A .05, B .05.
    model = BigramModel(
        {BOS: {A: 0.5, B: 0.4, EOS: 0.1}, A: {A: 0.4, B: 0.32, EOS: 0.28}, B: {EOS: 0.9, A: 0.05, B: 0.05}}
    )
    features, lengths = torch.zeros(2, 1, 1), torch.ones(2, dtype=torch.long)
    # Greedy: A (.5), A (.4), A (.4) -> cut at 3 words, probability .08.
    greedy = greedy_decode(model, features, lengths, max_length=3, **IDS)
    assert greedy.tolist() == [[A, A, A]] * 2
    # Beam 2: step 1 {A .5, B .4}; step 2 {B eos .36 (finished), A A .2}; step 3 {A A A .08, ...}.
    # "keep" (raw sum): "B eos" survives step 3 only if a finished beam extends at log-probability 0
    # (the model's own pad probability is 1e-9). "collect" (per word): "B eos" was collected at step 2,
    # log(.36) / 2 = -0.51 beats the cut "A A A", log(.08) / 3 = -0.84. Either way it is found only
    # if the first step did not duplicate beam A.
    options = dict(max_length=3, finished=finished, length_penalty=1.0 if finished == "collect" else 0.0, **IDS)
    for beam_size in (2, 3):
        tokens = beam_search(model, features, lengths, beam_size=beam_size, **options)
        assert tokens.tolist() == [[B, EOS]] * 2
        single = beam_search_single(model, features[0], beam_size=beam_size, **options)
        assert single.tolist() == [B, EOS]
    assert beam_search(model, features, lengths, beam_size=1, **options).tolist() == [[A, A, A]] * 2


def test_authors_rule_collects_finished_hypotheses_and_ranks_them_per_word():
    # P(.|bos) eos .5, A .3, B .2;  P(.|A) A .5, B .45, eos .05;  P(.|B) eos .99, A .005, B .005.
    model = BigramModel(
        {BOS: {EOS: 0.5, A: 0.3, B: 0.2}, A: {A: 0.5, B: 0.45, EOS: 0.05}, B: {EOS: 0.99, A: 0.005, B: 0.005}}
    )
    features, lengths = torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long)
    # Beam 2, at most 3 words. Step 1: {eos .5, A .3} in both rules.
    # "collect": eos leaves the beam, which refills from A: step 2 {A A .15, A B .135}; step 3 (the
    #   last: all collected) {A B eos .13365, A A A .075}. Collected: eos, A B eos, A A A.
    # "keep": eos holds a place: step 2 {eos .5, A A .15}; step 3 {eos .5, A A A .075}.
    # Per word: eos log(.5) = -0.693 < A B eos log(.13365) / 3 = -0.671; A A A log(.075) / 3 = -0.863.
    assert math.log(0.5) < math.log(0.3 * 0.45 * 0.99) / 3
    assert math.log(0.3 * 0.5 * 0.5) / 3 < math.log(0.5)
    expected = {
        ("collect", 1.0): [A, B, EOS],  # the authors' rule: only it finds the best caption per word
        ("collect", 0.0): [EOS],  # raw sum over the collected ones
        ("keep", 1.0): [EOS],  # "A B" was pruned while eos held a place in the beam
        ("keep", 0.0): [EOS],  # the earlier default
    }
    for (finished, penalty), words in expected.items():
        options = dict(beam_size=2, max_length=3, finished=finished, length_penalty=penalty, **IDS)
        assert beam_search(model, features, lengths, **options).tolist() == [words], (finished, penalty)
        assert beam_search_single(model, features[0], **options).tolist() == words, (finished, penalty)
    # The defaults are the authors' rule.
    assert beam_search(model, features, lengths, beam_size=2, max_length=3, **IDS).tolist() == [[A, B, EOS]]
    assert beam_search_single(model, features[0], beam_size=2, max_length=3, **IDS).tolist() == [A, B, EOS]


def test_authors_rule_ends_when_no_live_hypothesis_is_left():
    # P(.|bos) eos .6, A .4;  P(.|A) A .99, eos .01.
    model = BigramModel({BOS: {EOS: 0.6, A: 0.4}, A: {A: 0.99, EOS: 0.01}})
    features, lengths = torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long)
    # Beam 1: step 1 takes eos, collected; no live hypothesis is left, so the search ends with it
    # (the authors' search goes on extending the finished one at a -1000 penalty, which never wins).
    for rule in ("collect", "keep"):
        assert beam_search(model, features, lengths, beam_size=1, max_length=4, finished=rule, **IDS).tolist() == [[EOS]]
        assert beam_search_single(model, features[0], beam_size=1, max_length=4, finished=rule, **IDS).tolist() == [EOS]
    # Beam 2: eos and A at step 1; "collect" refills the beam from A: {A A .396, A eos .004}, ...,
    # A A A A cut at 4 words: log(.4 * .99^3) / 4 = -0.237 > log(.6) = -0.511 > log(.004) / 2.
    assert beam_search(model, features, lengths, beam_size=2, max_length=4, **IDS).tolist() == [[A, A, A, A]]
    # A batch mixing a clip whose beam empties early with clips that go on: rows are independent.
    two = BigramModel({BOS: {EOS: 0.6, A: 0.4}, A: {A: 0.99, EOS: 0.01}})
    batch = beam_search(two, torch.zeros(3, 1, 1), torch.ones(3, dtype=torch.long), beam_size=1, max_length=4, **IDS)
    assert batch.tolist() == [[EOS]] * 3


def test_decoding_defaults_follow_the_authors():
    import inspect

    from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH

    assert DEFAULT_MAX_LENGTH == 20
    for function in (beam_search, beam_search_single, greedy_decode, sample_decode):
        assert inspect.signature(function).parameters["max_length"].default == 20, function.__name__
    for function in (beam_search, beam_search_single):
        parameters = inspect.signature(function).parameters
        assert (parameters["finished"].default, parameters["length_penalty"].default) == ("collect", 1.0)
    assert inspect.signature(beam_search).parameters["ensemble_renormalize"].default is True


def test_length_penalty_changes_the_final_choice_as_computed_by_hand():
    # P(.|bos) eos .3, A .62, B .08;  P(.|A) B .5, eos .4, A .1;  P(.|B) eos .95, A .025, B .025.
    model = BigramModel(
        {BOS: {EOS: 0.3, A: 0.62, B: 0.08}, A: {B: 0.5, EOS: 0.4, A: 0.1}, B: {EOS: 0.95, A: 0.025, B: 0.025}}
    )
    features, lengths = torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long)
    # Beam 2: step 1 {A .62, eos .3}; step 2 {A B .31, eos .3}; step 3 {eos .3, A B eos .2945}: all done.
    # Raw sums: eos log .3 = -1.204 > A B eos log .2945 = -1.223.
    # Per word: eos -1.204 / 1 < A B eos -1.223 / 3 = -0.408.
    assert math.log(0.3) > math.log(0.62 * 0.5 * 0.95) and math.log(0.3) < math.log(0.62 * 0.5 * 0.95) / 3
    # ("collect" also collects A eos .248 at step 2: log(.248) / 2 = -0.697, between the two.)
    for finished in ("keep", "collect"):
        options = dict(beam_size=2, max_length=5, finished=finished, **IDS)
        raw = beam_search(model, features, lengths, length_penalty=0.0, **options)
        normalised = beam_search(model, features, lengths, length_penalty=1.0, **options)
        assert raw.tolist() == [[EOS]]
        assert normalised.tolist() == [[A, B, EOS]]
        for penalty, expected in [(0.0, [EOS]), (1.0, [A, B, EOS])]:
            single = beam_search_single(model, features[0], length_penalty=penalty, **options)
            assert single.tolist() == expected


def test_bos_and_pad_are_never_generated():
    # A model that would rather say pad or bos than anything else.
    model = BigramModel({BOS: {PAD: 0.5, BOS: 0.3, A: 0.15, EOS: 0.05}, A: {PAD: 0.5, BOS: 0.3, EOS: 0.2}})
    features, lengths = torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long)
    assert greedy_decode(model, features, lengths, max_length=4, **IDS).tolist() == [[A, EOS]]
    # Beam 2 among generable words: {A .15, eos .05}, then {eos .05, A eos .03}: raw score picks eos.
    raw = dict(beam_size=2, max_length=4, finished="keep", length_penalty=0.0, **IDS)
    assert beam_search(model, features, lengths, **raw).tolist() == [[EOS]]
    assert beam_search_single(model, features[0], **raw).tolist() == [EOS]
    normalised = beam_search(model, features, lengths, beam_size=2, max_length=4, **IDS)  # authors' default
    assert normalised.tolist() == [[A, EOS]]  # log(.03) / 2 > log(.05)
    assert beam_search_single(model, features[0], beam_size=2, max_length=4, **IDS).tolist() == [A, EOS]
    sampled = sample_decode(
        model, features, lengths, max_length=4, num_samples=200, generator=torch.Generator().manual_seed(0), **IDS
    )
    assert not (sampled.tokens[sampled.mask] == PAD).any() and not (sampled.tokens == BOS).any()
    # Renormalised over the generable words: P(A | bos) = .15 / (.15 + .05) (+ the table's 1e-9 floor).
    chose_a = sampled.tokens[:, 0] == A
    torch.testing.assert_close(sampled.log_probs[chose_a, 0], torch.full((int(chose_a.sum()),), math.log(0.75)))


# --------------------------------------------------------------------------------------------------
# Batched beam search against the per-clip reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_batched_beam_search_equals_per_clip_reference(decoder):
    # Seeds whose tiny models give captions of varied lengths (checked at the end).
    model = tiny_model(decoder, seed={"transformer": 0, "gru_attention": 3}[decoder])
    seen_lengths = set()
    differs_from_greedy = False
    for seed, (batch_size, frames) in enumerate([(5, 7), (3, 11), (6, 4)]):
        features, lengths = random_features(batch_size, frames, seed)
        greedy = greedy_decode(model, features, lengths, max_length=9, **IDS)
        for beam_size in (1, 2, 3, 4):
            for finished, penalty in [("collect", 1.0), ("collect", 0.0), ("keep", 0.0), ("keep", 1.0)]:
                options = dict(beam_size=beam_size, max_length=9, finished=finished, length_penalty=penalty, **IDS)
                batched = beam_search(model, features, lengths, **options)
                reference = [beam_search_single(model, features[i, : lengths[i]], **options) for i in range(batch_size)]
                assert batched.shape[1] == max(r.shape[0] for r in reference)
                label = (seed, beam_size, finished, penalty)
                assert torch.equal(batched, pad_to(reference, batched.shape[1])), label
                seen_lengths.update(caption_lengths(batched))
                differs_from_greedy |= beam_size > 1 and not torch.equal(batched, greedy)
    # The comparison covered captions that end early, at different lengths, and beams that matter.
    assert len(seen_lengths) >= 3 and min(seen_lengths) < 8
    assert differs_from_greedy


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_beam_one_equals_greedy_and_cache_changes_nothing(decoder):
    model = tiny_model(decoder, seed=3)
    features, lengths = random_features(6, 8, seed=5)
    greedy = greedy_decode(model, features, lengths, max_length=10, **IDS)
    assert torch.equal(beam_search(model, features, lengths, beam_size=1, max_length=10, **IDS), greedy)
    with_cache = beam_search(model, features, lengths, beam_size=3, max_length=10, **IDS)
    without_cache = beam_search(model, features, lengths, beam_size=3, max_length=10, use_cache=False, **IDS)
    assert torch.equal(with_cache, without_cache)


def test_greedy_output_convention():
    model = tiny_model("transformer", seed=1)
    features, lengths = random_features(8, 6, seed=2)
    tokens = greedy_decode(model, features, lengths, max_length=7, **IDS)
    assert tokens.shape[0] == 8 and tokens.shape[1] <= 7
    for row in tokens.tolist():
        assert BOS not in row
        if EOS in row:
            end = row.index(EOS)
            assert all(t == PAD for t in row[end + 1 :]) and PAD not in row[:end]
        else:
            assert len(row) == 7 and PAD not in row
    assert any(EOS in row for row in tokens.tolist())


# --------------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_ensemble_of_one_or_two_identical_copies_equals_the_model(decoder):
    model = tiny_model(decoder, seed=2)
    features, lengths = random_features(5, 9, seed=4)
    options = dict(beam_size=3, max_length=9, **IDS)
    alone = beam_search(model, features, lengths, **options)
    assert torch.equal(beam_search([model], features, lengths, **options), alone)
    assert torch.equal(beam_search([model, copy.deepcopy(model)], features, lengths, **options), alone)


@pytest.mark.parametrize("renormalize", [True, False])
def test_ensemble_of_different_models_equals_reference_mean_of_log_probs(renormalize):
    models = [tiny_model("transformer", seed=0), tiny_model("gru_attention", seed=3, input_dim=6)]
    features_a, lengths = random_features(4, 8, seed=9)
    features_b = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(10))
    options = dict(beam_size=3, max_length=8, **IDS)
    batched = beam_search(models, [features_a, features_b], [lengths, lengths], ensemble_renormalize=renormalize, **options)
    reference_model = MeanOfModels(models, renormalize=renormalize)
    reference = []
    for i in range(4):
        clip = (features_a[i : i + 1, : lengths[i]], features_b[i : i + 1, : lengths[i]])
        # beam_search_single passes (1, T, D) features and a length to encode; wrap the pair.
        state = reference_model.encode(clip, lengths[i : i + 1])
        reference.append(_single_with_state(reference_model, state, **options))
    assert torch.equal(batched, pad_to(reference, batched.shape[1]))
    # The ensemble is neither of its members (else this test could not tell a mean from one model).
    for member, member_features in zip(models, [features_a, features_b]):
        alone = beam_search(member, member_features, lengths, **options)
        assert alone.shape != batched.shape or not torch.equal(alone, batched)


def test_combine_log_probs_renormalises_the_mean_as_computed_by_hand():
    from aac_lightning.nn.decoding import combine_log_probs

    first = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]).log()
    second = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]).log()
    # Row 0: geometric means sqrt(.07), .2, sqrt(.07) (sum .7292); renormalised: divide by the sum.
    geometric = torch.tensor([[0.07**0.5, 0.2, 0.07**0.5], [0.5, 0.25, 0.25]])
    expected = (geometric / geometric.sum(dim=1, keepdim=True)).log()
    combined = combine_log_probs([first, second])  # the default: renormalised (the authors' ensemble)
    torch.testing.assert_close(combined, expected)
    torch.testing.assert_close(combined.exp().sum(dim=1), torch.ones(2))
    torch.testing.assert_close(combined, torch.log_softmax((first + second) / 2, dim=1))
    plain = combine_log_probs([first, second], renormalize=False)
    torch.testing.assert_close(plain, geometric.log())
    assert plain.exp().sum(dim=1)[0] < 0.73  # the plain mean is no distribution when members disagree
    assert combine_log_probs([first]) is first  # one member: its own (normalised) log-probabilities
    with pytest.raises(ValueError, match="at least one"):
        combine_log_probs([])


def test_renormalising_the_ensemble_changes_the_caption_as_computed_by_hand():
    # Two members that agree after bos and after A, and disagree after B:
    #   P(.|bos) A .46, B .44, eos .1;  P(.|A) eos .4, A .35, B .25  (both members)
    #   P(.|B) member 1: eos .9, A .05, B .05;  member 2: eos .1, A .05, B .85.
    shared = {BOS: {A: 0.46, B: 0.44, EOS: 0.1}, A: {EOS: 0.4, A: 0.35, B: 0.25}}
    one = BigramModel({**shared, B: {EOS: 0.9, A: 0.05, B: 0.05}})
    two = BigramModel({**shared, B: {EOS: 0.1, A: 0.05, B: 0.85}})
    features, lengths = torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long)
    # After B the geometric means are eos .3, A .05, B sqrt(.0425) = .2062 (sum .5562): renormalised,
    # eos .5394. Beam 2, 2 words (all collected at step 2):
    #   plain mean:   A eos .184, A A .161, B eos .44 * .3 = .132 -> beam {A eos, A A}: "A eos".
    #   renormalised: B eos .44 * .5394 = .2373 > A eos .184 -> "B eos".
    after_b = 0.3 / (0.3 + 0.05 + 0.0425**0.5)
    assert 0.44 * 0.3 < 0.46 * 0.35 < 0.46 * 0.4 < 0.44 * after_b
    options = dict(beam_size=2, max_length=2, **IDS)
    plain = beam_search([one, two], features, lengths, ensemble_renormalize=False, **options)
    renormalised = beam_search([one, two], features, lengths, **options)  # the default
    assert plain.tolist() == [[A, EOS]]
    assert renormalised.tolist() == [[B, EOS]]
    for renormalize, words in [(False, [A, EOS]), (True, [B, EOS])]:
        reference = MeanOfModels([one, two], renormalize=renormalize)
        state = reference.encode([features[:1], features[:1]], lengths)
        assert _single_with_state(reference, state, **options).tolist() == words


def _single_with_state(model: MeanOfModels, state, **options) -> Tensor:
    """Run beam_search_single on a pre-encoded state (the reference ensemble takes two inputs)."""

    class Preencoded(nn.Module):
        vocab_size = model.vocab_size

        def encode(self, features, lengths):
            return state

        def step(self, s, prev_tokens):
            return model.step(s, prev_tokens)

    return beam_search_single(Preencoded(), torch.zeros(1, 1), **options)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_reproducible_and_log_probs_match_the_model(decoder, temperature):
    model = tiny_model(decoder, seed=4)
    features, lengths = random_features(3, 7, seed=6)
    options = dict(max_length=8, num_samples=4, temperature=temperature, **IDS)
    first = sample_decode(model, features, lengths, generator=torch.Generator().manual_seed(0), **options)
    second = sample_decode(model, features, lengths, generator=torch.Generator().manual_seed(0), **options)
    other = sample_decode(model, features, lengths, generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.log_probs, second.log_probs)
    assert not torch.equal(first.tokens, other.tokens)
    assert first.tokens.shape == first.log_probs.shape == first.mask.shape
    assert first.tokens.shape[0] == 12

    # Mask: up to and including the end token; after it only pad at log-probability 0.
    for tokens, mask, log_probs in zip(first.tokens.tolist(), first.mask.tolist(), first.log_probs.tolist()):
        end = tokens.index(EOS) + 1 if EOS in tokens else len(tokens)
        assert mask == [True] * end + [False] * (len(tokens) - end)
        assert all(t == PAD for t in tokens[end:]) and all(lp == 0.0 for lp in log_probs[end:])
    assert not first.mask.all() and first.mask[:, 0].all()

    # Log-probs equal the teacher-forced distribution (a separate, parallel pass) at the sampled words.
    repeated_features = features.repeat_interleave(4, dim=0)
    repeated_lengths = lengths.repeat_interleave(4)
    inputs = torch.cat([torch.full((12, 1), BOS), first.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(repeated_features, repeated_lengths, inputs)
    logits[..., [BOS, PAD]] = float("-inf")  # never generated
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(2, first.tokens.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(first.log_probs[first.mask], expected[first.mask], atol=1e-4, rtol=1e-4)


def test_sampling_keeps_gradients_for_scst():
    model = tiny_model("transformer", seed=5).train()
    features, lengths = random_features(2, 6, seed=7)
    generator = torch.Generator().manual_seed(2)
    sampled = sample_decode(model, features, lengths, max_length=6, num_samples=3, generator=generator, **IDS)
    assert sampled.log_probs.requires_grad
    reward = torch.randn(6, 1)
    (-(reward * sampled.log_probs * sampled.mask).sum()).backward()
    assert model.decoder.classifier.weight.grad.abs().sum() > 0
    assert model.encoder.gru.weight_ih_l0.grad.abs().sum() > 0


def test_sampling_frequencies_follow_the_model_distribution():
    model = BigramModel({BOS: {A: 0.6, B: 0.3, EOS: 0.1}, A: {EOS: 1.0}, B: {EOS: 1.0}})
    sampled = sample_decode(
        model, torch.zeros(1, 1, 1), torch.ones(1, dtype=torch.long), max_length=1, num_samples=6000,
        generator=torch.Generator().manual_seed(0), **IDS,
    )
    first_words = sampled.tokens[:, 0]
    for word, probability in [(A, 0.6), (B, 0.3), (EOS, 0.1)]:
        # 4 standard deviations of a binomial proportion over 6000 draws is at most 0.026.
        assert abs((first_words == word).float().mean().item() - probability) < 0.026
    chose_a = first_words == A
    torch.testing.assert_close(sampled.log_probs[chose_a, 0], torch.full((int(chose_a.sum()),), math.log(0.6)))


# --------------------------------------------------------------------------------------------------
# Devices and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_beam_search_runs_on_the_gpu_and_agrees_with_the_cpu():
    model = tiny_model("transformer", seed=6)
    features, lengths = random_features(8, 9, seed=8)
    options = dict(beam_size=3, max_length=9, **IDS)
    on_cpu = beam_search(model, features, lengths, **options)
    on_gpu = beam_search(model.cuda(), features.cuda(), lengths.cuda(), **options)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_decoding_rejects_bad_arguments():
    model = tiny_model("transformer")
    features, lengths = random_features(2, 5, seed=0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, features, lengths, beam_size=VOCAB + 1, max_length=5, **IDS)
    with pytest.raises(ValueError, match="max_length"):
        beam_search(model, features, lengths, max_length=0, **IDS)
    with pytest.raises(ValueError, match="eos_id"):
        greedy_decode(model, features, lengths, max_length=5, bos_id=BOS, eos_id=VOCAB, pad_id=PAD)
    with pytest.raises(ValueError, match="must differ"):
        beam_search(model, features, lengths, max_length=5, bos_id=BOS, eos_id=PAD, pad_id=PAD)
    with pytest.raises(ValueError, match="feature_lengths"):
        greedy_decode(model, features, lengths[:1], max_length=5, **IDS)
    with pytest.raises(ValueError, match="temperature"):
        sample_decode(model, features, lengths, max_length=5, temperature=0.0, **IDS)
    with pytest.raises(ValueError, match="num_samples"):
        sample_decode(model, features, lengths, max_length=5, num_samples=0, **IDS)
    with pytest.raises(ValueError, match="empty"):
        beam_search([], features, lengths, max_length=5, **IDS)
    other_vocab = build_caption_model(
        "gru_attention", VOCAB + 1, INPUT_DIM, hidden_size=8, embed_dim=8, attention_dim=8
    )
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search([model, other_vocab], features, lengths, max_length=5, **IDS)
    with pytest.raises(ValueError, match="per-model features"):
        beam_search([model, model], [features], [lengths], max_length=5, **IDS)
    with pytest.raises(ValueError, match="one clip"):
        beam_search_single(model, features, max_length=5, **IDS)
