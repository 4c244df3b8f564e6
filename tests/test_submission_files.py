"""Submission files for the challenge's hidden sets, each read back: captions of an audio folder without
references (2022-2024 ``file_name,caption_predicted``), rankings of a folder for a query file (2022/2024
top-10 ``caption,fname_1..fname_10``; 2025 every score, ``index,<file>,...``).

The models are stood in for by fakes (captions and scores from the file names): what is checked is
the files, the commands' options and the read-back checks, not the models.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from aac_lightning.commands.evaluate import caption_eval_command, retrieval_eval_command
from aac_lightning.ensembles import captioning as caption_ensembles
from aac_lightning.ensembles import retrieval as retrieval_ensembles
from aac_lightning.metrics.captioning import read_dcase_captioning_csv, write_dcase_captioning_csv
from aac_lightning.metrics.dcase import (
    check_captioning_submission,
    check_retrieval_submission,
    read_dcase2025_retrieval_csv,
    read_dcase_retrieval_csv,
    write_dcase2025_retrieval_csv,
)
from tests.conftest import ODD_NAMES, write_tone

QUERIES = ['a beep, then "a hiss"', "a low rumble followed by a bell", "ヘリコプター passes"]


@pytest.fixture
def audio_dir(tmp_path) -> Path:
    folder = tmp_path / "evaluation_audio"
    for k, name in enumerate(ODD_NAMES):
        write_tone(folder / name, seconds=0.1, freq=200 + 40 * k)
    return folder


def _fake_scores(queries, names) -> torch.Tensor:
    return torch.tensor([[((len(q) * 5 + len(n) * 3 + i) % 13) / 13 - 0.3 for i, n in enumerate(names)] for q in queries],
                        dtype=torch.float64)


class _FakeRetrieval:
    def __len__(self) -> int:
        return 1

    def score(self, captions, audio_paths, batch_size=16, text_batch_size=64):
        return _fake_scores(captions, [Path(p).name for p in audio_paths])


class _FakeCaptioner:
    def caption_files(self, paths, batch_size=16):
        return [f"a sound from {Path(p).stem[:4].lower()}" for p in paths]


def _query_file(tmp_path: Path) -> Path:
    path = tmp_path / "retrieval_captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["caption"], *[[q] for q in QUERIES]])
    return path


# ---------------------------------------------------------------------------------------------
# the 2025 score-matrix file
def test_dcase2025_file_round_trips_names_and_exact_scores(tmp_path) -> None:
    scores = _fake_scores(QUERIES, ODD_NAMES) + 1e-13  # digits a short format would lose
    path = write_dcase2025_retrieval_csv(tmp_path / "out" / "sub.csv", QUERIES, ODD_NAMES, scores)
    queries, fnames, read = read_dcase2025_retrieval_csv(path)
    assert (queries, fnames) == (QUERIES, ODD_NAMES)
    assert torch.equal(read, scores)  # exact: repr round-trips a float
    with open(path, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["index", *ODD_NAMES]  # the baseline's predictions layout
    check_retrieval_submission(path, QUERIES, ODD_NAMES, "dcase2025")


def test_dcase2025_file_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"scores must be \(3 queries, 6 files\)"):
        write_dcase2025_retrieval_csv(tmp_path / "a.csv", QUERIES, ODD_NAMES, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_dcase2025_retrieval_csv(tmp_path / "a.csv", QUERIES, ODD_NAMES, torch.full((3, 6), float("nan")))
    with pytest.raises(ValueError, match="unique"):
        write_dcase2025_retrieval_csv(tmp_path / "a.csv", QUERIES, ["x.wav", "x.wav"], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="line breaks"):
        write_dcase2025_retrieval_csv(tmp_path / "a.csv", ["two\nlines"], ["x.wav"], torch.zeros(1, 1))
    bad = tmp_path / "bad.csv"
    bad.write_text("index,a.wav\nq,not-a-number\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: scores must be numbers"):
        read_dcase2025_retrieval_csv(bad)
    bad.write_text("caption,fname_1\nq,a.wav\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected the header 'index"):
        read_dcase2025_retrieval_csv(bad)


# ---------------------------------------------------------------------------------------------
# read-back checks catch a file that differs from what was meant
def test_read_back_checks_name_the_difference(tmp_path) -> None:
    path = write_dcase2025_retrieval_csv(tmp_path / "s.csv", QUERIES[:2], ODD_NAMES, _fake_scores(QUERIES[:2], ODD_NAMES))
    with pytest.raises(ValueError, match=r"2 queries for 3, first difference at query 2"):
        check_retrieval_submission(path, QUERIES, ODD_NAMES, "dcase2025")
    with pytest.raises(ValueError, match="audio columns differ"):
        check_retrieval_submission(path, QUERIES[:2], ODD_NAMES[::-1], "dcase2025")
    top10 = tmp_path / "top10.csv"
    top10.write_text("caption,fname_1,fname_2\nq,plain.wav,plain.wav\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not 2 distinct files"):
        check_retrieval_submission(top10, ["q"], ["plain.wav", "other.wav"], "dcase2024")
    captions = write_dcase_captioning_csv(tmp_path / "c.csv", ["b.wav", "a.wav"], ["rain", " "])
    with pytest.raises(ValueError, match="another order"):
        check_captioning_submission(captions, ["a.wav", "b.wav"])
    with pytest.raises(ValueError, match="1 empty caption.*'a.wav'"):
        check_captioning_submission(captions, ["b.wav", "a.wav"])


def test_write_submission_fails_when_the_file_reads_back_wrong(tmp_path, monkeypatch) -> None:
    real = retrieval_ensembles.write_dcase_retrieval_csv
    monkeypatch.setattr(retrieval_ensembles, "write_dcase_retrieval_csv",
                        lambda path, captions, ranked: real(path, captions[:-1], ranked[:-1]))  # loses a row
    with pytest.raises(ValueError, match="read back"):
        retrieval_ensembles.write_submission(tmp_path / "s.csv", _fake_scores(QUERIES, ODD_NAMES), QUERIES, ODD_NAMES, "dcase2024")


# ---------------------------------------------------------------------------------------------
# the commands on folders without ground truth
def test_caption_eval_captions_a_folder_without_references(tmp_path, audio_dir, monkeypatch, capsys) -> None:
    seen = {}

    def fake_from_checkpoints(paths, device=None, **decoding):
        seen.update(decoding)
        return _FakeCaptioner()

    monkeypatch.setattr(caption_ensembles.CaptionEnsemble, "from_checkpoints", staticmethod(fake_from_checkpoints))
    out = tmp_path / "task6a.csv"
    caption_eval_command(["x.ckpt", "--audio-dir", str(audio_dir), "--csv", str(out), "--beam-size", "5"])
    assert "read back: ok" in capsys.readouterr().out
    fnames, captions = read_dcase_captioning_csv(out)
    assert fnames == sorted(ODD_NAMES, key=lambda n: str(audio_dir / n))  # every file, the folder's order
    assert captions == _FakeCaptioner().caption_files(fnames)
    assert seen["beam_size"] == 5


def test_caption_eval_usage_errors(tmp_path, audio_dir) -> None:
    for args in (
        ["x.ckpt", "--audio-dir", str(audio_dir)],  # no --csv
        ["x.ckpt", "--audio-dir", str(audio_dir), "--csv", "c.csv", "--out", "m.json"],  # no metrics there
        ["x.ckpt", "--audio-dir", str(audio_dir), "--clotho-root", str(tmp_path), "--csv", "c.csv"],
        ["x.ckpt"],  # neither
        ["x.ckpt", "--clotho-root", str(tmp_path), "--metrics", "dcase2019"],
    ):
        with pytest.raises(SystemExit):
            caption_eval_command(args)


@pytest.mark.parametrize("protocol", ["dcase2024", "dcase2025"])
def test_retrieval_eval_writes_the_submission_of_each_protocol(tmp_path, audio_dir, monkeypatch, protocol) -> None:
    monkeypatch.setattr(retrieval_ensembles.RetrievalEnsemble, "from_checkpoints", staticmethod(lambda paths, device=None: _FakeRetrieval()))
    out = tmp_path / f"{protocol}.csv"
    retrieval_eval_command(["x.ckpt", "--audio-dir", str(audio_dir), "--queries", str(_query_file(tmp_path)),
                            "--protocol", protocol, "--csv", str(out)])
    names = [p.name for p in sorted(audio_dir.iterdir())]
    scores = _fake_scores(QUERIES, names)
    if protocol == "dcase2025":
        queries, fnames, read = read_dcase2025_retrieval_csv(out)
        assert (queries, fnames) == (QUERIES, names) and torch.equal(read, scores)
    else:  # the ten best files (all six here), best first
        queries, ranked = read_dcase_retrieval_csv(out)
        assert queries == QUERIES
        for row, query_scores in zip(ranked, scores):
            assert [query_scores[names.index(n)].item() for n in row] == sorted(query_scores.tolist(), reverse=True)
