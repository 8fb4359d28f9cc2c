"""bench/ranking.py on a tiny generated run folder: the table's rows (every public baseline, then the run's own
rows), the popularity row equal to the run's, and a planted signal that lifts EASE far above popularity."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import numpy as np
import pandas as pd
import pytest

from bench_scripts import load_bench

HAS_IMPLICIT = importlib.util.find_spec("implicit") is not None  # pinned in setup.cfg; without it: no ALS, no blend
SMALL_GRIDS = ["--ease-lambdas", "1,10", "--ials-factors", "4", "--ials-regs", "0.1", "--ials-alphas", "5",
               "--ials-iters", "3", "--rp3-alphas", "1", "--rp3-betas", "0", "--rp3-neighbours", "10",
               "--knn-neighbours", "10", "--blend-weights", "0,0.5,1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_bench("ranking")


def _split(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Two taste groups of 40 users, each rating 14 of its own 25 movies (4 or 5 stars); the 10 movies everyone
    rates (2 or 3 stars) are the most popular and never relevant. 60 % of each user's ratings train, 20 %
    validation, 20 % test."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "validation": [], "test": []}
    for user in range(1, 81):
        own = np.arange(25) + (100 if user <= 40 else 200)
        movies = np.concatenate([rng.choice(own, 14, replace=False), np.arange(10) + 1])
        ratings = np.where(movies >= 100, rng.choice([4.0, 5.0], len(movies)), rng.choice([2.0, 3.0], len(movies)))
        order = rng.permutation(len(movies))
        for name, part in zip(rows, np.split(order, [int(0.6 * len(order)), int(0.8 * len(order))])):
            rows[name] += [(user, int(movies[i]), float(ratings[i])) for i in part]
    return {name: pd.DataFrame(r, columns=["user_id", "movie_id", "rating"]).astype(
        {"user_id": np.int64, "movie_id": np.int64, "rating": np.float64}) for name, r in rows.items()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from pipeline.models.protocol import Split
    from pipeline.models.reference import popularity_metrics

    run = tmp_path_factory.mktemp("run")
    (run / "etl").mkdir()
    frames = _split()
    tables = {}
    for name, frame in frames.items():
        path = run / "etl" / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        tables[name] = {"path": str(path), "rows": len(frame)}
    (run / "etl" / "manifest.json").write_text(json.dumps({"stage": "etl", "tables": tables, "split": {}}))
    params = {"ranking_max_users": 10_000, "seed": 42, "ease_min_ratings": 3}
    popularity = popularity_metrics(Split(**frames, summary={}, ranking_sample=(10_000, 42)))
    report = {"params": params, "ranking": {
        "popularity": popularity, "best_by_validation_ndcg": "ease",
        "candidates": {"ease": {"val_ndcg_at_10": 0.5, "test_ndcg_at_10": 0.25, "test_precision_at_10": 0.125,
                                "test_recall_at_10": 0.75, "users": 80}}}}
    (run / "report.json").write_text(json.dumps(report))
    return run


@pytest.fixture(scope="module")
def printed(bench, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "bench.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        assert bench.main(["--run-dir", str(run_dir), "--json", str(out), *SMALL_GRIDS]) == 0
    return buffer.getvalue(), json.loads(out.read_text())


def _table(text: str) -> dict[str, list[float | None]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| model", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = [float(c) if c else None for c in cells[1:]]
    return rows


def test_the_table_has_every_baseline_then_the_runs_own_rows(printed):
    text, saved = printed
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| model | val NDCG@10 | test NDCG@10 | test P@10 | test R@10 |"
    labels = list(_table(text))
    assert labels[0] == "popularity"
    assert [label.split(",")[1].strip() for label in labels[1:5]] == [
        "input binary", "input rating/5", "input rating>=3.5", "input (rating/5)^2"]
    if HAS_IMPLICIT:
        assert labels.pop(5) == "implicit ALS, confidence 1 + 5 * rating/5, reg 0.1, 4 factors"
        blend = labels.pop(7)
        assert blend.startswith("blend ") and "EASE" in blend and blend.endswith("implicit ALS")
    assert labels[5] == "RP3beta, alpha 1, beta 0, 10 neighbours"
    assert labels[6] == "item-kNN cosine, 10 neighbours"
    assert labels[7:] == ["popularity (this project)", "ease (best by validation) (this project)"]
    assert _table(text)["ease (best by validation) (this project)"] == [0.5, 0.25, 0.125, 0.75]
    # each EASE input's lambda is its best of the grid on validation
    assert {name: len(grid) for name, grid in saved["grids"].items()} == {
        "EASE binary": 2, "EASE rating/5": 2, "EASE rating>=3.5": 2, "EASE (rating/5)^2": 2, "RP3beta": 1,
        "item-kNN": 1, **({"implicit ALS": 1, "blend": 3} if HAS_IMPLICIT else {})}
    assert "popularity against the run's report.json: the same figures" in text


def test_a_planted_signal_puts_ease_far_above_popularity(printed):
    rows = _table(printed[0])
    popularity = rows["popularity"]
    assert popularity == rows["popularity (this project)"]
    ease = [figures for label, figures in rows.items() if label.startswith("EASE")]
    assert len(ease) == 4
    for figures in ease:  # validation and test NDCG@10, P@10 and R@10
        assert all(mine > theirs + 0.05 for mine, theirs in zip(figures, popularity))
        assert figures[0] > 2 * popularity[0] and figures[1] > 2 * popularity[1]
    if HAS_IMPLICIT:
        blend = rows[next(label for label in rows if label.startswith("blend"))]
        assert blend[0] >= max(figures[0] for figures in ease)  # its EASE weight of 1 is on the grid


def test_an_unknown_input_weighting_is_refused_before_reading_the_run(bench, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--run-dir", str(tmp_path / "missing"), "--ease-inputs", "binary,log"])
    assert stopped.value.code == 2
