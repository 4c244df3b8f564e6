"""The caption tab's picture: the clip's log-mel spectrogram with a phrase's frame similarity over it."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["log_mel", "spectrogram_image"]


def log_mel(waveform: np.ndarray, sample_rate: int, n_mels: int = 64, hop_seconds: float = 0.01) -> tuple[np.ndarray, float]:
    """``(log-mel (n_mels, frames) in dB, hop in seconds)`` of a mono ``(T,)`` clip (Hann window, ~64 ms)."""
    from torchlibrosa.stft import LogmelFilterBank, Spectrogram

    hop = max(1, int(round(sample_rate * hop_seconds)))
    n_fft = 1 << int(np.ceil(np.log2(max(2 * hop, 0.064 * sample_rate))))
    spectrogram = Spectrogram(n_fft=n_fft, hop_length=hop, win_length=n_fft, freeze_parameters=True)
    mel = LogmelFilterBank(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sample_rate / 2, freeze_parameters=True)
    with torch.inference_mode():
        power = spectrogram(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))[None])  # (1, 1, frames, bins)
        db = mel(power)[0, 0].T.numpy()  # (n_mels, frames)
    return db, hop / sample_rate


def spectrogram_image(
    waveform: np.ndarray,
    sample_rate: int,
    similarity: tuple[np.ndarray, np.ndarray] | None = None,
    phrase: str = "",
) -> np.ndarray:
    """An RGB image ``(H, W, 3)`` uint8: the log-mel spectrogram, and the similarity curve on a right axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    db, hop = log_mel(waveform, sample_rate)
    duration = len(waveform) / sample_rate
    figure = Figure(figsize=(9, 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    top = float(db.max())
    axes.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top, extent=(0, db.shape[1] * hop, 0, db.shape[0]))
    axes.set_xlabel("time (s)")
    axes.set_ylabel("mel band")
    axes.set_xlim(0, duration)
    if similarity is not None:
        times, scores = similarity
        curve = axes.twinx()
        curve.plot(times, scores, color="#38bdf8", linewidth=2)
        curve.set_ylabel(f"similarity to '{phrase}'" if phrase else "similarity", color="#0284c7")
        curve.set_xlim(0, duration)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)
