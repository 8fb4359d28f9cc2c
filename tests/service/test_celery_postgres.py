"""Airflow as a team runs it: metadata on PostgreSQL, the CeleryExecutor with Redis as broker, every component
a separate process on loopback (api-server, scheduler, dag-processor, triggerer, a Celery worker). The test
triggers movielens_recsys over the REST API v2 with a JWT and the Params exactly as the trigger form sends them
(every default, plus a small ALS grid, two AutoRec epochs and a sample of the real data as the source), polls
the run to success and reads its report.json; unauthenticated requests are refused. Every server is stopped by
the test, also when it fails."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_service import DAG_ID, AirflowService, free_port, http, movielens_sample

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

RUN_TIMEOUT_S = 420
OVERRIDES = {"als_ranks": [5], "als_reg_params": [0.1], "als_max_iters": [5], "autorec_epochs": 2}


@pytest.fixture
def celery_airflow(tmp_path, artifacts, postgres_db, redis_url, real_movielens):
    queue = f"recsys-{uuid.uuid4().hex[:8]}"
    service = AirflowService(tmp_path / "airflow", {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_db.replace("postgresql://", "postgresql+psycopg2://"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": postgres_db.replace("postgresql://", "db+postgresql://"),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,  # this test's tasks go to this test's worker only
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # only the run this test triggers: unpausing must not also start the latest weekly run
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "RECSYS_SPARK_SHUFFLE_PARTITIONS": "2",
    })
    service.queue = queue
    try:
        service.cli("db", "migrate")
        service.start_api_server()
        service.start("scheduler", "scheduler")
        service.start("dag-processor", "dag-processor")
        service.start("triggerer", "triggerer")
        service.start("celery-worker", "celery", "worker", "--queues", queue, "--concurrency", "2",
                      "--skip-serve-logs")
        yield service
    finally:
        service.stop()
        for log in service.logs.glob("*.log"):
            (artifacts / log.name).write_bytes(log.read_bytes())


def _wait_for_dag(service: AirflowService, token: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_running()
        status, details = http("GET", f"{service.url}/api/v2/dags/{DAG_ID}/details", token=token)
        if status == 200:
            return details
        time.sleep(2)
    _, errors = http("GET", f"{service.url}/api/v2/importErrors", token=token)
    raise AssertionError(f"{DAG_ID} was not parsed within {timeout} s; import errors: {errors}\n"
                         f"{service.tail('dag-processor')}")


def _failure_details(service: AirflowService, token: str, run_id: str) -> str:
    base = f"{service.url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    _, tis = http("GET", f"{base}/taskInstances", token=token)
    lines = []
    for ti in tis.get("task_instances", []) if isinstance(tis, dict) else []:
        lines.append(f"{ti['task_id']}: {ti['state']}")
        if ti["state"] in ("failed", "upstream_failed") and ti.get("try_number"):
            _, log = http("GET", f"{base}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}?full_content=true",
                          token=token)
            lines.append(json.dumps(log)[-3000:])
    return "\n".join(lines) + "\n" + service.tail(chars=2000)


def test_rest_triggered_run_on_postgres_and_celery(celery_airflow, real_movielens, tmp_path):
    service = celery_airflow
    url = service.url
    sample = movielens_sample(real_movielens, tmp_path / "ml-sample", max_user=200)

    # unauthenticated: refused
    assert http("GET", f"{url}/api/v2/dags")[0] == 401
    assert http("POST", f"{url}/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None})[0] == 401
    assert http("POST", f"{url}/auth/token", {"username": "admin", "password": "wrong"})[0] == 401

    token = service.token()
    details = _wait_for_dag(service, token)
    # the trigger form's payload: every Param's default, then the overrides typed into it
    conf = {name: spec["value"] for name, spec in details["params"].items()}
    assert set(OVERRIDES) <= set(conf) and "source" in conf
    conf.update(OVERRIDES, source=str(sample))

    status, body = http("PATCH", f"{url}/api/v2/dags/{DAG_ID}", {"is_paused": False}, token=token)
    assert status == 200, body
    status, run = http("POST", f"{url}/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf},
                       token=token)
    assert status == 200, run
    run_id = run["dag_run_id"]
    assert run["conf"] == conf

    deadline, state = time.monotonic() + RUN_TIMEOUT_S, run["state"]
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(5)
        service.check_running()
        _, current = http("GET", f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}", token=token)
        state = current["state"]
    assert state == "success", f"run {run_id} ended {state}:\n{_failure_details(service, token, run_id)}"

    # every task went through this test's Celery queue (its worker is the only consumer)
    base = f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    _, tis = http("GET", f"{base}/taskInstances", token=token)
    ran = [ti for ti in tis["task_instances"] if ti["state"] == "success"]
    assert ran and {ti["queue"] for ti in ran} == {service.queue}, ran
    _, runs = http("GET", f"{url}/api/v2/dags/{DAG_ID}/dagRuns", token=token)
    assert runs["total_entries"] == 1  # unpausing started no scheduled run (use_job_schedule off)

    # the Spark-only tasks log the JVM's warnings at INFO (stdout), not as ERROR lines (stderr)
    for task_id in ("etl", "olap"):
        status, log = http("GET", f"{base}/taskInstances/{task_id}/logs/1?full_content=true", token=token)
        assert status == 200, log
        entries = log["content"] if isinstance(log, dict) else []
        errors = [e for e in entries
                  if isinstance(e, dict) and str(e.get("level", "")).lower() in ("error", "critical")]
        assert entries and not errors, (task_id, errors[:5])

    # report.json (the report task returns its path) honours the overrides
    status, xcom = http("GET", f"{base}/taskInstances/report/xcomEntries/return_value?deserialize=true",
                        token=token)
    assert status == 200, xcom
    report = json.loads(Path(xcom["value"]).read_text())
    assert report["run_id"] == run_id
    assert report["dataset"]["variant"] == "ml-sample" and report["dataset"]["users"] == 200
    als = report["models"]["als"]
    assert [(p["rank"], p["reg_param"]) for p in als["grid"]] == [(5, 0.1)]
    assert report["models"]["autorec"]["epochs_run"] <= 2

    # the plugin's extra links, as the API server computes them from the tasks' XCom
    status, links = http("GET", f"{base}/taskInstances/als/links", token=token)
    assert status == 200, links
    assert links["extra_links"]["MLflow run"].endswith(f"/#/runs/{als['mlflow_run_id']}")
    status, links = http("GET", f"{base}/taskInstances/validate/links", token=token)
    docs = links["extra_links"]["Data Docs"]
    assert docs.startswith(f"{url}/recsys/data-docs/"), docs
    assert http("GET", docs)[0] == 401  # the Data Docs need a login too
    status, page = http("GET", docs, token=token)
    assert status == 200 and "<html" in str(page).lower()
