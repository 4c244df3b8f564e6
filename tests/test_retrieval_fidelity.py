"""The SJTU recipe as its authors ran it (issue 11): the options that follow wsntxxn/DCASE2022T6_CLAP
and wsntxxn/AudioCaption, their defaults in the SJTU configs, and the old behaviour kept as options.

Truths used here are independent of this package: plain cross entropies for the loss, torchaudio's
MelSpectrogram + AmplitudeToDB for the authors' CNN14 front end, and the Stanford PTB tokenizer jar
(the one pycocoevalcap runs) for caption tokenisation.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from aac_lightning.cli import main
from aac_lightning.data import Vocabulary, normalize_caption
from aac_lightning.data.text import tokenize_caption
from aac_lightning.nn.contrastive import ContrastiveLoss, info_nce_loss
from aac_lightning.nn.audio_encoders.panns import Cnn14
from aac_lightning.config import read_configs

REPO = Path(__file__).resolve().parents[1]
RETRIEVAL = REPO / "conf" / "retrieval"
MODEL_CONFIGS = ("wlcnn14_bert_base", "cnn14_bert_medium", "cnn14_bert_base", "cnn14_roberta_base", "ast_bert_base")


# ------------------------------------------------------------------------------ loss


def _embeddings(n: int = 6, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    audio = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    return audio, text


def test_mean_direction_reduction_is_the_authors_info_nce():
    audio, text = _embeddings()
    scale = 7.5
    # the authors' models/loss.py: logit = s * a @ t.T; (CE(logit.T, arange) + CE(logit, arange)) / 2
    logits = scale * audio @ text.T
    labels = torch.arange(audio.shape[0])
    authors = (F.cross_entropy(logits.T, labels) + F.cross_entropy(logits, labels)) / 2
    mean = info_nce_loss(audio, text, scale, direction_reduction="mean")
    torch.testing.assert_close(mean, authors)
    torch.testing.assert_close(info_nce_loss(audio, text, scale), 2 * authors)  # eq. 6 sums: twice
    torch.testing.assert_close(ContrastiveLoss(gather=False, direction_reduction="mean")(audio, text, scale), authors)
    with pytest.raises(ValueError, match="direction_reduction must be 'sum'"):
        ContrastiveLoss(direction_reduction="avg")
    with pytest.raises(ValueError, match="direction_reduction must be 'sum'"):
        info_nce_loss(audio, text, scale, direction_reduction="none")


def test_unmasked_same_clip_captions_are_negatives_as_in_the_authors_code():
    audio, text = _embeddings(n=4, seed=1)
    clip_ids = torch.tensor([0, 0, 1, 2])  # two captions of clip 0 in the batch
    logits = 3.0 * audio @ text.T
    labels = torch.arange(4)
    plain = (F.cross_entropy(logits.T, labels) + F.cross_entropy(logits, labels)) / 2
    # The module passes no clip ids when mask_same_clip is False: plain diagonal targets.
    torch.testing.assert_close(info_nce_loss(audio, text, 3.0, direction_reduction="mean"), plain)
    masked = info_nce_loss(audio, text, 3.0, clip_ids=clip_ids, direction_reduction="mean")
    assert masked.item() < plain.item()  # the old option still differs (fewer negatives)


# ------------------------------------------------------------------------------ configs


def _model_args(name: str, stage: str = "pretrain_audiocaps") -> dict:
    config = read_configs([str(RETRIEVAL / f"{name}.yaml"), str(RETRIEVAL / f"{stage}.yaml")])
    return config["model"]["init_args"]


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_sjtu_retrieval_configs_use_the_authors_values(name: str):
    args = _model_args(name)
    assert args["text_max_length"] == 30  # data.json: max_text_length
    assert args["mask_same_clip"] is False
    assert args["loss_direction_reduction"] == "mean"
    if name.startswith("ast"):
        assert "spec_augment" not in (args["audio_encoder_kwargs"] or {})  # the AST encoder has none
    else:
        assert args["audio_encoder_kwargs"]["spec_augment"] is False


def test_audiocaps_stage_configs_skip_missing_clips_and_clotho_finetuning_does_not():
    for stage in ("pretrain_audiocaps", "pretrain_all"):
        data = yaml.safe_load((RETRIEVAL / f"{stage}.yaml").read_text())["data"]["init_args"]
        assert "audiocaps" in data["train_sources"] and data["on_missing"] == "skip", stage
    finetune = yaml.safe_load((RETRIEVAL / "finetune_clotho.yaml").read_text())["data"]["init_args"]
    assert finetune.get("on_missing", "error") == "error"


def test_cli_shows_the_new_options_with_the_authors_defaults(capsys, synth_root: Path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "ContrastiveRetrieval", "--model.text_encoder", "minilm-l6",
              "--data", "RetrievalDataModule", "--data.clotho_root", str(synth_root), "--print_config"])
    assert exit_info.value.code in (0, None)
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["text_max_length"] == 30
    assert init_args["mask_same_clip"] is False
    assert init_args["loss_direction_reduction"] == "mean"
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ContrastiveRetrieval"])
    shown = capsys.readouterr().out
    assert "--model.loss_direction_reduction" in shown and "--model.mask_same_clip" in shown


# ------------------------------------------------------------------------------ audio front end

TINY = dict(sample_rate=32000, channels=(4, 8, 8, 8, 8, 8), embed_dim=16)


def test_spec_augment_off_never_runs_and_on_still_does():
    off = Cnn14(**TINY, spec_augment=False).train()
    assert off.spec_augmenter is None
    torch.manual_seed(0)
    waveform = torch.randn(2, 32000) * 0.1
    off(waveform)  # trains without it
    on = Cnn14(**TINY, spec_augment=True).train()
    calls = []
    on.spec_augmenter.register_forward_hook(lambda *args: calls.append(1))
    on(waveform)
    assert calls == [1]


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="torchaudio not installed")
def test_cnn14_log_mel_equals_the_authors_torchaudio_front_end():
    import torchaudio

    encoder = Cnn14(**TINY).eval()
    # models/audio_encoder.py, Cnn14 at 32 kHz: 32 ms window, 10 ms hop, 64 slaney mel bins 50-14000 Hz, power dB
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=32000, n_fft=1024, win_length=1024, hop_length=320, f_min=50, f_max=14000,
        n_mels=64, norm="slaney", mel_scale="slaney",
    )
    to_db = torchaudio.transforms.AmplitudeToDB()
    torch.manual_seed(1)
    waveform = torch.randn(2, 32000 * 2) * 0.2
    expected = to_db(mel(waveform)).transpose(1, 2)  # (B, T, mel)
    with torch.no_grad():
        ours = encoder.logmel_extractor(encoder.spectrogram_extractor(waveform))[:, 0]  # (B, T, mel), before bn0
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------ caption tokenisation

# pycocoevalcap's PTBTokenizer drops these tokens after the Stanford tokenizer (tokenizer/ptbtokenizer.py)
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
CAPTIONS = [
    "A high-pitched whistle, then a dog's bark.",
    "A man-made machine whirs... and stops",
    "Birds chirp: three times, a ten-year-old kid yells!",
    "A well-known e-mail chime -- x - y",
    "Rain falls on a tin-roof; dogs' barks",
    "People can't talk and it's loud",
    "high- pitched -loud a--b well--known a-b-c",
    "it's a dog's-life",
]


def _ptb_jar() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    return jar if jar.is_file() else None


@pytest.mark.skipif(shutil.which("java") is None or _ptb_jar() is None, reason="needs java and pycocoevalcap's PTB jar")
def test_keep_hyphens_matches_the_stanford_ptb_tokenizer():
    command = ["java", "-cp", str(_ptb_jar()), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    result = subprocess.run(command, input="\n".join(CAPTIONS) + "\n", capture_output=True, text=True, timeout=120, check=True)
    lines = result.stdout.rstrip("\n").split("\n")
    assert len(lines) == len(CAPTIONS)
    for caption, line in zip(CAPTIONS, lines):
        ptb = [token for token in line.split(" ") if token and token not in PTB_PUNCTUATION]
        assert tokenize_caption(caption) == ptb, caption


@pytest.mark.parametrize(
    "raw,keep,split",
    [
        ("A high-pitched beep", "a high-pitched beep", "a high pitched beep"),
        ("a 10-year-old kid", "a 10-year-old kid", "a 10 year old kid"),
        ("x - y -- z", "x y z", "x y z"),
        ("high- pitched -low", "high pitched low", "high pitched low"),
        ("non\u2011stop high\u2010pitched", "non-stop high-pitched", "non stop high pitched"),
        ("a bird\u2013chirps", "a bird chirps", "a bird chirps"),  # an en dash is punctuation
        ("sound_effect", "sound effect", "sound effect"),
    ],
)
def test_hyphen_modes(raw: str, keep: str, split: str):
    assert normalize_caption(raw) == keep
    assert normalize_caption(raw, hyphens="keep") == keep
    assert normalize_caption(raw, hyphens="split") == split


def test_vocabulary_carries_its_hyphen_mode(tmp_path: Path):
    captions = ["A high-pitched beep", "a high-pitched whistle"]
    keep = Vocabulary.build(captions)
    split = Vocabulary.build(captions, hyphens="split")
    assert "high-pitched" in keep.words and "high" not in keep.words
    assert {"high", "pitched"} <= set(split.words) and "high-pitched" not in split.words
    assert keep.encode("high-pitched", add_bos_eos=False) == [keep.index["high-pitched"]]
    assert split.encode("high-pitched", add_bos_eos=False) == [split.index["high"], split.index["pitched"]]
    assert keep != Vocabulary(keep.words, hyphens="split")  # same words, other tokenisation
    keep.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == keep
    assert Vocabulary.from_dict(split.to_dict()) == split
    # saved before the option existed: built with split hyphens
    assert Vocabulary.from_dict({"words": split.words}).hyphens == "split"
    with pytest.raises(ValueError, match="hyphens must be 'keep'"):
        Vocabulary.build(captions, hyphens="join")
    with pytest.raises(ValueError, match="hyphens must be 'keep'"):
        normalize_caption("a-b", hyphens=True)
