"""A run killed mid-epoch and resumed from its `last.ckpt` ends with the weights of an uninterrupted run.

Three `python -m aac_lightning fit` processes on the demo pre-training config with tiny sizes: an
uninterrupted two-epoch run; the same run killed with SIGKILL during epoch 1 (after its end-of-epoch-0
`last.ckpt` was written and two epoch-1 steps were taken); and a rerun resuming from that checkpoint.
Random crops, SpecAugment, dropout and the shuffle all draw random numbers, so the resumed epoch
repeats the uninterrupted one only because every epoch is reseeded from (seed, epoch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from aac_lightning.checkpoints import read_checkpoint
from tests.test_retrieval_module import TINY_AUDIO

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf" / "demo" / "contrastive_pretrain.yaml"
KILL_EPOCH, KILL_AFTER_BATCH = 1, 1


class StepMarker(pl.Callback):
    """Writes `e<epoch>-b<batch>` into `marker_dir` after each training step; can hang at one step.

    The killed run hangs after step `(block_epoch, block_batch)` until it is killed, so the kill lands
    mid-epoch however slow the machine is.
    """

    def __init__(self, marker_dir: str, block_epoch: int = -1, block_batch: int = -1):
        self.marker_dir = Path(marker_dir)
        self.block_epoch, self.block_batch = block_epoch, block_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"e{trainer.current_epoch}-b{batch_idx}").touch()
        if (trainer.current_epoch, batch_idx) == (self.block_epoch, self.block_batch):
            time.sleep(600)


def _launch(synth_root: Path, text_encoder: str, run_dir: Path, *extra: str, block: bool = False) -> subprocess.Popen:
    """Start `aac_lightning fit` on the demo config, every output under `run_dir`."""
    callbacks = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    # No monitor: every epoch is saved, and with it `last.ckpt` (Lightning 2.6 refreshes
                    # `last.ckpt` only in steps that save a top-k checkpoint).
                    "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "monitor": None},
                },
                {
                    "class_path": "tests.test_resume.StepMarker",
                    "init_args": {
                        "marker_dir": str(run_dir / "markers"),
                        "block_epoch": KILL_EPOCH if block else -1,
                        "block_batch": KILL_AFTER_BATCH if block else -1,
                    },
                },
            ]
        }
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "callbacks.yaml").write_text(yaml.safe_dump(callbacks), encoding="utf-8")
    args = [
        sys.executable, "-m", "aac_lightning", "fit",
        "--config", str(CONFIG),
        "--config", str(run_dir / "callbacks.yaml"),
        f"--model.init_args.audio_encoder_kwargs={json.dumps(TINY_AUDIO)}",
        "--model.init_args.embed_dim=8",
        "--model.init_args.text_max_length=16",
        f"--model.init_args.text_encoder={text_encoder}",
        f"--data.init_args.clotho_root={synth_root}",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.train_max_seconds=1.0",  # random crops: the clips are longer
        f"--data.init_args.split_dir={run_dir}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *extra,
    ]
    return start_cli(args, run_dir)


def start_cli(args: list[str], run_dir: Path) -> subprocess.Popen:
    """`args` (a `python -m aac_lightning ...` command) in the repository, offline, one thread;
    its output goes to `run_dir/output.log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(run_dir / "output.log", "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_log(run_dir: Path) -> str:
    """The last lines of a run's output."""
    return (run_dir / "output.log").read_text(encoding="utf-8", errors="replace")[-3000:]


def wait_ok(process: subprocess.Popen, run_dir: Path, timeout_s: float = 400.0) -> None:
    """Wait for a run; fail the test with its output if it fails or does not finish in time."""
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"run in {run_dir} did not finish in {timeout_s} s")
    assert code == 0, f"run in {run_dir} failed ({code}):\n{run_log(run_dir)}"


def kill_and_resume_runs(launch: Callable[..., subprocess.Popen], tmp_path: Path, steps_per_epoch: int) -> tuple[Path, Path, Path]:
    """The three runs: uninterrupted and to-be-killed side by side (two cores), the kill with SIGKILL
    at the step marker, then the resumed run from the end-of-epoch-0 `last.ckpt` that survived.

    `launch(run_dir, *extra_args, block=False)` starts one run. Returns the uninterrupted run's
    folder, the checkpoint resumed from, and the resumed run's folder (both runs finished)."""
    uninterrupted_dir, killed_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "killed", tmp_path / "resumed"
    uninterrupted = launch(uninterrupted_dir)
    killed = launch(killed_dir, block=True)
    marker = killed_dir / "markers" / f"e{KILL_EPOCH}-b{KILL_AFTER_BATCH}"
    deadline = time.monotonic() + 400
    while not marker.exists():
        if killed.poll() is not None:
            uninterrupted.kill()
            pytest.fail("the run to kill ended early:\n" + run_log(killed_dir))
        if time.monotonic() > deadline:
            killed.kill()
            uninterrupted.kill()
            pytest.fail("the run to kill never reached epoch 1")
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    last = killed_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0  # what survived the kill: the end of epoch 0
    resume_from = killed_dir / "epoch0-last.ckpt"
    resume_from.write_bytes(last.read_bytes())

    resumed = launch(resumed_dir, f"--ckpt_path={resume_from}")
    wait_ok(uninterrupted, uninterrupted_dir)
    wait_ok(resumed, resumed_dir)
    # the resumed run trained epoch 1 only, from its first step
    assert sorted(p.name for p in (resumed_dir / "markers").iterdir()) == [f"e1-b{b}" for b in range(steps_per_epoch)]
    return uninterrupted_dir, resume_from, resumed_dir


@pytest.mark.slow  # three CLI runs end to end
def test_killed_and_resumed_run_equals_uninterrupted_run(synth_root: Path, tiny_text_encoder: str, tmp_path: Path):
    def launch(run_dir: Path, *extra: str, block: bool = False) -> subprocess.Popen:
        return _launch(synth_root, tiny_text_encoder, run_dir, *extra, block=block)

    uninterrupted_dir, resume_from, resumed_dir = kill_and_resume_runs(launch, tmp_path, steps_per_epoch=4)

    expected = read_checkpoint(uninterrupted_dir / "checkpoints" / "last.ckpt")
    actual = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"]) == (1, 8)
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    differing = [k for k, v in expected["state_dict"].items() if not torch.equal(v, actual["state_dict"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:5]}"
    # the end-of-epoch-0 weights differ from the final ones: epoch 1 did train
    epoch0 = read_checkpoint(resume_from)["state_dict"]
    assert any(not torch.equal(v, epoch0[k]) for k, v in expected["state_dict"].items())


def test_epoch_reseed_repeats_the_draws_of_an_epoch(monkeypatch):
    from aac_lightning.data.datamodules import crop_waveform
    from aac_lightning.modules.base import AACModule, epoch_seed

    def draws() -> list[torch.Tensor]:
        crop = crop_waveform(torch.arange(1000.0), 100, None)[:1]  # a random crop's start
        mask = torch.nn.functional.dropout(torch.ones(64), p=0.5)  # a dropout mask
        return [crop, mask, torch.randperm(20)]

    module = AACModule()
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert module.reseed_epoch(3) is None  # no global seed: the generators are left alone
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert module.reseed_epoch(3) == epoch_seed(7, 3, 0)
    first = draws()
    torch.rand(5)  # whatever ran in between (validation, another epoch) does not matter
    module.reseed_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(first, draws()))
    module.reseed_epoch(4)
    assert not all(torch.equal(a, b) for a, b in zip(first, draws()))
    # epochs and ranks get unrelated seeds
    seeds = {epoch_seed(7, e, r) for e in range(50) for r in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="must be >= 0"):
        epoch_seed(7, -1)
