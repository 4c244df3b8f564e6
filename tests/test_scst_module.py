"""The SCST stage: loss and advantages by hand, clip deduplication, frozen extractor, CLI run, handoff errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

import aac_lightning.modules.scst as scst
from aac_lightning.cli import main
from aac_lightning.data import CaptioningDataModule
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.modules.scst import XE_ONLY_ARGUMENTS, CaptioningSCST, batch_document_frequency, leave_one_out_mean, scst_loss
from aac_lightning.nn.decoding import SampledCaptions
from tests.conftest import demo_config_overrides
from tests.test_xe_module import TINY_CAPTIONER, fit_xe, retrieval_ckpt  # noqa: F401  (retrieval_ckpt is a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xe_ckpt(retrieval_ckpt: Path, synth_root: Path, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("xe_for_scst")
    _, trainer = fit_xe(retrieval_ckpt, synth_root, max_epochs=1, feature_cache_dir=str(out / "cache"), lr=1e-3, final_lr=1e-5)
    path = out / "xe.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_scst_loss_and_leave_one_out_baseline_by_hand():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, 0.0]], requires_grad=True)  # (2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    advantages = torch.tensor([0.5, -2.0])
    # caption 0: 0.5 * (-3.0) ; caption 1: -2 * (-0.3) -> loss = -(-1.5 + 0.6) / 2 = 0.45
    loss = scst_loss(log_probs, mask, advantages)
    assert loss.item() == pytest.approx(0.45)
    loss.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([[-0.25, -0.25, 0.0], [1.0, 1.0, 1.0]]))
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])  # two clips, three samples each
    assert torch.allclose(leave_one_out_mean(rewards, 3), torch.tensor([4.0, 3.5, 1.5, 3.0, 1.5, 1.5]))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        leave_one_out_mean(rewards, 1)


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_training_step_rewards_advantages_and_deduplication(xe_ckpt: Path, monkeypatch, baseline: str):
    module = CaptioningSCST(init_from=str(xe_ckpt), samples="per_clip", num_samples=2, baseline=baseline)
    vocab = module.vocab
    words = [w for w in vocab.words if w not in ("<pad>", "<bos>", "<eos>", "<unk>")][:3]
    a, b, c = (vocab.words.index(w) for w in words)
    eos = vocab.eos_id
    feats = torch.randn(3, 5, 8)
    monkeypatch.setattr(module, "features", lambda batch: (feats, torch.tensor([5, 4, 3])))
    # Each sample (and greedy caption) is one of its own clip's references and none of the other's: the
    # reward below depends on the references, so scoring a clip against the other's changes the loss.
    module._train_references = {3: [words[0], words[1]], 5: [words[2], f"{words[0]} {words[1]}"]}
    calls = {}

    def fake_sample(model, f, lengths, **kwargs):
        calls["sample_rows"] = f.clone()
        calls["training"] = model.training
        tokens = torch.tensor([[a, eos], [b, eos], [c, eos], [a, b]])  # clip 3: "a", "b"; clip 5: "c", "a b"
        log_probs = torch.tensor([[-1.0, -1.0], [-2.0, -0.5], [-0.5, -0.5], [-1.0, -3.0]], requires_grad=True)
        calls["log_probs"] = log_probs
        return SampledCaptions(tokens, log_probs, torch.ones(4, 2, dtype=torch.bool))

    def fake_greedy(model, f, lengths, **kwargs):
        calls["greedy_training"] = model.training
        calls["greedy_grad"] = torch.is_grad_enabled()
        return torch.tensor([[b, eos], [c, eos]])  # clip 3: "b"; clip 5: "c"

    reward_of = {words[0]: 1.0, words[1]: 0.5, words[2]: 2.0, f"{words[0]} {words[1]}": 0.0}
    monkeypatch.setattr(scst, "sample_decode", fake_sample)
    monkeypatch.setattr(scst, "greedy_decode", fake_greedy)
    monkeypatch.setattr(
        module, "cider_rewards",
        lambda cands, refs, clips=None: torch.tensor([reward_of[x] if x in rs else -5.0 for x, rs in zip(cands, refs)]),
    )
    module.train()
    batch = {"clip_ids": torch.tensor([3, 3, 5])}  # clip 3 met twice: sampled once
    loss = module.training_step(batch, 0)
    assert torch.equal(calls["sample_rows"], feats[[0, 2]])
    assert calls["training"]
    rewards = torch.tensor([1.0, 0.5, 2.0, 0.0])
    if baseline == "greedy":
        assert not calls["greedy_training"] and not calls["greedy_grad"]
        baselines = torch.tensor([0.5, 0.5, 2.0, 2.0])  # greedy rewards of clip 3 and clip 5
    else:
        baselines = torch.tensor([0.5, 1.0, 0.0, 2.0])  # the other sample of the same clip
    advantages = rewards - baselines
    sums = torch.tensor([-2.0, -2.5, -1.0, -4.0])
    assert loss.item() == pytest.approx(float(-(advantages * sums).mean()))
    assert module.model.training  # the greedy pass restores training mode


def test_rewards_are_cider_d_with_corpus_or_batch_frequencies(xe_ckpt: Path):
    from aac_lightning.metrics.cider import CiderDocumentFrequency, cider_d

    refs = [["a dog barks loudly", "a dog is barking"], ["rain falls on a roof", "heavy rain on a roof"], ["a car passes by", "a car drives past"]]
    cands = ["a dog barks", "a dog barks", "rain on a roof"]
    cand_refs = [refs[0], refs[0], refs[1]]
    module = CaptioningSCST(init_from=str(xe_ckpt), cider_df="batch")
    batch_rewards = module.cider_rewards(cands, cand_refs)
    # batch mode: one document per distinct clip (2 clips), not per candidate
    expected = cider_d(cands, cand_refs, document_frequency=CiderDocumentFrequency.from_references(refs[:2]))[1]
    assert torch.allclose(batch_rewards, expected.float())
    assert batch_rewards[0] == batch_rewards[1] > 0
    module = CaptioningSCST(init_from=str(xe_ckpt), cider_df="corpus")
    module._document_frequency = CiderDocumentFrequency.from_references(refs)
    expected = cider_d(cands, cand_refs, document_frequency=CiderDocumentFrequency.from_references(refs))[1]
    assert torch.allclose(module.cider_rewards(cands, cand_refs), expected.float())


def test_scst_fit_keeps_the_extractor_and_trains_the_captioner(xe_ckpt: Path, synth_root: Path, tmp_path: Path):
    pl.seed_everything(0)
    source = read_checkpoint(xe_ckpt)
    module = CaptioningSCST(init_from=str(xe_ckpt), num_samples=3, lr=1e-3, feature_cache_dir=str(tmp_path / "cache"))
    assert module.hparams.decoder_kwargs == source["hyper_parameters"]["decoder_kwargs"]  # architecture from init_from
    dm = CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=8, eval_batch_size=8)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    for key, value in module.extractor.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, source["state_dict"]["extractor." + key]), key
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, source["state_dict"]["model." + k])]
    assert changed  # the captioner did learn
    assert {"train/reward_sample", "train/reward_greedy", "train/advantage"} <= set(trainer.callback_metrics)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # constant
    path = tmp_path / "scst.ckpt"
    trainer.save_checkpoint(path)
    assert read_checkpoint(path)["aac_lightning"]["kind"] == "scst"
    again = CaptioningSCST(init_from=str(path))  # SCST continues from SCST
    for key, value in module.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    loaded = CaptioningSCST.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert loaded.vocab == module.vocab and loaded.hparams.num_samples == 3


def test_cli_fit_runs_the_demo_config(xe_ckpt: Path, synth_root: Path, tmp_path: Path):
    config = yaml.safe_load((REPO / "conf" / "demo" / "scst.yaml").read_text(encoding="utf-8"))
    assert config["model"]["init_args"]["init_from"].startswith("demo_workdir/runs/xe/")
    args = [
        *demo_config_overrides(tmp_path, synth_root),
        f"--model.init_args.init_from={xe_ckpt}",
        f"--model.init_args.feature_cache_dir={tmp_path}/cache",
        "--model.init_args.num_samples=2",
    ]
    main(["fit", "--config", str(REPO / "conf" / "demo" / "scst.yaml"), *args])
    assert list((tmp_path / "cache").glob("features-*.h5"))


def test_bad_arguments_and_wrong_kind_handoffs_fail_clearly(retrieval_ckpt: Path, xe_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(HandoffError, match=r"stage kind 'contrastive', but CaptioningSCST needs one of \['xe', 'scst'\]"):
        CaptioningSCST(init_from=str(retrieval_ckpt))
    with pytest.raises(ValueError, match="baseline must be one of"):
        CaptioningSCST(init_from=str(xe_ckpt), baseline="beam")
    with pytest.raises(ValueError, match="cider_df must be one of"):
        CaptioningSCST(init_from=str(xe_ckpt), cider_df="train")
    with pytest.raises(ValueError, match="baseline='mean' needs num_samples >= 2"):
        CaptioningSCST(init_from=str(xe_ckpt), baseline="mean", num_samples=1)
    with pytest.raises(ValueError, match="input_dim=2048 differs from the input_dim of init_from"):
        CaptioningSCST(init_from=str(xe_ckpt), input_dim=2048)
    # a fit needs a starting checkpoint
    module = CaptioningSCST(vocabulary=read_checkpoint(xe_ckpt)["hyper_parameters"]["vocabulary"], input_dim=8, decoder_kwargs=dict(d_model=16, num_layers=1, nhead=2, dim_feedforward=32), encoder_kwargs=dict(encoder_hidden_size=8, encoder_num_layers=1))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pass init_from"):
        trainer.fit(module, datamodule=CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=4))


@pytest.mark.parametrize("name,decoder", [("transformer2", "transformer"), ("gru_attention", "gru_attention")])
def test_scst_config_switches_any_xe_config_to_scst(name: str, decoder: str, capsys):
    # jsonargparse keeps the init args the new class accepts when a later config changes class_path
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "conf" / "captioning" / f"{name}.yaml"), "--config", str(REPO / "conf" / "captioning" / "scst.yaml"), "--model.init_args.init_from=xe.ckpt", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    xe = yaml.safe_load((REPO / "conf" / "captioning" / f"{name}.yaml").read_text(encoding="utf-8"))
    model = config["model"]
    assert model["class_path"] == "aac_lightning.modules.CaptioningSCST"
    init = model["init_args"]
    # the XE-only arguments of the XE config are dropped: CaptioningSCST does not take them
    assert not set(XE_ONLY_ARGUMENTS) & set(init) and set(XE_ONLY_ARGUMENTS) & set(xe["model"]["init_args"])
    assert init["decoder"] == decoder and init["decoder_kwargs"] == xe["model"]["init_args"]["decoder_kwargs"]
    expected = tuple(yaml.safe_load((REPO / "conf" / "captioning" / "scst.yaml").read_text(encoding="utf-8"))["model"]["init_args"].get(k, d)
                     for k, d in [("lr", 5e-5), ("num_samples", 1), ("baseline", "greedy"), ("cider_df", "batch"), ("beam_size", 3)])
    assert (init["lr"], init["num_samples"], init["baseline"], init["cider_df"], init["beam_size"]) == expected
    assert init["init_from"] == "xe.ckpt" and init["extractor_ckpt"] is None
    assert config["trainer"]["max_epochs"] == 100
    callbacks = [(c["class_path"].rpartition(".")[2], c["init_args"]["dirpath"]) for c in config["trainer"]["callbacks"]]
    # last.ckpt next to the best (other callbacks, e.g. weight averaging, may come with them)
    assert [c for c in callbacks if c[0] in ("LatestCheckpoint", "ModelCheckpoint")] == [("LatestCheckpoint", None), ("ModelCheckpoint", "runs/scst/checkpoints")]


# --------------------------------------------------------------------------------------------------
# The authors' SCST: one sample per item, greedy baseline, batch document frequencies
# --------------------------------------------------------------------------------------------------


def _two_clip_module(xe_ckpt: Path, monkeypatch, **kwargs):
    """An SCST module on a fake batch of 3 items: clip 3, clip 5, clip 3 again; words a, b, c."""
    module = CaptioningSCST(init_from=str(xe_ckpt), **kwargs)
    vocab = module.vocab
    words = [w for w in vocab.words if w not in ("<pad>", "<bos>", "<eos>", "<unk>")][:3]
    ids = [vocab.words.index(w) for w in words]
    feats = torch.randn(3, 5, 8)
    monkeypatch.setattr(module, "features", lambda batch: (feats, torch.tensor([5, 4, 5])))
    module.train()
    return module, words, ids, feats


def test_authors_defaults():
    import inspect

    parameters = inspect.signature(CaptioningSCST.__init__).parameters
    defaults = {k: parameters[k].default for k in ("samples", "num_samples", "baseline", "cider_df", "duplicate_reward", "sample_temperature", "max_decode_length")}
    assert defaults == {"samples": "per_item", "num_samples": 1, "baseline": "greedy", "cider_df": "batch",
                        "duplicate_reward": "own", "sample_temperature": 1.0, "max_decode_length": 20}


@pytest.mark.parametrize("duplicate_reward", ["own", "first"])
def test_per_item_samples_once_per_item_and_rewards_each_against_its_own_clip(xe_ckpt: Path, monkeypatch, duplicate_reward: str):
    module, (wa, wb, wc), (a, b, c), feats = _two_clip_module(xe_ckpt, monkeypatch, duplicate_reward=duplicate_reward)
    eos = module.vocab.eos_id
    # Clip 3's references hold "a" and "b", clip 5's hold "c": a reward that depends on the references
    # (1 when the caption is one of them) fails if a sample is scored against another clip's references.
    module._train_references = {3: [wa, wb], 5: [wc]}
    calls = {}

    def fake_sample(model, f, lengths, **kwargs):
        calls["sample_rows"], calls["num_samples"], calls["training"] = f.clone(), kwargs["num_samples"], model.training
        calls["max_length"] = kwargs["max_length"]
        tokens = torch.tensor([[a, eos], [c, eos], [b, eos]])  # item 0 "a", item 1 "c", item 2 "b"
        log_probs = torch.tensor([[-1.0, -1.0], [-2.0, -0.5], [-0.5, -0.25]], requires_grad=True)
        return SampledCaptions(tokens, log_probs, torch.ones(3, 2, dtype=torch.bool))

    def fake_greedy(model, f, lengths, **kwargs):
        calls["greedy_rows"] = f.clone()
        return torch.tensor([[c, eos], [c, eos], [c, eos]])  # "c": right for clip 5 only

    def own_reference_reward(cands, refs, clips=None):
        calls.setdefault("reward_clips", []).append(list(clips))
        return torch.tensor([float(cand in r) for cand, r in zip(cands, refs)])

    monkeypatch.setattr(scst, "sample_decode", fake_sample)
    monkeypatch.setattr(scst, "greedy_decode", fake_greedy)
    monkeypatch.setattr(module, "cider_rewards", own_reference_reward)
    loss = module.training_step({"clip_ids": torch.tensor([3, 5, 3])}, 0)
    assert torch.equal(calls["sample_rows"], feats) and calls["num_samples"] == 1  # one sample per item
    assert torch.equal(calls["greedy_rows"], feats) and calls["training"] and calls["max_length"] == 20
    assert calls["reward_clips"] == [[3, 5, 3], [3, 5, 3]]
    # Own references: samples "a" (clip 3) 1, "c" (clip 5) 1, "b" (clip 3) 1; greedy "c": 0, 1, 0.
    rewards = torch.tensor([1.0, 1.0, 1.0])  # ("first": item 2 takes item 0's reward, 1 as well)
    advantages = rewards - torch.tensor([0.0, 1.0, 0.0])
    sums = torch.tensor([-2.0, -2.5, -0.75])
    assert loss.item() == pytest.approx(float(-(advantages * sums).mean()))


def test_duplicate_reward_first_copies_the_first_items_reward(xe_ckpt: Path, monkeypatch):
    eos_rewards = {}
    for mode in ("own", "first"):
        module, (wa, wb, wc), (a, b, c), _ = _two_clip_module(xe_ckpt, monkeypatch, duplicate_reward=mode, baseline="greedy")
        eos = module.vocab.eos_id
        module._train_references = {3: [wa], 5: [wc]}
        tokens = torch.tensor([[a, eos], [c, eos], [b, eos]])  # item 2 (clip 3 again) says "b": reward 0 of its own
        log_probs = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
        monkeypatch.setattr(scst, "sample_decode", lambda *args, **kw: SampledCaptions(tokens, log_probs, torch.ones(3, 2, dtype=torch.bool)))
        monkeypatch.setattr(scst, "greedy_decode", lambda *args, **kw: torch.tensor([[b, eos]] * 3))  # reward 0 everywhere
        monkeypatch.setattr(module, "cider_rewards", lambda cands, refs, clips=None: torch.tensor([float(x in r) for x, r in zip(cands, refs)]))
        eos_rewards[mode] = module.training_step({"clip_ids": torch.tensor([3, 5, 3])}, 0).item()
    # own: advantages 1, 1, 0 -> loss = -(-1 - 1 + 0) / 3; first: item 2 takes item 0's 1 -> -(-3) / 3.
    assert eos_rewards["own"] == pytest.approx(2 / 3)
    assert eos_rewards["first"] == pytest.approx(1.0)


def _ngram_frequencies(frequency) -> dict[tuple[str, ...], float]:
    """The unigram and bigram document frequencies of a table, by words."""
    words, vocab = frequency.words, len(frequency.words)
    table = {(w,): float(df) for w, df in zip(words, frequency.frequencies[0])}
    for key, df in zip(frequency.order_keys[0].tolist(), frequency.frequencies[1]):
        table[(words[key // vocab], words[key % vocab])] = float(df)
    return table


def test_batch_document_frequencies_count_each_distinct_clip_once_by_hand():
    # Items of a batch: clip 3, clip 5, clip 3 again (one item per caption), each with its clip's references.
    dog, cat = ["a dog barks", "a dog"], ["a cat"]
    frequency = batch_document_frequency([dog, cat, dog], clip_ids=[3, 5, 3])
    assert frequency.num_documents == 2  # N = distinct clips, as pycocoevalcap's Cider on the key -> refs dict
    expected = {("a",): 2, ("dog",): 1, ("barks",): 1, ("cat",): 1, ("a", "dog"): 1, ("dog", "barks"): 1, ("a", "cat"): 1}
    assert _ngram_frequencies(frequency) == expected
    # Two clips whose reference lists happen to be equal are still two documents when ids are given.
    assert batch_document_frequency([cat, cat], clip_ids=[1, 2]).num_documents == 2
    assert batch_document_frequency([cat, cat]).num_documents == 1  # without ids: told apart by references
    with pytest.raises(ValueError, match="clip_ids"):
        batch_document_frequency([cat], clip_ids=[1, 2])


def test_training_step_rewards_are_cider_d_against_own_references_with_batch_frequencies(xe_ckpt: Path, monkeypatch):
    from aac_lightning.metrics.cider import cider_d

    module, _, _, _ = _two_clip_module(xe_ckpt, monkeypatch)  # the authors' defaults
    vocab = module.vocab
    words = [w for w in vocab.words if w not in ("<pad>", "<bos>", "<eos>", "<unk>")][:6]
    refs = {3: [f"{words[0]} {words[1]} {words[2]}", f"{words[0]} {words[1]}"], 5: [f"{words[3]} {words[4]}", f"{words[3]} {words[5]}"]}
    module._train_references = refs
    eos, pad = vocab.eos_id, vocab.pad_id
    tok = {w: vocab.words.index(w) for w in words}
    sample_tokens = torch.tensor([[tok[words[0]], tok[words[1]], eos], [tok[words[3]], tok[words[4]], eos], [tok[words[0]], tok[words[3]], eos]])
    greedy_tokens = torch.tensor([[tok[words[0]], eos, pad]] * 3)
    log_probs = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5], [-2.0, -2.0, -2.0]], requires_grad=True)
    monkeypatch.setattr(scst, "sample_decode", lambda *a, **k: SampledCaptions(sample_tokens, log_probs, torch.ones(3, 3, dtype=torch.bool)))
    monkeypatch.setattr(scst, "greedy_decode", lambda *a, **k: greedy_tokens)
    loss = module.training_step({"clip_ids": torch.tensor([3, 5, 3])}, 0)
    own = [refs[3], refs[5], refs[3]]
    frequency = batch_document_frequency([refs[3], refs[5]])  # the two distinct clips
    samples = [f"{words[0]} {words[1]}", f"{words[3]} {words[4]}", f"{words[0]} {words[3]}"]
    reward = cider_d(samples, own, document_frequency=frequency)[1].float()
    base = cider_d([words[0]] * 3, own, document_frequency=frequency)[1].float()
    assert reward[0] > 0 and reward[1] > 0 and not torch.equal(reward, base)
    sums = torch.tensor([-3.0, -1.5, -6.0])
    assert loss.item() == pytest.approx(float(-((reward - base) * sums).mean()), rel=1e-5)
    # Scored against the swapped references, the rewards would differ (the check above can tell).
    swapped = cider_d(samples, [refs[5], refs[3], refs[5]], document_frequency=frequency)[1].float()
    assert not torch.allclose(swapped, reward)


def test_new_options_are_checked(xe_ckpt: Path):
    with pytest.raises(ValueError, match="samples must be one of"):
        CaptioningSCST(init_from=str(xe_ckpt), samples="per_batch")
    with pytest.raises(ValueError, match="duplicate_reward must be one of"):
        CaptioningSCST(init_from=str(xe_ckpt), duplicate_reward="last")


def greedy_train_cider(module: CaptioningSCST, dm: CaptioningDataModule) -> float:
    """Corpus CIDEr-D (training-reference frequencies) of the greedy captions of all training clips."""
    from aac_lightning.data.text import normalize_caption
    from aac_lightning.metrics.cider import CiderDocumentFrequency, cider_d
    from aac_lightning.nn.decoding import greedy_decode

    clips = dm.clips("train")
    references = [[normalize_caption(c) for c in caps] for caps in clips.captions]
    feats, lengths = module.feature_cache.batch([r.key for r in clips.records])  # (N, T', D), (N,)
    module.eval()
    with torch.no_grad():
        tokens = greedy_decode(module.model, feats, lengths, max_length=module.hparams.max_decode_length, bos_id=module.vocab.bos_id, eos_id=module.vocab.eos_id, pad_id=module.vocab.pad_id)
    captions = [normalize_caption(c) for c in module.vocab.decode_batch(tokens)]
    return cider_d(captions, references, document_frequency=CiderDocumentFrequency.from_references(references))[0]


@pytest.mark.slow
def test_scst_raises_the_greedy_cider_d_of_the_training_set(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    cache = str(tmp_path / "cache")
    # A tiny model learns fast enough for this check without the paper's regularisation (dropouts,
    # random positions): those options are switched off; the SCST path is the same.
    tiny = dict(
        decoder_kwargs={**TINY_CAPTIONER["decoder_kwargs"], "dropout": 0.0, "positional_encoding": "sinusoidal"},
        encoder_kwargs={**TINY_CAPTIONER["encoder_kwargs"], "encoder_dropout": 0.0, "encoder_input_dropout": 0.0},
    )
    _, xe_trainer = fit_xe(retrieval_ckpt, synth_root, max_epochs=3, feature_cache_dir=cache, lr=3e-3, final_lr=1e-4, **tiny)
    xe_path = tmp_path / "xe.ckpt"
    xe_trainer.save_checkpoint(xe_path)
    pl.seed_everything(0)
    module = CaptioningSCST(init_from=str(xe_path), feature_cache_dir=cache, lr=1e-3)  # the authors' sampling and rewards
    dm = CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=16, eval_batch_size=16)
    trainer = pl.Trainer(max_steps=SCST_STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    after = greedy_train_cider(module, dm)
    start = CaptioningSCST(init_from=str(xe_path))
    start.feature_cache = module.feature_cache
    before = greedy_train_cider(start, dm)
    print(f"greedy train CIDEr-D: XE start {before:.3f} -> after {SCST_STEPS} SCST steps {after:.3f}")
    assert after > before + 0.05, (before, after)


SCST_STEPS = 40
