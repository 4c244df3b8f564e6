"""Reading clips for the ensembles: each file decoded once per distinct sample rate, with a progress bar."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from aac_lightning.data.audio import load_audio


def file_progress(total: int, description: str, progress: bool | None = None) -> tqdm:
    """A tqdm bar over `total` files on stderr (use it as a context manager; pass it to `read_waveforms`).

    Args:
        progress: `True` shows it, `False` hides it, `None` (default) shows it only when stderr is a
            terminal, so logs, pipes and the tests' captured output never get one.
    """
    show = progress if progress is not None else _stderr_is_terminal()
    return tqdm(total=total, desc=description, unit="file", disable=not show, file=sys.stderr)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def read_waveforms(paths: Sequence[str | os.PathLike], rates: Iterable[int], bar: Any | None = None) -> dict[int, list[Tensor]]:
    """``{rate: [mono (T_i,) float32 waveform of each file]}``, files decoded and resampled per rate
    exactly as training reads them (:func:`aac_lightning.data.audio.load_audio`).

    `bar` (from :func:`file_progress`) advances by one per file, once all its rates are read.
    """
    rates = sorted({int(rate) for rate in rates})
    out: dict[int, list[Tensor]] = {rate: [] for rate in rates}
    for path in paths:
        for rate in rates:
            out[rate].append(load_audio(path, rate)[0][0])
        if bar is not None:
            bar.update(1)
    return out
