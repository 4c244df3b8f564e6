"""A checkpoint's vocabulary rules the data it is trained on; a conflicting explicit vocabulary is refused.

The XE checkpoint here carries a vocabulary that differs from the one the data would build: two
words of the training captions are missing from it (they must become `<unk>`, counted and logged)
and one word the data never uses is in it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from aac_lightning.data import CaptioningDataModule
from aac_lightning.data.text import SPECIAL_TOKENS, Vocabulary, tokenize_caption
from aac_lightning.modules.captioning import CaptioningXE
from aac_lightning.modules.scst import CaptioningSCST
from tests.test_xe_module import TINY_CAPTIONER, retrieval_ckpt  # noqa: F401  (retrieval_ckpt is a fixture)

LOGGER = "aac_lightning.modules.captioning"


def trainer_for(tmp_path: Path, max_steps: int = 1) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


def datamodule(root: Path, tmp_path: Path, **kwargs) -> CaptioningDataModule:
    return CaptioningDataModule(clotho_root=str(root), global_batch_size=4, split_dir=str(tmp_path), **kwargs)


@pytest.fixture(scope="module")
def vocabularies(synth_root: Path, tmp_path_factory) -> dict:
    """The data's own vocabulary and the checkpoint's: the data's minus its 5th and last words, plus 'zebra'."""
    data = datamodule(synth_root, tmp_path_factory.mktemp("vocab")).vocabulary
    words = data.words[len(SPECIAL_TOKENS) :]
    dropped = [words[4], words[-1]]
    ckpt_words = list(SPECIAL_TOKENS) + [w for w in words if w not in dropped] + ["zebra"]
    return {"data": data, "checkpoint": Vocabulary(ckpt_words), "dropped": dropped}


@pytest.fixture(scope="module")
def xe_ckpt(retrieval_ckpt: Path, synth_root: Path, vocabularies: dict, tmp_path_factory) -> Path:  # noqa: F811
    """One XE step with the checkpoint vocabulary, saved."""
    out = tmp_path_factory.mktemp("xe_vocab")
    pl.seed_everything(0)
    module = CaptioningXE(extractor_ckpt=str(retrieval_ckpt), vocabulary=vocabularies["checkpoint"].words, **{**TINY_CAPTIONER, "warmup_steps": 0})
    trainer = trainer_for(out)
    trainer.fit(module, datamodule=datamodule(synth_root, out))
    path = out / "xe.ckpt"
    trainer.save_checkpoint(path)
    return path


def unknown_counts(captions: list[list[str]], dropped: list[str]) -> tuple[int, int]:
    words = [w for caps in captions for c in caps for w in tokenize_caption(c)]
    return sum(w in dropped for w in words), len(words)


def test_handoff_checkpoint_vocabulary_encodes_the_data(xe_ckpt: Path, synth_root: Path, vocabularies: dict, tmp_path: Path, caplog):
    ckpt_vocab, dropped = vocabularies["checkpoint"], vocabularies["dropped"]
    module = CaptioningSCST(init_from=str(xe_ckpt), num_samples=2)
    dm = datamodule(synth_root, tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer_for(tmp_path).fit(module, datamodule=dm)
    assert module.vocab == ckpt_vocab and dm.vocabulary == ckpt_vocab
    # the dropped words are counted (by hand here) and reported once
    missing, total = unknown_counts(dm.clips("train").captions, dropped)
    assert missing > 0
    messages = [r.getMessage() for r in caplog.records if "caption words are not in" in r.getMessage()]
    assert len(messages) == 1
    assert messages[0].startswith(f"{missing} of {total} caption words are not in the checkpoint vocabulary (e.g. ")
    assert all(repr(w) in messages[0] for w in dropped) and str(xe_ckpt) in messages[0]
    # training batches are encoded with the checkpoint's ids: dropped words are <unk>
    batch = next(iter(dm.train_dataloader()))
    for caption, row in zip(batch["captions"], batch["tokens"].tolist()):
        words = tokenize_caption(caption)[: dm.max_caption_words]
        expected = [ckpt_vocab.bos_id] + [ckpt_vocab.unk_id if w in dropped else ckpt_vocab.words.index(w) for w in words] + [ckpt_vocab.eos_id]
        assert row[: len(expected)] == expected
        assert set(row[len(expected) :]) <= {ckpt_vocab.pad_id}


def test_resume_uses_the_checkpoint_vocabulary_not_the_data(retrieval_ckpt: Path, xe_ckpt: Path, synth_root: Path, vocabularies: dict, tmp_path: Path):  # noqa: F811
    assert len(vocabularies["data"]) != len(vocabularies["checkpoint"])  # the data's would not even fit the weights
    module = CaptioningXE(extractor_ckpt=str(retrieval_ckpt), **{**TINY_CAPTIONER, "warmup_steps": 0})  # the stage's config: no vocabulary
    dm = datamodule(synth_root, tmp_path)
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=dm, ckpt_path=str(xe_ckpt))
    assert trainer.global_step == 2  # resumed after the checkpoint's step 1
    assert module.vocab == vocabularies["checkpoint"] and dm.vocabulary == vocabularies["checkpoint"]
    assert module.hparams.vocabulary == vocabularies["checkpoint"].words


def test_explicit_data_vocabulary_that_differs_is_refused(xe_ckpt: Path, synth_root: Path, vocabularies: dict, tmp_path: Path):
    data_vocab, ckpt_vocab = vocabularies["data"], vocabularies["checkpoint"]
    path = tmp_path / "vocabulary.json"
    data_vocab.save(path)
    position = len(SPECIAL_TOKENS) + 4  # where the checkpoint's list lacks the data's 5th word
    first = f"#{position} {data_vocab.words[position]!r} vs {ckpt_vocab.words[position]!r}"
    module = CaptioningXE(init_from=str(xe_ckpt), **{**TINY_CAPTIONER, "warmup_steps": 0})
    with pytest.raises(ValueError) as error:
        trainer_for(tmp_path).fit(module, datamodule=datamodule(synth_root, tmp_path, vocabulary_path=str(path)))
    message = str(error.value)
    assert f"the vocabulary of data.vocabulary_path '{path}' ({len(data_vocab)} words)" in message
    assert f"the vocabulary of checkpoint '{xe_ckpt}' ({len(ckpt_vocab)} words)" in message
    assert f"first differing entries: {first}, " in message
    # the same vocabulary given explicitly is accepted
    ckpt_vocab.save(path)
    module = CaptioningXE(init_from=str(xe_ckpt), **{**TINY_CAPTIONER, "warmup_steps": 0})
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer_for(tmp_path).fit(module, datamodule=datamodule(synth_root, tmp_path, vocabulary_path=str(path)))
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
