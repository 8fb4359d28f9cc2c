"""The cluster-style pieces that run on this machine: the MLflow registry on PostgreSQL, and the ETL on a
Spark standalone cluster (master + worker on loopback) reached by its master URL."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

PG = os.environ.get("RECSYS_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432")


@pytest.fixture
def postgres_db():
    """A fresh database on the machine's PostgreSQL (CI starts it); dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{PG}/postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG}")
    admin.autocommit = True
    name = f"recsys_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3; the image ships psycopg2
    yield f"{PG.replace('postgresql://', 'postgresql+psycopg2://')}/{name}"
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_mlflow_registry_on_postgresql_serves_the_champion_alias(postgres_db, tmp_path):
    import mlflow

    from pipeline import tracking
    from pipeline.config import load_settings
    from pipeline.models.baseline import BiasBaseline
    from pipeline.models.factor_model import FactorModel
    from pipeline.registry import CHAMPION, load_registered

    settings = load_settings({"RECSYS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": postgres_db})
    train = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [10, 20, 10], "rating": [4.0, 3.0, 5.0]})
    base = BiasBaseline().fit(train)
    model = FactorModel("als", [1, 2], [10, 20], np.ones((2, 2)) * 0.1, np.ones((2, 2)) * 0.2, baseline=base,
                        fallback=base)
    experiment = tracking.configure(settings)
    assert mlflow.get_tracking_uri() == postgres_db and experiment
    with mlflow.start_run():
        info = tracking.log_factor_model(model)
    client = mlflow.MlflowClient()
    client.create_registered_model(settings.registered_model)
    version = mlflow.register_model(info.model_uri, settings.registered_model).version
    client.set_registered_model_alias(settings.registered_model, CHAMPION, version)
    assert client.get_model_version_by_alias(settings.registered_model, CHAMPION).version == version
    loaded = mlflow.pyfunc.load_model(f"models:/{settings.registered_model}@{CHAMPION}")
    pairs = pd.DataFrame({"user_id": [1, 2, 99], "movie_id": [20, 10, 10]})
    np.testing.assert_allclose(np.asarray(loaded.predict(pairs)), model.predict_all(pairs.user_id, pairs.movie_id))
    np.testing.assert_allclose(load_registered(settings.registered_model, version).predict([1], [10]),
                               model.predict([1], [10]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def standalone_cluster(tmp_path):
    """A Spark standalone master and one worker (1 core, 1 GB) on loopback, from the pyspark wheel."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    port, ui, worker_ui = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(tmp_path / "work"),
           "PYSPARK_PYTHON": sys.executable}
    logs = tmp_path / "logs"
    logs.mkdir()
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_for_port(port)
        worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker",
                                   f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "1",
                                   "--memory", "1g", "--webui-port", str(worker_ui)], env=env,
                                  stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(3)
        yield f"spark://127.0.0.1:{port}", env
    finally:
        for proc in (worker, master):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.mark.spark
def test_etl_runs_on_a_standalone_cluster_by_its_master_url(standalone_cluster, tmp_path):
    """The same `recsys run`, pointed at spark://…, gives the same split as local mode."""
    from movielens_fixtures import write_csv_variant

    master, env = standalone_cluster
    data = write_csv_variant(tmp_path / "ml-tiny")
    recsys = str(Path(sys.executable).with_name("recsys"))
    reports = {}
    for name, extra in (("local", {}), ("cluster", {"RECSYS_SPARK_MASTER": master,
                                                    "RECSYS_SPARK_DRIVER_MEMORY": "1g"})):
        work = tmp_path / name
        proc = subprocess.run([recsys, "run", "--source", str(data.folder), "--work-dir", str(work),
                               "--stages", "ingest,validate,etl"], capture_output=True, text=True, timeout=300,
                              env={**env, "RECSYS_HOME": str(tmp_path / f"home-{name}"), **extra})
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((work / "report.json").read_text())
    assert reports["cluster"]["split"]["test_fingerprint"] == reports["local"]["split"]["test_fingerprint"]
    assert reports["cluster"]["split"]["train"] == reports["local"]["split"]["train"]
    assert "app-" in "".join(p.name for p in (tmp_path / "work").iterdir())  # the worker really ran an app
