"""Start test workers the way torchrun starts ranks: spawned processes that talk over a local port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_workers(worker: Callable[..., None], args: tuple, nprocs: int = 2, timeout_s: float = 90.0) -> None:
    """Run `worker(rank, port, *args)` in `nprocs` spawned processes; fail the test if one fails or they overrun."""
    context = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"DDP workers did not finish within {timeout_s:.0f} s")
