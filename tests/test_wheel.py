"""The wheel as a user gets it: built from the sources, installed in a fresh environment outside the
repository, it runs the demo and finds every shipped recipe and config by name.

Offline: the wheel is built without build isolation (setuptools and wheel come from the dev extra) and
installed without dependencies into a new virtual environment; that environment reaches the already
installed dependencies (torch, Lightning, ...) through a `.pth` line naming this environment's
site-packages, whose own `.pth` files (the editable install of this checkout) are not read. The test
checks that `aac_lightning` is imported from the fresh environment, not from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("aac_lightning", "conf", "stages", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the fresh environment's bin folder, an empty working folder outside the repository, env)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("PYTHONPATH", None)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(source)], root, env)
    (wheel,) = dist.glob("aac_lightning-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).strip())
    (purelib / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], root, env)
    work = root / "empty"
    work.mkdir()
    return venv / "bin", work, env


@pytest.mark.slow
def test_wheel_carries_recipes_and_configs_usable_by_name(installed):
    bin_dir, work, env = installed
    where = _run([str(bin_dir / "python"), "-c", "import aac_lightning; print(aac_lightning.__file__)"], work, env)
    assert where.startswith(str(bin_dir.parent)), f"aac_lightning imported from {where}, not from the fresh environment"
    listing = _run([str(bin_dir / "aac-lightning"), "recipes", "--paths"], work, env)
    shipped = bin_dir.parent / "lib"
    for name in ("demo", "sjtu_captioning", "sjtu_retrieval", "captioning/transformer2", "retrieval/finetune_clotho", "demo/xe"):
        assert f"  {name} " in listing, name
    assert str(REPO) not in listing and str(shipped) in listing
    # a stage config by name: the check reads it and names the inputs it misses (no data here), exit 2
    done = subprocess.run([str(bin_dir / "aac-lightning"), "fit", "--config", "demo/xe", "--check"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "clotho data" in done.stdout, done.stdout + done.stderr
    # a recipe by name, with its configs found next to it inside the wheel
    done = subprocess.run([str(bin_dir / "aac-lightning"), "pipeline", "sjtu_captioning", "--workdir", "runs/x", "--check"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "input(s) missing" in done.stdout and "_shipped/stages/sjtu_captioning.yaml" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_runs_the_demo_outside_the_repository(installed):
    bin_dir, work, env = installed
    out = _run([str(bin_dir / "aac-lightning"), "demo", "--fast", "--workdir", "demo_run", "--loggers", "csv"], work, env)
    assert (work / "demo_run" / "results.json").is_file(), out
    assert "sample captions" in out
