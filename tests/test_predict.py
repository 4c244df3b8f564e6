"""`aac-lightning predict` of every stage kind: the PredictionWriter's file holds what the modules decode / embed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aac_lightning.callbacks import PredictionWriter, write_predictions
from aac_lightning.cli import main
from aac_lightning.data import CaptioningDataModule, RetrievalDataModule
from aac_lightning.modules import CaptioningXE, ContrastiveRetrieval
from aac_lightning.modules.captioner import CaptionPrediction, TestCaption
from tests.conftest import demo_config_overrides
from tests.test_retrieval_module import TINY_AUDIO, fit_tiny
from tests.test_xe_module import TINY_CAPTIONER, fit_xe, retrieval_ckpt  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def predict_args(tmp_path: Path, synth_root: Path, output: Path) -> list[str]:
    """The demo overrides without fast_dev_run (every clip of the predict split), plus the writer."""
    writer = {"class_path": "aac_lightning.callbacks.PredictionWriter", "init_args": {"output_path": str(output)}}
    return [
        *(a for a in demo_config_overrides(tmp_path, synth_root) if not a.startswith("--trainer.fast_dev_run")),
        "--data.init_args.eval_batch_size=4",
        f"--trainer.callbacks+={json.dumps(writer)}",
    ]


def test_cli_predict_writes_the_captions_that_decode_gives(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    _, trainer = fit_xe(retrieval_ckpt, synth_root, feature_cache_dir=None)
    ckpt = tmp_path / "xe.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "captions.json"
    main([
        "predict", "--config", str(REPO / "conf" / "demo" / "xe.yaml"), *predict_args(tmp_path, synth_root, out),
        f"--model.init_args.extractor_ckpt={retrieval_ckpt}",
        f"--model.init_args.feature_cache_dir={tmp_path}/cache",
        f"--model.init_args.input_dim={TINY_CAPTIONER['input_dim']}",
        f"--model.init_args.decoder_kwargs={json.dumps(TINY_CAPTIONER['decoder_kwargs'])}",
        f"--model.init_args.encoder_kwargs={json.dumps(TINY_CAPTIONER['encoder_kwargs'])}",
        f"--model.init_args.max_decode_length={TINY_CAPTIONER['max_decode_length']}",
        f"--model.init_args.init_from={ckpt}",  # the XE weights and vocabulary
    ])
    written = json.loads(out.read_text(encoding="utf-8"))
    assert list((tmp_path / "cache").glob("features-*.h5"))  # the predict split's features were cached

    module = CaptioningXE.load_for_inference(ckpt)
    dm = CaptioningDataModule(clotho_root=str(synth_root), global_batch_size=4, eval_batch_size=4, sample_rate=module.sample_rate)
    dm.use_vocabulary(module.vocab)
    expected = []
    for batch in dm.predict_dataloader():  # the test split, read from the audio
        expected.extend({"file": f, "caption": c} for f, c in zip(batch["fnames"], module.decode(*module.features(batch))))
    assert len(expected) == len(dm.clips("test")) > 4
    assert written == expected


def test_cli_predict_writes_the_clip_embeddings(synth_root: Path, tmp_path: Path):
    ckpt = fit_tiny(synth_root, tmp_path, embed_dim=256, audio_encoder_kwargs=TINY_AUDIO, text_max_length=32, text_pooling="mean")
    out = tmp_path / "embeddings.pt"
    main([
        "predict", "--config", str(REPO / "conf" / "demo" / "contrastive_finetune.yaml"), *predict_args(tmp_path, synth_root, out),
        f"--model.init_args.audio_encoder_kwargs={json.dumps(TINY_AUDIO)}",
        f"--model.init_args.init_from={ckpt}",
    ])
    written = torch.load(out, weights_only=True)

    module = ContrastiveRetrieval.load_for_inference(ckpt)
    dm = RetrievalDataModule(clotho_root=str(synth_root), global_batch_size=4, eval_batch_size=4, sample_rate=module.sample_rate)
    files, embeddings = [], []
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            files.extend(batch["fnames"])
            embeddings.append(module.model.encode_audio(batch["audio"], batch["audio_lengths"]))
    assert written["files"] == files and len(files) == len(dm.clips("test"))
    torch.testing.assert_close(written["audio_emb"], torch.cat(embeddings), rtol=1e-5, atol=1e-6)


def test_writer_formats(tmp_path: Path):
    captions = [("b.wav", "a dog, barking"), ("a.wav", "rain")]
    write_predictions(tmp_path / "c.csv", captions)
    with (tmp_path / "c.csv").open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["file_name", "caption_predicted"], ["b.wav", "a dog, barking"], ["a.wav", "rain"]]
    emb = [("a.wav", torch.ones(3)), ("b.wav", torch.zeros(3))]
    write_predictions(tmp_path / "e.npz", emb)
    data = np.load(tmp_path / "e.npz")
    assert data["files"].tolist() == ["a.wav", "b.wav"] and data["audio_emb"].shape == (2, 3)
    with pytest.raises(ValueError, match="predicts captions"):
        write_predictions(tmp_path / "c.pt", captions)
    with pytest.raises(ValueError, match="unknown suffix"):
        PredictionWriter(tmp_path / "out.txt")


def test_test_captions_unpack_as_file_caption_references():
    item = TestCaption("a.wav", "rain", ["rain falls"])
    file, caption, references = item
    assert (file, caption, references) == (item.file, item.caption, item.references)
    assert tuple(CaptionPrediction("a.wav", "rain")) == ("a.wav", "rain")
