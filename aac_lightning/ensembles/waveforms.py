"""Reading clips for the ensembles: each file decoded once per distinct sample rate."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from torch import Tensor

from aac_lightning.data.audio import load_audio


def read_waveforms(paths: Sequence[str | os.PathLike], rates: Iterable[int]) -> dict[int, list[Tensor]]:
    """``{rate: [mono (T_i,) float32 waveform of each file]}``, files decoded and resampled per rate
    exactly as training reads them (:func:`aac_lightning.data.audio.load_audio`)."""
    return {int(rate): [load_audio(p, int(rate))[0][0] for p in paths] for rate in sorted(set(rates))}
