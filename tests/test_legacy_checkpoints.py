"""Captioner checkpoints written by version 0.1 (before the SJTU-fidelity options) still load as the model they were.

`tests/data/legacy_v0_1/` holds two tiny XE checkpoints (Transformer and GRU decoders) written by the
package at 0.1.0 with `make_legacy.py` (kept there), and the logits each gave on fixed inputs then.
Their hyper-parameters name none of the options added since, whose new defaults would build another
model (a memory LayerNorm, xavier init, hyphens kept...). Truth: the logits the old code computed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aac_lightning.ensembles.captioning import load_captioner
from aac_lightning.checkpoints import UPGRADED_KEY, read_checkpoint
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.scst import CaptioningSCST

DATA = Path(__file__).parent / "data" / "legacy_v0_1"


@pytest.mark.parametrize("decoder", ["transformer", "gru_attention"])
def test_a_version_0_1_captioner_rebuilds_as_it_was_trained(decoder: str):
    path = DATA / f"xe_{decoder}.ckpt"
    expected = torch.load(DATA / f"xe_{decoder}_outputs.pt", weights_only=True)
    ckpt = read_checkpoint(path)
    assert ckpt["aac_lightning"]["version"] == "0.1.0"
    assert {"encoder_kwargs", "decoder_kwargs", "caption_hyphens"} <= set(ckpt[UPGRADED_KEY])
    assert ckpt["hyper_parameters"]["caption_hyphens"] == "split"
    for module in (CaptioningXE.load_for_inference(path), load_captioner(path)):
        assert module.vocab.words == expected["vocabulary"] and module.vocab.hyphens == "split"
        with torch.no_grad():
            logits = module.model(expected["features"], expected["lengths"], expected["tokens"])
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_scst_starts_from_a_version_0_1_checkpoint_with_its_architecture(tmp_path: Path):
    path = DATA / "xe_transformer.ckpt"
    module = CaptioningSCST(init_from=str(path))
    assert module.hparams.decoder_kwargs["memory_projection"] == "linear"
    assert module.vocab.hyphens == "split"
    source = read_checkpoint(path)["state_dict"]
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, source["model." + key]), key


def test_a_current_checkpoint_is_not_upgraded(tmp_path: Path):
    old = torch.load(DATA / "xe_transformer.ckpt", weights_only=True)
    old["aac_lightning"]["version"] = "0.2.0"  # the same file claiming the current version
    torch.save(old, tmp_path / "current.ckpt")
    assert read_checkpoint(tmp_path / "current.ckpt")[UPGRADED_KEY] == []
    with pytest.raises(Exception, match="memory_norm"):  # built with today's defaults: the old weights lack the new LayerNorm
        CaptioningXE.load_for_inference(tmp_path / "current.ckpt")


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_an_scst_checkpoint_from_before_the_xe_scst_split_loads(tmp_path: Path, version: str):
    """SCST checkpoints of the time when CaptioningSCST took every XE argument record XE-only ones: they are dropped."""
    expected = torch.load(DATA / "xe_transformer_outputs.pt", weights_only=True)
    ckpt = read_checkpoint(DATA / "xe_transformer.ckpt") if version == "0.2.0" else torch.load(DATA / "xe_transformer.ckpt", weights_only=True)
    ckpt.pop(UPGRADED_KEY, None)
    ckpt["aac_lightning"].update(version=version, kind="scst", class_path="aac_lightning.modules.scst.CaptioningSCST")
    xe_only = dict(label_smoothing=0.1, warmup_steps=0, final_lr=5e-7, teacher_forcing_start=1.0, teacher_forcing_end=0.7)
    ckpt["hyper_parameters"].update(xe_only, samples="per_clip", num_samples=5, baseline="greedy", cider_df="corpus")
    torch.save(ckpt, tmp_path / "old_scst.ckpt")
    assert not set(xe_only) & set(read_checkpoint(tmp_path / "old_scst.ckpt")["hyper_parameters"])
    module = CaptioningSCST.load_for_inference(tmp_path / "old_scst.ckpt")
    assert not set(xe_only) & set(module.hparams) and module.hparams.samples == "per_clip"
    assert module.vocab.words == expected["vocabulary"] and module.vocab.hyphens == "split"
    with torch.no_grad():
        logits = module.model(expected["features"], expected["lengths"], expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
