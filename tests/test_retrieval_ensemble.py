"""Retrieval ensembles (averaged cosine similarities), DCASE task 6b submission CSV, retrieval-eval command.

Two tiny retrieval checkpoints of different architectures (CNN14 at 16 kHz, Wavegram-Logmel-CNN14
at 32 kHz, both with the real MiniLM-L6 text encoder) are trained for two steps on the synthetic
dataset; the ensemble's outputs are checked against the members' bi-encoders called directly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

import aac_lightning.ensembles.waveforms as waveforms_module
from aac_lightning.data import Clotho, RetrievalDataModule, load_audio
from aac_lightning.data.datasets import find_clotho_files
from aac_lightning.data.synth import write_synthetic_clotho
from aac_lightning.metrics.retrieval import audio_to_text_metrics, retrieval_metrics
from aac_lightning.checkpoints import HandoffError
from aac_lightning.modules.retrieval import ContrastiveRetrieval
from aac_lightning.commands.evaluate import retrieval_eval_command
from aac_lightning.config import read_ensemble_config
from aac_lightning.metrics.dcase import read_dcase_retrieval_csv, write_dcase_retrieval_csv
from aac_lightning.ensembles.retrieval import RetrievalEnsemble

REPO = Path(__file__).resolve().parents[1]

CNN14_KWARGS = dict(
    sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmin=50, fmax=8000,
    channels=[4, 8, 8, 8, 8, 8], embed_dim=8,
)
# the wavegram's first conv strides by hop / 64, so the hop must be a multiple of 64
WLCNN14_KWARGS = dict(
    sample_rate=32000, window_size=1024, hop_size=320, mel_bins=32, fmin=50, fmax=14000,
    channels=[4, 8, 8, 8, 8, 8], embed_dim=8, wavegram_channels=[4, 4, 8, 16],
)


def _train_checkpoint(root: Path, out: Path, audio_encoder: str, audio_kwargs: dict, embed_dim: int) -> Path:
    pl.seed_everything(0, workers=False)
    model = ContrastiveRetrieval(
        audio_encoder=audio_encoder,
        audio_encoder_kwargs=audio_kwargs,
        text_encoder="minilm-l6",
        text_pretrained=True,
        text_max_length=16,
        text_pooling="mean",
        embed_dim=embed_dim,
        lr=1e-3,
        warmup_epochs=0.0,  # two steps: a warm-up of a whole epoch would never end
    )
    data = RetrievalDataModule(clotho_root=str(root), global_batch_size=4, train_max_seconds=2.0)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(out.parent),
    )
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(out, weights_only=True)  # no optimizer state: smaller files
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ensemble")
    root = tmp / "data"
    write_synthetic_clotho(root, n_clips=12, seed=0, sample_rate=16000)
    ckpt_a = _train_checkpoint(root, tmp / "cnn14.ckpt", "cnn14", CNN14_KWARGS, embed_dim=16)
    ckpt_b = _train_checkpoint(root, tmp / "wlcnn14.ckpt", "wavegram_logmel_cnn14", WLCNN14_KWARGS, embed_dim=12)
    dataset = Clotho(root, "development", sample_rate=None)
    return {"tmp": tmp, "root": root, "ckpts": [ckpt_a, ckpt_b], "dataset": dataset}


def _reference_similarity(ckpt: Path, captions: list[str], audio_paths: list[Path]) -> torch.Tensor:
    """(Q, A) cosine similarity from the member's own bi-encoder, one audio file at a time."""
    model = ContrastiveRetrieval.load_for_inference(ckpt).model
    with torch.no_grad():
        text = model.encode_text(captions)  # (Q, E)
        audio = torch.cat([
            model.encode_audio(load_audio(p, model.audio_encoder.sample_rate)[0])  # (1, T) -> (1, E)
            for p in audio_paths
        ])  # (A, E)
    return F.normalize(text, dim=-1) @ F.normalize(audio, dim=-1).T


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    dataset = setup["dataset"]
    captions = [c for caps in dataset.captions for c in caps]
    targets = torch.tensor([i for i, caps in enumerate(dataset.captions) for _ in caps])
    paths = [r.path for r in dataset.records]
    sims = [_reference_similarity(c, captions, paths) for c in setup["ckpts"]]
    return {"captions": captions, "targets": targets, "paths": paths, "sims": sims}


@pytest.fixture(scope="module")
def ensemble(setup) -> RetrievalEnsemble:
    """The two-member ensemble, loaded once (members are read-only at inference)."""
    return RetrievalEnsemble.from_checkpoints(setup["ckpts"])


@pytest.fixture(scope="module")
def encoded(ensemble, reference) -> dict:
    """The ensemble's embeddings of the development captions and clips (audio one file at a time)."""
    text = ensemble.encode_texts(reference["captions"], batch_size=8)
    audio = ensemble.encode_audio_files(reference["paths"], batch_size=1)
    return {"text": text, "audio": audio}


# ---------------------------------------------------------------------------------------------
# ensemble scores
# ---------------------------------------------------------------------------------------------
def test_one_member_equals_its_own_similarity(ensemble, reference) -> None:
    for model, expected in zip(ensemble.models, reference["sims"]):
        single = RetrievalEnsemble([model])
        text = single.encode_texts(reference["captions"], batch_size=16)
        audio = single.encode_audio_files(reference["paths"], batch_size=1)
        assert len(text) == len(audio) == 1
        assert torch.allclose(text[0].norm(dim=-1), torch.ones(len(reference["captions"])), atol=1e-5)
        sim = single.similarity(text, audio)
        assert sim.shape == (len(reference["captions"]), len(reference["paths"]))
        torch.testing.assert_close(sim, expected, atol=1e-5, rtol=0)


def test_two_members_average_their_similarities(ensemble, encoded, reference) -> None:
    assert ensemble.sample_rates == [16000, 32000]
    text, audio = encoded["text"], encoded["audio"]
    assert [t.shape[1] for t in text] == [a.shape[1] for a in audio] == [16, 12]  # members keep their own spaces
    sim = ensemble.similarity(text, audio)
    sim_a, sim_b = reference["sims"]
    torch.testing.assert_close(sim, (sim_a + sim_b) / 2, atol=1e-5, rtol=0)
    assert (sim - sim_a).abs().max() > 1e-3 and (sim - sim_b).abs().max() > 1e-3  # both members matter


def test_audio_read_once_per_distinct_rate(ensemble, reference, monkeypatch) -> None:
    calls: list[int] = []
    real = waveforms_module.load_audio

    def counting_load_audio(path, sample_rate=32000, **kwargs):
        calls.append(sample_rate)
        return real(path, sample_rate, **kwargs)

    monkeypatch.setattr(waveforms_module, "load_audio", counting_load_audio)
    paths = reference["paths"][:3]
    cnn14, wlcnn14 = ensemble.models
    RetrievalEnsemble([cnn14, cnn14]).encode_audio_files(paths, batch_size=2)
    assert calls == [16000] * len(paths)  # two members at one rate: each file read once
    calls.clear()
    ensemble.encode_audio_files(paths, batch_size=2)
    assert sorted(calls) == sorted([16000, 32000] * len(paths))


@pytest.fixture(scope="module")
def dev_metrics(ensemble, setup) -> dict:
    return ensemble.evaluate(setup["dataset"], batch_size=1)


def test_evaluate_equals_retrieval_metrics_of_the_average(dev_metrics, reference) -> None:
    sim = (reference["sims"][0] + reference["sims"][1]) / 2
    expected_t2a = retrieval_metrics(sim, reference["targets"])
    expected_a2t = audio_to_text_metrics(sim.T, reference["targets"])
    assert set(dev_metrics) == {"t2a", "a2t"}
    assert set(dev_metrics["t2a"]) == set(dev_metrics["a2t"]) == {"R@1", "R@5", "R@10", "mAP@10"}
    for name, value in expected_t2a.items():
        assert dev_metrics["t2a"][name] == pytest.approx(value, abs=1e-9)
    for name, value in expected_a2t.items():
        assert dev_metrics["a2t"][name] == pytest.approx(value, abs=1e-9)


def test_one_member_evaluate_equals_the_modules_own_test_metrics(setup) -> None:
    # the LightningModule's test loop (Clotho evaluation subset, batches of 2 padded clips) and the
    # ensemble fed the same batches must agree exactly
    module = ContrastiveRetrieval.load_for_inference(setup["ckpts"][0])
    data = RetrievalDataModule(clotho_root=str(setup["root"]), global_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(setup["tmp"]))
    logged = trainer.test(module, datamodule=data, verbose=False)[0]
    metrics = RetrievalEnsemble([module.model]).evaluate(Clotho(setup["root"], "evaluation"), batch_size=2)
    for direction in ("t2a", "a2t"):
        for name, value in metrics[direction].items():
            assert value == pytest.approx(logged[f"test/{direction}/{name}"], abs=1e-6)


def test_rank_returns_top_k_names_and_scores(ensemble, reference) -> None:
    captions = reference["captions"][:4]
    names, scores = ensemble.rank(captions, reference["paths"], k=3, batch_size=1)
    sim = ((reference["sims"][0] + reference["sims"][1]) / 2)[:4]
    fnames = [p.name for p in reference["paths"]]
    assert scores.shape == (4, 3)
    for q in range(4):
        order = sorted(range(len(fnames)), key=lambda j: -float(sim[q, j]))[:3]
        assert names[q] == [fnames[j] for j in order]
        torch.testing.assert_close(scores[q], sim[q, order], atol=1e-5, rtol=0)
        assert bool((scores[q][:-1] >= scores[q][1:]).all())


def test_bad_inputs_give_clear_errors(setup, ensemble, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        RetrievalEnsemble.from_checkpoints([tmp_path / "nothing.ckpt"])
    captioner = tmp_path / "captioner.ckpt"
    torch.save({"state_dict": {}, "aac_lightning": {"kind": "xe"}}, captioner)
    with pytest.raises(HandoffError, match="'xe'"):
        RetrievalEnsemble.from_checkpoints([setup["ckpts"][0], captioner])
    with pytest.raises(ValueError, match="at least one"):
        RetrievalEnsemble.from_checkpoints([])
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        ensemble.encode_audio_files([tmp_path / "missing.wav"])
    with pytest.raises(ValueError, match="captions"):
        ensemble.encode_texts("a single string")
    with pytest.raises(ValueError, match="batch_size"):
        ensemble.encode_texts(["a dog"], batch_size=0)
    with pytest.raises(ValueError, match="one text and one audio"):
        ensemble.similarity([torch.zeros(2, 16)], [torch.zeros(3, 16)])
    with pytest.raises(ValueError, match="share E"):
        ensemble.similarity([torch.zeros(2, 16)] * 2, [torch.zeros(3, 8)] * 2)


# ---------------------------------------------------------------------------------------------
# submission CSV
# ---------------------------------------------------------------------------------------------
def test_dcase_csv_round_trips_commas_and_quotes(tmp_path) -> None:
    captions = ['A man says "hello, there" twice.', "Rain, wind; and thunder", "Café noise – Zürich"]
    names = [f'clip "{i}", take {i}.wav' for i in range(10)]
    ranked = [names, names[::-1], names[3:] + names[:3]]
    path = write_dcase_retrieval_csv(tmp_path / "out" / "submission.csv", captions, ranked)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == "caption," + ",".join(f"fname_{j}" for j in range(1, 11))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 4 and all(len(r) == 11 for r in rows)  # quoting keeps every field whole
    assert read_dcase_retrieval_csv(path) == (captions, ranked)


def test_dcase_csv_rejects_bad_rows(tmp_path) -> None:
    names = [f"{i}.wav" for i in range(10)]
    with pytest.raises(ValueError, match="same length"):
        write_dcase_retrieval_csv(tmp_path / "a.csv", ["one", "two"], [names])
    with pytest.raises(ValueError, match="ranked_fnames\\[1\\]"):
        write_dcase_retrieval_csv(tmp_path / "a.csv", ["one", "two"], [names, names[:9]])
    with pytest.raises(ValueError, match="twice"):
        write_dcase_retrieval_csv(tmp_path / "a.csv", ["one"], [names[:9] + names[:1]])
    with pytest.raises(ValueError, match="line breaks"):
        write_dcase_retrieval_csv(tmp_path / "a.csv", ["two\nlines"], [names])
    bad = tmp_path / "bad.csv"
    bad.write_text("query,fname_1\nx,y.wav\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        read_dcase_retrieval_csv(bad)


# ---------------------------------------------------------------------------------------------
# command and system configs
# ---------------------------------------------------------------------------------------------
def test_retrieval_eval_command_writes_json_and_csv(setup, ensemble, dev_metrics, tmp_path, capsys) -> None:
    ckpts = [str(c) for c in setup["ckpts"]]
    config = tmp_path / "system.yaml"
    config.write_text("checkpoints:\n" + "".join(f"  - {c}\n" for c in ckpts), encoding="utf-8")
    out_json, out_csv = tmp_path / "res" / "results.json", tmp_path / "res" / "submission.csv"
    retrieval_eval_command([
        "--config", str(config), "--clotho-root", str(setup["root"]), "--subset", "development",
        "--batch-size", "1", "--device", "cpu", "--out", str(out_json), "--csv", str(out_csv),
    ])
    printed = capsys.readouterr().out
    assert "t2a" in printed and "a2t" in printed and "mAP@10" in printed

    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["checkpoints"] == ckpts
    dataset = setup["dataset"]
    for direction in ("t2a", "a2t"):  # the command with batch size 1 does what evaluate() does
        for name, value in dev_metrics[direction].items():
            assert report["metrics"][direction][name] == pytest.approx(value, abs=1e-9)

    captions, ranked = read_dcase_retrieval_csv(out_csv)
    all_captions = [c for caps in dataset.captions for c in caps]
    assert captions == all_captions
    assert all(len(row) == min(10, len(dataset)) for row in ranked)
    names, _ = ensemble.rank(all_captions[:2], [r.path for r in dataset.records], k=10, batch_size=1)
    assert ranked[:2] == names


def test_retrieval_eval_command_ranks_a_folder_for_a_query_file(setup, ensemble, tmp_path) -> None:
    # the challenge's evaluation form: a CSV of caption queries and a folder of audio, no ground truth
    _, audio_dir = find_clotho_files(setup["root"], "development")
    queries = ['a beep, then "a hiss"', "a low rumble followed by a bell"]
    query_file = tmp_path / "retrieval_captions.csv"
    with open(query_file, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["caption"], *[[q] for q in queries]])
    out_csv = tmp_path / "submission.csv"
    retrieval_eval_command([
        str(setup["ckpts"][0]), "--audio-dir", str(audio_dir), "--queries", str(query_file),
        "--batch-size", "1", "--device", "cpu", "--csv", str(out_csv),
    ])
    captions, ranked = read_dcase_retrieval_csv(out_csv)
    assert captions == queries
    audio_paths = sorted(audio_dir.glob("*.wav"))
    expected, _ = RetrievalEnsemble(ensemble.models[:1]).rank(queries, audio_paths, k=10, batch_size=1)
    assert ranked == expected


def test_retrieval_eval_command_usage_errors(setup) -> None:
    with pytest.raises(SystemExit):
        retrieval_eval_command(["--clotho-root", str(setup["root"])])  # no checkpoint
    with pytest.raises(SystemExit):
        retrieval_eval_command([str(setup["ckpts"][0])])  # no data
    with pytest.raises(SystemExit):
        retrieval_eval_command([str(setup["ckpts"][0]), "--audio-dir", str(setup["root"])])  # no queries


def test_system_configs_follow_the_report() -> None:
    # report Table 2 order, and Sec. 3: system 1 all five, 2 the first four, 3 the first, third and
    # fourth, 4 the first three
    models = ["wlcnn14_bert_base", "cnn14_bert_medium", "cnn14_bert_base", "cnn14_roberta_base", "ast_bert_base"]
    members = {1: [1, 2, 3, 4, 5], 2: [1, 2, 3, 4], 3: [1, 3, 4], 4: [1, 2, 3]}
    for system, indices in members.items():
        checkpoints = read_ensemble_config(REPO / "conf" / "retrieval" / "ensembles" / f"system{system}.yaml")
        assert checkpoints == [f"runs/retrieval/{models[i - 1]}_finetune/best.ckpt" for i in indices]
        for model in models:  # each member names an existing model config
            assert (REPO / "conf" / "retrieval" / f"{model}.yaml").is_file()


def test_ensemble_config_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        read_ensemble_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint: [a.ckpt]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key"):
        read_ensemble_config(bad)
    bad.write_text("checkpoints: []\n", encoding="utf-8")
    with pytest.raises(ValueError, match="non-empty list"):
        read_ensemble_config(bad)
