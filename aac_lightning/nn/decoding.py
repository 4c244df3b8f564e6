"""Caption decoding: greedy, sampling (for SCST), batched beam search with ensembles.

Every function works on a model exposing ``vocab_size``, ``encode(features, feature_lengths) ->
DecodingState`` and ``step(state, prev_tokens) -> (log_probs, state)`` (see
:class:`aac_lightning.nn.captioning.CaptionModel`).

Output convention: the generated words **without** the begin-of-sentence token, each row ending
with its end token followed by padding, or cut at ``max_length`` words when it never ended; the
number of columns is the length of the longest row (at most ``max_length``, end token included).

The begin-of-sentence and pad tokens are never generated (their log-probabilities are set to -inf;
sampling renormalises over the other words), so padding only ever follows an end token.

The functions leave the models' train/eval mode alone: call ``model.eval()`` for deterministic
decoding. Greedy and beam search run without gradients; sampling keeps them (SCST).

Defaults follow the SJTU system as its authors ran it (``wsntxxn/AudioCaption``,
``captioning/models/base_model.py`` and ``captioning/pytorch_runners/ensemble.py``): captions of at
most :data:`DEFAULT_MAX_LENGTH` = 20 words; beam search collects finished hypotheses out of the beam
and picks the best by mean log-probability per word (end token counted); an ensemble's step
distribution is the ``log_softmax`` of the members' mean log-probabilities. The earlier behaviour
(finished hypotheses compete in the beam, raw sum of log-probabilities, plain mean) stays available
through ``finished="keep"``, ``length_penalty=0`` and ``ensemble_renormalize=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from aac_lightning.nn.captioning import CaptionModel, DecodingState, check_features

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "FINISHED_RULES",
    "SampledCaptions",
    "beam_search",
    "beam_search_single",
    "combine_log_probs",
    "greedy_decode",
    "sample_decode",
]

DEFAULT_MAX_LENGTH = 20
"""Longest decoded caption in words (end token included), as the SJTU authors decode (``max_length = 20``)."""

FINISHED_RULES = ("collect", "keep")
"""What beam search does with a hypothesis that produced the end token (see :func:`beam_search`)."""


class SampledCaptions(NamedTuple):
    """Output of :func:`sample_decode`; row ``b * num_samples + k`` is sample k of clip b."""

    tokens: Tensor  # (B * num_samples, L) sampled words, pad after the end token
    log_probs: Tensor  # (B * num_samples, L) log-probability of each sampled word, 0 where masked
    mask: Tensor  # (B * num_samples, L) True up to and including the end token


def _check_ids(vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int) -> None:
    for name, value in [("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)]:
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    if eos_id in (bos_id, pad_id):
        raise ValueError(f"eos_id={eos_id} must differ from bos_id={bos_id} and pad_id={pad_id}")


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")


def _forbid_special(log_probs: Tensor, bos_id: int, pad_id: int) -> Tensor:
    """Log-probabilities (N, V) with the bos and pad columns set to -inf."""
    log_probs = log_probs.clone()
    log_probs[:, [bos_id, pad_id]] = float("-inf")
    return log_probs


def _check_beam_size(beam_size: int, vocab_size: int, bos_id: int, pad_id: int) -> None:
    generable = vocab_size - len({bos_id, pad_id})
    if not 1 <= beam_size <= generable:
        raise ValueError(
            f"beam_size must lie in [1, {generable}] (the vocabulary minus bos and pad), got {beam_size}"
        )


def _trim(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Keep the columns up to the longest row's length."""
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    return tokens[:, :longest]


@torch.no_grad()
def greedy_decode(
    model: CaptionModel,
    features: Tensor,
    feature_lengths: Tensor,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> Tensor:
    """Most likely word at each step; returns tokens (B, L) (see the module's output convention)."""
    check_features(features, feature_lengths)
    _check_max_length(max_length)
    _check_ids(model.vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    state = model.encode(features, feature_lengths)
    batch_size = features.shape[0]
    device = features.device
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    for _ in range(max_length):
        log_probs, state = model.step(state, prefix)  # (B, V)
        words = _forbid_special(log_probs, bos_id, pad_id).argmax(dim=-1)
        words = words.masked_fill(finished, pad_id)
        lengths += (~finished).long()
        finished = finished | (words == eos_id)
        prefix = torch.cat([prefix, words.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
    return _trim(prefix[:, 1:], lengths)


def sample_decode(
    model: CaptionModel,
    features: Tensor,
    feature_lengths: Tensor,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampledCaptions:
    """Sample ``num_samples`` captions per clip from ``softmax(logits / temperature)``.

    The distribution excludes bos and pad (renormalised over the other words). ``log_probs`` are the
    log-probabilities of the sampled words under that tempered distribution, with gradients to the
    model (the SCST loss is ``-(reward * log_probs * mask).sum()``). ``mask`` marks the positions up
    to and including each row's end token (all positions of a row that reached ``max_length``
    without one).
    """
    check_features(features, feature_lengths)
    _check_max_length(max_length)
    _check_ids(model.vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    state = model.encode(features, feature_lengths).repeat_interleave(num_samples)
    rows = features.shape[0] * num_samples
    device = features.device
    prefix = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)  # (N, 1)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    step_log_probs, step_masks = [], []
    for _ in range(max_length):
        log_probs, state = model.step(state, prefix)  # (N, V)
        log_probs = torch.log_softmax(_forbid_special(log_probs, bos_id, pad_id) / temperature, dim=-1)
        words = torch.multinomial(log_probs.detach().exp(), 1, generator=generator).squeeze(1)  # (N,)
        chosen = log_probs.gather(1, words.unsqueeze(1)).squeeze(1)  # (N,)
        active = ~finished
        step_masks.append(active)
        step_log_probs.append(torch.where(active, chosen, torch.zeros_like(chosen)))
        words = words.masked_fill(finished, pad_id)
        finished = finished | (words == eos_id)
        prefix = torch.cat([prefix, words.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
    return SampledCaptions(prefix[:, 1:], torch.stack(step_log_probs, dim=1), torch.stack(step_masks, dim=1))


def _as_model_list(models: CaptionModel | Sequence[CaptionModel]) -> list[CaptionModel]:
    model_list = [models] if hasattr(models, "step") else list(models)
    if not model_list:
        raise ValueError("models is empty: give one model or a non-empty sequence of models")
    vocab_sizes = {m.vocab_size for m in model_list}
    if len(vocab_sizes) != 1:
        raise ValueError(f"ensembled models must share one vocabulary, got sizes {sorted(vocab_sizes)}")
    return model_list


def _per_model_inputs(
    features: Tensor | Sequence[Tensor], feature_lengths: Tensor | Sequence[Tensor], num_models: int
) -> list[tuple[Tensor, Tensor]]:
    """One (features, lengths) pair per model: shared tensors or one pair per model."""
    if isinstance(features, Tensor):
        if not isinstance(feature_lengths, Tensor):
            raise ValueError("feature_lengths must be a tensor when features is a tensor")
        pairs = [(features, feature_lengths)] * num_models
    else:
        if isinstance(feature_lengths, Tensor) or len(features) != num_models or len(feature_lengths) != num_models:
            raise ValueError(
                f"with per-model features, give {num_models} feature tensors and {num_models} length tensors"
            )
        pairs = list(zip(features, feature_lengths))
    for f, lengths in pairs:
        check_features(f, lengths)
    if len({f.shape[0] for f, _ in pairs}) != 1:
        raise ValueError("per-model features must all have the same batch size")
    return pairs


def combine_log_probs(member_log_probs: Sequence[Tensor], *, renormalize: bool = True) -> Tensor:
    """Step distribution (N, V) of an ensemble from its members' log-probabilities (each (N, V)).

    The mean of the members' log-probabilities (a normalised geometric mean of their probabilities
    would sum to at most 1); with ``renormalize`` (default, as the SJTU authors' ensemble does:
    ``log_softmax(mean)``) it is renormalised into a proper log-distribution over the vocabulary.
    A single member is returned as it is (its log-probabilities are already normalised).
    """
    if len(member_log_probs) == 0:
        raise ValueError("combine_log_probs needs at least one member's log-probabilities")
    if len(member_log_probs) == 1:
        return member_log_probs[0]
    mean = torch.stack(list(member_log_probs)).mean(dim=0)
    return torch.log_softmax(mean, dim=-1) if renormalize else mean


def _check_finished_rule(finished: str, length_penalty: float) -> None:
    if finished not in FINISHED_RULES:
        raise ValueError(f"finished must be one of {list(FINISHED_RULES)}, got {finished!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")


def _normalised(score: Tensor, length: Tensor, length_penalty: float) -> Tensor:
    """``score / length ** length_penalty`` (float32, identical in the batched and reference searches)."""
    return score / length.to(score.dtype).clamp(min=1.0).pow(length_penalty)


@torch.no_grad()
def beam_search(
    models: CaptionModel | Sequence[CaptionModel],
    features: Tensor | Sequence[Tensor],
    feature_lengths: Tensor | Sequence[Tensor],
    *,
    beam_size: int = 3,
    max_length: int = DEFAULT_MAX_LENGTH,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    finished: str = "collect",
    length_penalty: float = 1.0,
    ensemble_renormalize: bool = True,
    use_cache: bool = True,
) -> Tensor:
    """Batched beam search over the whole batch at once (B * beam_size rows); returns tokens (B, L).

    Search: every clip keeps ``beam_size`` hypotheses ranked by the raw sum of their words'
    log-probabilities. At the first step only the first beam is expanded (the others start at
    -inf) so no hypothesis appears twice.

    Finished hypotheses (``finished``), the two rules:

    - ``"collect"`` (default, the SJTU authors' rule): a hypothesis of the top ``beam_size`` that ends
      with the end token leaves the beam for the clip's list of finished hypotheses; at the next step
      the top ``beam_size`` are drawn from the extensions of the live ones only, so the beam refills.
      The search runs to ``max_length`` words (a longer hypothesis may still score better per word),
      where the live hypotheses are collected too (cut, no end token); it stops earlier only when no
      live hypothesis is left in any clip. The answer is the collected hypothesis maximising
      ``score / length ** length_penalty`` (``length`` = its words, end token included); on a tie the
      one collected first wins (earlier step, then higher raw score), as the authors' stable sort does.
    - ``"keep"`` (the earlier behaviour): a finished hypothesis stays in the beam, extended only by the
      pad token at log-probability 0, and competes with the live ones; the search stops when all beams
      are finished or after ``max_length`` words, and the answer is the surviving hypothesis maximising
      ``score / length ** length_penalty``.

    ``length_penalty`` is the exponent of the length normalisation of the final choice only (not of
    the pruning): 1 (default) ranks by mean log-probability per word as the authors do, 0 by the raw
    sum. The authors' recipe is ``finished="collect", length_penalty=1``; the earlier behaviour of this
    package is ``finished="keep", length_penalty=0``.

    Ensembles: with a sequence of models, each keeps its own state and the search runs on the
    per-step combination :func:`combine_log_probs` of their log-probabilities: ``log_softmax`` of the
    mean with ``ensemble_renormalize=True`` (default, the authors' ensemble), the plain mean with
    ``False``. ``features`` / ``feature_lengths`` are shared by all models, or sequences with one
    entry per model (models with different frozen extractors).

    Args:
        use_cache: reuse each model's cached prefix computations (default); False recomputes the
            whole prefix at every step (same result, slower; kept for checks and measurements).
    """
    model_list = _as_model_list(models)
    inputs = _per_model_inputs(features, feature_lengths, len(model_list))
    _check_max_length(max_length)
    _check_finished_rule(finished, length_penalty)
    vocab_size = model_list[0].vocab_size
    _check_ids(vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    _check_beam_size(beam_size, vocab_size, bos_id, pad_id)
    collect = finished == "collect"

    batch_size = inputs[0][0].shape[0]
    device = inputs[0][0].device
    rows = batch_size * beam_size
    initial_states = [m.encode(f, lengths).repeat_interleave(beam_size) for m, (f, lengths) in zip(model_list, inputs)]
    states = list(initial_states)

    scores = torch.zeros(batch_size, beam_size, device=device)  # (B, K)
    scores[:, 1:] = float("-inf")
    done = torch.zeros(batch_size, beam_size, dtype=torch.bool, device=device)  # (B, K), "keep" rule
    lengths = torch.zeros(batch_size, beam_size, dtype=torch.long, device=device)  # (B, K)
    prefix = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    # Log-probabilities of a finished row under the "keep" rule: only pad, at no cost.
    finished_row = torch.full((vocab_size,), float("-inf"), device=device)
    finished_row[pad_id] = 0.0
    # Row offset of each clip's first beam, to turn a beam index into a row index.
    clip_offsets = torch.arange(batch_size, device=device).unsqueeze(1) * beam_size  # (B, 1)
    # "collect" rule: the best finished hypothesis of each clip so far.
    best_scores = torch.full((batch_size,), float("-inf"), device=device)  # (B,) normalised
    best_tokens = torch.full((batch_size, max_length), pad_id, dtype=torch.long, device=device)  # (B, max_length)
    best_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    for step in range(max_length):
        step_log_probs = []
        for index, model in enumerate(model_list):
            log_probs, new_state = model.step(states[index] if use_cache else initial_states[index], prefix)
            step_log_probs.append(log_probs)
            states[index] = new_state
        log_probs = combine_log_probs(step_log_probs, renormalize=ensemble_renormalize)
        log_probs = _forbid_special(log_probs, bos_id, pad_id)
        if not collect:
            log_probs = torch.where(done.view(rows, 1), finished_row, log_probs)  # (B*K, V)

        candidates = (scores.view(rows, 1) + log_probs).view(batch_size, beam_size * vocab_size)  # (B, K*V)
        scores, flat_index = candidates.topk(beam_size, dim=1)  # (B, K), sorted by raw score
        origin = flat_index // vocab_size  # beam each new hypothesis extends
        words = flat_index % vocab_size  # (B, K)
        origin_rows = (clip_offsets + origin).view(rows)  # (B*K,)
        prefix = torch.cat([prefix.index_select(0, origin_rows), words.view(rows, 1)], dim=1)
        if use_cache:
            # Beams only move inside their clip's group, so the clip tensors stay where they are.
            states = [s.reorder_cache(origin_rows) for s in states]

        if collect:
            # -inf scores: extensions of removed hypotheses (a clip with no live one left).
            valid = torch.isfinite(scores)
            ending = valid & ((words == eos_id) | (step == max_length - 1))  # (B, K)
            length = torch.tensor(float(step + 1), device=device)
            normalised = _normalised(scores, length, length_penalty).masked_fill(~ending, float("-inf"))
            step_best = normalised.argmax(dim=1)  # (B,) first of equal scores: higher raw score
            step_scores = normalised.gather(1, step_best.unsqueeze(1)).squeeze(1)  # (B,)
            better = step_scores > best_scores  # strict: on a tie the earlier one stays
            if bool(better.any()):
                chosen = prefix.index_select(0, clip_offsets.squeeze(1) + step_best)[:, 1:]  # (B, step+1)
                best_tokens[better, : step + 1] = chosen[better]
                best_scores = torch.where(better, step_scores, best_scores)
                best_lengths = torch.where(better, torch.full_like(best_lengths, step + 1), best_lengths)
            scores = scores.masked_fill(ending, float("-inf"))  # out of the beam
            if not bool(torch.isfinite(scores).any()):
                break
        else:
            origin_done = done.gather(1, origin)
            lengths = lengths.gather(1, origin) + (~origin_done).long()
            done = origin_done | (words == eos_id)
            if bool(done.all()):
                break

    if collect:
        return _trim(best_tokens, best_lengths)
    final_scores = _normalised(scores, lengths, length_penalty)  # (B, K)
    best = final_scores.argmax(dim=1)  # (B,)
    best_rows = clip_offsets.squeeze(1) + best
    return _trim(prefix.index_select(0, best_rows)[:, 1:], lengths.gather(1, best.unsqueeze(1)).squeeze(1))


@torch.no_grad()
def beam_search_single(
    model: CaptionModel,
    features: Tensor,
    *,
    beam_size: int = 3,
    max_length: int = DEFAULT_MAX_LENGTH,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    finished: str = "collect",
    length_penalty: float = 1.0,
) -> Tensor:
    """Reference beam search for one clip ``features`` (T, D) of valid frames; returns tokens (L,).

    Same search, ``finished`` rule and final choice as :func:`beam_search`, written as plainly as
    possible: Python lists of hypotheses, one model call per live hypothesis on its whole prefix (no
    cache), bos and pad skipped when ranking words. The result holds no padding.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError("features must be a tensor of shape (frames, dim) for one clip")
    _check_max_length(max_length)
    _check_finished_rule(finished, length_penalty)
    _check_ids(model.vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    _check_beam_size(beam_size, model.vocab_size, bos_id, pad_id)
    device = features.device
    lengths = torch.tensor([features.shape[0]], device=device)
    state: DecodingState = model.encode(features.unsqueeze(0), lengths)

    def final_score(score: Tensor, words: list[int]) -> float:
        return float(_normalised(score, torch.tensor(float(len(words)), device=device), length_penalty))

    def extensions(score: Tensor, words: list[int]) -> list[tuple[Tensor, list[int]]]:
        prefix = torch.tensor([[bos_id, *words]], device=device)
        log_probs, _ = model.step(state, prefix)
        new_scores = score + log_probs[0]  # (V,)
        # Only this hypothesis' own top beam_size generable words can enter the global top beam_size;
        # two more are ranked in case bos and pad are among them.
        ranked = new_scores.topk(min(beam_size + 2, new_scores.shape[0])).indices.tolist()
        return [(new_scores[w], [*words, w]) for w in [w for w in ranked if w not in (bos_id, pad_id)][:beam_size]]

    start = torch.zeros((), device=device)  # scores are float32 0-d tensors, as in the batched search
    if finished == "collect":
        live: list[tuple[Tensor, list[int]]] = [(start, [])]
        best_words: list[int] = []
        best_score = float("-inf")
        for step in range(max_length):
            candidates = [c for score, words in live for c in extensions(score, words)]
            candidates.sort(key=lambda c: float(c[0]), reverse=True)  # stable: ties keep their order
            live = []
            for score, words in candidates[:beam_size]:
                if not math.isfinite(float(score)):
                    continue
                if words[-1] == eos_id or step == max_length - 1:  # collected, out of the beam
                    value = final_score(score, words)
                    if value > best_score:  # strict: the first collected wins a tie
                        best_score, best_words = value, words
                else:
                    live.append((score, words))
            if not live:
                break
        return torch.tensor(best_words, dtype=torch.long, device=device)

    # "keep": a hypothesis: (score, words, finished); finished ones stay in the beam at their score.
    hypotheses: list[tuple[Tensor, list[int], bool]] = [(start, [], False)]
    for _ in range(max_length):
        kept: list[tuple[Tensor, list[int], bool]] = []
        for score, words, is_done in hypotheses:
            if is_done:
                kept.append((score, words, True))
            else:
                kept.extend((s, w, w[-1] == eos_id) for s, w in extensions(score, words))
        kept.sort(key=lambda c: float(c[0]), reverse=True)
        hypotheses = kept[:beam_size]
        if all(is_done for _, _, is_done in hypotheses):
            break
    best = max(hypotheses, key=lambda h: final_score(h[0], h[1]))
    return torch.tensor(best[1], dtype=torch.long, device=device)
