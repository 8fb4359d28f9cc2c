"""Fixtures of the service tests (helpers: airflow_service.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where a test keeps screenshots and server logs (under pytest's temporary folder); when the test fails they
    are also copied to $RECSYS_TEST_ARTIFACTS, or in CI to var/test-artifacts/ (ignored by git)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    yield folder
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        target = os.environ.get("RECSYS_TEST_ARTIFACTS") or (str(REPO / "var" / "test-artifacts") if os.environ.get("CI") else "")
        if target:
            import shutil

            dest = Path(target) / request.node.name.replace("/", "_")
            shutil.copytree(folder, dest, dirs_exist_ok=True)
            print(f"artifacts of the failed test: {dest}")
        else:
            print(f"artifacts of the failed test: {folder}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
