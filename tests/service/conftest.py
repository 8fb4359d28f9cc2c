"""Fixtures of the service tests (helpers: airflow_service.py, browser.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from airflow_service import AirflowService
from browser import browser  # noqa: F401 - the fixture, for every test in this folder

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
        default = str(REPO / "var" / "test-artifacts") if os.environ.get("CI") else ""
        target = os.environ.get("RECSYS_TEST_ARTIFACTS") or default
        if target:
            dest = Path(target) / request.node.name.replace("/", "_")
            shutil.copytree(folder, dest, dirs_exist_ok=True)
            print(f"artifacts of the failed test: {dest}")
        else:
            print(f"artifacts of the failed test: {folder}")


@pytest.fixture
def api_server(tmp_path, artifacts):
    """Migrated SQLite metadata DB, the DAGs serialized once (no dag-processor needed), an API server."""
    service = AirflowService(tmp_path / "airflow")
    try:
        service.cli("db", "migrate")
        service.cli("dags", "reserialize")
        service.start_api_server()
        yield service
    finally:
        service.stop()
        for log in service.logs.glob("*.log"):
            shutil.copy(log, artifacts / log.name)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


PG = os.environ.get("RECSYS_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432")
REDIS = os.environ.get("RECSYS_TEST_REDIS", "redis://127.0.0.1:6379")


def _unavailable(what: str, detail) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not reachable: {detail}")
    pytest.skip(f"{what} not reachable: {detail}")


@pytest.fixture
def postgres_db():
    """A fresh database on the machine's PostgreSQL (trust auth); dropped afterwards. Yields its URL
    (``postgresql://...``; callers pick the driver)."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{PG}/postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        _unavailable(f"PostgreSQL at {PG}", exc)
    admin.autocommit = True
    name = f"recsys_airflow_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def redis_url() -> str:
    """A Redis database index for this test's Celery broker (the queue name is unique per test as well)."""
    import random
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(REDIS)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=3).close()
    except OSError as exc:
        _unavailable(f"Redis at {REDIS}", exc)
    return f"{REDIS.rstrip('/')}/{random.randint(1, 15)}"
