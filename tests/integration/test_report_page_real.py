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
    assert run.info.run_name == real_pipeline["first"]["run_id"] == run.data.tags["recsys.run_id"]
    assert {f.path for f in tracking.client(real_pipeline["settings"]).list_artifacts(run.info.run_id)} == \
        {"report.html", "report.json"}
    assert Path(mlflow.artifacts.download_artifacts(page["artifact_uri"])).read_bytes() == \
        Path(page["path"]).read_bytes()


def test_the_pipeline_runs_mlflow_run_is_the_parent_of_every_stage_run(real_pipeline):
    """One row per pipeline run in MLflow's runs table: its stages' runs nest under the run the page is logged
    to, their grid points under them; the parent spans the stage runs."""
    from pipeline import tracking
    from pipeline.config import make_context

    first = real_pipeline["first"]
    ctx = make_context(run_id=first["run_id"], work_dir=real_pipeline["first_dir"], settings=real_pipeline["settings"])
    runs = {r.info.run_id: r for r in tracking.runs_of(ctx)}
    parent = runs.pop(first["report_page"]["mlflow_run_id"])
    stage_runs = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in stage_runs} >= {"baseline", "als", "autorec", "ease", "implicit_als", "ltr"}
    assert all(r.data.tags.get("mlflow.parentRunId") in runs or r in stage_runs for r in runs.values())
    assert parent.info.start_time == min(r.info.start_time for r in runs.values())
    assert parent.info.end_time >= max(r.info.end_time for r in stage_runs)
    assert first["models"]["als"]["mlflow_run_id"] in {r.info.run_id for r in stage_runs}
