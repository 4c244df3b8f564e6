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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from aac_lightning.nn.captioning import CaptionModel, DecodingState

__all__ = ["SampledCaptions", "beam_search", "beam_search_single", "greedy_decode", "sample_decode"]


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


def _check_features(features: Tensor, feature_lengths: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError("features must be a tensor of shape (batch, frames, dim)")
    if not isinstance(feature_lengths, Tensor) or feature_lengths.shape != (features.shape[0],):
        raise ValueError(f"feature_lengths must have shape ({features.shape[0]},), one length per clip")


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
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> Tensor:
    """Most likely word at each step; returns tokens (B, L) (see the module's output convention)."""
    _check_features(features, feature_lengths)
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
    max_length: int,
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
    _check_features(features, feature_lengths)
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
        _check_features(f, lengths)
    if len({f.shape[0] for f, _ in pairs}) != 1:
        raise ValueError("per-model features must all have the same batch size")
    return pairs


@torch.no_grad()
def beam_search(
    models: CaptionModel | Sequence[CaptionModel],
    features: Tensor | Sequence[Tensor],
    feature_lengths: Tensor | Sequence[Tensor],
    *,
    beam_size: int = 3,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.0,
    use_cache: bool = True,
) -> Tensor:
    """Batched beam search over the whole batch at once (B * beam_size rows); returns tokens (B, L).

    Search: every clip keeps ``beam_size`` hypotheses ranked by the raw sum of their words'
    log-probabilities. At the first step only the first beam is expanded (the others start at
    -inf) so no hypothesis appears twice. A hypothesis that produced the end token is finished: it
    can only be extended by the pad token at log-probability 0, so it keeps its score and competes
    for a place in the beam with the live ones. The search stops when every beam of every clip is
    finished or after ``max_length`` words.

    Length handling: the final choice among a clip's surviving hypotheses maximises
    ``score / length ** length_penalty`` where ``length`` counts the generated words, end token
    included (``max_length`` for a hypothesis cut there). ``length_penalty=0`` (default) keeps the
    raw sum of log-probabilities; ``1`` ranks by mean log-probability per word. Normalisation only
    applies to this final choice, not to the pruning during the search.

    Ensembles: with a sequence of models, each keeps its own state and the search runs on the
    per-step mean of their log-probabilities. ``features`` / ``feature_lengths`` are shared by all
    models, or sequences with one entry per model (models with different frozen extractors).

    Args:
        use_cache: reuse each model's cached prefix computations (default); False recomputes the
            whole prefix at every step (same result, slower; kept for checks and measurements).
    """
    model_list = _as_model_list(models)
    inputs = _per_model_inputs(features, feature_lengths, len(model_list))
    _check_max_length(max_length)
    vocab_size = model_list[0].vocab_size
    _check_ids(vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    _check_beam_size(beam_size, vocab_size, bos_id, pad_id)

    batch_size = inputs[0][0].shape[0]
    device = inputs[0][0].device
    rows = batch_size * beam_size
    initial_states = [m.encode(f, lengths).repeat_interleave(beam_size) for m, (f, lengths) in zip(model_list, inputs)]
    states = list(initial_states)

    scores = torch.zeros(batch_size, beam_size, device=device)  # (B, K)
    scores[:, 1:] = float("-inf")
    finished = torch.zeros(batch_size, beam_size, dtype=torch.bool, device=device)  # (B, K)
    lengths = torch.zeros(batch_size, beam_size, dtype=torch.long, device=device)  # (B, K)
    prefix = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    # Log-probabilities of a finished row: only pad, at no cost.
    finished_row = torch.full((vocab_size,), float("-inf"), device=device)
    finished_row[pad_id] = 0.0
    # Row offset of each clip's first beam, to turn a beam index into a row index.
    clip_offsets = torch.arange(batch_size, device=device).unsqueeze(1) * beam_size  # (B, 1)

    for _ in range(max_length):
        step_log_probs = []
        for index, model in enumerate(model_list):
            log_probs, new_state = model.step(states[index] if use_cache else initial_states[index], prefix)
            step_log_probs.append(log_probs)
            states[index] = new_state
        log_probs = step_log_probs[0] if len(step_log_probs) == 1 else torch.stack(step_log_probs).mean(dim=0)
        log_probs = _forbid_special(log_probs, bos_id, pad_id)
        log_probs = torch.where(finished.view(rows, 1), finished_row, log_probs)  # (B*K, V)

        candidates = (scores.view(rows, 1) + log_probs).view(batch_size, beam_size * vocab_size)  # (B, K*V)
        scores, flat_index = candidates.topk(beam_size, dim=1)  # (B, K)
        origin = flat_index // vocab_size  # beam each new hypothesis extends
        words = flat_index % vocab_size  # (B, K)

        origin_finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~origin_finished).long()
        finished = origin_finished | (words == eos_id)
        origin_rows = (clip_offsets + origin).view(rows)  # (B*K,)
        prefix = torch.cat([prefix.index_select(0, origin_rows), words.view(rows, 1)], dim=1)
        if use_cache:
            # Beams only move inside their clip's group, so the clip tensors stay where they are.
            states = [s.reorder_cache(origin_rows) for s in states]
        if bool(finished.all()):
            break

    final_scores = scores / lengths.clamp(min=1).float().pow(length_penalty)  # (B, K)
    best = final_scores.argmax(dim=1)  # (B,)
    best_rows = clip_offsets.squeeze(1) + best
    return _trim(prefix.index_select(0, best_rows)[:, 1:], lengths.gather(1, best.unsqueeze(1)).squeeze(1))


@torch.no_grad()
def beam_search_single(
    model: CaptionModel,
    features: Tensor,
    *,
    beam_size: int = 3,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.0,
) -> Tensor:
    """Reference beam search for one clip ``features`` (T, D) of valid frames; returns tokens (L,).

    Same search and final choice as :func:`beam_search`, written as plainly as possible: Python
    lists of hypotheses, one model call per live hypothesis on its whole prefix (no cache), bos and
    pad skipped when ranking words. The result holds no padding.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError("features must be a tensor of shape (frames, dim) for one clip")
    _check_max_length(max_length)
    _check_ids(model.vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    _check_beam_size(beam_size, model.vocab_size, bos_id, pad_id)
    lengths = torch.tensor([features.shape[0]], device=features.device)
    state: DecodingState = model.encode(features.unsqueeze(0), lengths)

    # A hypothesis: (score, words, finished); scores are float32 0-d tensors, as in the batched search.
    hypotheses: list[tuple[Tensor, list[int], bool]] = [(torch.zeros((), device=features.device), [], False)]
    for _ in range(max_length):
        candidates: list[tuple[Tensor, list[int], bool]] = []
        for score, words, done in hypotheses:
            if done:
                candidates.append((score, words, True))
                continue
            prefix = torch.tensor([[bos_id, *words]], device=features.device)
            log_probs, _ = model.step(state, prefix)
            new_scores = score + log_probs[0]  # (V,)
            # Only this hypothesis' own top beam_size generable words can enter the global top beam_size;
            # two more are ranked in case bos and pad are among them.
            ranked = new_scores.topk(min(beam_size + 2, new_scores.shape[0])).indices.tolist()
            for word in [w for w in ranked if w not in (bos_id, pad_id)][:beam_size]:
                candidates.append((new_scores[word], [*words, word], word == eos_id))
        candidates.sort(key=lambda candidate: float(candidate[0]), reverse=True)
        hypotheses = candidates[:beam_size]
        if all(done for _, _, done in hypotheses):
            break

    def final_score(hypothesis: tuple[Tensor, list[int], bool]) -> float:
        score, words, _ = hypothesis
        return float(score / torch.tensor(float(max(len(words), 1))).pow(length_penalty))

    best_words = max(hypotheses, key=final_score)[1]
    return torch.tensor(best_words, dtype=torch.long, device=features.device)
