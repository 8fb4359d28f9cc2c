"""A real browser (Debian's headless Chromium driven by Selenium) against `airflow api-server` on a free loopback
port: log in, open movielens_recsys, open the trigger form, submit it with its defaults, and see the run appear
(in the UI, confirmed through the REST API). Screenshots and the server log are kept when it fails.

No scheduler runs: the run stays queued, which is all the form's contract needs (what a run does is tested
elsewhere). In CI (``CI=true``) a missing chromium / chromium-driver is installed with apt-get, and the test fails
if it cannot be; elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from airflow_service import DAG_ID, AirflowService, http

pytestmark = [pytest.mark.service, pytest.mark.timeout(420)]

BROWSER_PACKAGES = ("chromium", "chromium-driver")


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; installed with apt-get in CI when missing."""
    def found():
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

    chromium, driver = found()
    if chromium and driver:
        return chromium, driver
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in ([*sudo, "apt-get", "update", "-qq"],
                        [*sudo, "apt-get", "install", "-y", "-qq", *BROWSER_PACKAGES]):
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                pytest.fail(f"CI: could not install {' '.join(BROWSER_PACKAGES)} ({' '.join(command)} exited "
                            f"{result.returncode}): {result.stderr[-2000:]}")
        chromium, driver = found()
        if not (chromium and driver):
            pytest.fail(f"CI: {' '.join(BROWSER_PACKAGES)} installed but chromium/chromedriver not on PATH")
        return chromium, driver
    pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver); CI installs it")


@pytest.fixture
def browser(artifacts):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={artifacts.parent / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(driver_path, log_output=str(artifacts / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


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


def test_trigger_form_submits_with_its_defaults(api_server, browser, artifacts):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, wait = api_server.url, WebDriverWait(browser, 60)
    step = "start"

    def shot(name: str) -> None:
        browser.save_screenshot(str(artifacts / f"{len(list(artifacts.glob('*.png'))):02d}-{name}.png"))

    try:
        step = "login"
        browser.get(f"{url}/")
        wait.until(EC.visibility_of_element_located((By.NAME, "username"))).send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(api_server.password)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"))
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
