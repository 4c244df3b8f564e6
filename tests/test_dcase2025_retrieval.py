"""DCASE 2025 retrieval metrics: mAP@16 against several relevant clips per query, and the relevance file.

The hand-built cases state every clip's position and the AP it gives; a brute-force AP@16 written
from the definition (sort, walk down the list) checks random cases without ties.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from aac_lightning.metrics.relevance import (
    dcase2025_metrics,
    multi_relevant_metrics,
    read_relevance_file,
    relevance_targets,
)

NUM_CLIPS = 20


def _scores_in_order(order: list[int]) -> torch.Tensor:
    """Scores (NUM_CLIPS,) that rank the clips of `order` first, best first; the rest after them."""
    rest = [c for c in range(NUM_CLIPS) if c not in order]
    scores = torch.empty(NUM_CLIPS, dtype=torch.float64)
    for position, clip in enumerate(order + rest):
        scores[clip] = 1.0 - position / 100  # position 0 (best) scores 1.0
    return scores


def _mask(rows: list[list[int]]) -> torch.Tensor:
    mask = torch.zeros(len(rows), NUM_CLIPS, dtype=torch.bool)
    for q, clips in enumerate(rows):
        mask[q, clips] = True
    return mask


def test_hand_built_graded_cases_give_the_known_map_at_16() -> None:
    # q0: relevant clips 0 and 3 at positions 1 and 4:            AP = (1/1 + 2/4) / 2 = 0.75
    q0 = _scores_in_order([0, 1, 2, 3])
    # q1: relevant 5, 6, 7 at positions 2, 16, 17 (17 is past the cut, still counts in m = 3):
    #                                                               AP = (1/2 + 2/16) / 3 = 0.208333...
    q1 = _scores_in_order([10, 5, 0, 1, 2, 3, 4, 8, 9, 11, 12, 13, 14, 15, 16, 6, 7])
    # q2: relevant 9 ties with irrelevant 13 and 14, below 12: pessimistic position 1 + 1 + 2 = 4:
    #                                                               AP = 1/4 (the optimistic rule would say 1/2)
    q2 = torch.linspace(0.0, 0.3, NUM_CLIPS, dtype=torch.float64)
    q2[12], q2[[9, 13, 14]] = 0.95, 0.5
    sim = torch.stack([q0, q1, q2])
    metrics = multi_relevant_metrics(sim, _mask([[0, 3], [5, 6, 7], [9]]))
    # mAP@16 = (0.75 + 0.625 / 3 + 0.25) / 3 = 0.402777...
    assert metrics["mAP@16"] == pytest.approx((0.75 + 0.625 / 3 + 0.25) / 3, abs=1e-12)
    # best relevant positions 1, 2, 4: R@1 = 1/3, R@5 = R@10 = 1
    assert metrics["R@1"] == pytest.approx(1 / 3) and metrics["R@5"] == 1.0 and metrics["R@10"] == 1.0


def test_ties_among_relevant_clips_and_more_than_16_relevant() -> None:
    # relevant 1 and 2 share the top score: positions 1 and 2 in either order -> AP = 1
    tied = torch.full((NUM_CLIPS,), 0.1, dtype=torch.float64)
    tied[[1, 2]] = 0.9
    tied[torch.arange(3, NUM_CLIPS)] = torch.linspace(0.0, 0.5, NUM_CLIPS - 3, dtype=torch.float64)
    assert multi_relevant_metrics(tied[None], _mask([[1, 2]]))["mAP@16"] == pytest.approx(1.0)
    # 18 relevant clips on the first 18 positions: AP@16 = (sum_{i<=16} i / i) / 18 = 16 / 18
    top = _scores_in_order(list(range(18)))
    assert multi_relevant_metrics(top[None], _mask([list(range(18))]))["mAP@16"] == pytest.approx(16 / 18)
    # a collapsed model (all scores equal) earns nothing from the tie: 2 relevant of 20 -> positions 19, 20
    flat = torch.zeros(1, NUM_CLIPS, dtype=torch.float64)
    assert multi_relevant_metrics(flat, _mask([[0, 1]]))["mAP@16"] == 0.0


def _brute_force_ap(scores: list[float], relevant: set[int], k: int) -> float:
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    found, total = 0, 0.0
    for position, clip in enumerate(order, start=1):
        if clip in relevant:
            found += 1
            if position <= k:
                total += found / position
    return total / len(relevant)


def test_random_cases_match_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(40, 30, generator=gen, dtype=torch.float64)  # continuous: no ties
    mask = torch.rand(40, 30, generator=gen) < 0.15
    mask[torch.arange(40), torch.randint(0, 30, (40,), generator=gen)] = True  # >= 1 relevant each
    expected = sum(
        _brute_force_ap(sim[q].tolist(), set(mask[q].nonzero().flatten().tolist()), 16) for q in range(40)
    ) / 40
    got = multi_relevant_metrics(sim, mask, chunk_size=7)  # chunked like a large evaluation
    assert got["mAP@16"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# the relevance file
CAPTIONS = ["A dog barks, twice.", 'Rain "falls" on a roof.', "A bird sings.", "A dog barks, twice."]
FNAMES = ["dog, barking.wav", "rain d&#39;été.wav", "bird.wav", "car.wav"]


def _write_relevance(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "audio_filenames"])
        writer.writerows(rows)
    return path


def test_relevance_file_maps_queries_and_clips(tmp_path) -> None:
    path = _write_relevance(tmp_path / "metadata_eval.csv", [
        ("A dog barks, twice.", str(["dog, barking.wav", "car.wav"])),
        ('Rain "falls" on a roof.', str(["rain d&#39;été.wav"])),
    ])
    relevance = read_relevance_file(path)
    assert relevance.queries == ["A dog barks, twice.", 'Rain "falls" on a roof.']
    assert relevance.relevant == [["dog, barking.wav", "car.wav"], ["rain d&#39;été.wav"]]
    rows, mask = relevance_targets(relevance, CAPTIONS, FNAMES)
    assert rows.tolist() == [0, 1]  # a caption given twice takes its first row (same text, same scores)
    assert mask.tolist() == [[True, False, False, True], [False, True, False, False]]
    # caption rows x clip columns; only the file's two queries count
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.2],  # dog query: relevant 0 at 1, 3 at 3 -> (1 + 2/3) / 2
        [0.5, 0.4, 0.6, 0.7],  # rain query: relevant 1 at 4 -> 1/4
        [0.0, 0.0, 0.0, 0.0],
        [0.9, 0.1, 0.8, 0.2],
    ], dtype=torch.float64)
    metrics = dcase2025_metrics(sim, CAPTIONS, FNAMES, path)
    assert metrics["mAP@16"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4) / 2)
    assert metrics["R@1"] == 0.5 and metrics["R@5"] == 1.0


def test_unknown_queries_and_clips_are_named_with_the_file(tmp_path) -> None:
    path = _write_relevance(tmp_path / "rel.csv", [
        ("A cat meows.", str(["bird.wav"])),
        ("A bird sings.", str(["bird.wav", "missing clip.wav"])),
    ])
    with pytest.raises(ValueError) as err:
        relevance_targets(read_relevance_file(path), CAPTIONS, FNAMES, "Clotho evaluation")
    message = str(err.value)
    assert str(path) in message
    assert "'query'" in message and "'A cat meows.'" in message
    assert "'audio_filenames'" in message and "'missing clip.wav'" in message
    assert "Clotho evaluation" in message


@pytest.mark.parametrize(
    ("rows", "header", "match"),
    [
        ([("A bird sings.", "bird.wav, car.wav")], ["query", "audio_filenames"], r"line 2: audio_filenames must be a list"),
        ([("A bird sings.", "[]")], ["query", "audio_filenames"], r"line 2: audio_filenames must be a non-empty list"),
        ([("A bird sings.", "['a.wav', 'a.wav']")], ["query", "audio_filenames"], "names a file twice"),
        ([("A bird sings.", "['a.wav']"), ("A bird sings.", "['b.wav']")], ["query", "audio_filenames"], "already given on line 2"),
        ([("", "['a.wav']")], ["query", "audio_filenames"], "line 2: the query is empty"),
        ([("A bird sings.", "['a.wav']")], ["caption", "audio_filenames"], r"missing column\(s\) \['query'\]"),
        ([], ["query", "audio_filenames"], "holds no queries"),
    ],
)
def test_bad_relevance_files(tmp_path, rows, header, match) -> None:
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    with pytest.raises(ValueError, match=match):
        read_relevance_file(path)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_relevance_file(tmp_path / "nowhere.csv")


# ---------------------------------------------------------------------------------------------
# retrieval-eval --protocol dcase2025
class _FakeEnsemble:
    """Scores caption q against clip a as a fixed function of their texts: no model, no audio decoding."""

    def __init__(self, n: int = 1):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def score(self, captions, audio_paths, batch_size=16, text_batch_size=64):
        names = [Path(p).name for p in audio_paths]
        return torch.tensor([[((len(c) * 7 + len(n) * 3 + i * 5) % 11) / 11 for i, n in enumerate(names)] for c in captions])


def test_retrieval_eval_protocol_dcase2025(tmp_path, monkeypatch, capsys) -> None:
    from aac_lightning.commands.evaluate import retrieval_eval_command
    from aac_lightning.data import Clotho
    from aac_lightning.ensembles import retrieval as retrieval_ensembles
    from aac_lightning.metrics.dcase import read_dcase2025_retrieval_csv
    from tests.conftest import ODD_NAMES, write_clotho

    root = write_clotho(tmp_path / "data", {"evaluation": ODD_NAMES})
    dataset = Clotho(root, "evaluation", sample_rate=None)
    captions = [c for caps in dataset.captions for c in caps]
    relevance = _write_relevance(tmp_path / "rel.csv", [
        (dataset.captions[0][1], str([ODD_NAMES[0], ODD_NAMES[3]])),
        (dataset.captions[2][0], str([ODD_NAMES[5]])),
    ])
    monkeypatch.setattr(retrieval_ensembles.RetrievalEnsemble, "from_checkpoints", staticmethod(lambda paths, device=None: _FakeEnsemble()))
    out_json, out_csv = tmp_path / "m.json", tmp_path / "sub.csv"
    retrieval_eval_command(["x.ckpt", "--clotho-root", str(root), "--protocol", "dcase2025", "--relevance", str(relevance),
                            "--out", str(out_json), "--csv", str(out_csv), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "dcase2025" in printed and "mAP@16" in printed
    sim = _FakeEnsemble().score(captions, [r.path for r in dataset.records])
    expected = dcase2025_metrics(sim, captions, dataset.fnames, relevance)
    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["metrics"]["dcase2025"] == pytest.approx(expected)
    assert set(report["metrics"]) == {"t2a", "a2t", "dcase2025"}  # next to the 2022 metrics
    queries, fnames, scores = read_dcase2025_retrieval_csv(out_csv)
    assert queries == captions and fnames == list(dataset.fnames)
    assert torch.allclose(scores, sim.double())

    # an id the subset lacks: a clear error before any model is loaded
    bad = _write_relevance(tmp_path / "bad.csv", [(dataset.captions[0][0], str(["not in clotho.wav"]))])
    monkeypatch.setattr(retrieval_ensembles.RetrievalEnsemble, "from_checkpoints", staticmethod(lambda *a, **k: pytest.fail("loaded")))
    with pytest.raises(ValueError, match=r"'not in clotho.wav'.*"):
        retrieval_eval_command(["x.ckpt", "--clotho-root", str(root), "--protocol", "dcase2025", "--relevance", str(bad)])
    with pytest.raises(SystemExit):  # dcase2025 needs the relevance file
        retrieval_eval_command(["x.ckpt", "--clotho-root", str(root), "--protocol", "dcase2025"])
    with pytest.raises(SystemExit):  # and the relevance file needs dcase2025
        retrieval_eval_command(["x.ckpt", "--clotho-root", str(root), "--relevance", str(relevance)])


# ---------------------------------------------------------------------------------------------
# the retrieval stage's test step (config option `test_relevance`)
def test_module_test_step_logs_dcase2025_metrics(synth_root, tmp_path, monkeypatch) -> None:
    import lightning.pytorch as pl

    from aac_lightning.data import RetrievalDataModule
    from aac_lightning.metrics.retrieval import retrieval_metrics
    from aac_lightning.modules import retrieval as retrieval_module
    from tests.test_retrieval_module import tiny_module

    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4, eval_batch_size=2)
    dm.setup("test")
    clips = dm.clips("test")
    relevance = _write_relevance(tmp_path / "rel.csv", [
        (clips.captions[0][2], str([clips.fnames[0], clips.fnames[3]])),
        (clips.captions[4][0], str([clips.fnames[1]])),
        (clips.captions[5][1], str(list(clips.fnames[2:7]))),
    ])
    seen = {}

    def recording(sim, captions, fnames, relevance_file, subset):
        seen.update(sim=sim.clone(), captions=list(captions), fnames=list(fnames))
        return dcase2025_metrics(sim, captions, fnames, relevance_file, subset)

    monkeypatch.setattr(retrieval_module, "dcase2025_metrics", recording)
    pl.seed_everything(0)
    module = tiny_module(test_relevance=str(relevance)).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]  # 2 clips per batch: several batches
    # the rows are the test captions and the columns the test clips, in the split's order ...
    captions = [c for caps in clips.captions for c in caps]
    assert seen["captions"] == captions and seen["fnames"] == list(clips.fnames)
    # ... of the very matrix the 2022 metrics were computed from
    targets = torch.tensor([i for i, caps in enumerate(clips.captions) for _ in caps])
    assert logged["test/t2a/mAP@10"] == pytest.approx(retrieval_metrics(seen["sim"], targets)["mAP@10"], abs=1e-6)
    expected = dcase2025_metrics(seen["sim"], captions, clips.fnames, relevance)
    assert set(expected) == {"mAP@16", "R@1", "R@5", "R@10"}
    for name, value in expected.items():
        assert logged[f"test/dcase2025/{name}"] == pytest.approx(value, abs=1e-6)

    bad = _write_relevance(tmp_path / "bad.csv", [(clips.captions[0][0], str(["absent.wav"]))])
    with pytest.raises(ValueError, match=r"'absent.wav'"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
            tiny_module(test_relevance=str(bad)), datamodule=dm, verbose=False)
