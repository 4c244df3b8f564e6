"""Captioning ensembles: one member equals the model, a shared-vocabulary check, and the caption-eval command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from aac_lightning.ensembles.captioning import CaptionEnsemble, load_captioner
from aac_lightning.config import read_ensemble_config
from aac_lightning.cli import main
from aac_lightning.data import Clotho
from aac_lightning.data.text import Vocabulary
from aac_lightning.metrics.captioning import read_dcase_captioning_csv
from aac_lightning.checkpoints import HandoffError
from tests.test_xe_module import distinct_run, online_run, retrieval_ckpt  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xe_ckpt(distinct_run, tmp_path_factory) -> Path:  # noqa: F811
    """A captioner whose captions differ between clips, so mixed-up clips or members show."""
    module, trainer, _ = distinct_run
    path = tmp_path_factory.mktemp("xe") / "xe.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def other_xe_ckpt(online_run, tmp_path_factory) -> Path:  # noqa: F811
    """Another captioner (other extractor statistics, one epoch): same data, so the same vocabulary."""
    module, trainer = online_run
    path = tmp_path_factory.mktemp("xe") / "other.ckpt"
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
    assert len(set(expected)) >= 3, expected  # a clip mix-up or a batch-order bug would show
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
    from aac_lightning.metrics import caption_metrics

    main(["caption-eval", str(xe_ckpt), "--clotho-root", str(synth_root), "--out", str(tmp_path / "m.json"), "--csv", str(tmp_path / "s.csv")])
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["metrics"]
    assert {"bleu_4", "meteor", "rouge_l", "cider_d"} <= set(metrics)
    fnames, captions = read_dcase_captioning_csv(tmp_path / "s.csv")
    dataset = Clotho(synth_root, "evaluation")
    assert fnames == dataset.fnames
    # each clip's own caption in the CSV (caption-eval decodes up to 20 words, the authors' length),
    # and the metrics are those of the CSV's captions
    own = CaptionEnsemble.from_checkpoints([xe_ckpt], beam_size=3, max_length=20).caption_files([r.path for r in dataset.records], batch_size=1)
    assert captions == own
    assert len(set(captions)) >= 3, captions
    expected = caption_metrics(captions, dataset.captions)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(float(value), abs=1e-6), name


def test_ensemble_of_two_different_captioners_through_captioner_and_caption(xe_ckpt: Path, other_xe_ckpt: Path, synth_root: Path, tmp_path: Path, capsys):
    from aac_lightning import Captioner

    records = Clotho(synth_root, "evaluation").records
    paths = [r.path for r in records]
    members = [load_captioner(p) for p in (xe_ckpt, other_xe_ckpt)]
    alone = [_own_captions(m, paths) for m in members]
    assert alone[0] != alone[1]  # two really different captioners
    ensemble = CaptionEnsemble.from_checkpoints([xe_ckpt, other_xe_ckpt], beam_size=3, max_length=20)
    library = ensemble.caption_files(paths, batch_size=4)
    # the shared beam over each member's own frames, each clip encoded alone by each member's own extractor
    from aac_lightning.data.audio import load_audio

    expected = []
    with torch.no_grad():
        for path in paths:
            outs = []
            for member in members:
                audio, _ = load_audio(path, member.extractor.sample_rate)
                outs.append(member.extractor(audio, torch.tensor([audio.shape[1]])))
            expected += ensemble.decode([o["frames"] for o in outs], [o["frame_lengths"] for o in outs])
    assert library == expected
    assert library != alone[0] or library != alone[1]  # not one member's captions under another name
    captioner = Captioner.from_checkpoint([xe_ckpt, other_xe_ckpt])
    assert captioner.caption(paths, batch_size=2) == [(str(p), c) for p, c in zip(paths, library)]
    # each clip as if alone: the same captions one file at a time, and in the other order
    assert [captioner.caption(p)[0][1] for p in reversed(paths)] == list(reversed(library))
    main(["caption", str(xe_ckpt), str(other_xe_ckpt), *map(str, paths), "--out", str(tmp_path / "c.csv")])
    fnames, captions = read_dcase_captioning_csv(tmp_path / "c.csv")
    assert captions == library and fnames == [str(p) for p in paths]


def test_report_systems_as_configs():
    sizes = {n: len(read_ensemble_config(REPO / "conf" / "captioning" / "ensembles" / f"system{n}.yaml")) for n in (1, 2, 3, 4)}
    assert sizes == {1: 1, 2: 2, 3: 4, 4: 6}


# --------------------------------------------------------------------------------------------------
# The authors' ensemble rule (log_softmax of the mean) against the plain mean, on hand-built members
# --------------------------------------------------------------------------------------------------


class _FakeExtractor(torch.nn.Module):
    sample_rate = 16000

    def forward(self, audio, lengths):
        return {"frames": torch.zeros(audio.shape[0], 1, 1), "frame_lengths": torch.ones(audio.shape[0], dtype=torch.long)}


class _Member:
    """A captioner-like object: a bigram table as its model, a fake extractor, a 6-word vocabulary."""

    def __init__(self, table):
        from tests.test_decoding import BigramModel

        self.model = BigramModel(table, vocab_size=6)
        self.model.anchor = torch.nn.Parameter(torch.zeros(1))  # the ensemble reads its device from a parameter
        self.extractor = _FakeExtractor()
        self.vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "rain", "dog"])

    def eval(self):
        self.model.eval()
        return self


def test_ensemble_renormalises_the_mean_by_default_and_it_changes_the_caption(monkeypatch):
    import aac_lightning.ensembles.waveforms as waveforms

    bos, eos, rain, dog = 1, 2, 4, 5
    # As in tests/test_decoding.py::test_renormalising_the_ensemble_changes_the_caption_as_computed_by_hand:
    # the members agree after bos and after "rain", disagree after "dog". Beam 2, 2 words:
    # plain mean -> "rain" (rain eos .184 beats dog eos .132); renormalised -> "dog" (.44 * .5394 = .2373).
    shared = {bos: {rain: 0.46, dog: 0.44, eos: 0.1}, rain: {eos: 0.4, rain: 0.35, dog: 0.25}}
    one = _Member({**shared, dog: {eos: 0.9, rain: 0.05, dog: 0.05}})
    two = _Member({**shared, dog: {eos: 0.1, rain: 0.05, dog: 0.85}})
    monkeypatch.setattr(waveforms, "load_audio", lambda path, rate: (torch.zeros(1, 100), rate))
    files = ["a.wav", "b.wav", "c.wav"]
    default = CaptionEnsemble([one, two], beam_size=2, max_length=2)
    assert (default.renormalize, default.finished, default.length_penalty) == (True, "collect", 1.0)
    assert default.caption_files(files, batch_size=2) == ["dog"] * 3
    plain = CaptionEnsemble([one, two], beam_size=2, max_length=2, renormalize=False)
    assert plain.caption_files(files, batch_size=2) == ["rain"] * 3
    assert CaptionEnsemble([one, two]).max_length == 20  # the authors' decoding length
    with pytest.raises(ValueError, match="finished must be one of"):
        CaptionEnsemble([one, two], finished="drop")


def test_caption_eval_passes_the_decoding_options(monkeypatch, tmp_path: Path):
    from aac_lightning.commands.evaluate import caption_eval_command

    seen = {}

    class Stop(Exception):
        pass

    def fake_from_checkpoints(paths, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(CaptionEnsemble, "from_checkpoints", staticmethod(fake_from_checkpoints))
    with pytest.raises(Stop):
        caption_eval_command(["x.ckpt", "--clotho-root", str(tmp_path), "--device", "cpu"])
    assert (seen["max_length"], seen["renormalize"], seen["finished"], seen["length_penalty"]) == (20, True, "collect", 1.0)
    seen.clear()
    with pytest.raises(Stop):
        caption_eval_command(
            ["x.ckpt", "--clotho-root", str(tmp_path), "--device", "cpu", "--no-renormalize", "--finished", "keep",
             "--length-penalty", "0", "--max-length", "30"]
        )
    assert (seen["max_length"], seen["renormalize"], seen["finished"], seen["length_penalty"]) == (30, False, "keep", 0.0)
