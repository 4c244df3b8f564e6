"""Run with the package at version 0.1.0 on PYTHONPATH: writes tiny XE/SCST-style checkpoints and their outputs."""
import sys
from pathlib import Path
import torch
import lightning.pytorch as pl
import aac_lightning
assert aac_lightning.__version__ == "0.1.0", aac_lightning.__version__
from aac_lightning.data.synth import write_synthetic_clotho
from aac_lightning.data import RetrievalDataModule, CaptioningDataModule
from aac_lightning.modules import ContrastiveRetrieval, CaptioningXE

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
root = out / "synth"
write_synthetic_clotho(root, n_clips=12, seed=3, sample_rate=16000)
TINY_AUDIO = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=32, fmax=8000, channels=[4, 8, 8, 8, 8, 8], embed_dim=16)
pl.seed_everything(0)
ret = ContrastiveRetrieval(audio_encoder="cnn14", audio_encoder_kwargs=TINY_AUDIO, text_encoder="minilm-l6", text_max_length=16, embed_dim=8, lr=1e-3)
dm = RetrievalDataModule(clotho_root=str(root), batch_size=4, eval_batch_size=4)
tr = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out)
tr.fit(ret, datamodule=dm)
tr.save_checkpoint(out / "retrieval.ckpt", weights_only=True)
for decoder, dkw in (("transformer", dict(d_model=16, num_layers=1, nhead=2, dim_feedforward=32)), ("gru_attention", dict(hidden_size=16, embed_dim=16, attention_dim=16))):
    pl.seed_everything(0)
    xe = CaptioningXE(extractor_ckpt=str(out / "retrieval.ckpt"), input_dim=8, decoder=decoder, decoder_kwargs=dkw,
                      encoder_kwargs=dict(encoder_hidden_size=8, encoder_num_layers=2), warmup_steps=1, max_decode_length=8)
    cdm = CaptioningDataModule(clotho_root=str(root), batch_size=8, eval_batch_size=8)
    tr = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out)
    tr.fit(xe, datamodule=cdm)
    tr.save_checkpoint(out / f"xe_{decoder}.ckpt", weights_only=True)
    xe.eval()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 7, 8, generator=g)
    lengths = torch.tensor([7, 5])
    tokens = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 4]])
    with torch.no_grad():
        logits = xe.model(feats, lengths, tokens)
    torch.save({"features": feats, "lengths": lengths, "tokens": tokens, "logits": logits, "vocabulary": xe.vocab.words}, out / f"xe_{decoder}_outputs.pt")
print("ok")
