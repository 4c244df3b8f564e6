"""DataModules: batches, padding, re-split wiring, mixtures, and the distributed samplers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aac_lightning.data import CaptioningDataModule, Clotho, RetrievalDataModule, Vocabulary
from aac_lightning.data.datamodules import CaptionPairs, pad_waveforms
from aac_lightning.data.samplers import EvenTrainSampler, ShardedEvalSampler
from tests.test_datasets import write_audiocaps, write_macs


def test_pad_waveforms_zero_pads_and_keeps_lengths():
    batch, lengths = pad_waveforms([torch.ones(3), torch.full((5,), 2.0)])
    assert lengths.tolist() == [3, 5]
    assert batch.tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]


def test_retrieval_batches_pairs_and_clips(synth_root: Path, tmp_path: Path):
    dm = RetrievalDataModule(clotho_root=str(synth_root), sample_rate=16000, global_batch_size=8, train_max_seconds=1.0, split_dir=str(tmp_path))
    dm.setup("fit")
    train_clips = dm.clips("train")
    assert len(train_clips) == round(0.9 * 24) and len(dm.clips("val")) == 24 - len(train_clips)
    # every caption of every training clip is one pair per epoch
    pairs = CaptionPairs(train_clips)
    assert len(pairs) == 5 * len(train_clips)
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["audio"].shape[1] <= 16000 and batch["audio"].shape[0] == len(batch["captions"])
        for row, length in enumerate(batch["audio_lengths"].tolist()):
            assert batch["audio"][row, length:].abs().sum() == 0  # padding is zeros
        for cid, cap in zip(batch["clip_ids"].tolist(), batch["captions"]):
            assert cap in train_clips.captions[cid]
            seen.add((cid, cap))
    assert len(seen) == len(pairs)
    val = next(iter(dm.val_dataloader()))
    assert len(val["references"][0]) == 5 and val["audio"].shape[0] == len(val["fnames"])
    # the chosen lists are written for audit, and match the data used
    written = json.loads((tmp_path / "splits.json").read_text(encoding="utf-8"))
    assert written["splits"]["train"] == sorted(r.key for r in train_clips.records)
    assert not set(written["splits"]["train"]) & set(written["splits"]["val"])


def test_no_resplit_uses_original_subsets(synth_root: Path):
    dm = RetrievalDataModule(clotho_root=str(synth_root), sample_rate=16000, resplit=False)
    assert dm.clips("train").fnames == Clotho(synth_root, "development").fnames
    assert dm.clips("val").fnames == Clotho(synth_root, "validation").fnames
    assert dm.clips("test").fnames == Clotho(synth_root, "evaluation").fnames


def test_mixture_of_sources(synth_root: Path, tmp_path: Path):
    rows = [(1, "aaaaaaaaaaa", 0, "a dog barks"), (2, "bbbbbbbbbbb", 10, "a cat meows")]
    write_audiocaps(tmp_path, "train", rows)
    write_macs(tmp_path)
    dm = RetrievalDataModule(
        clotho_root=str(synth_root), audiocaps_root=str(tmp_path), macs_root=str(tmp_path),
        train_sources=["clotho", "audiocaps", "macs"], sample_rate=16000,
    )
    mix = dm.clips("train")
    datasets = [r.dataset for r in mix.records]
    assert datasets.count("audiocaps") == 2 and datasets.count("macs") == 2 and datasets.count("clotho") == round(0.9 * 24)
    item = mix[len(mix) - 1]
    assert item["dataset"] == "macs" and item["sr"] == 16000


def test_missing_root_and_bad_sources_are_named(synth_root: Path):
    with pytest.raises(ValueError, match=r"\['audiocaps'\] are used but their root is not set \(audiocaps_root\)"):
        RetrievalDataModule(clotho_root=str(synth_root), train_sources=["clotho", "audiocaps"])
    with pytest.raises(ValueError, match="MACS has no validation/test subsets"):
        RetrievalDataModule(clotho_root=str(synth_root), macs_root="x", val_source="macs")


def test_captioning_tokens_and_vocabulary(synth_root: Path):
    dm = CaptioningDataModule(clotho_root=str(synth_root), sample_rate=16000, global_batch_size=4, max_caption_words=5)
    vocab = dm.vocabulary
    captions = [c for caps in dm.clips("train").captions for c in caps]
    assert vocab == Vocabulary.build(captions)
    batch = next(iter(dm.train_dataloader()))
    tokens = batch["tokens"]
    assert tokens.shape[1] <= 5 + 2
    for row, caption in zip(tokens.tolist(), batch["captions"]):
        assert row[0] == vocab.bos_id and vocab.eos_id in row
        n = row.index(vocab.eos_id)
        assert row[1:n] == vocab.encode(caption, add_bos_eos=False)[:5]
        assert all(t == vocab.pad_id for t in row[n + 1 :])


@pytest.mark.parametrize("n,batch,world", [(10, 2, 2), (11, 2, 2), (13, 4, 3), (5, 4, 4), (3, 1, 2), (16, 3, 3), (9, 4, 2)])
def test_distributed_samplers_cover_each_sample_once(n: int, batch: int, world: int):
    data = list(range(n))
    # evaluation: exactly once over all ranks, no padding
    eval_idx = [list(ShardedEvalSampler(data, world, r)) for r in range(world)]
    assert sorted(i for idx in eval_idx for i in idx) == data
    assert [len(ShardedEvalSampler(data, world, r)) for r in range(world)] == [len(i) for i in eval_idx]
    # training: the same number of batches on every rank; every sample used once, repeats only to fill
    samplers = [EvenTrainSampler(data, batch, world, r, shuffle=True, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(3)
    per_rank = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(p) for p in per_rank]
    n_batches = {-(-len(p) // batch) for p in per_rank}
    assert len(n_batches) == 1
    used = [i for p in per_rank for i in p]
    assert set(used) == set(data)
    assert len(used) - n < world  # at most world - 1 repeats, only when the last global batch is tiny
    # the union of the ranks' k-th batches is the k-th batch of the same sampler at world 1 with the
    # global batch (one process), for every k; only a tiny last one is topped up from the epoch's start
    single = EvenTrainSampler(data, batch * world, 1, 0, shuffle=True, seed=5)
    single.set_epoch(3)
    single_order = list(single)
    assert sorted(single_order) == data
    single_batches = [single_order[k : k + batch * world] for k in range(0, n, batch * world)]
    assert len(single_batches) == n_batches.pop()
    for k, expected in enumerate(single_batches):
        union = [i for p in per_rank for i in p[k * batch : (k + 1) * batch]]
        if len(expected) >= world or k < len(single_batches) - 1:
            assert sorted(union) == sorted(expected), k
        else:  # fewer samples than ranks: each rank gets one, the missing ones from the epoch's start
            assert sorted(union) == sorted(expected + single_order[: world - len(expected)]), k


def test_data_sample_rate_differing_from_the_model_is_an_error_and_unset_follows_the_model(synth_root: Path):
    """The bad-input table's "data sample rate differing from the model's": both rates named; unset follows."""
    import types

    def attached(dm, model_rate: int):
        dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(sample_rate=model_rate))
        return dm

    for cls in (RetrievalDataModule, CaptioningDataModule):
        dm = attached(cls(clotho_root=str(synth_root), sample_rate=32000), 16000)
        with pytest.raises(ValueError, match=r"data\.sample_rate=32000 but the model's audio encoder expects 16000 Hz"):
            dm.setup("fit")
        for model_rate in (16000, 8000):
            follows = attached(cls(clotho_root=str(synth_root)), model_rate)
            clips = follows.clips("train")
            assert clips.sample_rate == model_rate and clips[0]["sr"] == model_rate
        same = attached(cls(clotho_root=str(synth_root), sample_rate=16000), 16000)
        assert same.clips("val")[0]["sr"] == 16000
    assert RetrievalDataModule(clotho_root=str(synth_root)).resolved_sample_rate() == 32000  # no model: PANNs' rate
