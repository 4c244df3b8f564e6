"""XE and SCST runs killed mid-epoch (SIGKILL) and resumed from `last.ckpt` end where an uninterrupted run ends.

For each captioning stage, three `python -m aac_lightning fit` processes on the shipped demo config
(`conf/demo/xe.yaml`, `conf/demo/scst.yaml`) with its shipped callbacks (`EpochWeightAveraging`,
`LatestCheckpoint`, the monitored `ModelCheckpoint`) and tiny sizes: an uninterrupted two-epoch run;
the same run killed with SIGKILL during epoch 1 (after its end-of-epoch-0 `last.ckpt` was written and
two epoch-1 steps were taken); and a rerun resuming from that `last.ckpt` with `--ckpt_path`.

The truth is the uninterrupted run: the resumed one must end with the same weights, Adam state,
learning-rate schedule, learning rate, global step and running weight average, bit for bit. What
draws random numbers in these stages: dropout, scheduled sampling (XE, teacher forcing 1 -> 0.7 over
the run) and the sampled captions (SCST); the resumed epoch repeats them only because every epoch is
reseeded from (seed, epoch), and the schedule continues only because the scheduler state is restored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from aac_lightning.checkpoints import read_checkpoint
from tests.test_resume import KILL_AFTER_BATCH, KILL_EPOCH, kill_and_resume_runs, start_cli
from tests.test_xe_module import TINY_CAPTIONER, fit_xe, retrieval_ckpt  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def xe_ckpt(retrieval_ckpt: Path, synth_root: Path, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("xe_for_scst_resume")
    _, trainer = fit_xe(retrieval_ckpt, synth_root, max_epochs=1, feature_cache_dir=str(out / "cache"), lr=1e-3, final_lr=1e-5)
    path = out / "xe.ckpt"
    trainer.save_checkpoint(path)
    return path


def _callbacks_config(config: Path, run_dir: Path, block: bool) -> dict[str, Any]:
    """The config's own (shipped) callbacks, writing under `run_dir`, plus the step marker."""
    shipped = yaml.safe_load(config.read_text(encoding="utf-8"))["trainer"]["callbacks"]
    callbacks = []
    for spec in shipped:
        spec = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
        if spec["class_path"].endswith("EpochWeightAveraging"):
            spec["init_args"]["last_epochs"] = 2  # both epochs of the run: the resumed average must hold both
        if spec["class_path"].endswith(".ModelCheckpoint"):
            spec["init_args"]["dirpath"] = str(run_dir / "checkpoints")
        callbacks.append(spec)
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == ["EpochWeightAveraging", "LatestCheckpoint", "ModelCheckpoint"]
    callbacks.append(
        {
            "class_path": "tests.test_resume.StepMarker",
            "init_args": {
                "marker_dir": str(run_dir / "markers"),
                "block_epoch": KILL_EPOCH if block else -1,
                "block_batch": KILL_AFTER_BATCH if block else -1,
            },
        }
    )
    return {"trainer": {"callbacks": callbacks}}


def _launch(config: Path, model_args: list[str], synth_root: Path, run_dir: Path, *extra: str, block: bool = False) -> subprocess.Popen:
    """Start `aac_lightning fit` on a demo captioning config, every output under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "callbacks.yaml").write_text(yaml.safe_dump(_callbacks_config(config, run_dir, block)), encoding="utf-8")
    args = [
        sys.executable, "-m", "aac_lightning", "fit",
        "--config", str(config),
        "--config", str(run_dir / "callbacks.yaml"),
        *model_args,
        f"--model.init_args.feature_cache_dir={run_dir / 'cache'}",  # one per run: the first two run side by side
        f"--data.init_args.clotho_root={synth_root}",
        "--data.init_args.global_batch_size=8",
        "--data.init_args.eval_batch_size=8",
        f"--data.init_args.split_dir={run_dir}",
        "--trainer.max_epochs=2",
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *extra,
    ]
    return start_cli(args, run_dir)


def _differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Paths at which two nested checkpoint structures (dicts, lists, tensors, numbers) differ."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        same = isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype and torch.equal(expected, actual)
        return [] if same else [where]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return [f"{where} keys {sorted(map(str, expected.keys() ^ actual.keys()))}"]
        return [d for key in expected for d in _differences(expected[key], actual[key], f"{where}/{key}")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where} length {len(expected)} != {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [f"{where}: {expected!r} != {actual!r}"]


def kill_and_resume(config: Path, model_args: list[str], synth_root: Path, tmp_path: Path) -> tuple[dict, dict, dict]:
    """Run the three processes; returns the final `last.ckpt` of the uninterrupted and the resumed runs, and the resumed-from one."""
    def launch(run_dir: Path, *extra: str, block: bool = False) -> subprocess.Popen:
        return _launch(config, model_args, synth_root, run_dir, *extra, block=block)

    uninterrupted_dir, resume_from, resumed_dir = kill_and_resume_runs(launch, tmp_path, STEPS_PER_EPOCH)
    assert not (resume_from.parent / "checkpoints" / "averaged.ckpt").exists()  # the killed run never finished
    expected = read_checkpoint(uninterrupted_dir / "checkpoints" / "last.ckpt")
    actual = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"]) == (1, 2 * STEPS_PER_EPOCH)
    # the averaged weights (EpochWeightAveraging over both epochs) match too
    averaged = [read_checkpoint(d / "checkpoints" / "averaged.ckpt")["state_dict"] for d in (uninterrupted_dir, resumed_dir)]
    assert not _differences(averaged[0], averaged[1])
    return expected, actual, read_checkpoint(resume_from)


def assert_same_training_state(expected: dict, actual: dict, epoch0: dict) -> None:
    """Weights, optimizer, schedulers, running average and the non-finite counter, bit for bit."""
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    differing = [k for k, v in expected["state_dict"].items() if not torch.equal(v, actual["state_dict"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:5]}"
    assert not _differences(expected["optimizer_states"], actual["optimizer_states"], "optimizer_states")
    assert not _differences(expected["lr_schedulers"], actual["lr_schedulers"], "lr_schedulers")
    assert not _differences(expected["weight_averaging"], actual["weight_averaging"], "weight_averaging")
    learning_rates = [[group["lr"] for group in state["param_groups"]] for state in (expected["optimizer_states"][0], actual["optimizer_states"][0])]
    assert learning_rates[0] == learning_rates[1]
    # epoch 1 did train: the final weights and Adam's step count differ from those at the end of epoch 0
    assert any(not torch.equal(v, epoch0["state_dict"][k]) for k, v in expected["state_dict"].items())
    steps = {int(s["step"]) for s in expected["optimizer_states"][0]["state"].values()}
    assert steps == {2 * STEPS_PER_EPOCH}, steps


@pytest.mark.slow  # three CLI runs end to end
def test_killed_and_resumed_xe_run_equals_uninterrupted_run(retrieval_ckpt: Path, synth_root: Path, tmp_path: Path):  # noqa: F811
    model_args = [
        f"--model.init_args.extractor_ckpt={retrieval_ckpt}",
        f"--model.init_args.input_dim={TINY_CAPTIONER['input_dim']}",
        f"--model.init_args.decoder_kwargs={json.dumps({**TINY_CAPTIONER['decoder_kwargs'], 'dropout': 0.1})}",
        f"--model.init_args.encoder_kwargs={json.dumps({**TINY_CAPTIONER['encoder_kwargs'], 'encoder_dropout': 0.1})}",
        "--model.init_args.warmup_steps=2",  # warm-up, then exponential decay, both inside the run
        "--model.init_args.final_lr=1e-5",
        "--model.init_args.max_decode_length=8",
    ]
    expected, actual, epoch0 = kill_and_resume(REPO / "conf" / "demo" / "xe.yaml", model_args, synth_root, tmp_path)
    assert_same_training_state(expected, actual, epoch0)
    # the schedule moved during epoch 1 (so restoring it is what the equality above shows)
    assert expected["lr_schedulers"] and expected["lr_schedulers"][0]["last_epoch"] == 2 * STEPS_PER_EPOCH
    assert epoch0["lr_schedulers"][0]["_last_lr"] != expected["lr_schedulers"][0]["_last_lr"]
    # scheduled sampling was on: teacher forcing went below 1 during epoch 1 (the demo's 1 -> 0.7)
    metrics = (tmp_path / "uninterrupted" / "logs").rglob("metrics.csv")
    ratios = [float(v) for path in metrics for v in _csv_column(path, "train/teacher_forcing")]
    assert ratios and min(ratios) < 0.9
    # the resumed run extracted its features once, with the restored extractor: one cache file, the
    # uninterrupted run's (none for the weights the module was built with before the restore)
    # (the resumed run reads `feature_cache_dir` from the checkpoint's hyper-parameters: the killed run's)
    uninterrupted = sorted(p.name for p in (tmp_path / "uninterrupted" / "cache").glob("*.h5"))
    resumed = sorted({p.name for run in ("killed", "resumed") for p in (tmp_path / run / "cache").glob("*.h5")})
    assert len(uninterrupted) == 1 and resumed == uninterrupted


@pytest.mark.slow  # three CLI runs end to end
def test_killed_and_resumed_scst_run_equals_uninterrupted_run(xe_ckpt: Path, synth_root: Path, tmp_path: Path):
    model_args = [
        f"--model.init_args.init_from={xe_ckpt}",
        "--model.init_args.num_samples=2",  # sampled captions: random draws in every step
        "--model.init_args.max_decode_length=8",
    ]
    expected, actual, epoch0 = kill_and_resume(REPO / "conf" / "demo" / "scst.yaml", model_args, synth_root, tmp_path)
    assert_same_training_state(expected, actual, epoch0)


def _csv_column(path: Path, name: str) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8") as handle:
        return [row[name] for row in csv.DictReader(handle) if row.get(name)]
