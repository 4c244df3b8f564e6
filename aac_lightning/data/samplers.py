"""Distributed samplers that neither drop nor (at evaluation) repeat samples."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class ShardedEvalSampler(DistributedSampler):
    """Evaluation sampler: rank `r` of `W` gets indices `r, r + W, r + 2W, ...`, in order.

    Every sample is evaluated exactly once over all ranks (PyTorch's `DistributedSampler` pads with
    repeats, which would count some clips twice). Ranks may get one sample more or less than each
    other, which is fine for evaluation steps that run no collective operation; metrics accumulate in
    `torchmetrics` states and synchronise once at the end. Subclassing `DistributedSampler` tells
    Lightning not to replace it.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class EvenTrainSampler(DistributedSampler):
    """Training sampler giving every rank the same number of batches with each sample used once.

    The epoch's permutation (seeded by `seed + epoch`, the same on every rank) is cut into global
    batches of `batch_size * W`; rank `r` takes positions `r::W` of each, so the union of the ranks'
    batches is the single-process global batch. Only when the last global batch has fewer than `W`
    samples is it topped up with samples from the start of the permutation (at most `W - 1` repeats
    per epoch), because every rank must run the same number of steps.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self._indices_cache: list[int] | None = None

    def _global_order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=generator).tolist()
        return list(range(n))

    def rank_indices(self) -> list[int]:
        order = self._global_order()
        world, global_batch = self.num_replicas, self.batch_size * self.num_replicas
        remainder = len(order) % global_batch
        if 0 < remainder < world:
            order = order + order[: world - remainder]
        indices = []
        for start in range(0, len(order), global_batch):
            indices.extend(order[start : start + global_batch][self.rank :: world])
        return indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices())

    def __len__(self) -> int:
        n, world, global_batch = len(self.dataset), self.num_replicas, self.batch_size * self.num_replicas
        full, remainder = divmod(n, global_batch)
        if remainder == 0:
            return full * self.batch_size
        remainder = max(remainder, world)
        return full * self.batch_size + len(range(self.rank, remainder, world))
