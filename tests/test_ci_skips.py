"""In CI (`CI=true`) a test whose dependency is missing fails instead of skipping (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = '''
import pytest

def test_missing_module():
    pytest.importorskip("aac_lightning_no_such_module")

def test_missing_java():
    pytest.skip("no usable Java: java not found")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_no_gpu():
    pass

def test_passes():
    pass
'''


def run_cases(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n", encoding="utf-8")
    (tmp_path / "test_cases.py").write_text(CASES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_cases.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    return out.stdout


def test_missing_dependency_fails_in_ci_and_skips_elsewhere(tmp_path: Path):
    local = run_cases(tmp_path, None)
    assert "3 skipped" in local and "failed" not in local, local
    ci = run_cases(tmp_path, "true")
    assert "2 failed, 1 passed, 1 skipped" in ci, ci
    assert "FAILED test_cases.py::test_missing_module" in ci and "FAILED test_cases.py::test_missing_java" in ci
    assert "a dependency of this test is missing" in ci
