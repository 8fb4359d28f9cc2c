"""The run report page, opened as a person does from Airflow: a real browser (headless Chromium) logs in to
`airflow api-server`, opens a task of a movielens_recsys run, follows its "Run report" extra link and sees the page
whole: no broken image, no empty chart, nothing in the console at level SEVERE (which includes anything the page
tried to load despite its Content-Security-Policy). A screenshot of the page is kept in the artifacts folder.

The run is triggered through the REST API and its ``report`` task's return value set there: the path of the run's
report.json, as the DAG's task returns it, whose ``report_page`` section names the page; no scheduler runs. The
page is the pipeline's own (``pipeline.report_page``) for a small report.json-shaped dict: charts as inline PNGs.
The browser and its login: browser.py."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_service import DAG_ID, http
from browser import login, page_problems, screenshot

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]

RUN_ID = "manual__run-report-probe"
MLFLOW_RUN = "5" * 32
GATE_REASON = "challenger als beats the baseline's test RMSE by 0.0500 (margin 0.0100)"
RANKING_GATE_REASON = "challenger ease's test NDCG@10 0.3200 beats popularity's 0.1200 by more than the margin"


def _report() -> dict:
    """report.json's sections the page charts: rating models, rankers beside popularity, both gates, timings."""
    ranking = {name: {"val_ndcg_at_10": ndcg + 0.01, "test_ndcg_at_10": ndcg, "test_precision_at_10": ndcg / 2}
               for name, ndcg in (("als", 0.21), ("ease", 0.32))}
    return {
        "run_id": "run-report-probe",
        "models": {"baseline": {"val_rmse": 0.93, "test_rmse": 0.95, "test_mae": 0.74},
                   "als": {"val_rmse": 0.88, "test_rmse": 0.90, "test_mae": 0.70}},
        "ranking": {"candidates": ranking, "popularity": {"val_ndcg_at_10": 0.13, "test_ndcg_at_10": 0.12,
                                                            "test_precision_at_10": 0.06}},
        "gate": {"registered_model": "movielens-recommender", "challenger": "als", "challenger_version": "1",
                 "challenger_test_rmse": 0.90, "baseline_test_rmse": 0.95, "margin": 0.01, "decision": "promote",
                 "reason": GATE_REASON},
        "ranking_gate": {"registered_model": "movielens-ranker", "challenger": "ease", "challenger_version": "1",
                         "challenger_test_ndcg_at_10": 0.32, "popularity_test_ndcg_at_10": 0.12, "margin": 0.01,
                         "decision": "promote", "reason": RANKING_GATE_REASON},
        "timings_s": {"ingest": 2.5, "validate": 4.0, "etl": 9.0, "baseline": 3.0, "als": 12.0, "gate": 0.5},
    }


def write_report_page(run_dir: Path) -> Path:
    """``<run>/report.html`` as the report stage writes it."""
    from pipeline.report_page import write_page
    from pipeline.stages import ORDER

    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(write_page(_report(), run_dir, list(ORDER)))


def _links(server, token: str, task_id: str) -> dict:
    status, body = http("GET", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(RUN_ID, safe='')}"
                               f"/taskInstances/{task_id}/links", token=token)
    assert status == 200, body
    return {name: url for name, url in body["extra_links"].items() if url}


def test_run_report_opens_from_a_tasks_extra_link(api_server, browser, artifacts, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    page = write_report_page(tmp_path / "run")
    url, token = api_server.url, api_server.token()
    status, body = http("POST", f"{url}/api/v2/dags/{DAG_ID}/dagRuns", {"dag_run_id": RUN_ID, "logical_date": None},
                        token=token)
    assert status == 200, body
    assert "Run report" not in _links(api_server, token, "ingest")  # the report task has not returned yet
    report_json = page.with_name("report.json")
    report_json.write_text(json.dumps({**_report(), "report_page": {
        "path": str(page), "mlflow_run_id": MLFLOW_RUN,
        "artifact_uri": f"file://{tmp_path}/mlruns/1/{MLFLOW_RUN}/artifacts/report.html"}}))
    status, body = http("POST", f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(RUN_ID, safe='')}/taskInstances/report"
                                f"/xcomEntries", {"key": "return_value", "value": str(report_json)}, token=token)
    assert status in (200, 201), body
    expected = f"{url}/recsys/run-report/{DAG_ID}/{quote(RUN_ID, safe='')}/report.html"
    assert _links(api_server, token, "ingest")["Run report"] == expected
    assert http("GET", expected)[0] == 401  # the page is for logged-in users only

    wait, step = WebDriverWait(browser, 60), "login"

    def open_details(task_id: str) -> None:
        """The task instance's page, then its Details tab (where the UI lists the extra links)."""
        browser.get(f"{url}/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}/tasks/{task_id}")
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "a[title=Details]"))).click()

    try:
        login(browser, url, api_server.password)

        step = "the report task links to the page's MLflow run"
        open_details("report")
        mlflow = wait.until(EC.presence_of_element_located((By.LINK_TEXT, "MLflow run")))
        assert mlflow.get_attribute("href").endswith(f"/#/runs/{MLFLOW_RUN}")

        step = "a task's page shows the Run report link"
        open_details("ingest")
        link = wait.until(EC.element_to_be_clickable((By.LINK_TEXT, "Run report")))
        assert link.get_attribute("href") == expected
        screenshot(browser, artifacts, "task-with-run-report-link")
        browser.get_log("browser")  # the UI's own console is not the page's
        link.click()

        step = "the report page"
        wait.until(lambda d: d.current_url == expected and d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
        shot = screenshot(browser, artifacts, "run-report", full_page=True)
        assert shot.stat().st_size > 10_000
        text = browser.find_element(By.TAG_NAME, "body").text
        for reason in (GATE_REASON, RANKING_GATE_REASON):  # both gates' decisions, with their reasons
            assert reason in text, text[:2000]
        charts = browser.find_elements(By.CSS_SELECTOR, "img, svg")
        assert len(charts) >= 2, f"{len(charts)} charts on the page"
        assert page_problems(browser) == []
    except (TimeoutException, AssertionError):
        screenshot(browser, artifacts, f"failed-at-{step.replace(' ', '-')}")
        (artifacts / "page.html").write_text(browser.page_source)
        raise
