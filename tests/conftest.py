"""Shared fixtures. Everything a test writes lives under pytest's temporary folders, never in ./var."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="recsys-tests-"))

# Set before anything imports airflow or reads settings: Airflow reads its config at import time.
os.environ["RECSYS_HOME"] = str(_SESSION_HOME / "home")
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for var in ("RECSYS_SOURCE", "RECSYS_DATA_ROOT", "RECSYS_CACHE_DIR", "RECSYS_SETTINGS_FILE", "MLFLOW_TRACKING_URI"):
    os.environ.pop(var, None)


def movielens_dir() -> Path | None:
    """The real ml-latest-small: $MOVIELENS_DIR, else ../shared/data/ml-latest-small beside the repo."""
    candidates = [os.environ.get("MOVIELENS_DIR"), REPO.parent / "shared" / "data" / "ml-latest-small"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ratings.csv").exists():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def real_movielens() -> Path:
    path = movielens_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the real dataset is missing: set MOVIELENS_DIR to ml-latest-small")
        pytest.skip("ml-latest-small not found (set MOVIELENS_DIR)")
    return path


@pytest.fixture
def settings(tmp_path):
    from pipeline.config import load_settings

    return load_settings({"RECSYS_HOME": str(tmp_path / "home")})


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run (starting one costs several seconds)."""
    from pipeline.config import load_settings
    from pipeline.spark import get_spark

    session = get_spark(load_settings({"RECSYS_HOME": str(_SESSION_HOME / "spark-home")}))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated SQLite Airflow metadata DB in a temporary AIRFLOW_HOME (dag.test() needs one)."""
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return Path(os.environ["AIRFLOW_HOME"])


def pytest_configure(config):
    import logging

    logging.getLogger("py4j").setLevel(logging.WARNING)  # its shutdown chatter hits closed streams


def _tree_digest(folder: Path) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under ``folder`` (links resolved)."""
    import hashlib

    folder = Path(folder).resolve()
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def real_pipeline(real_movielens, tmp_path_factory, spark):
    """Two consecutive `recsys run`s on the real ml-latest-small and one MLflow store: the first with the
    defaults (it promotes), the second sabotaged (it must be kept out, the served tables untouched)."""
    from pipeline import cli
    from pipeline.config import load_settings

    root = tmp_path_factory.mktemp("real")
    previous = os.environ.get("RECSYS_HOME")
    os.environ["RECSYS_HOME"] = str(root / "home")
    try:
        first, second = root / "run1", root / "run2"
        assert cli.main(["run", "--source", str(real_movielens), "--work-dir", str(first)]) == 0
        serving = load_settings().serving_dir
        before = {"target": os.readlink(serving / "current"), "files": _tree_digest(serving / "current")}
        sabotage = ["--param", "als_ranks=[1]", "--param", "als_reg_params=[10.0]", "--param", "als_max_iters=[1]",
                    "--param", "autorec_enabled=false", "--param", "ials_ranks=[1]", "--param", "ials_max_iters=[1]",
                    "--param", "ease_lambdas=[100000000.0]", "--param", "knn_enabled=false",
                    "--param", "blend_enabled=false"]
        assert cli.main(["run", "--source", str(real_movielens), "--work-dir", str(second), *sabotage]) == 0
        after = {"target": os.readlink(serving / "current"), "files": _tree_digest(serving / "current")}
        settings = load_settings()
    finally:
        if previous is None:
            os.environ.pop("RECSYS_HOME", None)
        else:
            os.environ["RECSYS_HOME"] = previous
    import json

    return {"first": json.loads((first / "report.json").read_text()), "first_dir": first,
            "second": json.loads((second / "report.json").read_text()), "second_dir": second,
            "serving": serving, "before": before, "after": after, "settings": settings}
