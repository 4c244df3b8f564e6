"""Each stage kind trains and evaluates under real Lightning DDP exactly as one process would.

Two CPU processes are started the way torchrun starts them (MASTER_ADDR / MASTER_PORT / WORLD_SIZE /
RANK / LOCAL_RANK / NODE_RANK in the environment, so Lightning treats them as externally launched)
and each runs a real `lightning.pytorch.Trainer(devices=2, strategy=DDPStrategy("gloo"))` on the real
modules and datamodules, one stage after the other: contrastive -> XE (on the frozen audio encoder
of the DDP contrastive checkpoint, features cached) -> SCST (from the DDP XE checkpoint). The test
process then runs one process on the same global batches / the same weights and compares.

The data are the session's synthetic clips cut to exactly 1 s, so no batch is ever zero-padded: a
clip's features then do not depend on which other clips share its batch (the CNN14 front end sees
the padding of a batch), and the DDP per-rank batches and the single-process global batch compute the
same per-clip values. Evaluation uses one clip per batch for the same reason. The re-split keeps 5
validation clips, an odd number, so a sampler that padded the ranks' shards would count a clip twice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

import aac_lightning.data.feature_cache as features
import aac_lightning.modules.captioning as captioning
from aac_lightning.data import CaptioningDataModule, RetrievalDataModule
from aac_lightning.modules import CaptioningSCST, CaptioningXE, ContrastiveRetrieval
from tests.test_retrieval_module import TINY_AUDIO
from tests.test_xe_module import TINY_CAPTIONER
from tests.ddp import spawn_workers

WORLD_SIZE = 2
PER_RANK_BATCH = 4
TRAIN_FRACTION = 0.8  # 24 development + validation clips -> 19 train, 5 validation
TRAIN_STEPS = 2
XE_NAN_STEP, XE_NAN_RANK = 1, 1  # the XE run gets a NaN loss on one rank at this step
TINY_RETRIEVAL = dict(audio_encoder="cnn14", audio_encoder_kwargs=TINY_AUDIO, text_encoder="minilm-l6", text_max_length=16, embed_dim=8, lr=1e-3)


class NoBatchStatisticsRetrieval(ContrastiveRetrieval):
    """`ContrastiveRetrieval` whose bi-encoder computes in eval mode while it trains.

    In training mode a DDP rank normalises its BatchNorm layers with the statistics of its own share
    of the batch, and dropout / SpecAugment draw from each process's own generator: two ranks then
    cannot compute what one process computes on the whole batch, by construction. Eval mode removes
    exactly those (running statistics, no random draws) and keeps everything DDP is responsible for:
    the gathered InfoNCE, gradient averaging and the optimizer, so the comparison can be exact.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train()  # Lightning 2.6 keeps the modules' modes as built (and restores them after validation)

    def train(self, mode: bool = True) -> NoBatchStatisticsRetrieval:
        super().train(mode)
        self.model.eval()
        return self


class NoDropoutXE(CaptioningXE):
    """`CaptioningXE` whose captioner computes in eval mode while it trains: no dropout draws.

    Each DDP rank draws dropout masks from its own generator, so two ranks cannot compute what one
    process computes on the whole batch; without them (and with teacher forcing kept at 1, so
    scheduled sampling draws nothing) the two runs do the same arithmetic on the same global batches.
    """

    def setup(self, stage: str) -> None:
        # The captioner is built here, once the vocabulary is known: from a fixed seed, so its first
        # weights do not depend on what the process drew before (DDP setup, samplers).
        with torch.random.fork_rng():
            torch.manual_seed(1)
            super().setup(stage)
        if stage == "fit":
            self.initial_captioner = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def training_step(self, batch, batch_idx):
        self.model.eval()
        return super().training_step(batch, batch_idx)


# Every training caption cut to 3 words: all rows hold 5 tokens, so each rank's token-mean loss is
# over the same number of tokens and the mean of the ranks' gradients is the global batch's gradient
# (with captions of different lengths, per-rank token means weight the ranks' tokens differently).
XE_CAPTION_WORDS = 3


class Recorder(pl.Callback):
    """Per training step: the logged metrics and the batch's (file name, caption) pairs."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        logged["local_loss"] = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        pairs = sorted(zip(batch["fnames"], batch["captions"]))
        self.steps.append({"logged": logged, "pairs": pairs, "global_step": trainer.global_step})


# ---------------------------------------------------------------------------------------------- shared
def make_trainer(out: Path, ddp: bool, callbacks: list[pl.Callback] = (), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE if ddp else 1,
        strategy=DDPStrategy(process_group_backend="gloo") if ddp else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=list(callbacks),
        **kwargs,
    )


def data_kwargs(root: Path, out: Path, ddp: bool) -> dict[str, Any]:
    # The same global batch whatever the number of processes: each of the two ranks loads half of it.
    return dict(clotho_root=str(root), global_batch_size=PER_RANK_BATCH * WORLD_SIZE, eval_batch_size=1, resplit_train_fraction=TRAIN_FRACTION, split_dir=str(out))


def weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def equal_length_copy(root: Path, out: Path, seconds: float = 1.0) -> Path:
    """A copy of a Clotho-layout root with every clip cut to exactly `seconds` (all clips are longer)."""
    shutil.copytree(root, out)
    for path in out.rglob("*.wav"):
        audio, rate = sf.read(path, dtype="float32")
        n = int(seconds * rate)
        assert len(audio) > n, path
        sf.write(path, audio[:n], rate)
    return out


# ---------------------------------------------------------------------------------------------- stages
# The DDP workers run all three; the test process runs the contrastive one on the global batch.
def _run_contrastive(root: Path, out: Path, ddp: bool) -> dict[str, Any]:
    pl.seed_everything(0)
    module = NoBatchStatisticsRetrieval(**TINY_RETRIEVAL)
    initial = weights(module)
    dm = RetrievalDataModule(train_max_seconds=None, **data_kwargs(root, out, ddp))
    recorder = Recorder()
    trainer = make_trainer(out, ddp, [recorder], max_epochs=1, limit_train_batches=TRAIN_STEPS, check_val_every_n_epoch=2)  # validated after fit
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.save_checkpoint(out / "contrastive.ckpt")
    return {"steps": recorder.steps, "split": dm.clotho_resplit(), "val": val, "initial": initial, "weights": weights(module)}


def _nan_once_cross_entropy(rank: int):
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        call, calls["n"] = calls["n"], calls["n"] + 1
        return loss * float("nan") if (rank, call) == (XE_NAN_RANK, XE_NAN_STEP) else loss

    return types.SimpleNamespace(cross_entropy=cross_entropy)


def _run_xe(root: Path, out: Path, rank: int, ddp: bool = True) -> dict[str, Any]:
    builds: list[int] = []
    original_build, original_functional = features.FeatureCache.build, captioning.F

    def counting_build(self, *args, **kwargs):
        extracted = original_build(self, *args, **kwargs)
        builds.append(extracted)
        return extracted

    features.FeatureCache.build = counting_build
    captioning.F = _nan_once_cross_entropy(rank)  # one rank's loss of one step is NaN (one process: pass XE_NAN_RANK)
    try:
        pl.seed_everything(0)
        module = NoDropoutXE(
            extractor_ckpt=str(out / "contrastive.ckpt"), feature_cache_dir=str(out / "cache"), nonfinite_loss="skip", lr=1e-3,
            teacher_forcing_end=1.0, **TINY_CAPTIONER,
        )
        dm = CaptioningDataModule(max_caption_words=XE_CAPTION_WORDS, **data_kwargs(root, out, ddp=ddp))
        recorder = Recorder()
        trainer = make_trainer(out, ddp, [recorder], max_epochs=1, limit_train_batches=3, check_val_every_n_epoch=2)  # validated after fit
        trainer.fit(module, datamodule=dm)
    finally:  # the test process runs this too: leave its modules as they were (the workers keep
        if not ddp:  # counting, so SCST's setup shows it finds every feature cached)
            features.FeatureCache.build, captioning.F = original_build, original_functional
    if not ddp:
        return {"steps": recorder.steps, "skipped": module.nonfinite_skipped, "global_step": trainer.global_step, "initial": module.initial_captioner, "weights": weights(module)}
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.save_checkpoint(out / "xe.ckpt")
    keys = [r.key for r in dm.clips("val").records] + [r.key for r in dm.clips("train").records]
    feats, lengths = module.feature_cache.batch(keys)
    stat = module.feature_cache.path.stat()
    return {
        "builds": builds,
        "cache_file": (str(module.feature_cache.path), stat.st_ino, stat.st_mtime_ns),
        "features_sha": hashlib.sha256(feats.numpy().tobytes() + lengths.numpy().tobytes()).hexdigest(),
        "steps": recorder.steps,
        "initial": module.initial_captioner,
        "skipped": module.nonfinite_skipped,
        "global_step": trainer.global_step,
        "val": val,
        "weights": weights(module),
    }


def _run_scst(root: Path, out: Path) -> dict[str, Any]:
    pl.seed_everything(0)
    module = CaptioningSCST(init_from=str(out / "xe.ckpt"), feature_cache_dir=str(out / "cache"), num_samples=2, lr=1e-4, max_decode_length=8)
    dm = CaptioningDataModule(**data_kwargs(root, out, ddp=True))
    trainer = make_trainer(out, True, max_epochs=1, limit_train_batches=TRAIN_STEPS, check_val_every_n_epoch=2)  # validated after fit
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.save_checkpoint(out / "scst.ckpt")
    return {"global_step": trainer.global_step, "val": val, "weights": weights(module)}


def _worker(rank: int, port: int, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # What torchrun sets: Lightning's environment then takes the processes as launched externally.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    out = Path(out_dir)
    results = {"contrastive": _run_contrastive(Path(root), out, ddp=True)}
    results["xe"] = _run_xe(Path(root), out, rank)
    results["scst"] = _run_scst(Path(root), out)
    results["world_size"] = dist.get_world_size()
    torch.save(results, out / f"rank{rank}.pt")
    # Both ranks finish their collectives before either tears the group down (gloo aborts otherwise).
    dist.barrier()
    dist.destroy_process_group()
    # Results are on disk: leave without interpreter teardown, where gloo's background threads can
    # abort the process on a loaded machine.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_run(synth_root: Path, tmp_path_factory) -> dict[str, Any]:
    """The three stages under 2-process DDP: per-rank results, the data root and the output folder."""
    base = tmp_path_factory.mktemp("ddp_stages")
    root = equal_length_copy(synth_root, base / "data")
    out = base / "ddp"
    out.mkdir()
    spawn_workers(_worker, (str(root), str(out)), WORLD_SIZE, timeout_s=400)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"ranks": ranks, "root": root, "out": out, "base": base}


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def assert_same_metrics(distributed: dict[str, float], single: dict[str, float], prefix: str) -> None:
    names = sorted(k for k in single if k.startswith(prefix))
    assert names and names == sorted(k for k in distributed if k.startswith(prefix))
    for name in names:
        assert distributed[name] == pytest.approx(single[name], abs=1e-6), name


# ---------------------------------------------------------------------------------------------- tests
def assert_captioner_validates_like_one_process(ddp_run: dict[str, Any], ranks: list[dict], cls: type, stage: str) -> None:
    """The saved captioner holds the ranks' weights, and its CIDEr-D over the 2 ranks equals one process."""
    single_dir = ddp_run["base"] / f"single_{stage}"
    module = cls.load_from_checkpoint(ddp_run["out"] / f"{stage}.ckpt", map_location="cpu", weights_only=True)
    assert_same_weights(weights(module), ranks[0]["weights"])
    dm = CaptioningDataModule(**data_kwargs(ddp_run["root"], single_dir, ddp=False))
    single_val = make_trainer(single_dir, False).validate(module, datamodule=dm, verbose=False)[0]
    assert_same_metrics(ranks[0]["val"], single_val, "val/cider_d")
    assert single_val["val/cider_d"] > 0  # captions that score: not an equality of zeros
    assert ranks[0]["val"] == ranks[1]["val"]


@pytest.mark.ddp
def test_contrastive_ddp_equals_one_process_on_the_global_batch(ddp_run: dict[str, Any]):
    ranks = [r["contrastive"] for r in ddp_run["ranks"]]
    assert [r["world_size"] for r in ddp_run["ranks"]] == [WORLD_SIZE] * WORLD_SIZE
    single_dir = ddp_run["base"] / "single_contrastive"
    single = _run_contrastive(ddp_run["root"], single_dir, ddp=False)
    # every rank re-splits like the single process
    assert ranks[0]["split"] == ranks[1]["split"] == single["split"]
    assert len(single["split"][1]) == 5
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == len(single["steps"]) == TRAIN_STEPS
    for step in range(TRAIN_STEPS):
        # the ranks' k-th batches together are the single process's k-th global batch
        union = sorted(ranks[0]["steps"][step]["pairs"] + ranks[1]["steps"][step]["pairs"])
        assert union == single["steps"][step]["pairs"], step
        assert set(ranks[0]["steps"][step]["pairs"]).isdisjoint(ranks[1]["steps"][step]["pairs"])
    # same starting weights; the logged loss is the mean of the ranks' shares, eq. 6 on the global batch
    assert_same_weights(ranks[0]["initial"], single["initial"])
    shares = [rank["steps"][0]["logged"]["local_loss"] for rank in ranks]
    assert shares[0] != shares[1]
    expected = single["steps"][0]["logged"]["train/loss"]
    for rank in ranks:
        assert rank["steps"][0]["logged"]["train/loss"] == pytest.approx(sum(shares) / WORLD_SIZE, rel=1e-6)
        assert rank["steps"][0]["logged"]["train/loss"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # one averaged-gradient step later the weights (hence the loss) still agree, up to rounding
    expected = single["steps"][1]["logged"]["train/loss"]
    for rank in ranks:
        assert rank["steps"][1]["logged"]["train/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    # validation over the two ranks' shards equals one process validating the same weights
    module = NoBatchStatisticsRetrieval(**TINY_RETRIEVAL)
    module.load_state_dict(ranks[0]["weights"])
    dm = RetrievalDataModule(**data_kwargs(ddp_run["root"], single_dir, ddp=False))
    single_val = make_trainer(single_dir, False).validate(module, datamodule=dm, verbose=False)[0]
    assert_same_metrics(ranks[0]["val"], single_val, "val/")
    assert ranks[0]["val"] == ranks[1]["val"]


@pytest.mark.ddp
def test_xe_ddp_writes_the_cache_once_and_evaluates_like_one_process(ddp_run: dict[str, Any]):
    ranks = [r["xe"] for r in ddp_run["ranks"]]
    # rank 0 extracted every train and validation clip once (later setups, SCST's included, found
    # them cached); rank 1 never wrote
    builds = ranks[0]["builds"]
    assert builds[:2] == [19, 5] and len(builds) > 2 and not any(builds[2:])
    assert ranks[1]["builds"] == []
    assert ranks[0]["cache_file"] == ranks[1]["cache_file"]  # same file, not rewritten after rank 0
    assert ranks[0]["features_sha"] == ranks[1]["features_sha"]
    # the NaN of one rank made both ranks skip that step; training went on in lockstep
    for rank in ranks:
        assert rank["global_step"] == 3 and rank["skipped"] == 1
        assert rank["steps"][XE_NAN_STEP]["logged"]["train/nonfinite_skipped"] == 1.0
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    # one process on the same global batches (the same step's NaN skipped) ends with the same weights
    single_dir = ddp_run["base"] / "single_xe"
    single_dir.mkdir()
    shutil.copy(ddp_run["out"] / "contrastive.ckpt", single_dir / "contrastive.ckpt")
    single = _run_xe(ddp_run["root"], single_dir, XE_NAN_RANK, ddp=False)
    assert single["global_step"] == 3 and single["skipped"] == 1
    assert_same_weights(single["initial"], ranks[0]["initial"])
    for step in range(3):
        union = sorted(ranks[0]["steps"][step]["pairs"] + ranks[1]["steps"][step]["pairs"])
        assert union == single["steps"][step]["pairs"], step
    for step in (0, 2):  # the logged loss: the mean over the ranks, the global batch's loss
        assert ranks[0]["steps"][step]["logged"]["train/loss"] == pytest.approx(single["steps"][step]["logged"]["train/loss"], rel=1e-5), step
    moved = max((ranks[0]["weights"]["model." + k] - v).abs().max().item() for k, v in ranks[0]["initial"].items())
    assert moved > 1e-4  # XE did train
    # Up to rounding: Adam divides by the gradient's magnitude, so the attention key biases (gradient
    # zero up to rounding) move by noise; measured worst 7.6e-6 for moves of 5e-4. Other batches or
    # other gradient weights move weights by the size of a step.
    differences = {k: (ranks[0]["weights"][k] - v).abs().max().item() for k, v in single["weights"].items()}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 0.05 * moved, (worst, differences[worst], moved)
    # validation CIDEr-D over the ranks equals one process decoding all validation clips
    assert_captioner_validates_like_one_process(ddp_run, ranks, CaptioningXE, "xe")


@pytest.mark.ddp
def test_scst_ddp_trains_in_lockstep_and_evaluates_like_one_process(ddp_run: dict[str, Any]):
    ranks = [r["scst"] for r in ddp_run["ranks"]]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == TRAIN_STEPS
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    xe = ddp_run["ranks"][0]["xe"]["weights"]
    assert any(not torch.equal(v, xe[k]) for k, v in ranks[0]["weights"].items() if k.startswith("model."))  # SCST did train
    assert_captioner_validates_like_one_process(ddp_run, ranks, CaptioningSCST, "scst")
