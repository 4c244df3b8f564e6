"""torch.distributed helpers: rank queries and all-gathers that keep gradients.

Every function here also works without an initialised process group (single process): the
gathers then return their input unchanged, so callers need no special case.

All collectives must be called by every rank in the same order with tensors of the same dtype and
trailing shape; the first dimension may differ between ranks (the gathers pad to the largest size
and cut the padding off again).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_sizes(local_size: int, device: torch.device | str = "cpu") -> list[int]:
    """Gather every rank's ``local_size`` (e.g. its local batch size), in rank order.

    ``device`` must suit the backend (CPU for gloo, the rank's CUDA device for NCCL).
    """
    if local_size < 0:
        raise ValueError(f"local_size must be >= 0, got {local_size}")
    if not is_distributed():
        return [int(local_size)]
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _check_sizes(tensor: torch.Tensor, sizes: list[int] | tuple[int, ...]) -> None:
    if len(sizes) != get_world_size():
        raise ValueError(f"sizes has {len(sizes)} entries, expected one per rank ({get_world_size()})")
    if tensor.ndim == 0:
        raise ValueError("tensor to gather must have at least one dimension (gathered along dim 0)")
    if tensor.shape[0] != sizes[get_rank()]:
        raise ValueError(
            f"sizes[{get_rank()}] = {sizes[get_rank()]} does not match the local tensor's first "
            f"dimension {tensor.shape[0]}"
        )


def _all_gather_concat(tensor: torch.Tensor, sizes: list[int] | tuple[int, ...]) -> torch.Tensor:
    """All-gather along dim 0 and concatenate in rank order, without autograd."""
    max_size = max(sizes)
    padded = tensor.detach()
    if padded.shape[0] < max_size:
        # all_gather needs equal shapes on every rank: pad the short ones with zeros
        padding = padded.new_zeros((max_size - padded.shape[0], *padded.shape[1:]))
        padded = torch.cat([padded, padding], dim=0)
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded.contiguous())
    return torch.cat([buf[:size] for buf, size in zip(buffers, sizes)], dim=0)  # (sum(sizes), ...)


def all_gather_tensor(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order; no gradient flows back.

    Args:
        tensor: local tensor ``(n_local, ...)``.
        sizes: every rank's ``n_local`` (from :func:`all_gather_sizes`); gathered here when None.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        sizes = all_gather_sizes(tensor.shape[0], tensor.device)
    _check_sizes(tensor, sizes)
    return _all_gather_concat(tensor, sizes)


class GatherLayer(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends each rank the gradient of its own rows.

    Forward: ``(n_local, ...) -> (sum(sizes), ...)``, rows in rank order.
    Backward: every rank holds the gradient of *its own* loss with respect to *all* gathered rows;
    summing those over ranks (all-reduce) and keeping this rank's slice gives, for the local rows,
    the gradient of ``sum_r loss_r``. This is what makes a gathered contrastive loss train as if
    the global batch sat on one process (see :class:`aac_lightning.nn.contrastive.ContrastiveLoss`
    for the scaling that turns that sum into the single-process gradient under DDP averaging).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = tuple(sizes)
        ctx.rank = dist.get_rank()
        return _all_gather_concat(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad_output.contiguous().clone()  # (sum(sizes), ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order), keeping the autograd graph.

    Gradients reaching the gathered tensor are summed over ranks and routed back to the rank that
    owns each row (:class:`GatherLayer`). Returns ``tensor`` itself when not distributed.

    Args:
        tensor: local tensor ``(n_local, ...)``.
        sizes: every rank's ``n_local`` (from :func:`all_gather_sizes`); gathered here when None.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        sizes = all_gather_sizes(tensor.shape[0], tensor.device)
    _check_sizes(tensor, sizes)
    return GatherLayer.apply(tensor, tuple(sizes))


def launcher_rank() -> int:
    """Global rank of this process as the launcher set it, known before the process group exists.

    Lightning's DDP launcher, torchrun and SLURM start every rank with its rank in the environment;
    Lightning reads it at import (``rank_zero_only.rank``) and the Trainer keeps it current. Unlike
    :func:`get_rank`, this is right before ``trainer.fit`` initialises ``torch.distributed``.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def is_launcher_rank_zero() -> bool:
    """Rank 0 of a launched run (or a single process): the one process that writes shared files."""
    return launcher_rank() == 0


def barrier() -> None:
    """Wait for every rank of the default group; does nothing when not distributed."""
    if is_distributed():
        dist.barrier()
