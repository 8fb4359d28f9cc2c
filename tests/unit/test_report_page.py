"""The run report page (report.html) rendered from a synthetic report and tiny tables: self-contained, well-formed,
both gates' reasons, titles, and a line for each section whose stage did not run."""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
import pytest

from pipeline import report, report_page
from pipeline.stages import ORDER
from report_html import Page

RATING_REASON = "challenger beats the baseline (0.8297 vs 0.8647) and there is no champion"
RANKING_REASON = "challenger does not beat popularity (0.0901 vs 0.1098): keep the champion"
MOVIES = {1: "Toy Story (1995)", 2: "Jumanji (1995)", 3: "Heat (1995)", 4: "<b>Bold</b> & Co (2000)",
          5: "Casino (1995)", 6: "Matrix, The (1999)"}


def _tiny_png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


def _run_folder(run: Path) -> dict:
    """Tiny tables where the stages write them, and the report sections that name them."""
    for stage in ("validate", "olap", "similarity", "recommend"):
        (run / stage).mkdir(parents=True)
    pd.DataFrame({"movie_id": list(MOVIES), "title": list(MOVIES.values())}).to_parquet(
        run / "validate" / "movies.parquet")
    ratings = [(10, m, 5.0 - 0.5 * m) for m in (1, 2, 3, 4, 5)] + [(20, 1, 4.0)] + [(30, m, 3.0) for m in (2, 3)]
    pd.DataFrame(ratings, columns=["user_id", "movie_id", "rating"]).to_parquet(run / "validate" / "ratings.parquet")
    (run / "olap" / "summary.md").write_text("# summary\n")
    _tiny_png(run / "olap" / "ratings_per_month.png")
    similar = [(m, n, metric, rank, 1.0 / rank) for m in MOVIES for metric in ("cosine", "euclidean", "lsh")
               for rank, n in enumerate([x for x in MOVIES if x != m][:3], start=1)]
    pd.DataFrame(similar, columns=["movie_id", "similar_movie_id", "metric", "rank", "score"]).to_parquet(
        run / "similarity" / "similar_movies.parquet")
    recs = [(u, rank, m, 1.0 - rank / 10) for u in (10, 20, 30) for rank, m in enumerate((6, 4), start=1)]
    pd.DataFrame(recs, columns=["user_id", "rank", "movie_id", "score"]).to_parquet(
        run / "recommend" / "recommendations.parquet")
    return {
        "olap": {"summary": str(run / "olap" / "summary.md"), "tables": {}},
        "similarity": {"table": str(run / "similarity" / "similar_movies.parquet"), "k": 3,
                       "registered_model": "movielens-ranker", "champion_version": "1"},
        "recommendations": {"table": str(run / "recommend" / "recommendations.parquet"), "k": 2, "model": "ease",
                            "registered_model": "movielens-ranker", "champion_version": "1", "users": 3},
    }


def _ranking(ndcg: float) -> dict:
    return {"val_ndcg_at_10": ndcg, "test_ndcg_at_10": ndcg, "test_precision_at_10": 0.1,
            "test_recall_at_10": 0.1, "coverage": 0.05, "long_tail_share": 0.2}


def _report(run: Path) -> dict:
    rows = [{"model": "baseline", "val_rmse": 0.8652, "test_rmse": 0.8647, "test_mae": 0.67, "cold_test_rmse": 0.9},
            {"model": "blend", "val_rmse": 0.8275, "test_rmse": 0.8297, "test_mae": 0.64, "cold_test_rmse": 0.9}]
    return {
        "run_id": "cli_test", "source": "/data/ml-tiny", "params": {},
        "dataset": {"variant": "ml-latest-small", "format": "csv", "ratings": 8, "users": 3, "movies": 6, "tags": 0,
                    "fingerprint": "abc"},
        "validation": {"success": True, "quarantined_rows": 2, "data_docs": str(run / "validate" / "index.html"),
                       "failed_expectations": [{"table": "ratings", "level": "row", "unexpected_count": 2,
                                                "expectation": "expect_column_values_to_be_between",
                                                "what": "rating outside 0.5-5"}]},
        "split": {"strategy": "random", "seed": 42, "train": 6, "validation": 1, "test": 1, "test_fingerprint": "f"},
        "models": {row["model"]: {**row, "ranking": _ranking(0.05)} for row in rows},
        "model_comparison": {"rows": rows, "best_by_validation_rmse": "blend"},
        "ranking": {"popularity": _ranking(0.1098), "candidates": {"blend": _ranking(0.05), "ease": _ranking(0.0901)}},
        "gate": {"decision": "promote", "reason": RATING_REASON, "challenger": "blend", "challenger_version": "1",
                 "challenger_test_rmse": 0.8297, "baseline_test_rmse": 0.8647, "champion_version_before": None,
                 "champion_test_rmse_before": None, "margin": 0.0, "registered_model": "movielens-recommender"},
        "promotion": {"decision": "promoted", "reason": RATING_REASON, "champion_version": "1"},
        "ranking_gate": {"decision": "keep", "reason": RANKING_REASON, "challenger": "ease",
                         "challenger_version": "2", "challenger_test_ndcg_at_10": 0.0901,
                         "popularity_test_ndcg_at_10": 0.1098, "champion_version_before": "1",
                         "champion_test_ndcg_at_10_before": 0.2, "margin": 0.0, "registered_model": "movielens-ranker"},
        "ranking_promotion": {"decision": "kept", "reason": RANKING_REASON, "champion_version": "1"},
        "timings_s": {"ingest": 1.2, "validate": 3.4, "report": 0.5},
        **_run_folder(run),
    }


@pytest.fixture
def run(tmp_path) -> Path:
    return tmp_path / "run"


def test_the_page_is_well_formed_and_loads_nothing_from_the_network(run):
    html = report_page.render_page(_report(run), run, ORDER)
    page = Page(html)
    assert html.startswith("<!DOCTYPE html>") and not page.errors and page.open == []
    assert not [link for link in page.links if not link.startswith(("data:", "#"))]
    assert "http://" not in html and "https://" not in html and "url(" not in html and "<script" not in html
    assert len(page.images) == 4  # the OLAP plot, RMSE, NDCG@10, timings
    for image in page.images:
        assert image["alt"] and image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_shows_both_gates_with_their_figures_and_reasons(run):
    words = Page(report_page.render_page(_report(run), run, ORDER)).words
    assert RATING_REASON in words and RANKING_REASON in words
    assert "promote" in words and "keep" in words and "kept" in words
    assert "challenger (blend v1), test RMSE 0.8297" in words
    assert "champion before (none), test RMSE —" in words
    assert "popularity, test NDCG@10 0.1098" in words and "champion before (v1), test NDCG@10 0.2000" in words


def test_titles_are_shown_and_escaped(run):
    html = report_page.render_page(_report(run), run, ORDER)
    assert "&lt;b&gt;Bold&lt;/b&gt; &amp; Co (2000)" in html and "<b>Bold</b>" not in html
    words = Page(html).words
    assert "Toy Story (1995)" in words and "Matrix, The (1999)" in words  # well-known movies, by title
    assert "Jumanji (1995)" in words  # Toy Story's first similar movie


def test_users_with_the_fewest_median_and_most_ratings_are_shown_with_their_lists(run):
    context = report_page.page_context(_report(run), run, ORDER)
    users = context["users"]["users"]
    assert [(u["user_id"], u["label"], u["ratings"]) for u in users] == \
        [(20, "fewest ratings", 1), (30, "median", 2), (10, "most ratings", 5)]
    assert [m["title"] for m in users[0]["list"]] == ["Matrix, The (1999)", "<b>Bold</b> & Co (2000)"]
    assert [m["title"] for m in users[2]["liked"]][:2] == ["Toy Story (1995)", "Jumanji (1995)"]


def test_a_missing_section_renders_as_not_run_with_its_reason(run):
    content = _report(run)
    for key in ("ranking_gate", "ranking_promotion", "split", "recommendations", "olap"):
        del content[key]
    del content["similarity"]
    content["skipped"] = {"similarity": "no champion in movielens-ranker"}
    content["stale"] = {"recommend": "similarity was re-run after it"}
    words = Page(report_page.render_page(content, run, ORDER)).words
    assert "not run: the ranking_gate stage did not run in this run folder" in words
    assert "not run: the etl stage did not run" in words
    assert "not run: similarity was skipped: no champion in movielens-ranker" in words
    assert "not run: recommend's output is stale: similarity was re-run after it" in words
    assert "not run: the olap stage did not run" in words
    assert RATING_REASON in words


def test_a_report_of_one_stage_renders(run):
    """The first stage alone: every other section says it did not run, nothing fails."""
    words = Page(report_page.render_page({"run_id": "r", "timings_s": {"ingest": 1.0}}, run, ORDER)).words
    assert words.count("not run") >= 10


def test_the_report_stage_writes_the_page_and_logs_it_to_mlflow(run, settings):
    import mlflow

    from pipeline import stages, tracking
    from pipeline.config import make_context

    content = _report(run)
    ctx = make_context(run_id="cli_test", work_dir=run, settings=settings)
    report.write_summary(run, "compare_models", {k: v for k, v in content.items() if k not in ("run_id", "params")})
    summary = stages.run_stage("report", ctx)

    page = summary["report_page"]
    assert page["path"] == str(run / "report.html") and Path(page["path"]).is_file()
    assert page["artifact_uri"].endswith("/report.html")
    assert RATING_REASON in Page(Path(page["path"]).read_text()).words
    client = tracking.client(settings)
    logged = client.get_run(page["mlflow_run_id"])
    assert logged.info.run_name == "cli_test" and logged.data.tags["recsys.run_id"] == "cli_test"
    assert logged.data.tags["recsys.role"] == "pipeline" and logged.info.status == "FINISHED"
    assert logged.data.tags["recsys.ranking_gate.decision"] == content["ranking_gate"]["decision"]
    assert {f.path for f in client.list_artifacts(page["mlflow_run_id"])} == {"report.html", "report.json"}
    assert Path(mlflow.artifacts.download_artifacts(page["artifact_uri"])).read_bytes() == \
        Path(page["path"]).read_bytes()
    assert report.merged_sections(run, ORDER)["report_page"] == page
