"""The ensembles' file-reading progress bar: shown on request (or on a terminal), silent otherwise."""

from __future__ import annotations

from pathlib import Path

import torch

from aac_lightning.data.audio import load_audio
from aac_lightning.ensembles.waveforms import file_progress, read_waveforms
from tests.conftest import write_tone


def _files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"clip {i}.wav" for i in range(3)]
    for i, path in enumerate(paths):
        write_tone(path, seconds=0.1 + 0.05 * i, sr=16000, freq=300 + 100 * i)
    return paths


def test_bar_counts_files_when_asked_and_stays_silent_by_default(tmp_path: Path, capsys):
    paths = _files(tmp_path)
    with file_progress(len(paths), "reading", progress=True) as bar:
        waves = read_waveforms(paths, [16000, 8000], bar=bar)
        assert bar.n == 3  # one step per file, whatever the number of rates
    shown = capsys.readouterr()
    assert "reading" in shown.err and "3/3" in shown.err and shown.out == ""
    # the waveforms are those of load_audio, per rate, in order
    for rate in (8000, 16000):
        assert all(torch.equal(w, load_audio(p, rate)[0][0]) for w, p in zip(waves[rate], paths))
    # default: stderr is not a terminal under pytest's capture -> no bar at all
    with file_progress(len(paths), "quiet") as bar:
        read_waveforms(paths, [16000], bar=bar)
    with file_progress(len(paths), "off", progress=False) as bar:
        read_waveforms(paths, [16000], bar=bar)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
