"""The run report page of the real runs on ml-latest-small (the session's ``real_pipeline``): written in the run
folder, logged to MLflow, self-contained, and showing what the run decided, with titles."""

from __future__ import annotations

from pathlib import Path

import pytest

from report_html import Page

pytestmark = pytest.mark.integration


def _page(run: dict) -> tuple[Path, Page, str]:
    path = Path(run["report_page"]["path"])
    html = path.read_text()
    return path, Page(html), html


def test_the_first_run_writes_its_report_page_in_its_folder(real_pipeline):
    first = real_pipeline["first"]
    path, page, html = _page(first)
    assert path == real_pipeline["first_dir"] / "report.html"
    assert not page.errors and page.open == []
    assert not [link for link in page.links if not link.startswith(("data:", "#"))]
    assert "http://" not in html and "https://" not in html
    # the OLAP stage's two plots, RMSE, NDCG@10 and timings: every one an inline PNG
    assert len(page.images) == 5 and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    words = page.words
    assert first["gate"]["reason"] in words and first["ranking_gate"]["reason"] in words
    assert "not run" not in words  # every stage ran
    for title in ("Toy Story (1995)", "Matrix, The (1999)", "Pulp Fiction (1994)", "Forrest Gump (1994)",
                  "Star Wars: Episode IV - A New Hope (1977)"):
        assert title in words
    for model in first["models"]:
        assert model in words
    assert "fewest ratings" in words and "most ratings" in words


def test_the_sabotaged_run_shows_why_its_challengers_were_kept(real_pipeline):
    second = real_pipeline["second"]
    words = _page(second)[1].words
    assert second["gate"]["decision"] == "keep" and second["gate"]["reason"] in words
    assert second["ranking_gate"]["reason"] in words


def test_the_report_page_is_logged_to_mlflow_with_report_json(real_pipeline):
    import mlflow

    from pipeline import tracking

    page = real_pipeline["first"]["report_page"]
    tracking.configure(real_pipeline["settings"])
    run = mlflow.get_run(page["mlflow_run_id"])
    assert run.info.run_name == "report" and run.data.tags["recsys.run_id"] == real_pipeline["first"]["run_id"]
    assert {f.path for f in tracking.client(real_pipeline["settings"]).list_artifacts(run.info.run_id)} == \
        {"report.html", "report.json"}
    assert Path(mlflow.artifacts.download_artifacts(page["artifact_uri"])).read_bytes() == \
        Path(page["path"]).read_bytes()
