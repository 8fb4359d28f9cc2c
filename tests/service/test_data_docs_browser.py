"""The validate stage's Data Docs in a real browser (headless Chromium) with the network cut off (every host name
fails to resolve), as on an air-gapped machine: the index shows its tables, a row opens its validation page, which
names its data asset and run; no broken image, no console error. Screenshots are kept in the artifacts folder.
The browser and the generic checks: browser.py; the pages' HTML: tests/unit/test_data_docs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from browser import find_browser, page_problems, screenshot
from movielens_fixtures import write_csv_variant
from pipeline.config import load_settings
from pipeline.data.ingest import ingest_movielens
from pipeline.data.validate import validate_tables

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]

RUN_ID = "manual__2026-12-07T10:00:00+00:00"


@pytest.fixture
def offline_browser(artifacts):
    """Headless Chromium where no host name resolves: a page that needs a CDN renders as it would air-gapped."""
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--user-data-dir={artifacts.parent / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path,
                                                               log_output=str(artifacts / "chromedriver.log")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_data_docs_render_with_no_network(tmp_path, offline_browser, artifacts):
    from selenium.webdriver.common.by import By

    written = write_csv_variant(tmp_path / "source" / "ml-latest-small")
    ingest_movielens(str(written.folder), tmp_path / "ingest", load_settings({"RECSYS_HOME": str(tmp_path / "h")}))
    index = Path(validate_tables(tmp_path / "ingest", tmp_path / "validate", 0.5, run_id=RUN_ID)["validation"]
                 ["data_docs"])
    browser = offline_browser
    browser.get(index.as_uri())
    screenshot(browser, artifacts, "index", full_page=True)
    rows = browser.find_elements(By.CSS_SELECTOR, "#Validation-Results table tbody tr")
    assert len(rows) == 12 and all(row.is_displayed() and row.size["height"] > 0 for row in rows)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f"{RUN_ID} ratings" in body and "Expectation Suites" in body
    assert page_problems(browser) == []

    link = next(row for row in rows if f"{RUN_ID} ratings" in row.text).find_element(By.TAG_NAME, "a")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)  # clear of the fixed footer
    link.click()
    screenshot(browser, artifacts, "validation", full_page=True)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Data asset: ratings (" in body and f"{RUN_ID} ratings" in body and "Succeeded" in body
    assert page_problems(browser) == []
