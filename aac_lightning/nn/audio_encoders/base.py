"""The audio-encoder interface, its input checks, third-party weight files and the one encoding rule.

Every audio encoder maps a batch of mono waveforms at its own ``sample_rate`` to

- ``clip``: one embedding per clip, ``(B, clip_dim)``;
- ``frames``: a sequence of frame features, ``(B, T', frame_dim)``;
- ``frame_lengths``: the number of valid frames per clip, ``(B,)`` long;

and exposes, for frame-level similarity, :meth:`AudioEncoder.frame_times` (the centre time of each
output frame) and :meth:`AudioEncoder.frame_embeddings` (frame features mapped into the clip
embedding space), so that callers never read an encoder's layers.

:func:`encode_clips` is the one way to encode clips outside training (feature extraction, retrieval
embeddings, inference): see its docstring for why.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aac_lightning.checkpoints import load_state_dict_strict

__all__ = [
    "AudioEncoder",
    "check_num_frames",
    "check_waveform",
    "clamp_to_duration",
    "encode_clips",
    "load_checkpoint_file",
    "load_third_party_state",
]


class AudioEncoder(nn.Module):
    """Base class of the audio encoders.

    Subclasses set ``sample_rate``, ``clip_dim`` and ``frame_dim`` and implement ``forward``,
    :meth:`frame_times` and :meth:`frame_embeddings`.
    """

    sample_rate: int
    clip_dim: int
    frame_dim: int

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Encode ``waveform`` (B, T) with optional valid ``lengths`` (B,) in samples.

        Returns a dict with ``clip`` (B, clip_dim), ``frames`` (B, T', frame_dim) and
        ``frame_lengths`` (B,) long.
        """
        raise NotImplementedError

    def frame_times(self, num_frames: int, num_samples: int | None = None) -> torch.Tensor:
        """Centre time in seconds of each of the first ``num_frames`` output frames, ``(num_frames,)`` float64.

        ``num_frames`` is an int (e.g. ``int(frame_lengths[i])``); with ``num_samples`` (the clip's
        length in samples) the times are clipped to the clip's duration.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define frame_times")

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame features ``(..., T', frame_dim)`` -> ``(..., T', clip_dim)`` in the clip-embedding space.

        This is the space the bi-encoder's audio projection reads, so projected frame embeddings
        can be compared with text embeddings (frame-level relevance).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define frame_embeddings")

    def load_pretrained(self, checkpoint: str | Path, trust_checkpoint: bool = False) -> None:
        """Load third-party weights from ``checkpoint`` (format depends on the encoder)."""
        raise NotImplementedError(f"{type(self).__name__} has no pretrained-weight loader")


def clamp_to_duration(times: torch.Tensor, sample_rate: int, num_samples: int | None) -> torch.Tensor:
    """``times`` (s) clipped to the duration of a clip of ``num_samples`` samples (unchanged when None)."""
    return times if num_samples is None else times.clamp(max=int(num_samples) / float(sample_rate))


def check_num_frames(num_frames: int) -> int:
    """``num_frames`` as a non-negative int (a 0-d tensor is accepted)."""
    value = int(num_frames)
    if value < 0:
        raise ValueError(f"num_frames must be >= 0, got {value}")
    return value


def check_waveform(
    waveform: torch.Tensor, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an encoder input; return the waveform and the lengths (full length when None).

    ``waveform`` must be a floating (B, T) tensor; ``lengths`` an integer (B,) tensor with
    ``1 <= lengths <= T``.
    """
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() != 2:
        raise ValueError(f"waveform must have shape (batch, samples), got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        raise ValueError(f"waveform must be a floating tensor, got dtype {waveform.dtype}")
    batch_size, num_samples = waveform.shape
    if num_samples == 0:
        raise ValueError("waveform has zero samples")
    if lengths is None:
        return waveform, torch.full((batch_size,), num_samples, dtype=torch.long, device=waveform.device)
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise ValueError(
            f"lengths must be a 1-D tensor with one entry per waveform ({batch_size}), "
            f"got {getattr(lengths, 'shape', type(lengths).__name__)}"
        )
    if lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    lengths = lengths.to(device=waveform.device, dtype=torch.long)
    if bool((lengths < 1).any()) or bool((lengths > num_samples).any()):
        raise ValueError(
            f"lengths must lie in [1, {num_samples}] (the padded waveform length), got {lengths.tolist()}"
        )
    return waveform, lengths


# --------------------------------------------------------------------------- the encoding rule


def encode_clips(
    encoder: nn.Module, waveform: torch.Tensor, lengths: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Encode a padded batch so that every clip's result equals encoding that clip alone.

    Args:
        encoder: an audio encoder (``forward(waveform (B, T), lengths (B,))`` returning a mapping
            with ``frames`` (B, T', D) and ``frame_lengths`` (B,), plus clip-level entries such as
            ``clip`` (B, clip_dim)).
        waveform: (B, T) clips, zero-padded at the end to the longest.
        lengths: (B,) valid samples per clip; None means every clip fills all T samples.

    Returns:
        The encoder's keys: ``frames`` (B, T'_max, D), zero beyond each clip's ``frame_lengths``
        (B,), and the clip-level entries (e.g. ``clip`` (B, clip_dim)), row i being
        ``encoder(waveform[i:i+1, :lengths[i]], lengths[i:i+1])`` (frames zero-padded to the
        longest clip's frame count).

    How: the rows are grouped by exact length, each group runs as one batch with its padding cut
    off (the encoder never sees padding) and its results are scattered back to their rows.

    Why this is the one rule outside training: training sees unpadded crops (10 s), so a clip
    encoded with padding behind it is a different input than the model learnt from — zero padding
    changes the convolutions (and AST's fbank normalisation and attention) near the clip's end, and
    the encoder's own length rules (minimum length, Wavegram-Logmel's 640-sample multiple) then act
    on the padded length. Cutting the padding makes a clip's features independent of the batch it
    happens to sit in, so every entry point (feature cache, captioning, retrieval evaluation,
    search) gives the same numbers. Clips of equal length (e.g. AudioCaps' 10 s clips, or training
    crops) still run as one batch. The training forward of the bi-encoder does not use this: its
    crops run batched as they are.
    """
    waveform, lengths = check_waveform(waveform, lengths)
    batch_size = waveform.shape[0]
    groups = []  # (rows (G,), outputs of the group)
    for length in torch.unique(lengths).tolist():  # sorted ascending
        rows = torch.nonzero(lengths == length).squeeze(1)  # (G,)
        out = encoder(waveform[rows, :length], lengths[rows])
        if not isinstance(out, Mapping):
            raise TypeError(f"{type(encoder).__name__} must return a mapping of tensors, got {type(out).__name__}")
        groups.append((rows, out))

    first = groups[0][1]
    result: dict[str, torch.Tensor] = {}
    for key, value in first.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(groups[0][0]):
            raise TypeError(f"{type(encoder).__name__} output {key!r} is not a per-clip tensor")
        if key == "frames":
            num_frames = max(out["frames"].shape[1] for _, out in groups)
            shape = (batch_size, num_frames, *value.shape[2:])
        else:
            shape = (batch_size, *value.shape[1:])
        result[key] = value.new_zeros(shape)
    for rows, out in groups:
        for key in result:
            value = out[key]
            if key == "frames":
                if "frame_lengths" in out:
                    valid = torch.arange(value.shape[1], device=value.device)[None, :] < out["frame_lengths"][:, None]
                    value = value * valid.reshape(*valid.shape, *([1] * (value.dim() - 2))).to(value.dtype)
                result[key][rows, : value.shape[1]] = value.to(result[key].dtype)
            else:
                result[key][rows] = value.to(result[key].dtype)
    return result


# --------------------------------------------------------------------------- third-party weights


def _numpy_safe_globals() -> list[Any]:
    """Globals needed to unpickle plain numpy arrays (sampler states in official PANNs files)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        return []

    try:  # numpy >= 2 moved the module; files written with numpy 1.x still name numpy.core
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    dtype_types = {type(np.dtype(kind)) for kind in ("int64", "int32", "float32", "float64", "bool", "uint8")}
    return [
        multiarray._reconstruct,
        multiarray.scalar,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        *dtype_types,
    ]


def load_checkpoint_file(path: str | Path, trust_checkpoint: bool = False) -> Any:
    """Load a third-party torch checkpoint file (official PANNs / AST weights) on the CPU, safely.

    The file is read with ``weights_only=True`` (tensors, containers, numbers; plain numpy arrays
    are allowed too, as official PANNs files carry a data-sampler state made of them). A file that
    needs any other Python object is refused with a ValueError naming those objects, unless
    ``trust_checkpoint=True``, which falls back to a full unpickling: only for files you trust.
    (This package's own checkpoints are read by :func:`aac_lightning.checkpoints.read_checkpoint`.)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except (RuntimeError, EOFError, OSError) as error:  # truncated, empty, or not a torch file
        raise ValueError(f"checkpoint {path} cannot be read: truncated or not a torch checkpoint ({error!r})") from error
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to enrich the message
            unsafe = []
        raise ValueError(
            f"checkpoint {path} cannot be loaded with weights_only=True: it contains Python objects "
            f"other than tensors and containers ({', '.join(unsafe) or error}). If you trust this "
            "file, pass trust_checkpoint=True to unpickle it fully."
        ) from error


def load_third_party_state(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load third-party weights strictly, after dropping the keys under ``ignore_prefixes``.

    The strict load is :func:`aac_lightning.checkpoints.load_state_dict_strict` (its error names
    every missing / unexpected key and shape mismatch); entries that are not tensors are refused.
    """
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    not_tensors = sorted(k for k, v in given.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{source} holds entries that are not tensors: {', '.join(not_tensors[:8])}")
    load_state_dict_strict(module, given, source)
