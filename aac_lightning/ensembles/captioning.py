"""Captioning ensembles: per-step mean of several captioners' log-probabilities inside one shared beam.

Members may have different frozen extractors (architecture, sample rate) and decoders; they must share
the word vocabulary, since their log-probabilities are averaged word by word.

As the SJTU authors decode (``captioning/pytorch_runners/ensemble.py`` and
``configs/dcase2022/ensemble/config.yaml`` of ``wsntxxn/AudioCaption``): the mean is renormalised with
``log_softmax`` at every step, beam 3, at most 20 words, finished hypotheses collected and ranked by
mean log-probability per word (see :func:`aac_lightning.nn.decoding.beam_search`).

Clips are encoded in one way only: a zero-padded batch ``(B, T)`` with its true lengths ``(B,)``
goes to each member's frozen extractor, which encodes every clip as if it were alone (see
``aac_lightning.nn.audio_encoders.encode_clips``); the captions never depend on the batch.
Command line: ``aac-lightning caption-eval`` (:mod:`aac_lightning.commands.evaluate`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aac_lightning.checkpoints import HandoffError, checkpoint_kind, read_checkpoint
from aac_lightning.data.datamodules import pad_waveforms
from aac_lightning.data.text import Vocabulary
from aac_lightning.ensembles.waveforms import file_progress, read_waveforms
from aac_lightning.modules.captioner import beam_search_captions
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, FINISHED_RULES
from aac_lightning.utils.devices import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "CAPTIONER_KINDS",
    "CaptionEnsemble",
    "caption_audio_folder",
    "evaluate_caption_ensemble",
    "load_captioner",
]

CAPTIONER_KINDS = ("xe", "scst")


def load_captioner(path: str | Path, device: str | torch.device | None = None):
    """A captioner (XE or SCST) rebuilt from its checkpoint alone, in eval mode."""
    from aac_lightning.config import import_class

    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind not in CAPTIONER_KINDS:
        raise HandoffError(f"'{path}' is a checkpoint of stage kind {kind!r}, not a captioner ({list(CAPTIONER_KINDS)})")
    cls = import_class(ckpt["aac_lightning"]["class_path"])
    return cls.load_for_inference(path, map_location=resolve_device(device))


class CaptionEnsemble:
    """Several captioners decoding together (one model = the model itself).

    Args:
        captioners: `CaptioningXE`-like modules with `extractor`, `model` and `vocab`.
        names: labels of the members (checkpoint paths), for messages.
        beam_size: beam width of the shared search.
        max_length: longest caption in words (the authors': 20).
        renormalize: `log_softmax` of the members' mean log-probabilities at each step (the authors'
            ensemble, default); False searches on the plain mean (this package's earlier behaviour).
        finished, length_penalty: the beam search's rule for finished hypotheses and the exponent of
            its length normalisation (see `beam_search`); the defaults are the authors' rule,
            `finished="keep", length_penalty=0.0` this package's earlier one.
    """

    def __init__(
        self,
        captioners: Sequence[Any],
        names: Sequence[str] | None = None,
        beam_size: int = 3,
        max_length: int = DEFAULT_MAX_LENGTH,
        renormalize: bool = True,
        finished: str = "collect",
        length_penalty: float = 1.0,
    ):
        if not captioners:
            raise ValueError("an ensemble needs at least one captioner")
        if finished not in FINISHED_RULES:
            raise ValueError(f"finished must be one of {list(FINISHED_RULES)}, got {finished!r}")
        names = list(names) if names is not None else [f"member {i}" for i in range(len(captioners))]
        vocab = captioners[0].vocab
        for name, member in zip(names, captioners):
            if member.extractor is None:
                raise ValueError(f"{name}: the captioner has no audio extractor")
            if member.vocab != vocab:
                raise ValueError(f"{name}: its vocabulary differs from {names[0]}'s; ensembled captioners must share it")
        self.captioners = [c.eval() for c in captioners]
        self.names = names
        self.vocab: Vocabulary = vocab
        self.beam_size = beam_size
        self.max_length = max_length
        self.renormalize = renormalize
        self.finished = finished
        self.length_penalty = length_penalty

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str], device: str | torch.device | None = None, **kwargs: Any) -> "CaptionEnsemble":
        return cls([load_captioner(p, device) for p in paths], names=[str(p) for p in paths], **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.captioners[0].model.parameters()).device

    @property
    def sample_rates(self) -> list[int]:
        """The distinct audio rates (Hz) the members' extractors read, ascending."""
        return sorted({int(m.extractor.sample_rate) for m in self.captioners})

    @torch.no_grad()
    def encode(self, waveforms: Mapping[int, Sequence[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Each member's frames ``(B, T'_m, D_m)`` and valid lengths ``(B,)`` of a batch of clips.

        ``waveforms`` maps every rate of :attr:`sample_rates` to the clips' mono ``(T_i,)`` waveforms
        at that rate (same clips, same order). The clips are zero-padded into ``(B, T)`` and passed
        with their lengths to each member's extractor: the one way clips are encoded.
        """
        padded: dict[int, tuple[Tensor, Tensor]] = {}
        for rate, waves in waveforms.items():
            audio, lengths = pad_waveforms(list(waves))  # (B, T_max), (B,)
            padded[int(rate)] = (audio.to(self.device), lengths.to(self.device))
        features, lengths = [], []
        for name, member in zip(self.names, self.captioners):
            rate = int(member.extractor.sample_rate)
            if rate not in padded:
                raise ValueError(f"{name}: no waveforms at its extractor's rate {rate} Hz (given: {sorted(padded)})")
            out = member.extractor(*padded[rate])
            features.append(out["frames"])  # (B, T'_m, D_m)
            lengths.append(out["frame_lengths"])  # (B,)
        return features, lengths

    @torch.no_grad()
    def decode(self, features: Sequence[Tensor], lengths: Sequence[Tensor]) -> list[str]:
        """Captions from each member's frames `(B, T'_m, D_m)` and valid lengths `(B,)`: one shared beam."""
        return beam_search_captions(
            [m.model for m in self.captioners],
            self.vocab,
            list(features),
            list(lengths),
            beam_size=self.beam_size,
            max_length=self.max_length,
            finished=self.finished,
            length_penalty=self.length_penalty,
            renormalize=self.renormalize,
        )

    def caption_waveforms(self, waveforms: Mapping[int, Sequence[Tensor]]) -> list[str]:
        """Captions of a batch of clips given as ``{rate: [(T_i,) ...]}`` (see :meth:`encode`)."""
        return self.decode(*self.encode(waveforms))

    def caption_files(self, audio_paths: Sequence[str | os.PathLike], batch_size: int = 16, progress: bool | None = None) -> list[str]:
        """Beam-search captions of audio files (any format and rate; decoded once per member rate).

        `progress`: a bar over the files on stderr (`None`: only when stderr is a terminal).
        """
        captions: list[str] = []
        with file_progress(len(audio_paths), "captioning", progress) as bar:
            for start in range(0, len(audio_paths), batch_size):
                chunk = list(audio_paths[start : start + batch_size])
                captions.extend(self.caption_waveforms(read_waveforms(chunk, self.sample_rates, bar=bar)))
        return captions


def evaluate_caption_ensemble(
    checkpoints: Sequence[str | os.PathLike],
    clotho_root: str | os.PathLike,
    subset: str = "evaluation",
    device: str | torch.device | None = None,
    *,
    beam_size: int = 3,
    max_length: int = DEFAULT_MAX_LENGTH,
    renormalize: bool = True,
    finished: str = "collect",
    length_penalty: float = 1.0,
    batch_size: int = 16,
    metrics: str | Sequence[str] | None = None,
    csv_path: str | os.PathLike | None = None,
    fense_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Caption a Clotho subset with one captioner or an ensemble and score the captions.

    Returns ``{"checkpoints": [...], "subset": ..., "metrics": {name: float}, "unavailable":
    {name: reason}, "captions": [(fname, caption, references), ...]}`` (clips in the dataset's order).
    ``device=None``: CUDA if available, else the CPU. ``metrics``: set and/or metric names for
    :func:`aac_lightning.metrics.captioning.evaluate_captions` (``"dcase2024"``, ...; default: its
    default set); a metric that cannot run is in ``unavailable`` with the reason, never scored 0.
    ``fense_dir``: folder holding the FENSE / SPIDEr-FL models (default: the caches).
    ``csv_path``: also write the DCASE task 6a submission CSV (``file_name,caption_predicted``) there.
    """
    from aac_lightning.data.datasets import Clotho
    from aac_lightning.metrics.captioning import evaluate_captions, write_dcase_captioning_csv
    from aac_lightning.metrics.sets import resolve_caption_metrics

    resolve_caption_metrics(metrics)  # a misspelt metric fails before any decoding

    paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError("checkpoints is empty: give at least one captioning (XE / SCST) checkpoint")
    ensemble = CaptionEnsemble.from_checkpoints(
        paths,
        device=device,
        beam_size=beam_size,
        max_length=max_length,
        renormalize=renormalize,
        finished=finished,
        length_penalty=length_penalty,
    )
    dataset = Clotho(clotho_root, subset, sample_rate=None)  # read at each member's own rate
    captions = ensemble.caption_files([r.path for r in dataset.records], batch_size=batch_size)
    scores, unavailable = evaluate_captions(captions, dataset.captions, metrics=metrics, fense_dir=fense_dir)
    if csv_path is not None:
        write_dcase_captioning_csv(csv_path, dataset.fnames, captions)
    return {
        "checkpoints": paths,
        "subset": subset,
        "metrics": {name: float(value) for name, value in scores.items()},
        "unavailable": unavailable,
        "captions": [(fname, caption, refs) for fname, caption, refs in zip(dataset.fnames, captions, dataset.captions)],
    }


def caption_audio_folder(
    checkpoints: Sequence[str | os.PathLike],
    audio_dir: str | os.PathLike,
    csv_path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    batch_size: int = 16,
    **decoding: Any,
) -> dict[str, Any]:
    """Caption every audio file of a folder (the challenge's evaluation set: no captions) and write the
    DCASE captioning submission (``file_name,caption_predicted``, file names relative to the folder),
    then read it back and check it. ``decoding``: :class:`CaptionEnsemble`'s options.

    Returns ``{"checkpoints", "audio_dir", "csv": path, "captions": [(fname, caption), ...]}``.
    """
    from aac_lightning.data.audio import list_audio_files
    from aac_lightning.metrics.captioning import write_dcase_captioning_csv
    from aac_lightning.metrics.dcase import check_captioning_submission

    paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError("checkpoints is empty: give at least one captioning (XE / SCST) checkpoint")
    audio_paths = [Path(p) for p in list_audio_files(audio_dir)]
    if not audio_paths:
        raise FileNotFoundError(f"no audio files under '{audio_dir}'")
    fnames = [p.relative_to(Path(audio_dir)).as_posix() for p in audio_paths]  # flat folder: the file names
    ensemble = CaptionEnsemble.from_checkpoints(paths, device=device, **decoding)
    captions = ensemble.caption_files(audio_paths, batch_size=batch_size)
    written = write_dcase_captioning_csv(csv_path, fnames, captions)
    check_captioning_submission(written, fnames)
    return {"checkpoints": paths, "audio_dir": str(audio_dir), "csv": str(written), "captions": list(zip(fnames, captions))}
