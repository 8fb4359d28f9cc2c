"""A real browser (Debian's headless Chromium driven by Selenium) against `airflow api-server` on a free loopback
port: log in, open movielens_recsys, open the trigger form, submit it with its defaults, and see the run appear
(in the UI, confirmed through the REST API). Screenshots and the server log are kept when it fails.

No scheduler runs: the run stays queued, which is all the form's contract needs (what a run does is tested
elsewhere). The browser, its login and how a missing Chromium is handled: browser.py."""

from __future__ import annotations

import time

import pytest

from airflow_service import DAG_ID, http
from browser import login, screenshot

pytestmark = [pytest.mark.service, pytest.mark.timeout(420)]

def test_trigger_form_submits_with_its_defaults(api_server, browser, artifacts):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, wait = api_server.url, WebDriverWait(browser, 60)
    step = "start"

    def shot(name: str) -> None:
        screenshot(browser, artifacts, name)

    try:
        step = "login"
        login(browser, url, api_server.password)
        shot("logged-in")

        step = "open the DAG"
        browser.get(f"{url}/dags/{DAG_ID}")
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))).click()

        step = "trigger form"
        submit = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]")))
        time.sleep(1)  # the form validates its Params once rendered
        shot("trigger-form")
        assert "required" not in browser.find_element(By.CSS_SELECTOR, "[role=dialog]").text.lower()
        assert submit.is_enabled(), "the Trigger button is disabled with the default Params"
        submit.click()

        step = "the run appears"
        wait.until(lambda d: f"/dags/{DAG_ID}/runs/" in d.current_url)
        run_id = browser.current_url.rsplit("/runs/", 1)[1].split("?")[0]
        from urllib.parse import unquote

        run_id = unquote(run_id)
        shot("run-page")
        browser.get(f"{url}/dags/{DAG_ID}/runs")
        wait.until(lambda d: run_id in d.find_element(By.TAG_NAME, "body").text)
        shot("runs-list")
    except (TimeoutException, AssertionError):
        shot(f"failed-at-{step.replace(' ', '-')}")
        (artifacts / "page.html").write_text(browser.page_source)
        raise

    step = "REST API"
    token = api_server.token()
    status, runs = http("GET", f"{url}/api/v2/dags/{DAG_ID}/dagRuns", token=token)
    assert status == 200, runs
    assert [r["dag_run_id"] for r in runs["dag_runs"]] == [run_id]
    run = runs["dag_runs"][0]
    assert run["run_type"] == "manual" and run["triggered_by"] == "ui" and run["triggering_user_name"] == "admin"
    status, details = http("GET", f"{url}/api/v2/dags/{DAG_ID}/details", token=token)
    assert status == 200, details
    defaults = {name: spec["value"] for name, spec in details["params"].items()}
    assert run["conf"] == defaults  # exactly the defaults: the form needed no edit
    assert details["is_paused"] is False  # "Unpause on trigger" is ticked by default
