"""Retrieval metrics: hand-computed cases with ties, a brute-force sort-based reference,
chunking, embeddings, the accumulating torchmetrics Metric (also across 2 DDP processes)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from aac_lightning.metrics.retrieval import (
    RetrievalRanks,
    audio_to_text_metrics,
    average_similarities,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    retrieval_ranks,
    top_k_candidates,
)
from tests.ddp import spawn_workers

KEYS = ["R@1", "R@5", "R@10", "mAP@10"]


# ---------------------------------------------------------------------------------------------
# independent reference: sort every row, with ties put the relevant items after the others


def brute_force_positions(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based positions of the relevant items when sorting by score (pessimistic ties)."""
    order = np.lexsort((relevant.astype(int), -scores))  # primary: score desc; ties: irrelevant first
    return np.flatnonzero(relevant[order]) + 1


def brute_force_metrics(sim: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    best, aps = [], []
    for scores, rel in zip(sim, relevant):
        positions = brute_force_positions(scores, rel)
        best.append(positions[0])
        aps.append(sum((i + 1) / p for i, p in enumerate(positions) if p <= 10) / len(positions))
    best = np.array(best)
    return {"R@1": np.mean(best <= 1), "R@5": np.mean(best <= 5), "R@10": np.mean(best <= 10), "mAP@10": np.mean(aps)}


def one_hot(targets: torch.Tensor, num_candidates: int) -> np.ndarray:
    relevant = np.zeros((len(targets), num_candidates), dtype=bool)
    relevant[np.arange(len(targets)), targets.numpy()] = True
    return relevant


def assert_metrics_close(actual: dict, expected: dict) -> None:
    assert list(actual) == KEYS
    for key in KEYS:
        assert actual[key] == pytest.approx(float(expected[key]), abs=1e-12), key


# ---------------------------------------------------------------------------------------------
# text-to-audio (one relevant candidate)


def test_hand_computed_with_ties():
    sim = torch.zeros(4, 12)
    sim[0] = torch.linspace(0.0, 0.5, 12)
    sim[0, 0] = 0.9  # target
    sim[0, 7] = 0.9  # tie with the target: ranked ahead -> rank 2
    sim[1] = 0.3
    sim[1, :10] = torch.linspace(0.4, 0.8, 10)
    sim[1, 11] = 0.1  # target 10 scores 0.3: 10 candidates above, one below -> rank 11
    sim[2, 11] = 1.0  # strictly best -> rank 1
    sim[3] = 0.5  # collapsed scores: everything ties -> rank 12
    targets = torch.tensor([0, 10, 11, 4])
    assert retrieval_ranks(sim, targets).tolist() == [2, 11, 1, 12]
    metrics = retrieval_metrics(sim, targets)
    assert metrics == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.5, "mAP@10": pytest.approx((1 / 2 + 0 + 1 + 0) / 4)}
    assert_metrics_close(metrics, brute_force_metrics(sim.numpy(), one_hot(targets, 12)))


def test_collapsed_model_gets_no_credit():
    metrics = retrieval_metrics(torch.ones(20, 20), torch.arange(20))
    assert metrics == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP@10": 0.0}


@pytest.mark.parametrize("integer_scores", [False, True])
def test_matches_brute_force_on_random_data(integer_scores):
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(300, 50, generator=generator)
    if integer_scores:  # many ties
        sim = torch.randint(0, 6, (300, 50), generator=generator).float()
    targets = torch.randint(0, 50, (300,), generator=generator)
    sim[torch.arange(100), targets[:100]] += 3.0  # some good queries so every metric is in (0, 1)
    metrics = retrieval_metrics(sim, targets)
    assert all(0.0 < metrics[k] < 1.0 for k in KEYS)
    assert_metrics_close(metrics, brute_force_metrics(sim.numpy(), one_hot(targets, 50)))


def test_chunked_equals_unchunked_and_embeddings_equal_matrix():
    generator = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(97, 16, generator=generator), dim=1)
    candidates = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
    targets = torch.randint(0, 40, (97,), generator=generator)
    sim = queries @ candidates.T
    full = retrieval_ranks(sim, targets, chunk_size=1000)
    for chunk_size in (1, 7, 97):
        assert torch.equal(retrieval_ranks(sim, targets, chunk_size=chunk_size), full)
        assert retrieval_metrics_from_embeddings(queries, candidates, targets, chunk_size=chunk_size) == \
            retrieval_metrics(sim, targets)


def test_metrics_from_ranks_hand_values():
    assert metrics_from_ranks(torch.tensor([1, 3, 6, 10, 11])) == {
        "R@1": 0.2, "R@5": 0.4, "R@10": 0.8, "mAP@10": pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 10) / 5)
    }


# ---------------------------------------------------------------------------------------------
# audio-to-text (several relevant captions)


def test_audio_to_text_hand_computed():
    # 2 audios, 6 captions; captions 0-2 describe audio 0, captions 3-5 audio 1
    caption_to_audio = torch.tensor([0, 0, 0, 1, 1, 1])
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.8, 0.5, 0.0],  # relevant 0.9, 0.5, 0.1; irrelevant 0.8, 0.5, 0.0
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tie: relevant at positions 4, 5, 6
        ]
    )
    # audio 0 sorted: 0.9(R) 0.8 0.5(irrelevant first on the tie) 0.5(R) 0.1(R) 0.0 -> p = 1, 4, 5
    ap0 = (1 / 1 + 2 / 4 + 3 / 5) / 3
    ap1 = (1 / 4 + 2 / 5 + 3 / 6) / 3
    metrics = audio_to_text_metrics(sim, caption_to_audio)
    assert metrics == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "mAP@10": pytest.approx((ap0 + ap1) / 2)}
    relevant = caption_to_audio[None, :].numpy() == np.arange(2)[:, None]
    assert_metrics_close(metrics, brute_force_metrics(sim.numpy(), relevant))


@pytest.mark.parametrize("integer_scores", [False, True])
def test_audio_to_text_matches_brute_force(integer_scores):
    generator = torch.Generator().manual_seed(2)
    num_audio = 60
    # 1 to 5 captions per audio, shuffled
    counts = torch.randint(1, 6, (num_audio,), generator=generator)
    caption_to_audio = torch.repeat_interleave(torch.arange(num_audio), counts)
    caption_to_audio = caption_to_audio[torch.randperm(len(caption_to_audio), generator=generator)]
    sim = torch.randn(num_audio, len(caption_to_audio), generator=generator)
    if integer_scores:
        sim = torch.randint(0, 4, sim.shape, generator=generator).float()
    sim += 1.5 * (caption_to_audio[None, :] == torch.arange(num_audio)[:, None])
    relevant = caption_to_audio[None, :].numpy() == np.arange(num_audio)[:, None]
    expected = brute_force_metrics(sim.numpy(), relevant)
    for chunk_size in (1, 13, 256):
        assert_metrics_close(audio_to_text_metrics(sim, caption_to_audio, chunk_size=chunk_size), expected)


def test_audio_to_text_with_one_caption_each_equals_single_relevant():
    generator = torch.Generator().manual_seed(3)
    sim = torch.randn(30, 30, generator=generator)
    order = torch.randperm(30, generator=generator)  # caption j describes audio order[j]
    single = retrieval_metrics(sim, torch.argsort(order))  # audio a's caption is argsort(order)[a]
    assert audio_to_text_metrics(sim, order) == single


# ---------------------------------------------------------------------------------------------
# the accumulating Metric


def test_metric_equals_function_over_batches_both_modes():
    generator = torch.Generator().manual_seed(4)
    sim = torch.randint(0, 8, (50, 25), generator=generator).float()
    targets = torch.randint(0, 25, (50,), generator=generator)
    metric = RetrievalRanks(chunk_size=4)
    for start in (0, 13, 30):
        stop = {0: 13, 13: 30, 30: 50}[start]
        metric.update(sim[start:stop], targets[start:stop])
    computed = {k: float(v) for k, v in metric.compute().items()}
    assert computed == retrieval_metrics(sim, targets)

    caption_to_audio = torch.arange(50) % 10
    sim_a2t = torch.randn(10, 50, generator=generator)
    mask = caption_to_audio[None, :] == torch.arange(10)[:, None]
    metric = RetrievalRanks()
    metric.update(sim_a2t[:4], mask[:4])
    metric.update(sim_a2t[4:], mask[4:])
    assert {k: float(v) for k, v in metric.compute().items()} == audio_to_text_metrics(sim_a2t, caption_to_audio)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no queries"):
        metric.compute()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        sim, targets = _ddp_data()
        rows = slice(0, 23) if rank == 0 else slice(23, None)  # unequal shares
        metric = RetrievalRanks()
        metric.update(sim[rows], targets[rows])
        torch.save({k: float(v) for k, v in metric.compute().items()}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before the group is torn down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()
    # Results are on disk: leave without interpreter teardown, where gloo's background threads
    # can abort the process ("terminate called without an active exception") on a loaded machine.
    os._exit(0)


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(40, 30, generator=generator), torch.randint(0, 30, (40,), generator=generator)


@pytest.mark.ddp
def test_metric_gathers_queries_of_all_ddp_ranks(tmp_path: Path):
    spawn_workers(_ddp_worker, (str(tmp_path),), nprocs=2, timeout_s=90)
    expected = retrieval_metrics(*_ddp_data())
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected


# ---------------------------------------------------------------------------------------------
# helpers and errors


def test_average_similarities_and_top_k():
    a = torch.tensor([[1.0, 0.0, 0.5]])
    b = torch.tensor([[0.0, 1.0, 0.5]])
    c = torch.tensor([[0.5, 0.2, 0.5]])
    mean = average_similarities([a, b, c])
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.4, 0.5]]))
    assert torch.equal(a, torch.tensor([[1.0, 0.0, 0.5]]))  # inputs untouched
    values, indices = top_k_candidates(torch.tensor([[0.1, 0.7, 0.3, 0.9]]), k=2)
    assert indices.tolist() == [[3, 1]] and values[0].tolist() == pytest.approx([0.9, 0.7])
    assert top_k_candidates(torch.tensor([[0.1, 0.7]]), k=10)[1].tolist() == [[1, 0]]  # k clipped to C


def test_bad_inputs_raise_clear_errors():
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 queries"):
        retrieval_metrics(sim, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        retrieval_metrics(sim, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(sim, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(sim, torch.tensor([0, 1, 2]), chunk_size=0)
    with pytest.raises(ValueError, match="share D"):
        retrieval_metrics_from_embeddings(torch.randn(3, 5), torch.randn(4, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="audio 1 has no caption"):
        audio_to_text_metrics(torch.randn(3, 4), torch.tensor([0, 0, 2, 2]))
    with pytest.raises(ValueError, match="4 entries for 5 captions"):
        audio_to_text_metrics(torch.randn(2, 5), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        average_similarities([torch.zeros(2, 3), torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="empty"):
        average_similarities([])
