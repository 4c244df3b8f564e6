"""The gathered InfoNCE under DistributedDataParallel trains exactly like one process.

Two CPU processes (gloo) each take a share of one global batch, run a tiny bi-encoder wrapped in
DistributedDataParallel, and back-propagate :class:`ContrastiveLoss`. The rank-averaged loss and
the gradients after DDP's averaging must equal a single process running :func:`info_nce_loss` on
the whole global batch. Same-clip duplicates sit both inside one rank and across the two ranks, so
the clip-id gathering and masking are exercised too.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from aac_lightning.nn.bi_encoder import BiEncoder
from aac_lightning.nn.contrastive import ContrastiveLoss, info_nce_loss
from tests.ddp import spawn_workers

WORLD_SIZE = 2
WORDS = "a dog barks cat meows rain falls car passes bird sings loud quiet".split()
# global batch of 8 pairs; clip 11 twice on rank 0, clips 10 and 12 on both ranks (equal split)
CLIP_IDS = [10, 11, 12, 11, 10, 13, 12, 14]
TEXTS = [
    "a dog barks",
    "a cat meows",
    "rain falls",
    "a quiet cat meows",
    "a loud dog barks",
    "a car passes",
    "loud rain falls",
    "a bird sings",
]
# rows of the global batch given to rank 0; rank 1 gets the rest
SPLITS = {"equal": 4, "unequal": 5}


class TinyAudioEncoder(nn.Module):
    """Waveform (B, 16) -> Linear -> (B, clip_dim)."""

    def __init__(self, clip_dim: int = 6) -> None:
        super().__init__()
        self.clip_dim = clip_dim
        self.proj = nn.Linear(16, clip_dim)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        clip = torch.tanh(self.proj(waveform))  # (B, D)
        frame_lengths = torch.ones(len(clip), dtype=torch.long)
        return {"clip": clip, "frames": clip[:, None], "frame_lengths": frame_lengths}


class TinyTextEncoder(nn.Module):
    """Mean of word embeddings."""

    def __init__(self, embed_dim: int = 5) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.word_index = {word: i for i, word in enumerate(WORDS)}
        self.embedding = nn.EmbeddingBag(len(WORDS), embed_dim, mode="mean")

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.word_index[w] for w in text.split()]) for text in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.embedding(torch.cat(ids), offsets)  # (B, H)


def build_model() -> BiEncoder:
    torch.manual_seed(0)
    return BiEncoder(TinyAudioEncoder(), TinyTextEncoder(), embed_dim=4, init_temperature=0.1)


def global_batch() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    clip_waveforms = torch.randn(max(CLIP_IDS) + 1, 16, generator=generator)
    clip_ids = torch.tensor(CLIP_IDS)
    return clip_waveforms[clip_ids], list(TEXTS), clip_ids  # same clip -> same waveform


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        waveform, texts, clip_ids = global_batch()
        results = {}
        for split_name, rank0_rows in SPLITS.items():
            rows = slice(0, rank0_rows) if rank == 0 else slice(rank0_rows, len(texts))
            model = nn.parallel.DistributedDataParallel(build_model())
            outputs = model(waveform[rows], texts[rows])
            loss = ContrastiveLoss(gather=True)(
                outputs["audio_emb"], outputs["text_emb"], outputs["logit_scale"], clip_ids[rows]
            )
            loss.backward()
            reported = loss.detach().clone()
            dist.all_reduce(reported)  # what a sync_dist=True log shows: mean over ranks
            reported /= WORLD_SIZE
            # without gathering, each rank sees only its own pairs as negatives
            local_only = ContrastiveLoss(gather=False)(
                outputs["audio_emb"].detach(), outputs["text_emb"].detach(), 10.0, clip_ids[rows]
            )
            local_reference = info_nce_loss(
                outputs["audio_emb"].detach(), outputs["text_emb"].detach(), 10.0, clip_ids=clip_ids[rows]
            )
            results[split_name] = {
                "loss": loss.detach(),
                "reported": reported,
                "local_only": local_only,
                "local_reference": local_reference,
                "grads": {name: p.grad.detach().clone() for name, p in model.module.named_parameters()},
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks finish their collectives before either tears the group down (gloo aborts otherwise).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Results are on disk: leave without interpreter teardown, where gloo's background threads
    # can abort the process ("terminate called without an active exception") on a loaded machine.
    os._exit(0)


def _run_workers(out_dir: Path, timeout_s: float = 90.0) -> None:
    spawn_workers(_worker, (str(out_dir),), WORLD_SIZE, timeout_s)


def _single_process_reference(rank0_rows: int) -> dict:
    model = build_model()
    waveform, texts, clip_ids = global_batch()
    outputs = model(waveform, texts)
    loss = info_nce_loss(outputs["audio_emb"], outputs["text_emb"], outputs["logit_scale"], clip_ids=clip_ids)
    loss.backward()
    with torch.no_grad():
        local_losses = []
        for rows in (slice(0, rank0_rows), slice(rank0_rows, len(texts))):
            local_losses.append(
                info_nce_loss(
                    outputs["audio_emb"][rows], outputs["text_emb"][rows], 10.0, clip_ids=clip_ids[rows]
                )
            )
    return {
        "loss": loss.detach(),
        "local_losses": local_losses,
        "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
    }


@pytest.mark.ddp
def test_gathered_info_nce_under_ddp_equals_single_process(tmp_path: Path) -> None:
    _run_workers(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for split_name, rank0_rows in SPLITS.items():
        reference = _single_process_reference(rank0_rows)
        per_rank = [r[split_name] for r in ranks]
        # (a) the rank-averaged loss is eq. 6 on the global batch
        for result in per_rank:
            torch.testing.assert_close(result["reported"], reference["loss"], atol=1e-6, rtol=1e-6)
        # each rank's loss is (W / N) * its rows' terms; with equal shards that is the local mean
        torch.testing.assert_close(
            (per_rank[0]["loss"] + per_rank[1]["loss"]) / WORLD_SIZE, reference["loss"], atol=1e-6, rtol=1e-6
        )
        assert not torch.allclose(per_rank[0]["loss"], per_rank[1]["loss"])  # the shares do differ
        # (b) gradients after DDP's averaging equal the single-process gradients, on both ranks
        assert set(per_rank[0]["grads"]) == set(reference["grads"])
        for name, expected in reference["grads"].items():
            assert expected.abs().sum() > 0, name
            for rank, result in enumerate(per_rank):
                torch.testing.assert_close(
                    result["grads"][name],
                    expected,
                    atol=1e-6,
                    rtol=1e-5,
                    msg=f"{split_name} rank {rank} {name}",
                )
        # gather=False: the plain local eq. 6 on each rank's own pairs
        for rank, result in enumerate(per_rank):
            torch.testing.assert_close(result["local_only"], result["local_reference"])
            torch.testing.assert_close(
                result["local_only"], reference["local_losses"][rank], atol=1e-6, rtol=1e-6
            )
