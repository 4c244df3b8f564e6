"""Audio encoders: the common interface, checkpoint helpers and the name registry.

Every audio encoder maps a batch of mono waveforms at its own ``sample_rate`` to

- ``clip``: one embedding per clip, ``(B, clip_dim)``;
- ``frames``: a sequence of frame embeddings, ``(B, T', frame_dim)``;
- ``frame_lengths``: the number of valid frames per clip, ``(B,)`` long.

The concrete encoders live in :mod:`aac_lightning.nn.panns` (CNN14, Wavegram-Logmel-CNN14) and
:mod:`aac_lightning.nn.ast` (Audio Spectrogram Transformer); :func:`load_audio_encoder` builds one
by name and optionally loads third-party (official) weights into it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUDIO_ENCODER_NAMES",
    "AudioEncoder",
    "load_audio_encoder",
    "load_checkpoint_file",
    "load_state_dict_checked",
]

AUDIO_ENCODER_NAMES = ("cnn14", "wavegram_logmel_cnn14", "ast")


class AudioEncoder(nn.Module):
    """Base class of the audio encoders.

    Subclasses set ``sample_rate``, ``clip_dim`` and ``frame_dim`` and implement ``forward``.
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

    def load_pretrained(self, checkpoint: str | Path, trust_checkpoint: bool = False) -> None:
        """Load third-party weights from ``checkpoint`` (format depends on the encoder)."""
        raise NotImplementedError(f"{type(self).__name__} has no pretrained-weight loader")


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


def _numpy_safe_globals() -> list[Any]:
    """Globals needed to unpickle plain numpy arrays (sampler states in official PANNs files)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        return []
    import importlib

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
    """Load a torch checkpoint file on the CPU without running arbitrary pickled code.

    The file is read with ``weights_only=True`` (tensors, containers, numbers; plain numpy arrays
    are allowed too, as official PANNs files carry a data-sampler state made of them). A file that
    needs any other Python object is refused with a ValueError naming those objects, unless
    ``trust_checkpoint=True``, which falls back to a full unpickling: only for files you trust.
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


def _name_list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore_prefixes: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module`` strictly, after dropping keys under ``ignore_prefixes``.

    Any other missing or unexpected key, or a shape mismatch, raises a ValueError naming the keys.
    """
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_list(unexpected)}")
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)})"
        for k, v in given.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches: {_name_list(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(given, strict=True)


def load_audio_encoder(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> AudioEncoder:
    """Build the audio encoder called ``name`` and optionally load third-party weights.

    Args:
        name: ``"cnn14"``, ``"wavegram_logmel_cnn14"`` or ``"ast"``.
        checkpoint: path to an official checkpoint (PANNs ``.pth`` with a ``"model"`` entry, or an
            AudioSet-trained AST ``.pth``); None keeps the random initialisation.
        **kwargs: constructor arguments of the encoder class (e.g. ``channels`` for CNN14,
            ``embed_dim``/``depth`` for AST); ``trust_checkpoint`` (and, for AST,
            ``checkpoint_grid``) go to the encoder's ``load_pretrained``.
    """
    load_kwargs: dict[str, Any] = {"trust_checkpoint": bool(kwargs.pop("trust_checkpoint", False))}
    if "checkpoint_grid" in kwargs:  # AST only: patch grid of the checkpoint when it is ambiguous
        load_kwargs["checkpoint_grid"] = kwargs.pop("checkpoint_grid")
    key = name.lower().replace("-", "_")
    if key == "cnn14":
        from aac_lightning.nn.panns import Cnn14

        encoder: AudioEncoder = Cnn14(**kwargs)
    elif key in ("wavegram_logmel_cnn14", "wlcnn14"):
        from aac_lightning.nn.panns import WavegramLogmelCnn14

        encoder = WavegramLogmelCnn14(**kwargs)
    elif key == "ast":
        from aac_lightning.nn.ast import AST

        encoder = AST(**kwargs)
    else:
        raise ValueError(f"unknown audio encoder name {name!r}; expected one of {AUDIO_ENCODER_NAMES}")
    if checkpoint is not None:
        encoder.load_pretrained(checkpoint, **load_kwargs)
    return encoder
