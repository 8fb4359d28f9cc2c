"""ALS on a planted low-rank structure, and the MLflow record of the grid (parent + one child per point)."""

import json
from pathlib import Path

import pytest

from pipeline.models.als import best_point, grid_points, parallel_fits, search_grid
from pipeline.models.baseline import BiasBaseline
from pipeline.models.grid_search import (
    SKIPPED_BY_RANK_WALK,
    best_first,
    halving_rungs,
    improves,
    rank_groups,
    reg_chains,
    walk_chain,
    walk_ranks,
)
from pipeline.models.metrics import rating_metrics
from stage_inputs import planted_ratings, write_split

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder, frames = write_split(tmp_path_factory.mktemp("split") / "etl", planted_ratings())
    return folder, frames


def test_als_learns_a_planted_low_rank_structure(spark, planted):
    _, frames = planted
    base = BiasBaseline().fit(frames["train"])
    points = grid_points([1, 3], [0.05], [15])
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points)
    assert [r["rank"] for r in results] == [1, 3]
    assert best_point(results)["rank"] == 3  # the planted rank wins on validation
    als_rmse = rating_metrics(frames["test"], model.predict, base, frames["train"])["test_rmse"]
    base_rmse = rating_metrics(frames["test"], base.predict, base, frames["train"])["test_rmse"]
    assert als_rmse < 0.75 * base_rmse, (als_rmse, base_rmse)


def test_a_diverged_first_fit_never_wins_the_grid(spark, planted, monkeypatch):
    """Regression: the best-so-far test ``(rmse, i) < (best_rmse, best_i)`` is False against a NaN, so when the
    grid's first fit diverged (validation RMSE NaN) nothing replaced it and the diverged fit was the model."""
    from pipeline.models import als

    _, frames = planted
    base = BiasBaseline().fit(frames["train"])
    scored = als.rating_metrics

    def first_diverges(validation, predict, *args, **kwargs):
        scores = scored(validation, predict, *args, **kwargs)
        if predict.__self__.meta["params"]["rank"] == 1:
            scores.update(val_rmse=float("nan"), val_mae=float("nan"))
        return scores

    monkeypatch.setattr(als, "rating_metrics", first_diverges)
    points = grid_points([1, 2, 3], [0.05], [5])
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points)
    assert results[0]["val_rmse"] != results[0]["val_rmse"]  # the first fit scored NaN
    finite = min(results[1:], key=lambda r: r["val_rmse"])
    assert model.meta["params"] == best_point(results) == {k: finite[k] for k in ("rank", "reg_param", "max_iter")}
    assert best_point([{**results[0], "val_rmse": float("nan")}, {**results[1], "val_rmse": 0.9}])["rank"] == 2


def test_a_diverged_fit_is_worse_than_every_score_and_the_line_searches_go_on_after_it():
    nan = float("nan")
    lower = lambda new, old: new < old  # noqa: E731
    higher = lambda new, old: new > old  # noqa: E731
    assert not improves(nan, 0.7, lower) and improves(0.7, nan, lower) and not improves(nan, nan, higher)
    assert sorted([0.7, nan, 0.6], key=lambda s: best_first(s, False))[:2] == [0.6, 0.7]
    assert sorted([0.1, nan, 0.2], key=lambda s: best_first(s, True))[:2] == [0.2, 0.1]
    # the lowest regParam diverged: the chain goes on to the next one instead of stopping at it
    assert list(walk_chain([0, 1, 2], lambda i: [nan, 0.7, 0.6][i], lower)) == [0, 1, 2]
    assert list(walk_chain([0, 1, 2], lambda i: [nan, 0.1, 0.2][i], higher)) == [0, 1, 2]
    # every fit of the lowest rank diverged: the walk goes on to the next rank
    assert walk_ranks([[0], [1], [2]], lambda g: [[nan], [0.7], [0.6]][g[0]], lower) == [0, 1, 2]


def test_halving_plan_screens_every_point_with_fewer_iterations_then_refits_the_best():
    plan = halving_rungs(15, 15, eta=3, min_iters=3)
    assert [(round(r["fraction"] * 15), r["points"], r["keep"]) for r in plan] == [(5, 15, 5), (15, 5, 1)]
    plan = halving_rungs(15, 30, eta=3, min_iters=3)
    assert [(round(r["fraction"] * 30), r["points"], r["keep"]) for r in plan] == [(3, 15, 5), (10, 5, 2), (30, 2, 1)]
    assert halving_rungs(15, 5, eta=3, min_iters=3) == [{"fraction": 1.0, "points": 15, "keep": 1}]  # no room
    plan = halving_rungs(15, 15, eta=5, min_iters=3)  # the default: a fifth of the points go on to all iterations
    assert [(round(r["fraction"] * 15), r["points"], r["keep"]) for r in plan] == [(3, 15, 3), (15, 3, 1)]
    plan = halving_rungs(4, 10, eta=5, min_iters=3)  # implicit ALS: no room for a 5x step, one screen at 3
    assert [(round(r["fraction"] * 10), r["points"], r["keep"]) for r in plan] == [(3, 4, 1), (10, 1, 1)]


def test_fits_side_by_side_are_the_params_or_every_ranks_chain_below_two_million_training_rows():
    assert parallel_fits(1, 800_000, 3) == 1 and parallel_fits(5, 20_000_000, 3) == 5  # the Param, where set
    assert parallel_fits(0, 800_000, 3) == 3  # the default grid at 1 M ratings: the three ranks' chains at once
    assert parallel_fits(0, 800_000, 1) == 2 and parallel_fits(0, 800_000, 9) == 4  # at least 2, at most 4
    assert parallel_fits(0, 2_000_000, 3) == 2 and parallel_fits(0, 8_000_000, 3) == 2  # compute-bound fits
    assert parallel_fits(0, 8_000_000, 2, at_scale=1) == 1 and parallel_fits(0, 800_000, 2, at_scale=1) == 2
    assert parallel_fits(2, 8_000_000, 2, at_scale=1) == 2  # the implicit grid's one at a time yields to the Param


def test_halving_refits_the_best_point_with_all_its_iterations(spark, planted):
    _, frames = planted
    base = BiasBaseline().fit(frames["train"])
    points = grid_points([1, 3], [0.05, 1.0], [12])
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points, strategy="halving",
                                 eta=2, min_rows=200)
    rungs = model.meta["search"]["rungs"]
    assert [len(r["points"]) for r in rungs] == [4, 2, 1] and rungs[-1]["fraction"] == 1.0
    assert [r["rung_iters"] for r in results if len(r["rung_iters"]) == 3] == [[3, 6, 12]]
    assert best_point(results) == model.meta["params"] and model.meta["params"]["rank"] == 3
    assert sum(r["val_rmse"] is not None for r in results) == 1  # only the last rung's point ran in full
    # under min_rows training rows halving is the full grid
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points, strategy="halving")
    assert model.meta["search"]["strategy"] == "full" and all(r["val_rmse"] is not None for r in results)


def test_grid_is_logged_as_a_parent_with_one_nested_run_per_point(spark, tmp_path):
    import mlflow

    from pipeline import stages
    from pipeline.config import load_settings
    from pipeline.models.als import run_als
    from pipeline.models.reference import run_baseline

    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    write_split(tmp_path / "run" / "etl", planted_ratings())
    ctx = stages.make_context(work_dir=tmp_path / "run", settings=settings, params={
        "als_ranks": [2, 3], "als_reg_params": [0.05, 0.1], "als_max_iters": [5]})
    run_baseline(ctx)
    section = run_als(ctx)["models"]["als"]
    assert section["grid"] == grid_points([2, 3], [0.05, 0.1], [5])
    assert set(section) >= {"best_params", "val_rmse", "test_rmse", "test_mae", "test_rows", "cold_test_rows",
                            "cold_test_rmse", "mlflow_run_id", "ranking"}
    assert set(section["ranking"]) >= {"val_ndcg_at_10", "test_ndcg_at_10", "test_precision_at_10",
                                       "test_recall_at_10", "test_map_at_10", "users", "test_lists"}

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    parent = client.get_run(section["mlflow_run_id"])
    assert parent.data.params["best_rank"] == str(section["best_params"]["rank"])
    assert parent.data.metrics["test_rmse"] == pytest.approx(section["test_rmse"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    logged = sorted((c.data.params["rank"], c.data.params["reg_param"], c.data.params["max_iter"]) for c in children)
    assert logged == [("2", "0.05", "5"), ("2", "0.1", "5"), ("3", "0.05", "5"), ("3", "0.1", "5")]
    assert all("val_rmse" in c.data.metrics and "fit_s" in c.data.metrics for c in children)
    # runs are open around the work they record: each child lasts at least its fit, inside its parent
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.info.end_time - child.info.start_time >= 1000 * child.data.metrics["fit_s"] - 5
        assert parent.info.start_time <= child.info.start_time <= child.info.end_time <= parent.info.end_time
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"als_val_rmse_heatmap.png", "grid.json", "item_factors"} <= artifacts
    grid = json.loads((tmp_path / "run" / "als" / "grid.json").read_text())
    assert len(grid) == 4


def test_line_search_walks_each_ranks_regparams_upwards_and_stops_at_the_first_worse_one():
    points = grid_points([10, 50], [0.2, 0.05, 0.1], [15])
    chains = reg_chains(points)
    assert [[(points[i]["rank"], points[i]["reg_param"]) for i in chain] for chain in chains] == [
        [(10, 0.05), (10, 0.1), (10, 0.2)], [(50, 0.05), (50, 0.1), (50, 0.2)]]
    rmse = {0.05: 0.70, 0.1: 0.68, 0.2: 0.69}  # U-shaped: the minimum inside the chain
    walked = walk_chain(chains[0], lambda i: rmse[points[i]["reg_param"]], lambda new, old: new < old)
    assert sorted(points[i]["reg_param"] for i in walked) == [0.05, 0.1, 0.2]  # the worse 0.2 ends it
    rmse = {0.05: 0.66, 0.1: 0.72, 0.2: 0.78}  # the edge: one step past it, the rest never fitted
    walked = walk_chain(chains[1], lambda i: rmse[points[i]["reg_param"]], lambda new, old: new < old)
    assert sorted(points[i]["reg_param"] for i in walked) == [0.05, 0.1]
    nan = float("nan")  # a diverged fit counts as worse
    assert len(walk_chain([0, 1, 2], lambda i: [0.7, nan, 0.6][i], lambda new, old: new < old)) == 2


def test_halving_with_the_line_search_skips_regparams_past_the_first_worse_one(spark, planted):
    _, frames = planted
    base = BiasBaseline().fit(frames["train"])
    points = grid_points([1, 3], [0.05, 1.0, 5.0], [12])
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points, strategy="halving",
                                 eta=2, min_rows=200, line_search=True)
    screened = [(r["rank"], r["reg_param"]) for r in results if r.get("rung_val_rmse")]
    assert screened == [(1, 0.05), (1, 1.0), (3, 0.05), (3, 1.0)]  # 1.0 is worse than 0.05: 5.0 never fitted
    assert all(r["skipped"].startswith("line search") for r in results if r["reg_param"] == 5.0)
    assert model.meta["search"]["line_search"] and model.meta["search"]["rungs"][0]["points"] == [0, 1, 3, 4]
    assert best_point(results) == {"rank": 3, "reg_param": 0.05, "max_iter": 12}


def test_the_finalists_are_walked_rank_by_rank_up_to_the_first_rank_that_scores_worse():
    points = grid_points([50, 10, 25], [0.05, 0.1], [15])
    groups = rank_groups(points, [0, 1, 2, 3, 5])
    assert [[(points[i]["rank"], points[i]["reg_param"]) for i in g] for g in groups] == [
        [(10, 0.05), (10, 0.1)], [(25, 0.1)], [(50, 0.05), (50, 0.1)]]
    rmse = {(10, 0.05): 0.69, (10, 0.1): 0.68, (25, 0.1): 0.685, (50, 0.05): 0.60, (50, 0.1): 0.61}
    seen = []

    def score_group(group):
        seen.append(group)
        return [rmse[points[i]["rank"], points[i]["reg_param"]] for i in group]

    lower = lambda new, old: new < old  # noqa: E731
    # rank 10's best (0.68) beats rank 25's (0.685): rank 50 is never fitted, although it would have won
    assert walk_ranks(groups, score_group, lower) == [2, 3, 5] and seen == groups[:2]
    rmse[25, 0.1] = 0.67  # improving ranks: every finalist is fitted
    assert walk_ranks(groups, score_group, lower) == [2, 3, 5, 0, 1]
    nan = float("nan")  # a rank whose fits all diverged counts as worse; NaN is never a rank's best
    assert walk_ranks([[0], [1], [2]], lambda g: [[0.7], [nan], [0.6]][g[0]], lower) == [0, 1]
    assert walk_ranks([[0, 1], [2]], lambda g: {0: [nan, 0.7], 2: [0.75]}[g[0]], lower) == [0, 1, 2]
    higher = lambda new, old: new > old  # noqa: E731  (implicit ALS: NDCG, higher is better)
    assert walk_ranks([[0], [1], [2]], lambda g: [[0.10], [0.12], [0.11]][g[0]], higher) == [0, 1, 2]
    assert walk_ranks([[0], [1], [2]], lambda g: [[0.12], [0.10], [0.13]][g[0]], higher) == [0, 1]


def test_halving_with_the_line_search_stops_the_finalists_at_the_first_rank_that_scores_worse(spark, planted):
    _, frames = planted
    base = BiasBaseline().fit(frames["train"])
    points = grid_points([1, 2, 3, 10, 20, 40], [0.05], [9])  # eta 2: three finalists
    results, model = search_grid(spark, frames["train"], frames["validation"], base, points, strategy="halving",
                                 eta=2, min_rows=200, line_search=True)
    finalists = [r["rank"] for r in results if len(r.get("rung_iters", [])) == 2 or r.get("skipped")]
    assert finalists == [10, 20, 40]  # the screen's best three
    full = {r["rank"]: r["val_rmse"] for r in results if r["val_rmse"] is not None}
    assert sorted(full) == [10, 20] and full[20] > full[10]  # rank 20 scored worse: rank 40 never refitted
    assert [r["rank"] for r in results if r.get("skipped") == SKIPPED_BY_RANK_WALK] == [40]
    assert model.meta["search"]["rungs"][-1]["points"] == [3, 4]
    assert best_point(results) == {"rank": 10, "reg_param": 0.05, "max_iter": 9}


def test_the_grid_imports_spark_ml_before_its_worker_threads_start(tmp_path):
    """Regression: ``recsys run --stages als`` in a fresh process (an Airflow task) crashed with "cannot access
    submodule 'ml' of module 'pyspark'": one worker thread was importing pyspark.ml.recommendation while the
    other logged its point to MLflow, whose Param checks ``pyspark.ml.param`` once ``pyspark.ml`` is in
    sys.modules. The grid must import it before any thread starts; checked in a fresh interpreter, where
    nothing imported it earlier."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import contextlib, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from stage_inputs import planted_ratings
        from pipeline.config import load_settings
        from pipeline.spark import get_spark
        from pipeline.models.als import grid_points, search_grid
        from pipeline.models.baseline import BiasBaseline
        assert "pyspark.ml.recommendation" not in sys.modules
        seen = []

        @contextlib.contextmanager
        def track(point):
            seen.append("pyspark.ml.recommendation" in sys.modules)
            yield lambda params, metrics: None

        ratings = planted_ratings(n_users=30, n_movies=20)
        base = BiasBaseline().fit(ratings)
        spark = get_spark(load_settings({{"RECSYS_HOME": {str(tmp_path)!r}}}))
        search_grid(spark, ratings, ratings, base, grid_points([1, 2], [0.1], [2]), workers=2, track=track)
        print("imported before every track:", all(seen), len(seen))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported before every track: True 2" in done.stdout, done.stdout


def test_pandas_reaches_spark_through_arrow_even_where_spark_defaults_turn_it_off(tmp_path):
    """The ALS stages hand Spark their training rows as pandas frames and collect every model's factors back:
    without Arrow, row by row, 20 M rows take 394 s instead of 30 s
    (docs/adr/0041-arrow-pinned-for-pandas-and-spark.md)."""
    import os
    import subprocess
    import sys

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("spark.sql.execution.arrow.pyspark.enabled false\n")
    code = ("from pipeline.config import load_settings; from pipeline.spark import get_spark; "
            f"s = get_spark(load_settings({{'RECSYS_HOME': {str(tmp_path / 'home')!r}}})); "
            "print('ARROW', s.conf.get('spark.sql.execution.arrow.pyspark.enabled')); s.stop()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SPARK_CONF_DIR": str(conf)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ARROW true" in done.stdout


def test_the_training_rows_reach_spark_through_a_parquet_file_that_is_removed_afterwards(spark, planted, tmp_path):
    import pandas as pd

    from pipeline.spark import frame_from_pandas

    _, frames = planted
    rows = frames["train"][["user_idx", "movie_idx", "rating"]].reset_index(drop=True)
    with frame_from_pandas(spark, rows, tmp_path) as frame:
        assert [p.suffix for p in tmp_path.iterdir()] == [".parquet"]  # not hidden: Spark skips . and _ names
        back = frame.toPandas().sort_values(["user_idx", "movie_idx"], ignore_index=True)
    pd.testing.assert_frame_equal(back, rows.sort_values(["user_idx", "movie_idx"], ignore_index=True))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), frame_from_pandas(spark, rows, tmp_path):
        raise RuntimeError("a fit failed")
    assert list(tmp_path.iterdir()) == []
    with frame_from_pandas(spark, rows) as frame:  # no folder: createDataFrame
        assert frame.count() == len(rows)

    base = BiasBaseline().fit(frames["train"])
    staged, _ = search_grid(spark, frames["train"], frames["validation"], base, grid_points([3], [0.05], [5]),
                            staging=tmp_path)
    direct, _ = search_grid(spark, frames["train"], frames["validation"], base, grid_points([3], [0.05], [5]))
    assert staged[0]["val_rmse"] == pytest.approx(direct[0]["val_rmse"], abs=1e-6)
    assert list(tmp_path.iterdir()) == []
