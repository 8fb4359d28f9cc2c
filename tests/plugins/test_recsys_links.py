"""The plugin's extra links resolve to URLs built from a task instance's XCom, as the API server computes them;
its routes serve only the run's Data Docs and report page, and only to an authenticated user."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))

import recsys_links  # noqa: E402

RUN_IDS = {"baseline": "b" * 32, "als": "a" * 32, "autorec": "c" * 32, "knn": "e" * 32, "blend": "f" * 32,
           "implicit_als": "1" * 32, "ease": "2" * 32, "gate": "d" * 32, "ranking_gate": "3" * 32,
           "report": "4" * 32}


def _summaries(data_docs: Path, report_html: Path) -> dict:
    """Return values shaped like the stages' (see README's report.json)."""
    return {
        "validate": {"validation": {"success": True, "data_docs": str(data_docs)}, "timings_s": {"validate": 1.0}},
        "olap": {"olap": {"summary": "/x/summary.md"}, "timings_s": {"olap": 1.0}},
        **{name: {"models": {name: {"test_rmse": 0.9, "mlflow_run_id": RUN_IDS[name]}}, "timings_s": {name: 1.0}}
           for name in ("baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease")},
        "gate": {"gate": {"registered_model": "movielens-recommender", "challenger": "autorec",
                          "challenger_version": "3", "challenger_run_id": RUN_IDS["gate"], "decision": "promote"}},
        "ranking_gate": {"ranking_gate": {"registered_model": "movielens-ranker", "challenger": "ease",
                                          "challenger_version": "2", "challenger_run_id": RUN_IDS["ranking_gate"],
                                          "decision": "promote"}},
        "report": str(report_html.with_name("report.json")),  # as the DAG's report task returns
    }


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "validate" / "data_docs"
    (folder / "validations").mkdir(parents=True)
    (folder / "index.html").write_text("<html>GX index</html>")
    (folder / "validations" / "ratings.html").write_text("<html>ratings suite</html>")
    (folder.parent / "result.json").write_text("{}")  # beside the docs, never served
    return folder / "index.html"


def _report_page(report_html: Path) -> dict:
    """The report stage's summary (a section of report.json)."""
    return {"report_page": {"path": str(report_html), "mlflow_run_id": RUN_IDS["report"],
                            "artifact_uri": f"file:///x/mlruns/1/{RUN_IDS['report']}/artifacts/report.html"}}


@pytest.fixture(scope="module")
def report_html(data_docs) -> Path:
    import json

    run = data_docs.parents[2]
    (run / "report.html").write_text("<html>the run on one page</html>")
    (run / "report.json").write_text(json.dumps({"run_id": "r", **_report_page(run / "report.html")}))  # not served
    return run / "report.html"


BUNDLES = "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"
PROBE_DAG = """
from datetime import datetime

from airflow.sdk import dag, task

SUMMARIES = {summaries!r}


@dag(dag_id="recsys_links_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def probe():
    for task_id, value in SUMMARIES.items():
        task(task_id=task_id)(lambda value=value: value)()


probe()
"""


@pytest.fixture(scope="module")
def probe_run(airflow_db, data_docs, report_html, tmp_path_factory):
    """A real run in the metadata DB whose tasks return stage-shaped summaries (dag.test() of a DAG file in its
    own bundle: dag.test() syncs the DAG from a bundle)."""
    import json
    import os

    from airflow.dag_processing.dagbag import DagBag

    folder = tmp_path_factory.mktemp("probe_dags")
    (folder / "recsys_links_probe.py").write_text(PROBE_DAG.format(summaries=_summaries(data_docs, report_html)))
    bundles = json.dumps([{"name": "recsys-links-probe",
                           "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                           "kwargs": {"path": str(folder), "refresh_interval": 0}}])
    previous = os.environ.get(BUNDLES)
    os.environ[BUNDLES] = bundles
    try:
        bag = DagBag(dag_folder=str(folder))
        assert bag.import_errors == {}
        run = bag.dags["recsys_links_probe"].test()
    finally:
        if previous is None:
            os.environ.pop(BUNDLES, None)
        else:
            os.environ[BUNDLES] = previous
    assert run.state == "success"
    return run


def _serialized_task(dag_id: str, task_id: str):
    from airflow.models.serialized_dag import SerializedDagModel

    return SerializedDagModel.get_dag(dag_id).get_task(task_id)


def test_plugin_is_loaded_from_the_plugins_folder():
    from airflow import plugins_manager

    names = {link.name for link in plugins_manager.get_global_operator_extra_links()}
    assert {"Run report", "MLflow run", "MLflow model version", "Data Docs"} <= names
    apps = plugins_manager.get_fastapi_plugins()[0]
    assert any(app["url_prefix"] == recsys_links.DOCS_PREFIX for app in apps)


@pytest.mark.parametrize("task_id", sorted(RUN_IDS))
def test_model_tasks_link_to_their_mlflow_run(probe_run, monkeypatch, task_id):
    monkeypatch.setenv("RECSYS_MLFLOW_UI_URL", "http://mlflow.example:5001/")
    ti = probe_run.get_task_instance(task_id)
    task = _serialized_task("recsys_links_probe", task_id)  # what the API server holds
    assert "MLflow run" in task.extra_links
    assert task.get_extra_links(ti, "MLflow run") == f"http://mlflow.example:5001/#/runs/{RUN_IDS[task_id]}"


def test_gates_link_to_the_registered_challenger_version(probe_run, monkeypatch):
    monkeypatch.delenv("RECSYS_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.internal")  # a tracking server serves the UI
    ti = probe_run.get_task_instance("gate")
    url = _serialized_task("recsys_links_probe", "gate").get_extra_links(ti, "MLflow model version")
    assert url == "https://mlflow.internal/#/models/movielens-recommender/versions/3"
    ti = probe_run.get_task_instance("ranking_gate")
    url = _serialized_task("recsys_links_probe", "ranking_gate").get_extra_links(ti, "MLflow model version")
    assert url == "https://mlflow.internal/#/models/movielens-ranker/versions/2"


def test_validate_links_to_its_data_docs_and_others_get_no_link(probe_run, monkeypatch):
    from urllib.parse import quote

    monkeypatch.delenv("RECSYS_MLFLOW_UI_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:18080/")
    run_id = probe_run.run_id
    validate = probe_run.get_task_instance("validate")
    assert _serialized_task("recsys_links_probe", "validate").get_extra_links(validate, "Data Docs") == (
        f"http://127.0.0.1:18080/recsys/data-docs/recsys_links_probe/{quote(run_id, safe='')}/index.html")
    for task_id, link in [("validate", "MLflow run"), ("olap", "MLflow run"), ("olap", "Data Docs"),
                          ("als", "Data Docs"), ("als", "MLflow model version")]:
        assert not _serialized_task("recsys_links_probe", task_id).get_extra_links(
            probe_run.get_task_instance(task_id), link), (task_id, link)


def test_links_default_to_a_local_mlflow_ui():
    assert recsys_links.mlflow_ui_url({}) == "http://127.0.0.1:5000"
    assert recsys_links.mlflow_ui_url({"MLFLOW_TRACKING_URI": "sqlite:///x/mlflow.db"}) == "http://127.0.0.1:5000"
    assert recsys_links.mlflow_ui_url({"RECSYS_MLFLOW_UI_URL": "http://h:1/mlflow/",
                                       "MLFLOW_TRACKING_URI": "http://other"}) == "http://h:1/mlflow"


def test_a_task_that_has_not_run_has_no_link():
    from airflow.models.taskinstancekey import TaskInstanceKey

    key = TaskInstanceKey("recsys_links_probe", "als", "no-such-run")
    assert recsys_links.MlflowRunLink().get_link(None, ti_key=key) == ""


@contextlib.contextmanager
def signed_in(route: str, run_id: str, page: str):
    """(client, base URL) of ``route`` for the probe run on the docs app: ``page`` answers 401 without a login
    first, then every request passes the authorization check (restored afterwards)."""
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    client = TestClient(recsys_links.docs_app)
    base = f"/{route}/recsys_links_probe/{quote(run_id, safe='')}"
    assert client.get(f"{base}/{page}").status_code == 401  # no token, no cookie
    recsys_links.docs_app.dependency_overrides[recsys_links._authorized] = lambda: None
    try:
        yield client, base
    finally:
        recsys_links.docs_app.dependency_overrides.clear()


def test_data_docs_route_serves_only_the_runs_docs(probe_run, data_docs):
    with signed_in("data-docs", probe_run.run_id, "index.html") as (client, base):
        page = client.get(f"{base}/index.html")
        assert page.status_code == 200 and "GX index" in page.text
        assert "ratings suite" in client.get(f"{base}/validations/ratings.html").text
        assert client.get(f"{base}/..%2Fresult.json").status_code == 404  # outside the docs folder
        assert client.get(f"{base}/../result.json").status_code == 404
        assert client.get("/data-docs/recsys_links_probe/other-run/index.html").status_code == 404


@pytest.fixture
def report_value(probe_run):
    """Set the report task's XCom return value for a test (restored afterwards)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    def set_value(value) -> None:
        with create_session() as session:
            XComModel.set("return_value", value, dag_id="recsys_links_probe", task_id="report",
                          run_id=probe_run.run_id, session=session)

    original = recsys_links.task_return_value("recsys_links_probe", "report", probe_run.run_id)
    yield set_value
    set_value(original)


@pytest.mark.parametrize("task_id", ["validate", "olap", "als", "gate", "report"])
def test_every_task_links_to_the_run_report_once_the_report_task_wrote_it(probe_run, report_html, report_value,
                                                                          monkeypatch, task_id):
    from urllib.parse import quote

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:18080/")
    ti, task = probe_run.get_task_instance(task_id), _serialized_task("recsys_links_probe", task_id)
    assert "Run report" in task.extra_links
    expected = (f"http://127.0.0.1:18080/recsys/run-report/recsys_links_probe/{quote(probe_run.run_id, safe='')}"
                "/report.html")
    assert task.get_extra_links(ti, "Run report") == expected  # from the report.json the report task returned
    report_value(_report_page(report_html))  # the stage summary itself
    assert task.get_extra_links(ti, "Run report") == expected
    for before in (None, "/x/report.json", {"report_page": {}}):  # not run yet, no report.json there, no page
        report_value(before)
        assert task.get_extra_links(ti, "Run report") == "", before


def test_report_task_links_to_the_pages_mlflow_run(probe_run, monkeypatch):
    monkeypatch.setenv("RECSYS_MLFLOW_UI_URL", "http://mlflow.example:5001")
    ti, task = probe_run.get_task_instance("report"), _serialized_task("recsys_links_probe", "report")
    assert task.get_extra_links(ti, "MLflow run") == f"http://mlflow.example:5001/#/runs/{RUN_IDS['report']}"
    assert recsys_links.mlflow_run_id("report", {"report_page": None}) is None


def test_run_report_route_serves_only_the_runs_page(probe_run, report_html, report_value):
    with signed_in("run-report", probe_run.run_id, "report.html") as (client, base):
        page = client.get(f"{base}/report.html")
        assert page.status_code == 200 and "the run on one page" in page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]  # the page loads nothing else
        for other in ("report.json", "..%2Freport.json", "index.html"):
            assert client.get(f"{base}/{other}").status_code == 404, other
        assert client.get(f"{base}/../report.json").status_code == 404
        assert client.get("/run-report/recsys_links_probe/other-run/report.html").status_code == 404
        report_value(_report_page(report_html))  # the stage summary itself
        assert "the run on one page" in client.get(f"{base}/report.html").text
        report_value("/x/report.json")  # a report task that returned no page
        assert client.get(f"{base}/report.html").status_code == 404
