"""Messy user input: every case ends in a clear error naming what is wrong and where, or a counted, logged skip.

Audio files, file lists, annotation tables, captions, configs, stage handoffs, checkpoints holding
pickled code, and output folders that are unwritable or on a full disk (detected before training).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from aac_lightning.cli import main
from aac_lightning.data import MACS, AudioCaps, CaptioningDataModule, Clotho, DatasetFormatError, RetrievalDataModule, Vocabulary
from aac_lightning.data.audio import AudioError, list_audio_files, load_audio
from aac_lightning.data.datamodules import CaptionPairs, ClipItems, collate_clips, collate_pairs
from aac_lightning.data.text import normalize_caption
from aac_lightning.modules import ContrastiveRetrieval
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.scst import CaptioningSCST
from aac_lightning.nn.audio_encoders import load_audio_encoder
from aac_lightning.nn.text_encoders import TextEncoder
from aac_lightning.utils import preflight
from aac_lightning.utils.preflight import OutputDirError, check_output_dir, preflight_trainer_outputs, trainer_output_dirs
from tests.conftest import demo_config_overrides, write_clotho, write_tone
from tests.test_retrieval_module import TINY_AUDIO, tiny_module
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import TINY_CAPTIONER, retrieval_ckpt  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
DEMO_PRETRAIN = REPO / "conf" / "demo" / "contrastive_pretrain.yaml"


def dev_paths(root: Path) -> tuple[Path, Path]:
    """`(captions_csv, audio_dir)` of the development subset written by `write_clotho`."""
    base = root / "CLOTHO_v2.1"
    return base / "clotho_csv_files" / "clotho_captions_development.csv", base / "clotho_audio_files" / "development"


# ============================================================================================ audio


def _write_bad_audio(path: Path, kind: str) -> None:
    if kind == "corrupt":  # random bytes under a .wav name
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "empty":  # 0 bytes
        path.write_bytes(b"")
    elif kind == "zero_length":  # a valid header, no frames
        sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000, subtype="FLOAT")
    else:  # float WAV holding a NaN or an infinity among finite samples
        x = np.full((1600, 1), 0.1, dtype=np.float32)
        x[800] = {"nan": np.nan, "inf": np.inf, "neg_inf": -np.inf}[kind]
        sf.write(path, x, 16000, subtype="FLOAT")


@pytest.mark.parametrize(
    "kind,message",
    [
        ("corrupt", "cannot decode audio file"),
        ("empty", r"is empty \(0 bytes\)"),
        ("zero_length", "has zero length"),
        ("nan", "contains non-finite samples"),
        ("inf", "contains non-finite samples"),
        ("neg_inf", "contains non-finite samples"),
    ],
)
def test_bad_audio_error_or_counted_skip(tmp_path: Path, caplog, kind: str, message: str):
    root = write_clotho(tmp_path, {"development": ["good one.wav", "bad, one.wav", "good two.wav"]})
    bad = dev_paths(root)[1] / "bad, one.wav"
    _write_bad_audio(bad, kind)

    with pytest.raises(AudioError, match=message) as err:
        Clotho(root, "development", sample_rate=16000)[1]
    assert f"'{bad}'" in str(err.value)  # the message names the file

    skipping = Clotho(root, "development", sample_rate=16000, on_bad_audio="skip")
    pairs = CaptionPairs(skipping)  # 3 clips x 5 captions
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    assert batch["audio"].shape[0] == 10 and "bad, one.wav" not in batch["fnames"]  # the bad clip's 5 pairs dropped
    assert torch.isfinite(batch["audio"]).all()
    assert skipping.bad_audio_skipped == 5  # counted once per skipped item
    assert "skipping bad audio (5 so far" in caplog.text and str(bad) in caplog.text


def test_very_short_audio_gives_valid_encoder_input(tmp_path: Path):
    path = tmp_path / "click.wav"
    sf.write(path, np.random.default_rng(1).uniform(-0.5, 0.5, (10, 1)).astype(np.float32), 16000, subtype="FLOAT")
    audio, sr = load_audio(path, 16000)
    assert audio.shape == (1, 10) and sr == 16000
    # in a batch with a 1 s clip: zero-padded, true lengths kept
    write_tone(tmp_path / "tone.wav", seconds=1.0, sr=16000)
    items = [{"audio": load_audio(p, 16000)[0][0], "captions": ["x"], "clip_id": i, "fname": p.name} for i, p in enumerate([path, tmp_path / "tone.wav"])]
    collated = collate_clips(items)
    batch, lengths = collated["audio"], collated["audio_lengths"]  # (2, 16000), (2,)
    assert lengths.tolist() == [10, 16000] and not batch[0, 10:].any()
    torch.manual_seed(0)
    encoders = {
        "cnn14": load_audio_encoder("cnn14", **TINY_AUDIO),
        "wavegram_logmel_cnn14": load_audio_encoder("wavegram_logmel_cnn14", **{**TINY_AUDIO, "hop_size": 128}),
        "ast": load_audio_encoder("ast", embed_dim=16, depth=1, num_heads=2, mel_bins=32, target_length=64),
    }
    for name, encoder in encoders.items():
        with torch.no_grad():
            alone = encoder.eval()(audio)  # the 10 samples alone: padded inside the encoder
            both = encoder(batch, lengths)
        for out in (alone, both):
            assert torch.isfinite(out["clip"]).all() and torch.isfinite(out["frames"]).all(), name
            assert (out["frame_lengths"] >= 1).all(), name
        assert both["frame_lengths"][0] <= both["frame_lengths"][1], name
    # "zero-padded to the encoder's minimum": the 10 samples alone equal them explicitly padded with zeros
    # (PANNs: 64 hops, at least 65 log-mel frames; AST: one analysis window, its mean taken over the true 10)
    minimum = {"cnn14": 64 * 160, "wavegram_logmel_cnn14": 64 * 128, "ast": 400}
    for name, encoder in encoders.items():
        padded = torch.nn.functional.pad(audio, (0, minimum[name] - audio.shape[1]))
        with torch.no_grad():
            alone = encoder(audio)
            explicit = encoder(padded) if name != "ast" else encoder(padded, torch.tensor([audio.shape[1]]))
        for key in ("clip", "frames"):
            assert alone[key].shape == explicit[key].shape and torch.allclose(alone[key], explicit[key], atol=1e-6), (name, key)


def test_very_long_audio_cropped_for_training_whole_for_evaluation(tmp_path: Path):
    root = write_clotho(tmp_path, {"development": ["long.wav", "short.wav"]})
    rng = np.random.default_rng(2)
    sf.write(dev_paths(root)[1] / "long.wav", rng.uniform(-0.3, 0.3, 600 * 8000).astype(np.float32), 8000, subtype="PCM_16")  # 10 min at 8 kHz
    clips = Clotho(root, "development", sample_rate=16000)
    full = clips[0]["audio"][0]
    assert full.shape == (600 * 16000,)  # resampled, duration kept

    pairs = CaptionPairs(clips, max_seconds=10.0)  # what RetrievalDataModule(train_max_seconds=10) trains on
    crop = pairs[0]["audio"]
    assert crop.shape == (10 * 16000,)
    # a true window of the clip: only the window is read and resampled, which equals the same window of
    # the whole resampled clip up to float rounding
    n = full.shape[0] - crop.shape[0] + 1
    close = (full[:n] - crop[0]).abs() < 1e-5
    for k in (1, 2, 3):
        close &= (full[k : n + k] - crop[k]).abs() < 1e-5
    starts = [int(s) for s in torch.nonzero(close).flatten()[:50]]
    assert any(torch.allclose(full[s : s + crop.shape[0]], crop, atol=1e-5) for s in starts)
    assert pairs[5]["audio"].shape[0] < 16000  # the short clip is not padded or cropped

    assert ClipItems(clips, max_seconds=None)[0]["audio"].shape == (600 * 16000,)  # evaluation: the whole clip
    assert ClipItems(clips, max_seconds=30.0)[0]["audio"].shape == (30 * 16000,)  # or cut at eval_max_seconds
    torch.manual_seed(0)
    encoder = load_audio_encoder("cnn14", **TINY_AUDIO).eval()
    with torch.no_grad():
        out = encoder(full[None])
    assert torch.isfinite(out["clip"]).all()
    assert out["frames"].shape[1] == 600 * 16000 // TINY_AUDIO["hop_size"] // 32  # one frame per 32 hops


FORMATS = [  # (subtype, extension, channels)
    ("PCM_U8", "wav", 1),  # 8-bit WAV is unsigned
    ("PCM_16", "wav", 2),
    ("PCM_24", "wav", 1),
    ("FLOAT", "wav", 2),  # float32
    ("PCM_16", "flac", 1),
    ("PCM_16", "aiff", 2),
]


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
@pytest.mark.parametrize("subtype,ext,channels", FORMATS, ids=[f"{s}-{e}-{c}ch" for s, e, c in FORMATS])
def test_audio_format_and_rate_resampled_to_model_rate(tmp_path: Path, rate: int, subtype: str, ext: str, channels: int):
    path = tmp_path / f"tone.{ext}"
    written = write_tone(path, seconds=1.0, sr=rate, freq=1000.0, channels=channels, subtype=subtype)
    audio, sr = load_audio(path, 32000)  # the PANNs rate
    assert sr == 32000 and audio.shape == (1, 32000) and audio.dtype == torch.float32  # mono, duration kept
    x = audio[0].numpy()
    spectrum = np.abs(np.fft.rfft(x))  # 1 Hz bins over 1 s
    assert abs(int(np.argmax(spectrum)) - 1000) <= 1  # the tone's frequency survives resampling
    assert spectrum[1100:].max() < 0.01 * spectrum.max()  # no aliases or images
    amplitude = 0.5 * np.mean([0.5 + 0.5 * c for c in range(channels)])  # write_tone's channel gains, mixed down
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(amplitude / np.sqrt(2), rel=0.03)
    assert written.shape == (rate, channels)


@pytest.mark.parametrize("subtype,ext", [("VORBIS", "ogg"), ("OPUS", "ogg"), ("MPEG_LAYER_III", "mp3")])
def test_lossy_formats_ogg_and_mp3_are_read_and_resampled(tmp_path: Path, subtype: str, ext: str):
    """The README's "OGG, MP3": lossy codecs keep the tone's frequency, about its level and duration."""
    rate = 48000 if subtype == "OPUS" else 44100  # Opus encodes at 48 kHz only
    path = tmp_path / f"tone.{ext}"
    write_tone(path, seconds=1.0, sr=rate, freq=1000.0, channels=2, subtype=subtype)
    audio, sr = load_audio(path, 32000)
    assert sr == 32000 and audio.shape[0] == 1 and audio.dtype == torch.float32
    assert abs(audio.shape[1] - 32000) <= 0.06 * 32000, audio.shape  # encoder delay / frame padding at most
    x = audio[0, :32000].numpy()
    spectrum = np.abs(np.fft.rfft(x, n=32000))
    assert abs(int(np.argmax(spectrum)) - 1000) <= 1
    assert np.sqrt(np.mean(x[4000:-4000] ** 2)) == pytest.approx(0.5 * 0.75 / np.sqrt(2), rel=0.1)
    upper = path.rename(tmp_path / f"TONE.{ext.upper()}")
    assert list_audio_files(tmp_path) == [upper]  # a folder given to `caption` / `search` finds it, any case


# ============================================================================================ files


def test_missing_audio_file_error_or_counted_skip(tmp_path: Path, caplog):
    names = ["a.wav", "b, c.wav", "d.wav", "e.wav"]
    root = write_clotho(tmp_path, {"development": names, "validation": ["v.wav"], "evaluation": names})
    (dev_paths(root)[1] / "b, c.wav").unlink()
    (root / "CLOTHO_v2.1" / "clotho_audio_files" / "evaluation" / "d.wav").unlink()

    with pytest.raises(FileNotFoundError, match=r"1 of 4 audio files are missing \(first: '.*b, c.wav'\); pass on_missing='skip'"):
        Clotho(root, "development")
    skipping = Clotho(root, "development", on_missing="skip")
    assert skipping.fnames == ["a.wav", "d.wav", "e.wav"]
    assert "1 of 4 audio files are missing" in caplog.text and "skipping them" in caplog.text

    # the same through a datamodule's configuration
    dm = RetrievalDataModule(clotho_root=str(root), resplit=False, sample_rate=16000, on_missing="skip", split_dir=str(tmp_path))
    assert dm.clips("test").fnames == ["a.wav", "b, c.wav", "e.wav"]
    with pytest.raises(FileNotFoundError, match=r"Clotho\(evaluation\): 1 of 4 audio files are missing"):
        RetrievalDataModule(clotho_root=str(root), resplit=False, sample_rate=16000, split_dir=str(tmp_path)).clips("test")


@pytest.mark.parametrize("bad_name", ["../outside.wav", "sub/../../outside.wav", "/tmp/outside.wav"])
def test_file_name_escaping_the_root(tmp_path: Path, bad_name: str):
    root = write_clotho(tmp_path / "data", {"development": ["ok.wav"]})
    write_tone(tmp_path / "data" / "CLOTHO_v2.1" / "clotho_audio_files" / "outside.wav")  # exists: the name alone is refused
    csv_path = dev_paths(root)[0]
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([bad_name, "a", "b", "c", "d", "e"])
    with pytest.raises(DatasetFormatError, match=re.escape(f"'{csv_path}' line 3: file name '{bad_name}' escapes the dataset folder")):
        Clotho(root, "development")
    # MACS names files in YAML: the same check, naming the entry
    (tmp_path / "MACS" / "audio").mkdir(parents=True)
    (tmp_path / "MACS" / "MACS.yaml").write_text(yaml.safe_dump({"files": [{"filename": bad_name, "annotations": [{"sentence": "cars"}]}]}), encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"files\[0\]: file name .* escapes the dataset folder"):
        MACS(tmp_path)


def test_folder_with_no_audio(tmp_path: Path):
    root = write_clotho(tmp_path, {"development": ["a.wav", "b.wav", "c.wav"]})
    audio_dir = dev_paths(root)[1]
    for path in audio_dir.iterdir():
        path.unlink()
    for on_missing in ("error", "skip"):  # skipping every clip would leave nothing to train on
        with pytest.raises(FileNotFoundError, match=rf"3 of 3 audio files are missing .*no audio at all in '{re.escape(str(audio_dir))}'"):
            Clotho(root, "development", on_missing=on_missing)
    assert list_audio_files(audio_dir) == []  # what `search --audio-dir` reads; it refuses an empty list
    with pytest.raises(FileNotFoundError, match="audio folder not found"):
        list_audio_files(tmp_path / "nowhere")


# ============================================================================================ tables


CSV_CASES = {
    "renamed_column": (lambda lines: [lines[0].replace("caption_3", "caption3"), *lines[1:]], r"lacks the column\(s\) \['caption_3'\]; found columns"),
    "missing_column": (lambda lines: [",".join(line.split(",")[:-1]) for line in lines], r"lacks the column\(s\) \['caption_5'\]"),
    "extra_fields": (lambda lines: [*lines, "c.wav,1,2,3,4,5,6"], r"line 4: more fields than the header has columns"),
    "missing_fields": (lambda lines: [*lines, "c.wav,1,2,3"], r"line 4: 4 field\(s\), but the header has 6 columns"),
    "unclosed_quote": (lambda lines: [*lines, 'c.wav,"one,two,three,four,five'], r"line 4: 2 field\(s\), but the header has 6 columns"),
    "empty_file": (lambda lines: [], r"lacks the column\(s\) \['file_name', 'caption_1'"),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_malformed_csv(tmp_path: Path, case: str):
    root = write_clotho(tmp_path, {"development": ["a.wav", "b.wav"]}, captions_for=lambda name: [f"cap {j}" for j in range(5)])
    csv_path = dev_paths(root)[0]
    edit, message = CSV_CASES[case]
    csv_path.write_text("\n".join(edit(csv_path.read_text(encoding="utf-8").splitlines())) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=rf"'{re.escape(str(csv_path))}'.*{message}"):
        Clotho(root, "development")


def test_csv_wrong_encoding_names_file_and_line(tmp_path: Path):
    names = ["a.wav", "b.wav", "c.wav"]
    captions = {"c.wav": ["Un caf\u00e9 anim\u00e9", "b", "c", "d", "e"]}
    root = write_clotho(tmp_path, {"development": names}, captions_for=lambda name: captions.get(name, [f"cap {j}" for j in range(5)]))
    csv_path = dev_paths(root)[0]
    csv_path.write_bytes(csv_path.read_text(encoding="utf-8").encode("latin-1"))  # e-acute as the single byte 0xe9
    with pytest.raises(DatasetFormatError, match=rf"'{re.escape(str(csv_path))}' line 4: byte 0xe9 \(byte 13 of the line\) is not valid UTF-8.*re-save it as UTF-8"):
        Clotho(root, "development")


def test_csv_utf8_bom_is_accepted(tmp_path: Path):
    root = write_clotho(tmp_path, {"development": ["caf\u00e9.wav", "b.wav"]})
    csv_path = dev_paths(root)[0]
    plain = Clotho(root, "development")
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as Excel saves "CSV UTF-8"
    with_bom = Clotho(root, "development")
    assert with_bom.fnames == plain.fnames == ["caf\u00e9.wav", "b.wav"]  # 'file_name' header still recognised
    assert with_bom.captions == plain.captions


MACS_CASES = {
    "syntax_error": ("files:\n- filename: a.wav\n  annotations: [{sentence: 'x'\n", "is not valid YAML"),
    "tab_indent": ("files:\n\t- filename: a.wav\n", "is not valid YAML"),
    "top_level_list": ("- filename: a.wav\n", "lacks the top-level key 'files'"),
    "files_is_mapping": ("files:\n  a.wav: {sentence: x}\n", "lacks the top-level key 'files'"),
    "entry_is_text": ("files:\n- a.wav\n", r"files\[0\]: expected a mapping with keys 'filename' and 'annotations'"),
    "annotations_not_list": ("files:\n- filename: a.wav\n  annotations: cars pass\n", r"files\[0\]: 'annotations' must be a non-empty list"),
    "sentence_missing": ("files:\n- filename: a.wav\n  annotations:\n  - {tags: [x]}\n", r"files\[0\]\.annotations\[0\]: missing key 'sentence'"),
    "sentence_not_text": ("files:\n- filename: a.wav\n  annotations:\n  - sentence: [a, b]\n", r"annotations\[0\]\.sentence: caption is missing or not text"),
}


@pytest.mark.parametrize("case", list(MACS_CASES))
def test_malformed_macs_yaml(tmp_path: Path, case: str):
    text, message = MACS_CASES[case]
    (tmp_path / "MACS" / "audio").mkdir(parents=True)
    write_tone(tmp_path / "MACS" / "audio" / "a.wav")
    yaml_path = tmp_path / "MACS" / "MACS.yaml"
    yaml_path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=rf"'{re.escape(str(yaml_path))}'.*{message}"):
        MACS(tmp_path)


def test_macs_yaml_wrong_encoding(tmp_path: Path):
    (tmp_path / "MACS" / "audio").mkdir(parents=True)
    (tmp_path / "MACS" / "MACS.yaml").write_bytes("files:\n- filename: a.wav\n  annotations:\n  - sentence: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match="MACS.yaml' is not valid UTF-8"):
        MACS(tmp_path)


# ============================================================================================ captions


def test_empty_caption(tmp_path: Path):
    root = write_clotho(tmp_path, {"development": ["a.wav", "b.wav"]}, captions_for=lambda name: ["one", "   ", "three", "four", "five"] if name == "b.wav" else ["x"] * 5)
    with pytest.raises(DatasetFormatError, match=r"line 3 column caption_2: caption is empty"):
        Clotho(root, "development")
    base = tmp_path / "AUDIOCAPS"
    (base / "csv_files_v1").mkdir(parents=True)
    (base / "csv_files_v1" / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,abc,30,a dog\n2,def,0,\n", encoding="utf-8")
    write_tone(base / "audio_32000Hz" / "train" / "abc_30.flac")
    with pytest.raises(DatasetFormatError, match=r"train.csv' line 3 column caption: caption is empty"):
        AudioCaps(tmp_path, "train")


def test_very_long_caption_is_truncated(tmp_path: Path):
    long_caption = " ".join(f"word{i % 50}" for i in range(500))  # 500 words
    names = ["a.wav", "b.wav"]
    subsets = {"development": names, "validation": ["v.wav"], "evaluation": ["e.wav"]}
    root = write_clotho(tmp_path, subsets, captions_for=lambda name: [long_caption] + [f"a short one {j}" for j in range(4)])
    dm = CaptioningDataModule(clotho_root=str(root), resplit=False, sample_rate=16000, global_batch_size=10, max_caption_words=30, split_dir=str(tmp_path))
    batch = dm.collate_train([CaptionPairs(dm.clips("train"))[i] for i in range(10)])
    vocab = dm.vocabulary
    assert batch["tokens"].shape == (10, 32)  # <bos> + 30 words + <eos>
    long_rows = batch["tokens"][[c == long_caption for c in batch["captions"]]]
    assert long_rows.shape[0] == 2
    assert (long_rows[:, 0] == vocab.bos_id).all() and (long_rows[:, -1] == vocab.eos_id).all()
    assert vocab.decode(long_rows[0]) == " ".join(long_caption.split()[:30])  # the first 30 words kept
    # the text encoder of the retrieval stage cuts to its max_length (special tokens included)
    encoder = TextEncoder("minilm-l6", pretrained=True, max_length=16, pooling="mean")
    tokens = encoder.tokenize([long_caption, "a dog barks"])
    assert tokens["input_ids"].shape == (2, 16)
    with torch.no_grad():
        assert torch.isfinite(encoder.encode_tokens(**tokens)).all()


def test_non_ascii_captions_are_normalised_consistently(tmp_path: Path):
    composed = "Un caf\u00e9 anim\u00e9 \u00e0 Z\u00fcrich, \u30d8\u30ea\u30b3\u30d7\u30bf\u30fc \U0001f681 passes!"
    decomposed = "UN CAFE\u0301 ANIME\u0301 A\u0300 ZU\u0308RICH \u30d8\u30ea\u30b3\u30d5\u309a\u30bf\u30fc passes"  # NFD, upper case
    expected = "un caf\u00e9 anim\u00e9 \u00e0 z\u00fcrich \u30d8\u30ea\u30b3\u30d7\u30bf\u30fc passes"  # emoji is not a word
    assert normalize_caption(composed) == normalize_caption(decomposed) == expected
    assert normalize_caption("\uff23\uff21\uff26\uff25 \u2018noise\u2019") == "cafe noise"  # full-width letters, curly quotes

    root = write_clotho(tmp_path, {"development": ["a.wav"]}, captions_for=lambda name: [composed] * 5)
    assert Clotho(root, "development").captions[0][0] == composed  # read back exactly
    vocab = Vocabulary.build([composed])
    assert vocab.encode(decomposed) == vocab.encode(composed)
    assert vocab.unk_id not in vocab.encode(decomposed)
    assert vocab.decode(vocab.encode(decomposed)) == expected
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab  # UTF-8 on disk
    encoder = TextEncoder("minilm-l6", pretrained=True, max_length=32, pooling="mean")
    with torch.no_grad():
        assert torch.isfinite(encoder([composed, decomposed])).all()


# ============================================================================================ configs


def _run_cli_expecting_exit(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2  # the README: user errors exit with status 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "section,bad,message",
    [
        ("model", {"embed_dimm": 12}, "Option 'embed_dimm' is not accepted"),
        ("data", {"batch_sise": 4}, "Option 'batch_sise' is not accepted"),
        ("trainer", {"max_epochz": 2}, "does not accept option 'trainer.max_epochz'"),
    ],
)
def test_cli_config_unknown_key(tmp_path: Path, capsys, section: str, bad: dict, message: str):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({section: bad if section == "trainer" else {"init_args": bad}}), encoding="utf-8")
    err = _run_cli_expecting_exit(["fit", "--config", str(DEMO_PRETRAIN), "--config", str(config), f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert message in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "section,bad,message",
    [
        ("model", {"embed_dim": "twelve"}, r'Parser key "embed_dim":\s+Expected a <class \'int\'>. Got value: twelve'),
        ("data", {"train_sources": "clotho"}, r'Parser key "train_sources"'),
        ("trainer", {"max_epochs": "many"}, r'trainer.max_epochs.*many|max_epochs.*Expected'),
    ],
)
def test_cli_config_wrong_type(tmp_path: Path, capsys, section: str, bad: dict, message: str):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({section: bad if section == "trainer" else {"init_args": bad}}), encoding="utf-8")
    err = _run_cli_expecting_exit(["fit", "--config", str(DEMO_PRETRAIN), "--config", str(config), f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert re.search(message, err, flags=re.S), err[-1500:]


# ============================================================================================ handoff


def test_handoff_wrong_stage_kind(retrieval_ckpt: Path, xe_ckpt: Path):  # noqa: F811
    cases = [
        (lambda: tiny_module(init_from=str(xe_ckpt)), xe_ckpt, "'xe'", "ContrastiveRetrieval", r"\['contrastive'\]"),
        (lambda: CaptioningXE(extractor_ckpt=str(xe_ckpt), **TINY_CAPTIONER), xe_ckpt, "'xe'", "CaptioningXE", r"\['contrastive'\]"),
        (lambda: CaptioningXE(init_from=str(retrieval_ckpt), **TINY_CAPTIONER), retrieval_ckpt, "'contrastive'", "CaptioningXE", r"\['xe', 'scst'\]"),
        (lambda: CaptioningSCST(init_from=str(retrieval_ckpt)), retrieval_ckpt, "'contrastive'", "CaptioningSCST", r"\['xe', 'scst'\]"),
    ]
    for build, path, found, module, expected in cases:
        with pytest.raises(HandoffError, match=rf"'{re.escape(str(path))}' is a checkpoint of stage kind {found}, but {module} needs one of {expected}"):
            build()


def test_handoff_wrong_architecture(retrieval_ckpt: Path, xe_ckpt: Path):  # noqa: F811
    # retrieval: another projection size
    with pytest.raises(HandoffError, match=rf"weights from '{re.escape(str(retrieval_ckpt))}' do not fit the model; shape mismatches: "):
        tiny_module(init_from=str(retrieval_ckpt), embed_dim=12)
    # retrieval: another audio encoder width
    with pytest.raises(HandoffError, match=rf"weights from '{re.escape(str(retrieval_ckpt))}' do not fit the model; .*audio_encoder\."):
        tiny_module(init_from=str(retrieval_ckpt), audio_encoder_kwargs={**TINY_AUDIO, "channels": [4, 8, 8, 8, 8, 16]})
    # captioner: a wider decoder than the XE checkpoint's
    wider = {**TINY_CAPTIONER, "decoder_kwargs": {**TINY_CAPTIONER["decoder_kwargs"], "d_model": 32}}
    with pytest.raises(HandoffError, match=rf"weights from '{re.escape(str(xe_ckpt))}' do not fit the model; shape mismatches: "):
        CaptioningXE(init_from=str(xe_ckpt), **wider)
    # extractor: an explicit architecture that differs from the checkpoint's
    with pytest.raises(ValueError, match="differs from the architecture of the handed-over checkpoint"):
        CaptioningXE(extractor_ckpt=str(retrieval_ckpt), extractor={"audio_encoder": "ast", "audio_encoder_kwargs": {}}, **TINY_CAPTIONER)


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "random_bytes", "not_a_lightning_checkpoint"])
def test_truncated_or_corrupt_checkpoint(retrieval_ckpt: Path, tmp_path: Path, damage: str):  # noqa: F811
    bad = tmp_path / "bad.ckpt"
    data = retrieval_ckpt.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "zero_bytes":
        bad.write_bytes(b"")
    elif damage == "random_bytes":
        bad.write_bytes(np.random.default_rng(3).bytes(5000))
    else:
        torch.save({"model": {"w": torch.zeros(2)}}, bad)  # a bare weights file, as PANNs ships
    message = "is not a Lightning checkpoint" if damage == "not_a_lightning_checkpoint" else "cannot load checkpoint"
    for build in (
        lambda: tiny_module(init_from=str(bad)),
        lambda: CaptioningXE(extractor_ckpt=str(bad), **TINY_CAPTIONER),
        lambda: CaptioningSCST(init_from=str(bad)),
        lambda: ContrastiveRetrieval.load_for_inference(bad),
    ):
        with pytest.raises(HandoffError) as err:
            build()
        assert f"'{bad}'" in str(err.value) and message in str(err.value)
    if damage != "not_a_lightning_checkpoint":  # third-party weight files (PANNs / AST) too
        from aac_lightning.nn.audio_encoders import load_checkpoint_file

        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load_checkpoint_file(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        tiny_module(init_from=str(tmp_path / "absent.ckpt"))


# ============================================================================================ safe loading


class RunsShellCommand:
    """Unpickling this object would run a shell command (creating the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _booby_trapped_checkpoint(source: Path, out: Path, marker: Path) -> Path:
    """A real checkpoint with one extra entry whose unpickling would execute code."""
    ckpt = read_checkpoint(source)
    ckpt["callbacks"] = {"payload": RunsShellCommand(marker)}
    torch.save(ckpt, out)
    return out


def test_pickled_code_in_checkpoint_is_refused(retrieval_ckpt: Path, xe_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    from aac_lightning.ensembles.captioning import load_captioner
    from aac_lightning.ensembles.retrieval import RetrievalEnsemble

    marker = tmp_path / "code_ran"
    evil_retrieval = _booby_trapped_checkpoint(retrieval_ckpt, tmp_path / "retrieval.ckpt", marker)
    evil_xe = _booby_trapped_checkpoint(xe_ckpt, tmp_path / "xe.ckpt", marker)
    weights = tmp_path / "panns.pth"
    torch.save({"model": load_audio_encoder("cnn14", **TINY_AUDIO).state_dict(), "sampler": RunsShellCommand(marker)}, weights)
    handoff_refusal = r"(?s)cannot load checkpoint '.*' safely \(weights_only=True\).*posix\.system"
    loaders = {
        "read_checkpoint": (lambda: read_checkpoint(evil_retrieval), HandoffError, handoff_refusal),
        "init_from (retrieval)": (lambda: tiny_module(init_from=str(evil_retrieval)), HandoffError, handoff_refusal),
        "extractor_ckpt": (lambda: CaptioningXE(extractor_ckpt=str(evil_retrieval), **TINY_CAPTIONER), HandoffError, handoff_refusal),
        "init_from (scst)": (lambda: CaptioningSCST(init_from=str(evil_xe)), HandoffError, handoff_refusal),
        "load_for_inference": (lambda: ContrastiveRetrieval.load_for_inference(evil_retrieval), HandoffError, handoff_refusal),
        "retrieval ensemble": (lambda: RetrievalEnsemble.from_checkpoints([evil_retrieval]), HandoffError, handoff_refusal),
        "captioner": (lambda: load_captioner(evil_xe), HandoffError, handoff_refusal),
        "PANNs weights": (
            lambda: load_audio_encoder("cnn14", checkpoint=weights, **TINY_AUDIO),
            ValueError,
            r"(?s)cannot be loaded with weights_only=True: .*posix\.system.*trust_checkpoint=True",
        ),
    }
    for name, (load, error, message) in loaders.items():
        with pytest.raises(error, match=message):
            load()
        assert not marker.exists(), name

    # resuming with --ckpt_path goes through Lightning, which torch.load-s with weights_only=True too
    module = tiny_module()
    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4, split_dir=str(tmp_path))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(Exception, match="posix.system"):
        trainer.fit(module, datamodule=dm, ckpt_path=str(evil_retrieval))
    assert not marker.exists()


def test_text_encoder_weights_read_without_pickle(tmp_path: Path):
    from transformers import BertConfig, BertModel

    marker = tmp_path / "code_ran"
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    model.save_pretrained(tmp_path / "bert")  # config.json + model.safetensors
    state = dict(model.state_dict(), payload=RunsShellCommand(marker))
    torch.save(state, tmp_path / "bert" / "pytorch_model.bin")  # a booby-trapped pickle next to it

    encoder = TextEncoder(str(tmp_path / "bert"), pretrained=True)  # reads the safetensors file only
    assert not marker.exists()
    for key, value in model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key

    (tmp_path / "bert" / "model.safetensors").unlink()  # only the pickle is left: refused
    with pytest.raises(OSError, match="could not load pretrained text encoder") as err:
        TextEncoder(str(tmp_path / "bert"), pretrained=True)
    assert "pytorch_model.bin" in str(err.value.__cause__)
    assert not marker.exists()


def test_cider_document_frequency_file_with_pickled_code_is_refused(tmp_path: Path):
    from aac_lightning.metrics.cider import CiderDocumentFrequency

    marker = tmp_path / "code_ran"
    path = tmp_path / "df.npz"
    np.savez(path, n=1, num_documents=1, words=np.array([RunsShellCommand(marker)], dtype=object), df_0=np.zeros(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        CiderDocumentFrequency.load(str(path))
    assert not marker.exists()
    # tables written by save() still load without pickle
    table = CiderDocumentFrequency.from_references([["a dog barks", "a dog is barking"], ["rain falls"]])
    table.save(str(tmp_path / "ok.npz"))
    assert CiderDocumentFrequency.load(str(tmp_path / "ok.npz")).words == table.words


# ============================================================================================ work directory


def test_output_dir_that_cannot_be_created(tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputDirError, match=re.escape(f"trainer.default_root_dir '{tmp_path}/a_file/runs' cannot be created")):
        check_output_dir(tmp_path / "a_file" / "runs", 0, "trainer.default_root_dir")
    with pytest.raises(OutputDirError, match=re.escape(f"'{tmp_path}/a_file' exists but is not a folder")):
        check_output_dir(tmp_path / "a_file", 0)
    assert isinstance(OutputDirError("x"), OSError)
    # a writable folder passes, is created, and keeps no probe file
    check_output_dir(tmp_path / "new" / "runs", 0)
    assert (tmp_path / "new" / "runs").is_dir() and not list((tmp_path / "new" / "runs").iterdir())


Unwritable = namedtuple("Unwritable", "path reason")


@pytest.fixture(params=["read_only_mode", "proc_fs"])
def unwritable_dir(request, tmp_path: Path):
    if request.param == "read_only_mode":
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits")
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        yield Unwritable(folder, "Permission denied")
        folder.chmod(0o700)
    else:
        if not sys.platform.startswith("linux") or not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        yield Unwritable(Path("/proc/self"), "")  # a real folder where nobody, root included, may create files


def test_unwritable_output_dir(unwritable_dir: Unwritable):
    with pytest.raises(OutputDirError, match=re.escape(f"ModelCheckpoint dirpath '{unwritable_dir.path}' is not writable: {unwritable_dir.reason}")):
        check_output_dir(unwritable_dir.path, 0, "ModelCheckpoint dirpath")


def _fake_disk_usage(full_under: Path, free_mb: float):
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        if Path(path).resolve().is_relative_to(full_under.resolve()):
            return usage._replace(free=int(free_mb * 1024 * 1024))
        return usage

    return disk_usage


def test_full_disk_output_dir(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(preflight.MIN_FREE_ENV, raising=False)
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(tmp_path, 120))
    with pytest.raises(OutputDirError, match=rf"'{re.escape(str(tmp_path))}/runs': only 120 MB free on its disk, below the required 500 MB .*AAC_LIGHTNING_MIN_FREE_MB"):
        check_output_dir(tmp_path / "runs")
    monkeypatch.setenv(preflight.MIN_FREE_ENV, "100")  # the requirement is configurable
    check_output_dir(tmp_path / "runs")
    monkeypatch.setenv(preflight.MIN_FREE_ENV, "0")  # 0 turns the space check off
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(tmp_path, 0))
    check_output_dir(tmp_path / "runs")
    monkeypatch.setenv(preflight.MIN_FREE_ENV, "lots")
    with pytest.raises(ValueError, match="AAC_LIGHTNING_MIN_FREE_MB='lots' is not a number of megabytes"):
        check_output_dir(tmp_path / "runs")


@pytest.mark.parametrize("full", ["root", "logger", "checkpoints"])
def test_preflight_checks_every_trainer_output_dir(tmp_path: Path, monkeypatch, full: str):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    dirs = {"root": tmp_path / "root", "logger": tmp_path / "logs", "checkpoints": tmp_path / "ckpts"}
    trainer = pl.Trainer(
        accelerator="cpu",
        default_root_dir=dirs["root"],
        logger=CSVLogger(save_dir=dirs["logger"]),
        callbacks=[ModelCheckpoint(dirpath=dirs["checkpoints"])],
        enable_progress_bar=False,
    )
    purposes = {"root": "trainer.default_root_dir", "logger": r"save_dir of logger 0 \(CSVLogger\)", "checkpoints": "ModelCheckpoint dirpath"}
    assert [Path(p) for _, p in trainer_output_dirs(trainer)] == [dirs["root"], dirs["logger"], dirs["checkpoints"]]
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(dirs[full], 1))
    with pytest.raises(OutputDirError, match=rf"{purposes[full]} '{re.escape(str(dirs[full]))}': only 1 MB free"):
        preflight_trainer_outputs(trainer, min_free_bytes=10 * 1024 * 1024)
    monkeypatch.undo()
    preflight_trainer_outputs(trainer, min_free_bytes=0)
    assert all(d.is_dir() for d in dirs.values())


@pytest.mark.parametrize("problem", ["unwritable_root", "full_checkpoint_disk"])
def test_cli_fit_fails_before_training(synth_root: Path, tmp_path: Path, monkeypatch, problem: str):
    steps = []
    monkeypatch.setattr(ContrastiveRetrieval, "training_step", lambda self, *a, **k: steps.append(1))
    args = ["fit", "--config", str(DEMO_PRETRAIN), *demo_config_overrides(tmp_path, synth_root)]
    if problem == "unwritable_root":
        (tmp_path / "a_file").write_text("x")
        args.append(f"--trainer.default_root_dir={tmp_path}/a_file/run")
        message = re.escape(f"trainer.default_root_dir '{tmp_path}/a_file/run' cannot be created")
    else:
        monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(tmp_path / "checkpoints", 3))
        message = re.escape(f"ModelCheckpoint dirpath '{tmp_path}/checkpoints': only 3 MB free on its disk")
    with pytest.raises(OutputDirError, match=message):
        main(args)
    assert steps == []  # no training step ran
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("config.yaml"))  # nothing written yet


def test_safe_loading_of_ast_weights_yaml_search_cache_and_hugging_face_bin(tmp_path: Path):
    """The README's "Safe loading" cases beyond stage checkpoints: nothing pickled runs, clean files load."""
    from transformers import BertConfig, BertModel

    from aac_lightning.config import read_ensemble_config
    from aac_lightning.inference.cache import EmbeddingCache
    from aac_lightning.pipeline.recipe import RecipeError, load_recipe

    marker = tmp_path / "code_ran"
    # a booby-trapped AST .pth: refused at torch.load, naming the object
    ast_kwargs = dict(embed_dim=16, depth=1, num_heads=2, mel_bins=32, target_length=64)
    state = load_audio_encoder("ast", **ast_kwargs).state_dict()
    torch.save({**state, "payload": RunsShellCommand(marker)}, tmp_path / "ast.pth")
    with pytest.raises(ValueError, match=r"(?s)cannot be loaded with weights_only=True: .*posix\.system"):
        load_audio_encoder("ast", checkpoint=tmp_path / "ast.pth", **ast_kwargs)
    assert not marker.exists()
    # YAML python tags in a recipe and an ensemble config: safe_load refuses them, nothing runs
    tag = f"!!python/object/apply:os.system [\"touch '{marker}'\"]"
    (tmp_path / "recipe.yaml").write_text(f"name: {tag}\nstages: []\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recipe\.yaml: invalid YAML: .*python/object/apply:os\.system"):
        load_recipe(tmp_path / "recipe.yaml", tmp_path / "work")
    (tmp_path / "ensemble.yaml").write_text(f"checkpoints:\n  - {tag}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ensemble\.yaml' is not valid YAML: .*python/object/apply:os\.system"):
        read_ensemble_config(tmp_path / "ensemble.yaml")
    assert not marker.exists()
    # a search cache holding pickled code: ignored (rebuilt), never unpickled
    cache = EmbeddingCache(tmp_path / "cache", "k" * 64)
    cache.path.parent.mkdir()
    torch.save({"format": 1, "key": "k" * 64, "names": RunsShellCommand(marker)}, cache.path)
    reread = EmbeddingCache(tmp_path / "cache", "k" * 64)
    assert reread.entries == {} and reread.dirty and not marker.exists()
    # a clean Hugging Face folder with only pytorch_model.bin (no safetensors) still loads, equal weights
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    model.save_pretrained(tmp_path / "bert", safe_serialization=False)
    assert (tmp_path / "bert" / "pytorch_model.bin").is_file() and not (tmp_path / "bert" / "model.safetensors").exists()
    encoder = TextEncoder(str(tmp_path / "bert"), pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
