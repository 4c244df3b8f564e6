"""The contrastive LightningModule: real CLI runs, weights-only handoff, checkpoint metadata, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from aac_lightning.cli import main
from aac_lightning.data import RetrievalDataModule
from aac_lightning.metrics import audio_to_text_metrics, retrieval_metrics
from aac_lightning.modules import ContrastiveRetrieval
from aac_lightning.modules.schedules import warmup_cosine
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.config import build_model_offline, count_parameters, read_configs
from tests.conftest import demo_config_overrides

REPO = Path(__file__).resolve().parents[1]
TINY_AUDIO = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmax=8000, channels=[4, 8, 8, 8, 8, 8], embed_dim=16)


def tiny_module(**kwargs) -> ContrastiveRetrieval:
    args = dict(audio_encoder="cnn14", audio_encoder_kwargs=TINY_AUDIO, text_encoder="minilm-l6", text_max_length=16, embed_dim=8, lr=1e-3, warmup_epochs=0.0)
    args.update(kwargs)
    return ContrastiveRetrieval(**args)


def fit_tiny(root: Path, out: Path, **kwargs) -> Path:
    pl.seed_everything(0)
    module = tiny_module(**kwargs)
    dm = RetrievalDataModule(clotho_root=str(root), global_batch_size=4, eval_batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(module, datamodule=dm)
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(synth_root: Path, tmp_path_factory) -> Path:
    return fit_tiny(synth_root, tmp_path_factory.mktemp("ckpt"))


def test_checkpoint_carries_version_kind_and_rebuilds_alone(tiny_ckpt: Path, tmp_path: Path):
    ckpt = read_checkpoint(tiny_ckpt)
    assert ckpt["aac_lightning"]["kind"] == "contrastive" and ckpt["aac_lightning"]["version"]
    module = ContrastiveRetrieval.load_for_inference(tiny_ckpt)
    assert not module.training
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key


def test_finetuning_starts_from_pretraining_weights_only(tiny_ckpt: Path):
    module = tiny_module(init_from=str(tiny_ckpt), lr=2e-5)
    source = read_checkpoint(tiny_ckpt)["state_dict"]
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, source["model." + key]), key
    assert module.hparams.lr == 2e-5  # optimiser settings come from this stage, not the checkpoint


def test_handoff_errors_name_the_problem(tiny_ckpt: Path, tmp_path: Path):
    with pytest.raises(HandoffError, match=r"missing keys: .*|shape mismatches: .*"):
        tiny_module(init_from=str(tiny_ckpt), embed_dim=12)
    wrong_kind = read_checkpoint(tiny_ckpt)
    wrong_kind["aac_lightning"]["kind"] = "xe"
    torch.save(wrong_kind, tmp_path / "xe.ckpt")
    with pytest.raises(HandoffError, match=r"stage kind 'xe', but ContrastiveRetrieval needs one of \['contrastive'\]"):
        tiny_module(init_from=str(tmp_path / "xe.ckpt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        tiny_module(init_from=str(tmp_path / "absent.ckpt"))


def test_validation_metrics_equal_offline_computation(tiny_ckpt: Path, synth_root: Path):
    module = ContrastiveRetrieval.load_for_inference(tiny_ckpt)
    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4, eval_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]
    clips = dm.clips("val")
    with torch.no_grad():
        audio = [clips[i]["audio"][0] for i in range(len(clips))]
        audio_emb = torch.cat([module.model.encode_audio(a[None], torch.tensor([a.numel()])) for a in audio])
        captions = [c for caps in clips.captions for c in caps]
        text_emb = module.model.encode_text(captions)
    targets = torch.tensor([i for i, caps in enumerate(clips.captions) for _ in caps])
    sim = text_emb @ audio_emb.T
    expected = retrieval_metrics(sim, targets)
    for name, value in expected.items():
        assert logged[f"val/t2a/{name}"] == pytest.approx(value, abs=1e-6)
    for name, value in audio_to_text_metrics(sim.T, targets).items():
        assert logged[f"val/a2t/{name}"] == pytest.approx(value, abs=1e-6)


def test_warmup_cosine_schedule_values():
    assert warmup_cosine(0, 4, 12) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0)


def test_temperature_has_no_weight_decay_and_is_clamped(synth_root: Path, tmp_path: Path):
    module = tiny_module(weight_decay=0.1)
    with torch.no_grad():
        module.model.log_logit_scale.fill_(math.log(500.0))
    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert module.model.text_encoder.model.training  # pretrained HF models load in eval mode; training must switch them
    groups = trainer.optimizers[0].param_groups
    scale_groups = [g for g in groups if any(p is module.model.log_logit_scale for p in g["params"])]
    assert len(scale_groups) == 1 and scale_groups[0]["weight_decay"] == 0.0 and len(scale_groups[0]["params"]) == 1
    assert all(g["weight_decay"] == 0.1 for g in groups if g is not scale_groups[0])
    # clamped after the optimiser step: the logit scale is back at its bound of 100
    assert module.model.log_logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)


def test_text_lr_applies_to_the_text_encoder_only():
    module = tiny_module(lr=1e-3, text_lr=5e-5)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10, "max_epochs": 1})()  # what configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # peak lr (before warm-up)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)  # each once
    for name, param in trainable:
        assert lr_of[id(param)] == (5e-5 if name.startswith("model.text_encoder.") else 1e-3), name
    default = tiny_module(lr=1e-3)
    default.trainer = module.trainer
    assert {g["initial_lr"] for g in default.configure_optimizers()["optimizer"].param_groups} == {1e-3}


def test_cli_fit_runs_the_demo_configs(tmp_path: Path, synth_root: Path):
    """Both contrastive demo configs go through the real CLI (fast_dev_run), outputs under tmp_path."""
    from aac_lightning.lightning_cli import build_lightning_cli  # what `main(["fit", ...])` runs

    args = [*demo_config_overrides(tmp_path, synth_root), f"--model.init_args.audio_encoder_kwargs={TINY_AUDIO}".replace("'", '"')]
    configs = {name: yaml.safe_load((REPO / "conf" / "demo" / f"{name}.yaml").read_text(encoding="utf-8")) for name in ("contrastive_pretrain", "contrastive_finetune")}
    cli = build_lightning_cli(["fit", "--config", str(REPO / "conf" / "demo" / "contrastive_pretrain.yaml"), *args])
    init = configs["contrastive_pretrain"]["model"]["init_args"]
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])  # one real step
    assert (cli.model.hparams.lr, cli.model.hparams.text_lr, cli.model.hparams.embed_dim) == (init["lr"], init["text_lr"], init["embed_dim"])
    assert cli.model.model.text_encoder.model.config.num_hidden_layers == 6  # the real MiniLM-L6 of the demo
    assert cli.datamodule.global_batch_size == 4
    # the fine-tuning config needs its init_from: hand it a checkpoint of the same architecture
    ckpt = fit_tiny(synth_root, tmp_path, embed_dim=256, audio_encoder_kwargs=TINY_AUDIO, text_max_length=32, text_pooling="mean")
    finetune = ["fit", "--config", str(REPO / "conf" / "demo" / "contrastive_finetune.yaml"), *args, f"--model.init_args.init_from={ckpt}"]
    source = read_checkpoint(ckpt)["state_dict"]
    built = build_lightning_cli(finetune[1:], run=False)  # run=False takes no subcommand
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, source[key]), key  # weights from the handed-on checkpoint
    cli = build_lightning_cli(finetune)
    assert cli.trainer.global_step == 1 and cli.model.hparams.lr == configs["contrastive_finetune"]["model"]["init_args"]["lr"]
    assert any(not torch.equal(value, source[key]) for key, value in cli.model.state_dict().items())  # and trained


# The README's table: `summary` totals to 0.1M as printed there, and the report's Table 2 within 1M (the
# totals keep the frozen PANNs front end and BERT pooler, about 1.1M, which the report seems to leave out).
@pytest.mark.parametrize(
    "name,readme_millions,table2",
    [("wlcnn14_bert_base", 193.4, 192), ("cnn14_bert_medium", 124.8, 124), ("cnn14_bert_base", 193.1, 192),
     ("cnn14_roberta_base", 208.3, 207), ("ast_bert_base", 196.7, 196)],
)
def test_paper_configs_match_table_2(name: str, readme_millions: float, table2: int):
    config = read_configs([str(REPO / "conf" / "retrieval" / f"{name}.yaml"), str(REPO / "conf" / "retrieval" / "finetune_clotho.yaml")])
    model = build_model_offline(config)  # no weight file, no download: handoff paths are cleared
    total, trainable = count_parameters(model)
    assert round(total / 1e6, 1) == readme_millions, (name, total)
    assert 0 <= total / 1e6 - table2 < 1.5, (name, total)
    assert model.hparams.lr == 2e-5 and model.hparams.init_from is None


def test_cli_resolves_short_class_names(capsys, synth_root: Path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "ContrastiveRetrieval", "--model.text_encoder", "minilm-l6",
              "--data", "RetrievalDataModule", "--data.clotho_root", str(synth_root), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "aac_lightning.modules.ContrastiveRetrieval"
    assert printed["data"]["class_path"] == "aac_lightning.data.RetrievalDataModule"
    assert printed["data"]["init_args"]["clotho_root"] == str(synth_root)


def test_bf16_mixed_precision_trains(synth_root: Path, tmp_path: Path):
    """The bf16 autocast path (what `--trainer.precision bf16-mixed` uses on a GPU) runs; here on the CPU."""
    module = tiny_module()
    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    before = {k: v.clone() for k, v in module.model.audio_projection.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.model.audio_projection.state_dict().items())
