"""A real browser for the tests (helpers and the ``browser`` fixture, exposed by conftest.py): Debian's headless
Chromium driven by Selenium, the Airflow UI's login, and the checks every page a person opens must pass.

In CI (``CI=true``) a missing chromium / chromium-driver is installed with apt-get, and the test fails if it cannot
be; elsewhere the test is skipped with the reason."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSER_PACKAGES = ("chromium", "chromium-driver")


def find_browser() -> tuple[str, str]:
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


def start_browser(artifacts: Path):
    """A headless Chromium whose console log can be read (``driver.get_log('browser')``); quit it when done."""
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={artifacts.parent / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(driver_path, log_output=str(artifacts / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def browser(artifacts):
    driver = start_browser(artifacts)
    yield driver
    driver.quit()


def screenshot(driver, artifacts: Path, name: str, full_page: bool = False) -> Path:
    """Save a numbered screenshot (``NN-name.png``) into the artifacts folder: the window, or with ``full_page``
    the whole page however long (Chromium's DevTools protocol)."""
    path = artifacts / f"{len(list(artifacts.glob('*.png'))):02d}-{name}.png"
    if not full_page:
        driver.save_screenshot(str(path))
        return path
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def login(driver, url: str, password: str, username: str = "admin", timeout: float = 60) -> None:
    """Log in through the Airflow UI's form (simple auth manager); returns once the session cookie is set."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(f"{url}/")
    wait.until(EC.visibility_of_element_located((By.NAME, "username"))).send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"))


# every <img>, inline <svg> and <canvas> of the page: broken (loaded, no pixels) or drawn at zero size
_MEDIA = """
return Array.from(document.querySelectorAll('img, svg, canvas'))
  .filter(el => !(el.tagName.toLowerCase() === 'svg' && el.parentElement && el.parentElement.closest('svg')))
  .map(el => {
    const box = el.getBoundingClientRect();
    const tag = el.tagName.toLowerCase();
    return {tag: tag, id: el.id || '', alt: el.getAttribute('alt') || '',
            src: tag === 'img' ? (el.currentSrc || el.src || '').slice(0, 80) : '',
            broken: tag === 'img' && el.complete && el.naturalWidth === 0,
            width: box.width, height: box.height,
            shapes: tag === 'svg' ? el.querySelectorAll('path, rect, circle, line, polyline, polygon, text, use')
                                      .length : -1};
  });
"""


def page_problems(driver) -> list[str]:
    """What a person would see as broken on the page now open: an image that did not load, an image, SVG or
    canvas drawn at zero size or an SVG chart with nothing in it, and every SEVERE browser console entry (reading
    the console empties it). Empty when the page is fine."""
    problems = []
    for el in driver.execute_script(_MEDIA):
        name = f"<{el['tag']}{' id=' + el['id'] if el['id'] else ''}{' alt=' + el['alt'] if el['alt'] else ''}" \
               f"{' src=' + el['src'] if el['src'] else ''}>"
        if el["broken"]:
            problems.append(f"broken image {name}")
        elif el["width"] == 0 or el["height"] == 0:
            problems.append(f"{name} has zero size ({el['width']}x{el['height']})")
        elif el["shapes"] == 0:
            problems.append(f"empty chart {name}: no shapes")
    problems += [f"console {entry['level']}: {entry['message']}" for entry in driver.get_log("browser")
                 if entry.get("level") == "SEVERE"]
    return problems
