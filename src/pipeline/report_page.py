"""``report.html``: the run on one self-contained page, written by the ``report`` stage and logged to MLflow.

The page is rendered from ``report.json``'s sections and the tables the run folder holds (titles from the
validated movies, the similar-movie table, the users' lists) with the Jinja2 template
``templates/report.html.j2`` (autoescaped); its charts are matplotlib PNGs inlined as ``data:`` URIs
(``report_charts``), so the file opens anywhere, without a network. A section whose stage did not run shows why
in one line. See docs/run-report.md and docs/adr/0072-run-report-page.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline import report_charts, storage

log = logging.getLogger(__name__)

PAGE = "report.html"
TEMPLATE = "report.html.j2"
# movies most people know, shown with their similar movies where the run's tables have them
WELL_KNOWN = ("Toy Story (1995)", "Matrix, The (1999)", "Pulp Fiction (1994)",
              "Star Wars: Episode IV - A New Hope (1977)", "Forrest Gump (1994)")
MOVIES_SHOWN = 5
USERS_SHOWN = 3
LIKED_SHOWN = 5
METRICS = ("cosine", "euclidean", "lsh")  # the similar-movie table's metrics, as its columns on the page


def not_run(report: dict, *stages: str) -> str:
    """One line on why the sections of ``stages`` are missing: skipped or stale (with the reason), or not run."""
    for stage in stages:
        if stage in (report.get("skipped") or {}):
            return f"not run: {stage} was skipped: {report['skipped'][stage]}"
        if stage in (report.get("stale") or {}):
            return f"not run: {stage}'s output is stale: {report['stale'][stage]}"
    return (f"not run: the {' / '.join(stages)} stage{'s' if len(stages) > 1 else ''} did not run in this run "
            f"folder (not chosen, switched off by its Param, or failed)")


class Titles:
    """Movie id → title, from the run's validated (or ingested) movies; ``movie <id>`` where unknown."""

    def __init__(self, run_dir: Path):
        self.by_id: dict[int, str] = {}
        for stage in ("validate", "ingest"):
            path = storage.stage_dir(run_dir, stage) / "movies.parquet"
            if path.exists():
                frame = pd.read_parquet(path, columns=["movie_id", "title"])
                self.by_id = dict(zip(frame["movie_id"].astype(int), frame["title"].astype(str)))
                break

    def __call__(self, movie_id) -> str:
        return self.by_id.get(int(movie_id), f"movie {int(movie_id)}")

    def find(self, title: str) -> int | None:
        return next((movie for movie, known in self.by_id.items() if known == title), None)


def _ratings(run_dir: Path) -> pd.DataFrame | None:
    path = storage.stage_dir(run_dir, "validate") / "ratings.parquet"
    return pd.read_parquet(path, columns=["user_id", "movie_id", "rating"]) if path.exists() else None


def _readable(path) -> Path | None:
    return Path(path) if path and Path(path).exists() else None


def _section_table(report: dict, key: str, stage: str) -> tuple:
    """(the report section, the table it names) or (why there is none, None)."""
    section = report.get(key)
    table = _readable(section and section.get("table"))
    if table is None:
        return (not_run(report, stage) if not section else f"not found: {section.get('table')}"), None
    return section, pd.read_parquet(table)


def similar_movies(report: dict, titles: Titles, ratings: pd.DataFrame | None) -> dict:
    """A few well-known movies (the most rated where none of them is in the table) and their similar movies,
    one column per metric."""
    section, frame = _section_table(report, "similarity", "similarity")
    if frame is None:
        return {"not_run": section}
    present = set(frame["movie_id"].astype(int))
    chosen = [m for m in (titles.find(t) for t in WELL_KNOWN) if m in present]
    if len(chosen) < MOVIES_SHOWN and ratings is not None:
        most_rated = ratings["movie_id"].value_counts().index
        chosen += [int(m) for m in most_rated if m in present and m not in chosen][:MOVIES_SHOWN - len(chosen)]
    if not chosen:
        chosen = sorted(present)[:MOVIES_SHOWN]
    movies = []
    for movie in chosen:
        rows = frame[frame["movie_id"] == movie]
        metrics = [m for m in METRICS if m in set(rows["metric"])]
        by_metric = {m: rows[rows["metric"] == m].sort_values("rank") for m in metrics}
        depth = max((len(r) for r in by_metric.values()), default=0)
        lines = [{"rank": i + 1, **{m: _similar_cell(by_metric[m], i, titles) for m in metrics}}
                 for i in range(depth)]
        movies.append({"movie_id": movie, "title": titles(movie), "metrics": metrics, "rows": lines})
    return {"movies": movies, "k": section.get("k"), "champion": f"{section.get('registered_model')} "
                                                                  f"v{section.get('champion_version')}"}


def _similar_cell(rows: pd.DataFrame, i: int, titles: Titles) -> dict | None:
    if i >= len(rows):
        return None
    row = rows.iloc[i]
    return {"title": titles(row["similar_movie_id"]), "score": float(row["score"])}


def user_lists(report: dict, titles: Titles, ratings: pd.DataFrame | None) -> dict:
    """The lists of a few users (the one with the fewest ratings, the median one, the one with the most), each
    beside the movies the user rated highest."""
    section, recs = _section_table(report, "recommendations", "recommend")
    if recs is None:
        return {"not_run": section}
    listed = set(recs["user_id"].astype(int))
    if ratings is not None and not ratings.empty:
        counts = ratings[ratings["user_id"].isin(listed)].groupby("user_id").size().sort_values(kind="stable")
    else:
        counts = pd.Series(1, index=sorted(listed))
    picks = {"fewest ratings": counts.index[0], "median": counts.index[len(counts) // 2],
             "most ratings": counts.index[-1]} if len(counts) else {}
    users, seen = [], set()
    for label, user in picks.items():
        if user in seen or len(users) >= USERS_SHOWN:
            continue
        seen.add(user)
        mine = recs[recs["user_id"] == user]
        mine = mine.sort_values("rank") if "rank" in mine else mine
        rated = ratings[ratings["user_id"] == user] if ratings is not None else pd.DataFrame()
        liked = rated.sort_values(["rating", "movie_id"], ascending=[False, True]).head(LIKED_SHOWN) \
            if not rated.empty else rated
        users.append({
            "user_id": int(user), "label": label, "ratings": int(counts.get(user, 0)),
            "liked": [{"title": titles(r.movie_id), "rating": float(r.rating)} for r in liked.itertuples()],
            "list": [{"rank": int(getattr(r, "rank", i + 1)), "title": titles(r.movie_id),
                      "score": float(r.score) if hasattr(r, "score") else None}
                     for i, r in enumerate(mine.itertuples())],
        })
    return {"users": users, "model": section.get("model"), "k": section.get("k"),
            "champion": f"{section.get('registered_model')} v{section.get('champion_version')}"}


def olap_charts(report: dict) -> list[dict]:
    """The olap stage's PNG plots (beside its summary.md), inlined."""
    summary = _readable((report.get("olap") or {}).get("summary"))
    if summary is None:
        return []
    return [{"name": p.stem.replace("_", " "), "uri": report_charts.file_uri(p)}
            for p in sorted(summary.parent.glob("*.png"))]


def rating_rows(report: dict) -> list[dict]:
    """One row per rating model: from ``model_comparison`` where it ran, else from ``models``."""
    rows = (report.get("model_comparison") or {}).get("rows")
    if rows:
        return rows
    return [{"model": name, **{k: m.get(k) for k in ("val_rmse", "test_rmse", "test_mae", "cold_test_rmse")}}
            for name, m in (report.get("models") or {}).items() if m.get("test_rmse") is not None]


def ranking_rows(report: dict) -> dict[str, dict]:
    """Model → its top-10 figures as a ranker: ``ranking.candidates`` where compare_models ran, else each
    model's own ``ranking``."""
    candidates = (report.get("ranking") or {}).get("candidates")
    if candidates:
        return candidates
    return {name: m["ranking"] for name, m in (report.get("models") or {}).items() if m.get("ranking")}


def _version(version) -> str:
    return "none" if version is None else f"v{version}"


GATES = (("gate", "promotion", "Rating gate", "RMSE", "rmse", "baseline"),
         ("ranking_gate", "ranking_promotion", "Ranking gate", "NDCG@10", "ndcg_at_10", "popularity"))


def gates(report: dict) -> list[dict]:
    """Both gates: the decision, its figures and reason, and the decision as applied."""
    out = []
    for gate, promotion, title, metric, key, bar in GATES:
        decided, applied = report.get(gate), report.get(promotion)
        if not decided:
            out.append({"title": title, "not_run": not_run(report, gate)})
            continue
        figures = [(f"challenger ({decided.get('challenger')} v{decided.get('challenger_version')}), test {metric}",
                    decided.get(f"challenger_test_{key}")),
                   (f"challenger, validation {metric}", decided.get(f"challenger_val_{key}")),
                   (f"{bar}, test {metric}", decided.get(f"{bar}_test_{key}")),
                   (f"champion before ({_version(decided.get('champion_version_before'))}), test {metric}",
                    decided.get(f"champion_test_{key}_before")),
                   ("margin", decided.get("margin"))]
        out.append({"title": title, "registered_model": decided.get("registered_model"),
                    "decision": decided.get("decision"), "reason": decided.get("reason"),
                    "champion_error": decided.get("champion_error"), "figures": figures,
                    "applied": applied, "applied_not_run": None if applied else not_run(report, promotion)})
    return out


def page_context(report: dict, run_dir: Path, order: list[str]) -> dict:
    """What the template shows, from ``report`` (report.json's sections) and the run folder's tables."""
    run_dir = Path(run_dir)
    titles, ratings = Titles(run_dir), _ratings(run_dir)
    rows, candidates = rating_rows(report), ranking_rows(report)
    popularity = (report.get("ranking") or {}).get("popularity")
    validation = report.get("validation") or {}
    return {
        "report": report, "run_dir": str(run_dir),
        "not_run": {stage: not_run(report, stage) for stage in order},
        "failed_expectations": validation.get("failed_expectations") or [],
        "olap_charts": olap_charts(report),
        "rating_rows": rows, "rmse_chart": report_charts.rmse_chart(rows),
        "ranking_rows": candidates, "popularity": popularity,
        "ndcg_chart": report_charts.ndcg_chart(candidates, popularity),
        "gates": gates(report),
        "similar": similar_movies(report, titles, ratings),
        "users": user_lists(report, titles, ratings),
        # the report stage's own time is not known yet (one left by an earlier render would be stale)
        "timings_chart": report_charts.timings_chart(
            {k: v for k, v in (report.get("timings_s") or {}).items() if k != "report"}, order),
    }


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_page(report: dict, run_dir: Path, order: list[str]) -> str:
    """The page's HTML for ``report`` (report.json's content) of the run in ``run_dir``."""
    from jinja2 import ChainableUndefined, Environment, PackageLoader

    env = Environment(loader=PackageLoader("pipeline", "templates"), autoescape=True, undefined=ChainableUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = _number
    return env.get_template(TEMPLATE).render(**page_context(report, run_dir, order))


def write_page(report: dict, run_dir: Path, order: list[str]) -> Path:
    """``<run>/report.html``, written atomically."""
    return storage.write_text_atomic(Path(run_dir) / PAGE, render_page(report, run_dir, order))


def publish_report_page(ctx, order: list[str]) -> dict:
    """Stage ``report``: write ``report.html`` and log it, with ``report.json``, to the pipeline run's own MLflow
    run (``tracking.pipeline_run``: the parent of every stage's run). Returns the section ``report_page`` (what
    the Airflow link reads)."""
    from pipeline import report, tracking

    content = report.assemble(ctx, order)
    path = write_page(content, ctx.run_dir, order)
    run_id = tracking.pipeline_run(ctx, split=content.get("split"))
    mlflow_client = tracking.client(ctx.settings)
    with tracking.quiet_mlflow():
        mlflow_client.log_artifact(run_id, str(path))
        mlflow_client.log_text(run_id, storage.strict_json(content, indent=2, sort_keys=True) + "\n", report.REPORT)
        for key, value in headline(content).items():
            mlflow_client.set_tag(run_id, key, value)
    uri = f"{mlflow_client.get_run(run_id).info.artifact_uri.rstrip('/')}/{PAGE}"
    log.info("report: %s (MLflow run %s, the pipeline run's parent run)", path, run_id)
    return {"report_page": {"path": str(path), "mlflow_run_id": run_id, "artifact_uri": uri}}


def headline(content: dict) -> dict:
    """The gates' outcomes as tags of the pipeline run's MLflow run (columns of MLflow's runs table)."""
    tags = {}
    for section, metric in (("gate", "rmse"), ("ranking_gate", "ndcg_at_10")):
        gate = content.get(section) or {}
        if gate:
            tags[f"recsys.{section}.decision"] = gate.get("decision", "")
            tags[f"recsys.{section}.challenger"] = gate.get("challenger", "")
            score = gate.get(f"challenger_test_{metric}")
            if score is not None:
                tags[f"recsys.{section}.challenger_test_{metric}"] = f"{score:.4f}"
    return tags
