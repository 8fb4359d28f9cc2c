"""The reference pages that mirror code: docs/params.md is the generated text, docs/benchmarks.md's tables are what
bench/pipeline.py renders from docs/scale.json, and docs/report.md's tables are read the way the real-report check
(tests/integration/test_models_and_serving.py) reads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench_scripts import load_bench
from pipeline import cli
from pipeline import reference_docs as docs
from pipeline.params import PARAMS, SECTIONS

REPO = Path(__file__).resolve().parents[2]
BENCH_COMMAND = ".venv/bin/python bench/pipeline.py --render"
# words about when or in which sitting a figure was taken; split so that this file does not match itself
DIARY = re.compile(r"\b(sess" r"ion [0-9]+|to" r"night|this (even" r"ing|morn" r"ing|after" r"noon)"
                   r"|a (slow|fast) ho" r"ur)\b", re.IGNORECASE)


def test_docs_params_md_is_the_generated_page():
    assert (REPO / docs.PARAMS_PAGE).read_text() == docs.params_markdown(), \
        f"{docs.PARAMS_PAGE} differs from src/pipeline/params.py: regenerate it with `{docs.PARAMS_COMMAND}`"


def test_recsys_params_markdown_prints_every_param_in_its_forms_section(capsys):
    assert cli.main(["params", "--markdown"]) == 0
    page = capsys.readouterr().out
    assert page == docs.params_markdown()
    headings = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert headings == list(SECTIONS)
    rows = {line.split("`")[1]: line for line in page.splitlines() if line.startswith("| `")}
    assert list(rows) == [p.name for p in PARAMS]
    assert rows["source"].startswith("| `source` | string or null | `null` |  | Dataset source: 'grouplens:&lt;")
    assert "| number | `0.001` | 0 ≤ value ≤ 1 |" in rows["quarantine_threshold"]
    assert "| string | `\"random\"` | one of `random`, `temporal` |" in rows["split_strategy"]
    assert "| array of integer | `[10, 25, 50]` | 1 ≤ each value ≤ 1000 |" in rows["als_ranks"]
    assert "| boolean | `true` |  |" in rows["autorec_enabled"]


def _bench():
    return load_bench("pipeline")


def test_docs_benchmarks_md_tables_are_rendered_from_scale_json():
    bench = _bench()
    runs = sorted(json.loads((REPO / "docs" / "scale.json").read_text())["runs"], key=lambda r: r["ratings"] or 0)
    page = (REPO / "docs" / "benchmarks.md").read_text()
    assert page == bench.render_page(page, runs), \
        f"docs/benchmarks.md's tables differ from docs/scale.json: regenerate them with `{BENCH_COMMAND}`"
    assert "(scale.png)" in page


def test_every_run_in_scale_json_names_the_commit_it_measured():
    for run in json.loads((REPO / "docs" / "scale.json").read_text())["runs"]:
        assert re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", run.get("commit") or ""), (run["size"], run.get("commit"))
        assert run["measured_at"].endswith(" UTC"), run["size"]


@pytest.mark.parametrize("page", [docs.PARAMS_PAGE, docs.REPORT_PAGE, "docs/benchmarks.md"])
def test_reference_pages_describe_the_project_not_a_diary(page):
    found = [m.group(0) for m in DIARY.finditer((REPO / page).read_text())]
    assert not found, f"{page}: {found}: a figure carries its date and commit; the story goes in git log"


def test_docs_report_md_documents_each_section_and_its_tables_agree_with_each_other():
    page = (REPO / docs.REPORT_PAGE).read_text()
    documented = docs.documented_report(page)
    assert {"run_id", "params", "dataset", "validation", "split", "models", "ranking", "gate", "promotion",
            "similarity", "recommendations", "cold_start", "timings_s"} <= set(documented[docs.ROOT])
    assert documented[docs.ROOT]["stale"].optional and not documented[docs.ROOT]["dataset"].optional
    assert {"dataset", "models.<model>", "models.<model>.ranking", "ranking.popularity", "gate",
            "ranking_gate"} <= set(documented)
    assert documented["models.<model>"]["best_epoch"].only == {"autorec"}
    assert documented["models.<model>"]["fit_s"].only is None
    assert [p for p in docs.report_drift(page, {}) if p.startswith(f"{docs.REPORT_PAGE} documents")] == []


PAGE = """\
# A report

## Sections of `report.json`

| key | type | meaning |
| --- | --- | --- |
| `run_id` | string | The run. |
| `models` | object | Per model. |
| `stale` | object, optional | Only after a re-run. |

## `models`

| key | type | meaning |
| --- | --- | --- |
| `als` | object | ALS. |
| `ease` | object | EASE. |

### `models.<model>`

| key | in | type | meaning |
| --- | --- | --- | --- |
| `fit_s` | all | number | Seconds. |
| `test_rmse` | `als` | number | Only the rating model's. |
| `skipped` | `ease` | string, optional | Why \\| it did nothing. |
"""


def test_report_drift_names_undocumented_keys_and_documented_keys_a_full_run_lacks():
    full = {"run_id": "r", "models": {"als": {"fit_s": 1.0, "test_rmse": 0.8}, "ease": {"fit_s": 2.0}}}
    assert docs.report_drift(PAGE, full, ({"run_id": "r", "models": {"ease": {"skipped": "too many movies"}}},)) == []
    drifted = {"run_id": "r", "extra": 1,
               "models": {"als": {"fit_s": 1.0}, "ease": {"fit_s": 2.0, "test_rmse": 0.9}, "knn": {"fit_s": 3.0}}}
    assert docs.report_drift(PAGE, drifted) == [
        "`extra` is in report.json but not documented in docs/report.md",
        "`models.als.test_rmse` is documented in docs/report.md but a full run did not write it",
        "`models.ease.test_rmse` is in report.json but not documented in docs/report.md",
        "`models.knn` is in report.json but not documented in docs/report.md",
    ]
    # another run's report: its keys must be documented, but it need not have every key
    assert docs.report_drift(PAGE, full, ({"run_id": "r", "models": {"als": {"fit_s": 1.0, "grid": []}}},)) == [
        "`models.als.grid` is in report.json but not documented in docs/report.md"]
    orphan = PAGE + "\n## `olap`\n\n| key | type | meaning |\n| --- | --- | --- |\n| `tables` | object | x |\n"
    assert docs.report_drift(orphan, full) == [
        "docs/report.md documents `olap`, but the table of `report.json` has no `olap`"]
