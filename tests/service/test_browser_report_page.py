"""The run report page in a real browser (headless Chromium): the first real run's ``report.html`` opened from its
run folder as a file, as a person does after ``recsys run``. A screenshot of the whole page is kept in the
artifacts folder; the test fails on a broken image, a SEVERE console entry, or an empty chart (drawn at zero size,
or an image of a single colour). A first test shows the checks catch each of those on a page made to fail them.
The browser and the generic checks: browser.py."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

from browser import page_problems, screenshot

pytestmark = [pytest.mark.service, pytest.mark.timeout(900)]

# every chart image of the page, read back through a canvas: its size and how many colours its pixels have
_CHARTS = """
return Array.from(document.querySelectorAll('figure.chart img')).map(img => {
  const box = img.getBoundingClientRect();
  const found = {alt: img.getAttribute('alt') || '', width: box.width, height: box.height,
                 natural: img.naturalWidth * img.naturalHeight, colours: 0, error: ''};
  try {
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    for (let i = 0; i < pixels.length && colours.size < 3; i += 4 * 7) {
      colours.add((pixels[i] << 24) | (pixels[i + 1] << 16) | (pixels[i + 2] << 8) | pixels[i + 3]);
    }
    found.colours = colours.size;
  } catch (e) { found.error = String(e); }
  return found;
});
"""


def chart_problems(driver) -> list[str]:
    """Every chart (``figure.chart img``) with no size on screen, no pixels, or pixels of one colour only."""
    problems = []
    for chart in driver.execute_script(_CHARTS):
        name = f"chart {chart['alt']!r}"
        if chart["error"]:
            problems.append(f"{name}: its pixels cannot be read: {chart['error']}")
        elif not (chart["width"] and chart["height"] and chart["natural"]):
            problems.append(f"{name} is empty: {chart['width']}x{chart['height']} on screen, {chart['natural']} px")
        elif chart["colours"] < 2:
            problems.append(f"{name} is empty: a single colour")
    return problems


def open_page(driver, path: Path, artifacts: Path, name: str) -> Path:
    """Open ``path`` as a file URL, wait for its images, and screenshot the whole page."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height, 1000), 16000))  # the whole page in one screenshot
    return screenshot(driver, artifacts, name)


def _png(colours: list[bytes], width: int = 30, height: int = 10) -> str:
    """A PNG as a data: URI, its rows striped with ``colours`` (one colour: a blank chart)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + colours[y % len(colours)] * width for y in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_the_checks_catch_a_broken_image_an_empty_chart_and_a_console_error(browser, artifacts, tmp_path):
    red, blue, white, black = b"\xff\x00\x00", b"\x00\x00\xff", b"\xff\xff\xff", b"\x00\x00\x00"
    page = tmp_path / "bad.html"
    page.write_text(f"""<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head><body>
<figure class="chart"><img alt="fine" src="{_png([red, blue])}"></figure>
<figure class="chart"><img alt="blank" src="{_png([white])}"></figure>
<figure class="chart"><img alt="hidden" style="display:none" src="{_png([black, white])}"></figure>
<img alt="broken" src="data:image/png;base64,AAAA">
<script>console.error("something failed");</script></body></html>""")
    open_page(browser, page, artifacts, "bad-page")
    assert chart_problems(browser) == ["chart 'blank' is empty: a single colour",
                                       "chart 'hidden' is empty: 0x0 on screen, 300 px"]
    problems = page_problems(browser)
    assert any(p.startswith("broken image <img alt=broken") for p in problems), problems
    assert any("console SEVERE" in p and "something failed" in p for p in problems), problems


@pytest.mark.integration
def test_the_real_runs_report_page_opens_whole_from_its_run_folder(real_pipeline, browser, artifacts):
    from selenium.webdriver.common.by import By

    first, page = real_pipeline["first"], real_pipeline["first_dir"] / "report.html"
    shot = open_page(browser, page, artifacts, "report-page")
    assert shot.stat().st_size > 50_000
    text = browser.find_element(By.TAG_NAME, "body").text
    assert first["gate"]["reason"] in text and first["ranking_gate"]["reason"] in text, text[:2000]
    assert "Toy Story (1995)" in text
    charts = browser.find_elements(By.CSS_SELECTOR, "figure.chart img")
    assert len(charts) == 5, f"{len(charts)} charts: the OLAP stage's two, RMSE, NDCG@10 and timings"
    assert chart_problems(browser) == []
    assert page_problems(browser) == []
