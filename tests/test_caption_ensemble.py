"""Captioning ensembles: one member equals the model, a shared-vocabulary check, and the caption-eval command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from aac_lightning.captioning_ensemble import CaptionEnsemble, load_captioner
from aac_lightning.retrieval_ensemble import read_ensemble_config
from aac_lightning.cli import main
from aac_lightning.data import Clotho
from aac_lightning.data.text import Vocabulary
from aac_lightning.metrics.captioning import read_dcase_captioning_csv
from aac_lightning.modules.base import HandoffError
from tests.test_xe_module import online_run, retrieval_ckpt  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xe_ckpt(online_run, tmp_path_factory) -> Path:  # noqa: F811
    module, trainer = online_run
    path = tmp_path_factory.mktemp("xe") / "xe.ckpt"
    trainer.save_checkpoint(path)
    return path


def _own_captions(module, paths: list[Path]) -> list[str]:
    """The member's captions computed without the ensemble: its extractor and `decode`, one clip at a time."""
    from aac_lightning.data.audio import load_audio

    captions = []
    with torch.no_grad():
        for path in paths:
            audio, _ = load_audio(path, module.extractor.sample_rate)
            out = module.extractor(audio, torch.tensor([audio.shape[1]]))
            captions += module.decode(out["frames"], out["frame_lengths"])
    return captions


def test_ensemble_of_one_equals_the_model_and_two_copies_too(xe_ckpt: Path, synth_root: Path):
    paths = [r.path for r in Clotho(synth_root, "evaluation").records]
    member = load_captioner(xe_ckpt)
    expected = _own_captions(member, paths)
    one = CaptionEnsemble.from_checkpoints([xe_ckpt], beam_size=member.hparams.beam_size, max_length=member.hparams.max_decode_length)
    assert one.caption_files(paths, batch_size=4) == expected
    two = CaptionEnsemble.from_checkpoints([xe_ckpt, xe_ckpt], beam_size=member.hparams.beam_size, max_length=member.hparams.max_decode_length)
    assert two.caption_files(paths, batch_size=3) == expected


def test_members_must_share_the_vocabulary(xe_ckpt: Path):
    a = load_captioner(xe_ckpt)
    b = copy.deepcopy(a)
    b.vocab = Vocabulary(list(a.vocab.words[:-1]) + ["zzz"])
    with pytest.raises(ValueError, match="vocabulary differs"):
        CaptionEnsemble([a, b], names=["a", "b"])


def test_a_retrieval_checkpoint_is_not_a_captioner(retrieval_ckpt: Path):  # noqa: F811
    with pytest.raises(HandoffError, match="stage kind 'contrastive', not a captioner"):
        load_captioner(retrieval_ckpt)


def test_caption_eval_command_writes_metrics_and_submission(xe_ckpt: Path, synth_root: Path, tmp_path: Path):
    main(["caption-eval", str(xe_ckpt), "--clotho-root", str(synth_root), "--out", str(tmp_path / "m.json"), "--csv", str(tmp_path / "s.csv")])
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["metrics"]
    assert {"bleu_4", "meteor", "rouge_l", "cider_d"} <= set(metrics)
    fnames, captions = read_dcase_captioning_csv(tmp_path / "s.csv")
    assert fnames == Clotho(synth_root, "evaluation").fnames and all(isinstance(c, str) for c in captions)


def test_report_systems_as_configs():
    sizes = {n: len(read_ensemble_config(REPO / "conf" / "captioning" / "ensembles" / f"system{n}.yaml")) for n in (1, 2, 3, 4)}
    assert sizes == {1: 1, 2: 2, 3: 4, 4: 6}
