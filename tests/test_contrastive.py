"""Symmetric InfoNCE (report eq. 6), same-clip masking, and the bi-encoder around it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.nn.contrastive import ContrastiveLoss, info_nce_loss


# ---------------------------------------------------------------------------------------------
# fakes with the audio / text encoder interface
# ---------------------------------------------------------------------------------------------
class FakeAudioEncoder(nn.Module):
    """Waveform (B, 16) -> 4 frames of 4 samples -> Linear -> mean over valid frames."""

    def __init__(self, clip_dim: int = 6) -> None:
        super().__init__()
        self.clip_dim = clip_dim
        self.frame_dim = clip_dim
        self.sample_rate = 16
        self.frame_proj = nn.Linear(4, clip_dim)
        self.received_lengths: torch.Tensor | None = None

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        self.received_lengths = lengths
        frames = self.frame_proj(waveform.reshape(waveform.shape[0], -1, 4))  # (B, 4, D)
        return {
            "clip": frames.mean(dim=1),
            "frames": frames,
            "frame_lengths": torch.full((waveform.shape[0],), frames.shape[1]),
        }


class FakeTextEncoder(nn.Module):
    """Mean of word embeddings over a fixed word list."""

    def __init__(self, words: list[str], embed_dim: int = 5) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.word_index = {word: i for i, word in enumerate(words)}
        self.embedding = nn.EmbeddingBag(len(words), embed_dim, mode="mean")

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.word_index[w] for w in text.split()]) for text in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.embedding(torch.cat(ids), offsets)  # (B, H)


WORDS = "a dog barks cat meows rain falls car passes".split()
TEXTS = ["a dog barks", "a cat meows", "rain falls", "a car passes"]


def make_bi_encoder(**kwargs) -> BiEncoder:
    torch.manual_seed(0)
    embed_dim = kwargs.pop("embed_dim", 3)
    return BiEncoder(FakeAudioEncoder(6), FakeTextEncoder(WORDS, 5), embed_dim=embed_dim, **kwargs)


# ---------------------------------------------------------------------------------------------
# eq. 6 against hand-computed values
# ---------------------------------------------------------------------------------------------
def test_info_nce_2x2_hand_computed() -> None:
    # a1 = (1, 0), a2 = (0, 1); t1 = (1, 0), t2 = (0.6, 0.8)  ->  S = [[1, 0.6], [0, 0.8]]
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logit scale 1:
    #   A->T row 1: log(1 + e^-0.4) = 0.513015252    row 2: log(1 + e^-0.8) = 0.371100666
    #   T->A col 1: log(1 + e^-1.0) = 0.313261688    col 2: log(1 + e^-0.2) = 0.598138869
    #   L = (0.513015252 + 0.371100666 + 0.313261688 + 0.598138869) / 2 = 0.897758238
    assert info_nce_loss(audio, text, 1.0).item() == pytest.approx(0.897758238, abs=1e-6)
    # logit scale 10 (tau = 0.1): every gap is multiplied by 10
    #   log(1 + e^-4) = 0.018149928, log(1 + e^-8) = 0.000335406,
    #   log(1 + e^-10) = 0.000045399, log(1 + e^-2) = 0.126928011  ->  L = 0.072729372
    assert info_nce_loss(audio, text, torch.tensor(10.0)).item() == pytest.approx(0.072729372, abs=1e-6)


def _masked_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # audios are the basis vectors, so S[i, j] = t_j[i]:
    #   t1 = (1, 0, 0), t2 = (0.6, 0.8, 0), t3 = (0, 0.6, 0.8)
    #   S = [[1, 0.6, 0  ],
    #        [0, 0.8, 0.6],
    #        [0, 0,   0.8]]
    # pairs 1 and 2 are two captions of the same clip (id 5): S[0, 1] and S[1, 0] leave the softmax
    audio = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    clip_ids = torch.tensor([5, 5, 9])
    return audio, text, clip_ids


def test_info_nce_same_clip_masking_hand_computed() -> None:
    audio, text, clip_ids = _masked_example()
    # logit scale 1, masked entries dropped from the denominators:
    #   A->T row 1: [1, -, 0]     -> log(1 + e^-1)              = 0.313261688
    #        row 2: [-, 0.8, 0.6] -> log(1 + e^-0.2)            = 0.598138869
    #        row 3: [0, 0, 0.8]   -> log(1 + 2 e^-0.8)          = 0.641147283
    #   T->A col 1: [1, -, 0]     -> log(1 + e^-1)              = 0.313261688
    #        col 2: [-, 0.8, 0]   -> log(1 + e^-0.8)            = 0.371100666
    #        col 3: [0, 0.6, 0.8] -> log(1 + e^-0.8 + e^-0.2)   = 0.818924716
    #   L = sum / 3 = 3.055834910 / 3 = 1.018611636
    loss = info_nce_loss(audio, text, 1.0, clip_ids=clip_ids)
    assert loss.item() == pytest.approx(1.018611636, abs=1e-6)
    # without clip ids the same-clip caption is a negative: row 1 becomes log(1 + e^-0.4 + e^-1), ...
    unmasked = info_nce_loss(audio, text, 1.0)
    assert unmasked.item() > loss.item() + 0.1


def test_masked_logits_receive_no_gradient() -> None:
    audio, text, clip_ids = _masked_example()
    audio.requires_grad_(True)
    text.requires_grad_(True)
    info_nce_loss(audio, text, 1.0, clip_ids=clip_ids).backward()
    # audios are the basis vectors, so S[i, j] = t_j[i]: component i of text j feeds exactly one
    # logit, S[i, j], and d L / d t_j[i] = d L / d S[i, j].
    # S[0, 1] = t2[0] and S[1, 0] = t1[1] are the masked same-clip logits -> no gradient
    assert text.grad[1, 0].item() == 0.0
    assert text.grad[0, 1].item() == 0.0
    # unmasked logits do get gradient: S[0, 2] = t3[0], S[2, 1] = t2[2]
    assert abs(text.grad[2, 0].item()) > 1e-3
    assert abs(text.grad[1, 2].item()) > 1e-3


def _loop_info_nce(
    audio: torch.Tensor, text: torch.Tensor, scale: float, clip_ids: list[int] | None
) -> float:
    """Eq. 6 with explicit loops over python floats (second, independent implementation)."""
    n = audio.shape[0]
    a = audio.double().tolist()
    t = text.double().tolist()
    sim = [[sum(x * y for x, y in zip(a[i], t[j])) for j in range(n)] for i in range(n)]

    def kept(i: int, j: int) -> bool:
        return i == j or clip_ids is None or clip_ids[i] != clip_ids[j]

    total = 0.0
    for i in range(n):
        a2t_denominator = sum(math.exp(scale * sim[i][j]) for j in range(n) if kept(i, j))
        t2a_denominator = sum(math.exp(scale * sim[j][i]) for j in range(n) if kept(j, i))
        total += -math.log(math.exp(scale * sim[i][i]) / a2t_denominator)
        total += -math.log(math.exp(scale * sim[i][i]) / t2a_denominator)
    return total / n


@pytest.mark.parametrize("clip_ids", [None, [3, 1, 3, 0, 1, 3, 7]])
def test_info_nce_matches_loop_implementation(clip_ids: list[int] | None) -> None:
    generator = torch.Generator().manual_seed(1)
    audio = F.normalize(torch.randn(7, 5, generator=generator), dim=-1)
    text = F.normalize(torch.randn(7, 5, generator=generator), dim=-1)
    ids = None if clip_ids is None else torch.tensor(clip_ids)
    loss = info_nce_loss(audio.double(), text.double(), 4.5, clip_ids=ids)
    assert loss.item() == pytest.approx(_loop_info_nce(audio, text, 4.5, clip_ids), abs=1e-10)


def test_info_nce_sums_the_two_directions() -> None:
    # eq. 6 sums A->T and T->A: twice the (CE_a2t + CE_t2a) / 2 of a CLIP-style loss
    generator = torch.Generator().manual_seed(2)
    audio = F.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    text = F.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    logits = 2.0 * audio @ text.T
    targets = torch.arange(4)
    clip_style = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert info_nce_loss(audio, text, 2.0).item() == pytest.approx(2 * clip_style.item(), abs=1e-6)


def test_info_nce_rejects_bad_input() -> None:
    audio = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(audio, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        info_nce_loss(torch.zeros(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="clip_ids"):
        info_nce_loss(audio, audio, 1.0, clip_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        info_nce_loss(audio, audio, 1.0, clip_ids=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="empty"):
        info_nce_loss(torch.zeros(0, 4), torch.zeros(0, 4), 1.0)


@pytest.mark.parametrize("gather", [True, False])
def test_contrastive_loss_module_single_process(gather: bool) -> None:
    audio, text, clip_ids = _masked_example()
    loss = ContrastiveLoss(gather=gather)(audio, text, torch.tensor(1.0), clip_ids)
    assert loss.item() == pytest.approx(1.018611636, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# bi-encoder
# ---------------------------------------------------------------------------------------------
def test_bi_encoder_shapes_and_normalisation() -> None:
    model = make_bi_encoder(embed_dim=3)
    waveform = torch.randn(4, 16)
    lengths = torch.tensor([16, 12, 16, 8])
    audio_emb = model.encode_audio(waveform, lengths)
    text_emb = model.encode_text(TEXTS)
    assert audio_emb.shape == (4, 3) and text_emb.shape == (4, 3)
    # encode_audio encodes each clip alone, its padding cut off (nn.audio_encoders.encode_clips)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(audio_emb[i], model.encode_audio(waveform[i : i + 1, :n])[0])
    torch.testing.assert_close(audio_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(4))
    # the projections are the ones named in the design, with the encoders' widths
    assert (model.audio_projection.in_features, model.audio_projection.out_features) == (6, 3)
    assert (model.text_projection.in_features, model.text_projection.out_features) == (5, 3)

    outputs = model(waveform, TEXTS, lengths)
    # the training forward runs the batch through the encoder as it is, in one call
    assert model.audio_encoder.received_lengths is lengths
    full = lengths == waveform.shape[1]
    torch.testing.assert_close(outputs["audio_emb"][full], audio_emb[full])
    torch.testing.assert_close(outputs["text_emb"], text_emb)
    assert outputs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_similarity_is_cosine() -> None:
    audio = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor(
        [[0.8, -0.6, 7 / (5 * math.sqrt(2))], [0.0, -1.0, 1 / math.sqrt(2)]]
    )  # a.t / (|a| |t|) by hand
    torch.testing.assert_close(BiEncoder.similarity(audio, text), expected)
    with pytest.raises(ValueError, match="similarity"):
        BiEncoder.similarity(audio, torch.zeros(2, 3))


def test_logit_scale_init_and_clamp() -> None:
    model = make_bi_encoder(init_temperature=0.05, max_logit_scale=50.0)
    assert model.log_logit_scale.item() == pytest.approx(math.log(20.0), rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(20.0, rel=1e-6)
    assert model.temperature == pytest.approx(0.05, rel=1e-6)

    # pushed above the bound (e.g. by an optimiser step): the scale used is clamped ...
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(500.0))
    assert model.logit_scale.item() == pytest.approx(50.0, rel=1e-6)
    # ... and, above the bound, receives no gradient: the reason for clamp_logit_scale()
    model.logit_scale.backward()
    assert model.log_logit_scale.grad.item() == 0.0

    model.clamp_logit_scale()
    assert model.log_logit_scale.item() == pytest.approx(math.log(50.0), rel=1e-6)
    # at the bound the gradient flows again (d exp(x)/dx = exp(x) = 50)
    model.log_logit_scale.grad = None
    model.logit_scale.backward()
    assert model.log_logit_scale.grad.item() == pytest.approx(50.0, rel=1e-5)

    # below the bound clamp_logit_scale leaves the parameter alone
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(3.0))
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(3.0, rel=1e-6)


def test_no_weight_decay_names_are_real_parameters() -> None:
    model = make_bi_encoder()
    names = model.no_weight_decay_parameter_names()
    assert names == ["log_logit_scale"]
    assert set(names) <= dict(model.named_parameters()).keys()

    holder = nn.Module()
    holder.model = model
    prefixed = model.no_weight_decay_parameter_names(prefix="model.")
    assert set(prefixed) <= dict(holder.named_parameters()).keys()


def test_bi_encoder_trains_on_info_nce() -> None:
    # gradients reach both encoders, both projections and the temperature
    model = make_bi_encoder()
    outputs = model(torch.randn(4, 16), TEXTS)
    loss = info_nce_loss(outputs["audio_emb"], outputs["text_emb"], outputs["logit_scale"])
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bi_encoder_rejects_bad_arguments() -> None:
    text_encoder = FakeTextEncoder(WORDS)
    with pytest.raises(TypeError, match="clip_dim"):
        BiEncoder(nn.Linear(2, 2), text_encoder)
    with pytest.raises(TypeError, match="embed_dim"):
        BiEncoder(FakeAudioEncoder(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init_temperature"):
        BiEncoder(FakeAudioEncoder(), text_encoder, init_temperature=0.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        BiEncoder(FakeAudioEncoder(), text_encoder, init_temperature=0.001, max_logit_scale=100.0)
    with pytest.raises(ValueError, match="embed_dim"):
        BiEncoder(FakeAudioEncoder(), text_encoder, embed_dim=0)
    model = make_bi_encoder()
    with pytest.raises(TypeError, match="single str"):
        model.encode_text("a dog barks")
    with pytest.raises(ValueError, match="waveforms"):
        model(torch.randn(3, 16), TEXTS)
