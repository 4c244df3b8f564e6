"""Dataset readers on files in their real on-disk formats, and their errors on bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from aac_lightning.data import MACS, AudioCaps, Clotho, DatasetFormatError
from aac_lightning.data.audio import AudioError, load_audio
from tests.conftest import ODD_NAMES, write_clotho, write_tone


# ------------------------------------------------------------------------------------ Clotho


@pytest.mark.parametrize("layout", ["aac-datasets", "zenodo"])
def test_clotho_reads_odd_names_and_quoted_commas(tmp_path: Path, layout: str):
    caps = lambda name: [f'"{name}", said the caption, number {j}' for j in range(5)]  # noqa: E731
    root = write_clotho(tmp_path, {"development": ODD_NAMES}, layout=layout, captions_for=caps)
    ds = Clotho(root, "development", sample_rate=16000)
    assert ds.fnames == ODD_NAMES  # CSV order, names intact
    for i, name in enumerate(ODD_NAMES):
        item = ds[i]
        assert item["fname"] == name
        assert item["captions"] == caps(name)  # quoted commas kept inside one caption
        assert item["audio"].dtype == torch.float32 and item["audio"].shape[0] == 1
        assert item["sr"] == 16000 and item["dataset"] == "clotho" and item["subset"] == "development"
        assert item["index"] == i
        # duration kept: write_tone wrote 0.2 + 0.05 k seconds
        assert item["audio"].shape[1] == int((0.2 + 0.05 * i) * 16000)


def test_clotho_short_subset_names(clotho_root: Path):
    for short, long in (("dev", "development"), ("val", "validation"), ("eval", "evaluation")):
        a, b = Clotho(clotho_root, short), Clotho(clotho_root, long)
        assert a.fnames == b.fnames and a[0]["subset"] == long


def test_clotho_unknown_subset_and_missing_root(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown Clotho subset 'train'"):
        Clotho(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="Clotho subset 'development' not found"):
        Clotho(tmp_path, "development")


def test_resampling_keeps_duration_and_pitch(tmp_path: Path):
    write_tone(tmp_path / "a.wav", seconds=1.0, sr=44100, freq=1000.0)
    audio, sr = load_audio(tmp_path / "a.wav", 32000)
    assert sr == 32000 and audio.shape == (1, 32000)
    spectrum = np.abs(np.fft.rfft(audio[0].numpy()))
    assert abs(np.argmax(spectrum) * 32000 / 32000 - 1000.0) <= 1.0  # 1 Hz bins
    # band-limited: no energy folded above the old content
    assert spectrum[5000:].max() < 1e-2 * spectrum.max()


@pytest.mark.parametrize(
    "subtype,sr,channels,ext",
    [("PCM_U8", 8000, 1, "wav"), ("PCM_24", 48000, 2, "wav"), ("FLOAT", 22050, 2, "wav"), ("PCM_16", 44100, 1, "flac")],
)
def test_unusual_formats_are_mixed_and_resampled(tmp_path: Path, subtype, sr, channels, ext):
    data = write_tone(tmp_path / f"x.{ext}", seconds=0.5, sr=sr, channels=channels, subtype=subtype)
    audio, out_sr = load_audio(tmp_path / f"x.{ext}", 16000)
    assert out_sr == 16000 and audio.shape == (1, 8000)
    native, _ = load_audio(tmp_path / f"x.{ext}", None)
    tol = 1e-2 if subtype == "PCM_U8" else 1e-4
    np.testing.assert_allclose(native[0].numpy(), data.mean(axis=1), atol=tol)


# ------------------------------------------------------------------------------------ AudioCaps


def write_audiocaps(root: Path, subset: str, rows: list[tuple]) -> Path:
    base = root / "AUDIOCAPS"
    (base / "csv_files_v1").mkdir(parents=True, exist_ok=True)
    with open(base / "csv_files_v1" / f"{subset}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    for _, yid, start, _ in rows:
        write_tone(base / "audio_32000Hz" / subset / f"{yid}_{start}.flac", seconds=0.3, sr=32000)
    return root


def test_audiocaps_groups_captions_per_clip_in_csv_order(tmp_path: Path):
    rows = [
        (97151, "vfY_TJq7n_U", 130, "Rustling occurs, ducks quack and water splashes"),
        (97152, "--0w1YA1Hm4", 30, "A vehicle driving as a man speaks"),
        (97153, "vfY_TJq7n_U", 130, "Ducks quack, then water splashes"),
        (97154, "--0w1YA1Hm4", 30, "High pitched whistling, a man talking"),
        (97155, "vfY_TJq7n_U", 130, "Water splashing while ducks quack"),
    ]
    root = write_audiocaps(tmp_path, "val", rows)
    ds = AudioCaps(root, "val")
    assert ds.fnames == ["vfY_TJq7n_U_130.flac", "--0w1YA1Hm4_30.flac"]
    assert ds[0]["captions"] == [rows[0][3], rows[2][3], rows[4][3]]
    assert ds[1]["captions"] == [rows[1][3], rows[3][3]]
    assert ds[0]["audio"].shape == (1, int(0.3 * 32000)) and ds[0]["dataset"] == "audiocaps"


def test_audiocaps_missing_clips_error_or_counted_skip(tmp_path: Path, caplog):
    rows = [(1, "aaaaaaaaaaa", 0, "a dog barks"), (2, "bbbbbbbbbbb", 10, "a cat meows"), (3, "ccccccccccc", 20, "rain")]
    root = write_audiocaps(tmp_path, "train", rows)
    (root / "AUDIOCAPS" / "audio_32000Hz" / "train" / "bbbbbbbbbbb_10.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 audio files are missing \(first: '.*bbbbbbbbbbb_10.flac'\)"):
        AudioCaps(root, "train")
    ds = AudioCaps(root, "train", on_missing="skip")
    assert ds.fnames == ["aaaaaaaaaaa_0.flac", "ccccccccccc_20.flac"]
    assert "1 of 3 audio files are missing" in caplog.text
    assert ds.missing_skipped == 1 and ds.missing_fnames == ["bbbbbbbbbbb_10.flac"]
    assert [ds[i]["captions"] for i in range(len(ds))] == [["a dog barks"], ["rain"]]


def test_audiocaps_skip_counts_many_missing_clips_with_one_warning(tmp_path: Path, caplog):
    rows = [(i, f"vid{i:08d}", 10 * i, f"caption {i}") for i in range(10)]
    root = write_audiocaps(tmp_path, "train", rows)
    audio_dir = root / "AUDIOCAPS" / "audio_32000Hz" / "train"
    gone = [f"vid{i:08d}_{10 * i}.flac" for i in (1, 4, 5, 8)]
    for name in gone:
        (audio_dir / name).unlink()
    with caplog.at_level("WARNING"):
        ds = AudioCaps(root, "train", on_missing="skip")
    assert ds.missing_skipped == 4 and ds.missing_fnames == gone
    assert ds.fnames == [f"vid{i:08d}_{10 * i}.flac" for i in (0, 2, 3, 6, 7, 9)]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "missing" in r.getMessage()]
    assert len(warnings) == 1 and "4 of 10 audio files are missing" in warnings[0].getMessage()
    assert gone[0] in warnings[0].getMessage()
    # what the parts skipped stays known after concatenation (Clotho + AudioCaps + MACS)
    from aac_lightning.data.datasets import CaptionDataset

    assert CaptionDataset.concat([ds, ds], "both").missing_skipped == 8
    with pytest.raises(FileNotFoundError, match=r"4 of 10 audio files are missing \(first: '.*vid00000001_10.flac'"):
        AudioCaps(root, "train")


def test_audiocaps_missing_column_is_named(tmp_path: Path):
    base = tmp_path / "AUDIOCAPS" / "csv_files_v1"
    base.mkdir(parents=True)
    (tmp_path / "AUDIOCAPS" / "audio_32000Hz" / "test").mkdir(parents=True)
    (base / "test.csv").write_text("audiocap_id,youtube_id,caption\n1,abc,hello\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"test.csv' lacks the column\(s\) \['start_time'\]"):
        AudioCaps(tmp_path, "test")


# ------------------------------------------------------------------------------------ MACS

MACS_YAML = """\
files:
- filename: airport-lisbon-1000-40000-a.wav
  annotations:
  - annotator_id: 133
    sentence: adults talking and footsteps echo in a large hall
    tags: [adults_talking, footsteps]
  - annotator_id: 52
    sentence: "people walk and talk, a bag rolls by"
    tags: [adults_talking]
- filename: street_traffic-helsinki-161-4901-a.wav
  annotations:
  - annotator_id: 7
    sentence: cars pass by on a busy road
    tags: [traffic]
"""


def write_macs(root: Path, text: str = MACS_YAML, names=("airport-lisbon-1000-40000-a.wav", "street_traffic-helsinki-161-4901-a.wav")) -> Path:
    (root / "MACS" / "audio").mkdir(parents=True, exist_ok=True)
    (root / "MACS" / "MACS.yaml").write_text(text, encoding="utf-8")
    for name in names:
        write_tone(root / "MACS" / "audio" / name, seconds=0.25, sr=48000, channels=2, subtype="PCM_24")
    return root


def test_macs_reads_yaml_annotations(tmp_path: Path):
    ds = MACS(write_macs(tmp_path))
    assert len(ds) == 2
    assert ds[0]["captions"] == ["adults talking and footsteps echo in a large hall", "people walk and talk, a bag rolls by"]
    assert ds[1]["fname"] == "street_traffic-helsinki-161-4901-a.wav"
    assert ds[0]["audio"].shape == (1, 8000) and ds[0]["dataset"] == "macs"


@pytest.mark.parametrize(
    "text,match",
    [
        ("version: 1\n", "lacks the top-level key 'files'"),
        ("files:\n- annotations: []\n", r"files\[0\]: missing key\(s\) \['filename'\]"),
        ("files:\n- filename: a.wav\n  annotations:\n  - tags: [x]\n", r"annotations\[0\]: missing key 'sentence'"),
        ("files: [\n  {filename: a.wav\n", "is not valid YAML"),
        ("files:\n- filename: a.wav\n  annotations:\n  - sentence: '   '\n", "caption is empty"),
    ],
)
def test_macs_malformed_yaml_errors(tmp_path: Path, text: str, match: str):
    write_macs(tmp_path, text, names=("a.wav",))
    with pytest.raises(DatasetFormatError, match=match):
        MACS(tmp_path)


# ------------------------------------------------------------------------------------ bad input


def test_missing_clotho_files_error_names_count_and_first(clotho_root: Path, caplog):
    audio_dir = clotho_root / "CLOTHO_v2.1" / "clotho_audio_files" / "development"
    for name in ODD_NAMES[:2]:
        (audio_dir / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        Clotho(clotho_root, "development")
    assert "2 of 10 audio files are missing" in str(err.value) and ODD_NAMES[0] in str(err.value)
    ds = Clotho(clotho_root, "development", on_missing="skip")
    assert len(ds) == 8 and ODD_NAMES[0] not in ds.fnames
    assert "2 of 10 audio files are missing" in caplog.text


def _replace_audio(root: Path, name: str, content: bytes | None = None, samples: np.ndarray | None = None):
    path = root / "CLOTHO_v2.1" / "clotho_audio_files" / "development" / name
    if content is not None:
        path.write_bytes(content)
    else:
        sf.write(path, samples, 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "kind,match",
    [
        ("empty", "is empty \\(0 bytes\\)"),
        ("corrupt", "cannot decode audio file"),
        ("zero-length", "has zero length"),
        ("nan", "contains non-finite samples"),
    ],
)
def test_bad_audio_errors_name_the_file(clotho_root: Path, kind: str, match: str):
    name = ODD_NAMES[1]
    if kind == "empty":
        path = _replace_audio(clotho_root, name, content=b"")
    elif kind == "corrupt":
        path = _replace_audio(clotho_root, name, content=b"RIFF\x00\x00garbage" * 10)
    elif kind == "zero-length":
        path = _replace_audio(clotho_root, name, samples=np.zeros((0, 1), dtype=np.float32))
    else:
        x = np.zeros((800, 1), dtype=np.float32)
        x[10] = np.nan
        path = _replace_audio(clotho_root, name, samples=x)
    ds = Clotho(clotho_root, "development")
    with pytest.raises(AudioError, match=match) as err:
        ds[1]
    assert str(path) in str(err.value)
    skipping = Clotho(clotho_root, "development", on_bad_audio="skip")
    assert skipping[1] is None and skipping.bad_audio_skipped == 1
    assert skipping[0] is not None


@pytest.mark.parametrize("bad_name", ["../outside.wav", "/etc/passwd", "sub/../../x.wav"])
def test_names_escaping_the_root_are_rejected(tmp_path: Path, bad_name: str):
    root = write_clotho(tmp_path, {"development": ["ok.wav"]})
    csv_path = root / "CLOTHO_v2.1" / "clotho_csv_files" / "clotho_captions_development.csv"
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([bad_name, "a", "b", "c", "d", "e"])
    with pytest.raises(DatasetFormatError, match="escapes the dataset folder|outside the dataset folder"):
        Clotho(root, "development")


def test_symlink_escaping_the_root_is_rejected(tmp_path: Path):
    root = write_clotho(tmp_path / "c", {"development": ["ok.wav"]})
    write_tone(tmp_path / "secret.wav")
    audio_dir = root / "CLOTHO_v2.1" / "clotho_audio_files" / "development"
    (audio_dir / "link.wav").symlink_to(tmp_path / "secret.wav")
    csv_path = root / "CLOTHO_v2.1" / "clotho_csv_files" / "clotho_captions_development.csv"
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["link.wav", "a", "b", "c", "d", "e"])
    with pytest.raises(DatasetFormatError, match="resolves outside the dataset folder"):
        Clotho(root, "development")


def test_clotho_csv_errors(tmp_path: Path):
    root = write_clotho(tmp_path, {"development": ["a.wav", "b.wav"]})
    csv_path = root / "CLOTHO_v2.1" / "clotho_csv_files" / "clotho_captions_development.csv"
    original = csv_path.read_text(encoding="utf-8")

    csv_path.write_text(original.replace("caption_5", "caption_five"), encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"lacks the column\(s\) \['caption_5'\]"):
        Clotho(root, "development")

    lines = original.splitlines()
    lines[2] = 'b.wav,one,two,,four,five'
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"line 3 column caption_3: caption is empty"):
        Clotho(root, "development")

    csv_path.write_bytes(original.replace("A sound", "Caf\u00e9 sound").encode("latin-1"))
    with pytest.raises(DatasetFormatError, match="is not valid UTF-8"):
        Clotho(root, "development")

    csv_path.write_text(original + "c.wav,1,2,3,4,5,6,7\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="more fields than the header"):
        Clotho(root, "development")

    csv_path.write_text(original + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="appears twice"):
        Clotho(root, "development")
