"""Great Expectations Data Docs as a person browses them: every page renders without a network (no CDN tag or
script left, the index's tables written out), and each validation page names its data asset and the pipeline run
(docs/adr/0073-mlflow-and-data-docs-as-browsed.md). In a real browser with the network cut off:
tests/service/test_data_docs_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from movielens_fixtures import write_csv_variant
from pipeline.config import load_settings
from pipeline.data.data_docs import offline_html
from pipeline.data.ingest import ingest_movielens
from pipeline.data.validate import validate_tables

NOW = 1_700_000_000
RUN_ID = "manual__2026-12-07T10:00:00+00:00"
TABLES = ("movies", "ratings", "tags", "links")
REMOTE = re.compile(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)=["']?(https?:)?//""", re.I)


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> Path:
    """The Data Docs of one validate run of a tiny dataset with a bad rating row (one quarantined row)."""
    tmp = tmp_path_factory.mktemp("data_docs")
    written = write_csv_variant(tmp / "source" / "ml-latest-small", extra_ratings=[("1", "2", "9.0", "964982703")])
    ingest_movielens(str(written.folder), tmp / "ingest", load_settings({"RECSYS_HOME": str(tmp / "home")}))
    result = validate_tables(tmp / "ingest", tmp / "validate", 0.5, now=NOW, run_id=RUN_ID)["validation"]
    assert result["quarantined_rows"] == 1
    return Path(result["data_docs"]).parent


def _pages(data_docs: Path) -> list[Path]:
    pages = sorted(data_docs.rglob("*.html"))
    assert len(pages) > 1 + len(TABLES)  # the index, the suites, the validations
    return pages


def test_no_page_loads_anything_from_the_network_or_runs_a_script(data_docs):
    for page in _pages(data_docs):
        text = page.read_text()
        assert not REMOTE.search(text), (page, REMOTE.search(text).group(0))
        assert "<script" not in text, page  # every GX script needs jQuery/Bootstrap from a CDN
        assert not re.search(r"url\(\s*['\"]?https?:", text), page
        assert "<style>" in text and "</html>" in text


def test_the_index_lists_every_validation_and_suite_in_plain_tables(data_docs):
    index = (data_docs / "index.html").read_text()
    validations = sorted(data_docs.glob("validations/*/*/*/*/*.html"))
    assert len(validations) == 3 * len(TABLES)  # schema, row and table level per table
    results = re.search(r'<table id="[^"]*"[^>]*validation-results-table[^>]*>(.*?)</table>', index, re.S).group(1)
    assert results.count("<tr>") == 1 + len(validations)  # the header and one row per validation
    assert "<th>Run Name</th>" in results and "<th>Asset Name</th>" in results
    for table in TABLES:
        assert f"<td>{RUN_ID} {table}</td>" in results
    for link in re.findall(r'<a href="(validations/[^"]+)"', results):  # each row opens its validation page
        from urllib.parse import unquote

        assert (data_docs / unquote(link)).is_file(), link
    assert "text-danger" in results  # the ratings row level failed (the quarantined row): shown as failed
    suites = re.search(r'<table id="[^"]*"[^>]*expectation_suites-table[^>]*>(.*?)</table>', index, re.S).group(1)
    assert suites.count('<a href="expectations/') == 3 * len(TABLES)


def test_each_validation_page_names_its_file_and_the_pipeline_run(data_docs):
    for page in sorted(data_docs.glob("validations/*/*/*/*/*.html")):
        table = page.relative_to(data_docs).parts[1]
        text = page.read_text()
        assert "Data asset: None" not in text and "__none__" not in text
        assert re.search(rf"Data asset: {table} \([^)]*/{table}\.csv\)", text), page
        assert f"{RUN_ID} {table}" in text
        assert page.parent.parent.name == f"{RUN_ID} {table}"  # the run name is the folder GX files it under


def test_a_bootstrap_table_is_written_out_sorted_with_its_rows_linked_and_plain_text_escaped():
    page = """<html><head><link rel="stylesheet" href="https://cdn.example/b.css"></head><body>
<table id="t1" class="x" data-toggle="table"></table>
<script>function f() {}</script>
<script>
  $('#t1').bootstrapTable(
    Object.assign(
      {
        columns: [{'field': 'ok', 'title': 'Status'}, {'field': 'run_time', 'title': 'Run Time',
                   'sortName': '_run_time_sort'}, {'field': 'run_name', 'title': 'Run Name'}],
        data: [{'ok': '<i class="fas fa-check"></i>', 'run_time': 'early', '_run_time_sort': 1.0,
                'run_name': 'a & b', '_table_row_link_path': 'validations/one.html'},
               {'ok': '<i class="fas fa-times"></i>', 'run_time': 'late', '_run_time_sort': 20.0,
                'run_name': 'c', '_table_row_link_path': 'validations/two.html'}],
        toolbar: '#t1-toolbar'
      },
      {'sortName': 'run_time', 'sortOrder': 'desc'}
    )
  );
</script></body></html>"""
    out = offline_html(page)
    assert "<script" not in out and "cdn.example" not in out and "<style>" in out
    rows = re.findall(r"<tr>(.*?)</tr>", out)
    assert rows[0] == "<th>Status</th><th>Run Time</th><th>Run Name</th>"
    assert rows[1:] == ['<td><i class="fas fa-times"></i></td><td><a href="validations/two.html">late</a></td>'
                        "<td>c</td>",
                        '<td><i class="fas fa-check"></i></td><td><a href="validations/one.html">early</a></td>'
                        "<td>a &amp; b</td>"]
