"""The XE captioning stage: frozen extractor, feature cache in training, CLI run, checkpoints that rebuild alone, Table 1 counts."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from aac_lightning.cli import main
from aac_lightning.data import CaptioningDataModule
from aac_lightning.data.datamodules import collate_clips
from aac_lightning.modules.schedules import warmup_exponential
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.config import build_model_offline, count_parameters, read_configs
from tests.conftest import demo_config_overrides
from tests.test_retrieval_module import fit_tiny

REPO = Path(__file__).resolve().parents[1]
TINY_CAPTIONER = dict(
    input_dim=8,
    decoder_kwargs=dict(d_model=16, num_layers=1, nhead=2, dim_feedforward=32),
    encoder_kwargs=dict(encoder_hidden_size=8, encoder_num_layers=1),
    warmup_steps=2,
    max_decode_length=8,
)


@pytest.fixture(scope="module")
def retrieval_ckpt(synth_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval")
    with contextlib.chdir(out):  # its trainer writes the re-split lists to the working directory
        return fit_tiny(synth_root, out)


def fit_xe(ckpt: Path, root: Path, max_epochs: int = 1, **kwargs) -> tuple[CaptioningXE, pl.Trainer]:
    """A short XE run; its outputs (the re-split lists) go to a folder next to the checkpoint."""
    pl.seed_everything(0)
    module = CaptioningXE(extractor_ckpt=str(ckpt), **{**TINY_CAPTIONER, **kwargs})
    dm = CaptioningDataModule(clotho_root=str(root), global_batch_size=8, eval_batch_size=8)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(ckpt.parent / "xe_run"),
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


def calibrated_extractor_ckpt(ckpt: Path, root: Path, out: Path) -> Path:
    """`ckpt` with its audio encoder's BatchNorm statistics recomputed over the development clips.

    Two training steps leave the tiny CNN14's statistics at their initial values, and its frames then
    differ between clips by about 1e-4: no captioner trained on them can tell clips apart. With the
    statistics of the data the frames differ by O(1), and a few epochs give clip-dependent captions.
    """
    from aac_lightning.data import Clotho
    from aac_lightning.nn.audio_encoders import load_audio_encoder
    from tests.test_retrieval_module import TINY_AUDIO

    state = read_checkpoint(ckpt)
    prefix = "model.audio_encoder."
    encoder = load_audio_encoder("cnn14", **TINY_AUDIO)
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)})
    for module in encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the clips
    clips = Clotho(str(root), "development", sample_rate=16000)
    encoder.train()
    with torch.no_grad():
        for index in range(len(clips)):
            audio = clips.load_audio(index)  # (1, T)
            encoder(audio, torch.tensor([audio.shape[1]]))
    state["state_dict"].update({prefix + k: v for k, v in encoder.state_dict().items()})
    path = out / "calibrated.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def distinct_run(retrieval_ckpt: Path, synth_root: Path, tmp_path_factory) -> tuple[CaptioningXE, pl.Trainer, Path]:
    """A captioner that really tells clips apart (5 different captions for the 6 evaluation clips).

    Three epochs on cached features of an extractor with calibrated BatchNorm statistics; returns the
    module, its trainer and the extractor checkpoint it was handed.
    """
    out = tmp_path_factory.mktemp("distinct")
    extractor = calibrated_extractor_ckpt(retrieval_ckpt, synth_root, out)
    module, trainer = fit_xe(extractor, synth_root, max_epochs=3, feature_cache_dir=str(out / "cache"), lr=3e-3, final_lr=3e-4)
    return module.eval(), trainer, extractor


@pytest.fixture(scope="module")
def online_run(retrieval_ckpt: Path, synth_root: Path) -> tuple[CaptioningXE, pl.Trainer]:
    """One epoch with the extractor run online in every step (no cache)."""
    return fit_xe(retrieval_ckpt, synth_root, feature_cache_dir=None)


@pytest.fixture(scope="module")
def cached_run(retrieval_ckpt: Path, synth_root: Path, tmp_path_factory) -> tuple[CaptioningXE, pl.Trainer]:
    """Two epochs on cached features."""
    cache_dir = tmp_path_factory.mktemp("xe") / "cache"
    return fit_xe(retrieval_ckpt, synth_root, max_epochs=2, feature_cache_dir=str(cache_dir), lr=1e-3, final_lr=1e-5)


def test_extractor_is_frozen_bit_identical_and_in_eval_mode(retrieval_ckpt: Path, online_run):
    source = read_checkpoint(retrieval_ckpt)["state_dict"]
    module, trainer = online_run  # online extraction: the extractor ran in every training step
    assert trainer.global_step > 0
    for key, value in module.extractor.encoder.state_dict().items():  # BatchNorm running stats included
        assert torch.equal(value, source["model.audio_encoder." + key]), key
    assert not any(p.requires_grad for p in module.extractor.parameters())
    module.train()
    assert module.model.training and not any(m.training for m in module.extractor.modules())
    assert "val/cider_d" in trainer.callback_metrics


def test_cached_training_reads_the_cache_and_matches_online_features(cached_run):
    module, trainer = cached_run
    cache = module.feature_cache
    assert cache is not None and cache.is_complete()
    dm = trainer.datamodule
    assert dm.loads_audio is False  # no audio decoded once every feature is cached
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio"].shape == (len(batch["keys"]), 0)
    records = dm.clips("train").records
    assert batch["keys"] == [records[i].key for i in batch["clip_ids"].tolist()]
    assert all(caption in records[i].captions for caption, i in zip(batch["captions"], batch["clip_ids"].tolist()))
    # the cache holds what the frozen extractor computes online, clip by clip
    clips = dm.clips("val")
    items = [{"audio": clips.load_audio(i)[0], "captions": clips.captions[i], "clip_id": i, "fname": clips.fnames[i]} for i in range(len(clips))]
    for item in items:
        batch = collate_clips([item])
        batch["keys"] = [clips.records[item["clip_id"]].key]
        cached, cached_lengths = module.features(batch)
        module.feature_cache = None
        online, online_lengths = module.features(batch)
        module.feature_cache = cache
        assert torch.equal(cached_lengths, online_lengths)
        assert torch.equal(cached, online)


def test_retrained_extractor_gets_a_new_cache(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path, cached_run):
    first = cached_run[0]
    ckpt = read_checkpoint(retrieval_ckpt)
    key = next(k for k in ckpt["state_dict"] if k.startswith("model.audio_encoder.") and k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1e-3
    torch.save(ckpt, tmp_path / "retrained.ckpt")
    second, _ = fit_xe(tmp_path / "retrained.ckpt", synth_root, feature_cache_dir=str(first.feature_cache.cache_dir))
    assert second.feature_cache.path != first.feature_cache.path
    assert second.feature_cache.path.parent == first.feature_cache.path.parent
    assert first.feature_cache.path.exists() and second.feature_cache.is_complete()


def test_schedules_follow_the_paper_settings(cached_run):
    module, trainer = cached_run
    total = int(trainer.estimated_stepping_batches)
    # teacher forcing reached its end value at the last step
    assert trainer.global_step == total
    assert module.teacher_forcing_ratio() == pytest.approx(0.7)
    # learning rate: linear warm-up over 2 steps then exponential decay, 1e-5 at the end
    assert warmup_exponential(0, 2, total, 1e-3, 1e-5) == pytest.approx(0.5)
    assert warmup_exponential(total, 2, total, 1e-3, 1e-5) * 1e-3 == pytest.approx(1e-5)
    # the peak is the last warm-up step (1); the last step of the run (total - 1) is at final_lr
    assert warmup_exponential(1, 2, total, 1e-3, 1e-5) == pytest.approx(1.0)
    assert warmup_exponential(total - 1, 2, total, 1e-3, 1e-5) * 1e-3 == pytest.approx(1e-5)
    mid = warmup_exponential(1 + (total - 2) // 2, 2, total, 1e-3, 1e-5)
    assert mid == pytest.approx(math.pow(1e-2, ((total - 2) // 2) / (total - 2)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-5)


def test_checkpoint_rebuilds_alone_with_its_vocabulary(distinct_run, tmp_path: Path):
    module, trainer, extractor_ckpt = distinct_run
    path = tmp_path / "xe.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(path)
    assert ckpt["aac_lightning"]["kind"] == "xe"
    assert ckpt["aac_lightning"]["handoff"]["extractor_ckpt"] == str(extractor_ckpt)
    assert ckpt["hyper_parameters"]["vocabulary"] == trainer.datamodule.vocabulary.words
    extractor_ckpt_copy = tmp_path / "moved.ckpt"
    extractor_ckpt.rename(extractor_ckpt_copy)  # the handoff file is gone: the XE checkpoint suffices
    try:
        loaded = CaptioningXE.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    finally:
        extractor_ckpt_copy.rename(extractor_ckpt)
    assert loaded.vocab == trainer.datamodule.vocabulary
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # every evaluation clip, one at a time and as one padded batch: same captions, and not one caption for all
    clips = trainer.datamodule.clips("test")
    items = [{"audio": clips.load_audio(i)[0], "captions": clips.captions[i], "clip_id": i, "fname": clips.fnames[i]} for i in range(len(clips))]
    module.eval()
    alone = [c for item in items for c in module.decode(*module.features(collate_clips([item])))]
    assert len(set(alone)) >= 3, alone
    batch = collate_clips(items)
    assert loaded.decode(*loaded.features(batch)) == alone
    # the next stage starts from it with init_from alone: captioner, frozen extractor and vocabulary
    following = CaptioningXE(init_from=str(path), **TINY_CAPTIONER)
    assert following.vocab == loaded.vocab
    for key, value in loaded.state_dict().items():
        assert torch.equal(following.state_dict()[key], value), key
    assert not any(p.requires_grad for p in following.extractor.parameters())


def test_handoff_errors_name_the_problem(retrieval_ckpt: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="input_dim=2048 but the extractor's frames have 8 channels"):
        CaptioningXE(extractor_ckpt=str(retrieval_ckpt), vocab_size=10)
    wrong = read_checkpoint(retrieval_ckpt)
    wrong["aac_lightning"]["kind"] = "xe"
    torch.save(wrong, tmp_path / "wrong.ckpt")
    with pytest.raises(HandoffError, match=r"stage kind 'xe', but CaptioningXE needs one of \['contrastive'\]"):
        CaptioningXE(extractor_ckpt=str(tmp_path / "wrong.ckpt"), input_dim=8, vocab_size=10)
    broken = read_checkpoint(retrieval_ckpt)
    del broken["state_dict"][next(k for k in broken["state_dict"] if k.startswith("model.audio_encoder."))]
    broken["state_dict"]["model.audio_encoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(HandoffError, match=r"missing keys: .*; unexpected keys: extra.weight"):
        CaptioningXE(extractor_ckpt=str(tmp_path / "broken.ckpt"), input_dim=8, vocab_size=10)


def test_cli_fit_runs_the_demo_config(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):
    config = yaml.safe_load((REPO / "conf" / "demo" / "xe.yaml").read_text(encoding="utf-8"))
    assert config["model"]["init_args"]["extractor_ckpt"].startswith("demo_workdir/")
    args = [
        *demo_config_overrides(tmp_path, synth_root),
        f"--model.init_args.extractor_ckpt={retrieval_ckpt}",
        f"--model.init_args.feature_cache_dir={tmp_path}/cache",
        "--model.init_args.input_dim=8",
    ]
    main(["fit", "--config", str(REPO / "conf" / "demo" / "xe.yaml"), *args])
    assert list((tmp_path / "cache").glob("features-*.h5"))


# The README's table of the report's Table 1: exact trainable counts, and the report's rounded millions.
@pytest.mark.parametrize(
    "name,readme_count,table1",
    [("transformer2", 10_386_960, 10.4), ("transformer4", 12_493_840, 12.5), ("gru_attention", 14_584_080, 14.6)],
)
def test_paper_configs_match_table_1(name: str, readme_count: int, table1: float):
    config = read_configs([str(REPO / "conf" / "captioning" / f"{name}.yaml")])
    assert config["trainer"]["max_epochs"] == 25 and config["data"]["init_args"]["global_batch_size"] == 64
    init = config["model"]["init_args"]
    assert (init["lr"], init["warmup_steps"], init["final_lr"], init["label_smoothing"], init["beam_size"]) == (5e-4, 3000, 5e-7, 0.1, 3)
    assert (init["teacher_forcing_start"], init["teacher_forcing_end"]) == (1.0, 0.7)
    model = build_model_offline(config, vocab_size=4368)  # the extractor checkpoint is cleared
    _, trainable = count_parameters(model)
    assert trainable == readme_count and round(trainable / 1e6, 1) == table1, trainable
