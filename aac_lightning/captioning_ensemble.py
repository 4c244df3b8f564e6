"""Captioning ensembles: per-step mean of several captioners' log-probabilities inside one shared beam.

Members may have different frozen extractors (architecture, sample rate) and decoders; they must share
the word vocabulary, since their log-probabilities are averaged word by word.

As the SJTU authors decode (``captioning/pytorch_runners/ensemble.py`` and
``configs/dcase2022/ensemble/config.yaml`` of ``wsntxxn/AudioCaption``): the mean is renormalised with
``log_softmax`` at every step, beam 3, at most 20 words, finished hypotheses collected and ranked by
mean log-probability per word (see :func:`aac_lightning.nn.decoding.beam_search`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from aac_lightning.data.audio import load_audio
from aac_lightning.data.datamodules import pad_waveforms
from aac_lightning.data.text import Vocabulary
from aac_lightning.checkpoints import HandoffError, checkpoint_kind, read_checkpoint
from aac_lightning.nn.decoding import DEFAULT_MAX_LENGTH, FINISHED_RULES, beam_search
from aac_lightning.config import read_ensemble_config

log = logging.getLogger(__name__)

CAPTIONER_KINDS = ("xe", "scst")


def load_captioner(path: str | Path, device: str | torch.device = "cpu"):
    """A captioner (XE or SCST) rebuilt from its checkpoint alone, in eval mode."""
    from aac_lightning.config import import_class

    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind not in CAPTIONER_KINDS:
        raise HandoffError(f"'{path}' is a checkpoint of stage kind {kind!r}, not a captioner ({list(CAPTIONER_KINDS)})")
    cls = import_class(ckpt["aac_lightning"]["class_path"])
    return cls.load_for_inference(path, map_location=device)


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
    def from_checkpoints(cls, paths: Sequence[str], device: str | torch.device = "cpu", **kwargs: Any) -> "CaptionEnsemble":
        return cls([load_captioner(p, device) for p in paths], names=[str(p) for p in paths], **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.captioners[0].model.parameters()).device

    @torch.no_grad()
    def caption_files(self, audio_paths: Sequence[str | Path], batch_size: int = 16) -> list[str]:
        """Beam-search captions of audio files (any format and rate; resampled per member)."""
        captions: list[str] = []
        for start in range(0, len(audio_paths), batch_size):
            chunk = list(audio_paths[start : start + batch_size])
            waveforms_by_rate: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            features, lengths = [], []
            for member in self.captioners:
                rate = member.extractor.sample_rate
                if rate not in waveforms_by_rate:  # decode each file once per distinct rate
                    audio, audio_lengths = pad_waveforms([load_audio(p, rate)[0][0] for p in chunk])
                    waveforms_by_rate[rate] = (audio.to(self.device), audio_lengths.to(self.device))
                out = member.extractor(*waveforms_by_rate[rate])
                features.append(out["frames"])  # (B, T', D')
                lengths.append(out["frame_lengths"])
            captions.extend(self.decode(features, lengths))
        return captions

    @torch.no_grad()
    def decode(self, features: Sequence[torch.Tensor], lengths: Sequence[torch.Tensor]) -> list[str]:
        """Captions from each member's frames `(B, T'_m, D_m)` and valid lengths `(B,)`: one shared beam."""
        tokens = beam_search(
            [m.model for m in self.captioners],
            list(features),
            list(lengths),
            beam_size=self.beam_size,
            max_length=self.max_length,
            bos_id=self.vocab.bos_id,
            eos_id=self.vocab.eos_id,
            pad_id=self.vocab.pad_id,
            finished=self.finished,
            length_penalty=self.length_penalty,
            ensemble_renormalize=self.renormalize,
        )  # (B, L)
        return self.vocab.decode_batch(tokens)


def caption_eval_command(args: Sequence[str]) -> None:
    """`aac-lightning caption-eval`: caption a Clotho subset with one captioner or an ensemble and score it."""
    from aac_lightning.data.datasets import Clotho
    from aac_lightning.metrics.captioning import caption_metrics, write_dcase_captioning_csv

    parser = argparse.ArgumentParser(
        prog="aac-lightning caption-eval",
        description="Caption a Clotho subset with one captioner or an ensemble (per-step mean of "
        "log-probabilities in one beam, renormalised) and compute the caption metrics.",
    )
    parser.add_argument("checkpoints", nargs="*", help="XE / SCST checkpoints (several = ensemble)")
    parser.add_argument("--config", help="ensemble config with a 'checkpoints' list (e.g. conf/captioning/ensembles/system2.yaml)")
    parser.add_argument("--clotho-root", required=True, help="folder holding Clotho (or the synthetic data)")
    parser.add_argument("--subset", default="evaluation", help="Clotho subset (default: evaluation)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="longest caption in words (default: 20, the authors')")
    parser.add_argument("--no-renormalize", action="store_true", help="search on the plain mean of the members' log-probabilities (default: log_softmax of the mean, the authors')")
    parser.add_argument("--finished", choices=FINISHED_RULES, default="collect", help="beam rule for finished hypotheses (default: collect, the authors'; keep: they stay in the beam)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="final choice by score / length**p (default: 1, the authors'; 0: raw sum)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--csv", help="write the DCASE task 6a submission CSV here")
    ns = parser.parse_args(args)
    paths = (read_ensemble_config(ns.config) if ns.config else []) + list(ns.checkpoints)
    if not paths:
        parser.error("give checkpoints or --config")
    ensemble = CaptionEnsemble.from_checkpoints(
        paths,
        device=ns.device,
        beam_size=ns.beam_size,
        max_length=ns.max_length,
        renormalize=not ns.no_renormalize,
        finished=ns.finished,
        length_penalty=ns.length_penalty,
    )
    dataset = Clotho(ns.clotho_root, ns.subset, sample_rate=None)
    captions = ensemble.caption_files([r.path for r in dataset.records], batch_size=ns.batch_size)
    metrics = caption_metrics(captions, dataset.captions)
    for name, value in metrics.items():
        print(f"{name:<10} {value:.4f}")
    if ns.out:
        payload = {"checkpoints": paths, "subset": ns.subset, "metrics": metrics}
        Path(ns.out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if ns.csv:
        write_dcase_captioning_csv(ns.csv, dataset.fnames, captions)
