"""`aac-lightning pack` and reading the datamodules' audio from packs: same items, same crops."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from aac_lightning.commands.pack import pack_command
from aac_lightning.data.audio import audio_length
from aac_lightning.data.batches import CaptionPairs
from aac_lightning.data.datamodules import RetrievalDataModule
from aac_lightning.data.datasets import CaptionDataset, ClipRecord, Clotho
from aac_lightning.data.pack import INT16_SCALE, PackedAudio, PackError, group_dir, pack_dataset, pack_records
from tests.test_windowed_reading import real_format_clotho, write_noise  # noqa: F401 (fixture)

INT16_TOLERANCE = 0.5 * 1.2 / INT16_SCALE + 1e-6  # half an int16 step x the clip gain (peaks here < 1.2)


def _batches(dm: RetrievalDataModule, n: int) -> list[dict]:
    torch.manual_seed(7)  # the crop draws use the global RNG (num_workers=0: this process)
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_datamodule_batches_equal_from_packs(tmp_path: Path, real_format_clotho: Path, dtype: str) -> None:  # noqa: F811
    kwargs = dict(clotho_root=str(real_format_clotho), resplit=False, sample_rate=32000, global_batch_size=4, seed=3, train_max_seconds=1.0)
    plain = RetrievalDataModule(**kwargs)
    plain.setup("fit")
    packed = RetrievalDataModule(**kwargs, packed_dir=str(tmp_path / "packs"), pack_dtype=dtype)
    packed.setup("fit")  # packs what is missing, then reads from the packs
    assert packed.clips("train").packed is not None
    for a, b in zip(_batches(plain, 3), _batches(packed, 3), strict=True):
        assert a["fnames"] == b["fnames"] and a["captions"] == b["captions"]
        assert torch.equal(a["audio_lengths"], b["audio_lengths"])
        tolerance = INT16_TOLERANCE if dtype == "int16" else 1e-5  # float: the files' path is windowed (~1e-7)
        assert torch.allclose(a["audio"], b["audio"], atol=tolerance, rtol=0)
    # float packs hold the whole-decoded clip: a window of it equals the old path's crop exactly
    if dtype == "float32":
        from aac_lightning.data.audio import load_audio
        from aac_lightning.data.batches import crop_waveform

        clips = packed.clips("train")
        pairs = CaptionPairs(clips, 1.0)
        torch.manual_seed(1)
        new = pairs[0]["audio"]
        torch.manual_seed(1)
        old = crop_waveform(load_audio(clips.records[0].path, 32000)[0][0], 32000, None)
        assert torch.equal(new, old)


def test_resume_restamp_foreign_incomplete(tmp_path: Path) -> None:
    paths = []
    for k in range(5):
        paths.append(tmp_path / "audio" / f"c{k}.wav")
        write_noise(paths[-1], 0.5, 44100, seed=k)
    records = [ClipRecord(p.name, p, ("x",), "clotho", "development") for p in paths]
    out = tmp_path / "packs"
    assert pack_records(records, out, 32000, shard_clips=2, progress=False) == 5
    directory = group_dir(out, "clotho", "development", 32000, "int16")
    assert sorted(p.name for p in directory.iterdir()) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert pack_records(records, out, 32000, shard_clips=2, progress=False) == 0  # nothing to do

    # a kill: one shard gone and a half-written temporary left behind -> only that shard is redone
    (directory / "shard-00001.h5").unlink()
    (directory / "shard-00001.h5.tmp-999").write_bytes(b"partial")
    packed = PackedAudio(out, 32000)
    with pytest.raises(PackError, match="incomplete pack"):
        packed.check(records)
    assert pack_records(records, out, 32000, shard_clips=2, progress=False) == 2
    assert not list(directory.glob("*.tmp-*"))

    # a replaced source file: the pack is stale until re-packed, and only its shard is rewritten
    write_noise(paths[4], 0.7, 44100, seed=99)
    os.utime(paths[4], ns=(1, 1_000_000_000))
    with pytest.raises(PackError, match="stale pack"):
        PackedAudio(out, 32000).check(records)
    assert pack_records(records, out, 32000, shard_clips=2, progress=False) == 1
    fresh = PackedAudio(out, 32000)
    fresh.check(records)
    assert fresh.length("clotho/development/c4.wav") == audio_length(paths[4], 32000) > 0.69 * 32000

    # a foreign file in the pack folder is reported, never read
    (directory / "notes.txt").write_text("hello")
    with pytest.raises(PackError, match="foreign"):
        PackedAudio(out, 32000).check(records)
    (directory / "notes.txt").unlink()
    import h5py

    with h5py.File(directory / "shard-00000.h5", "r+") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(PackError, match="not an aac_lightning pack"):
        PackedAudio(out, 32000).check(records)


def test_bad_audio_recorded_in_pack(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.wav", tmp_path / "bad.wav"
    write_noise(good, 0.5, 32000)
    bad.write_bytes(b"RIFF....not audio")
    records = [ClipRecord(p.name, p, ("x",), "macs", "full") for p in (good, bad)]
    clips = CaptionDataset(records, "m", 32000, on_bad_audio="skip")
    assert pack_dataset(clips, tmp_path / "packs", "float32", progress=False) == 2
    clips.use_pack(PackedAudio(tmp_path / "packs", 32000, "float32"))
    assert clips.load_crop(1, 1000) is None and clips.bad_audio_skipped == 1
    import soundfile as sf

    assert np.array_equal(clips.load_audio(0)[0].numpy(), sf.read(good, dtype="float32")[0])  # same rate: exact


def test_pack_command(tmp_path: Path, real_format_clotho: Path, capsys) -> None:  # noqa: F811
    pack_command([str(tmp_path / "packs"), "--clotho-root", str(real_format_clotho), "--no-progress"])
    printed = capsys.readouterr().out
    assert "Clotho(development): 4 clips, 4 packed now" in printed
    pack_command([str(tmp_path / "packs"), "--clotho-root", str(real_format_clotho), "--no-progress"])
    assert "4 clips, 0 packed now, 4 already packed" in capsys.readouterr().out
    clips = Clotho(real_format_clotho, "evaluation", sample_rate=32000)
    PackedAudio(tmp_path / "packs", 32000).check(clips.records)
