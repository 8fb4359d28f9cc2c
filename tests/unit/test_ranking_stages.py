"""The ranking stages end to end on tiny data: the candidates (implicit ALS, EASE, the rating models' lists),
the comparison, the second gate (promote a ranker that beats popularity; keep out a worse one), and the
cold-start stage. Implicit ALS runs on its default engine, the ``implicit`` library, unless a test names Spark."""

from __future__ import annotations

import mlflow
import pytest
from test_ranking import clustered_choices

from pipeline import stages
from pipeline.config import load_settings
from pipeline.registry import CHAMPION
from stage_inputs import write_split

SMALL = {"ials_ranks": [8], "ials_reg_params": [0.1], "ials_alphas": [1.0], "ials_max_iters": [8],
         "ease_lambdas": [5.0, 50.0], "ease_min_ratings": 1, "cold_start_known_ratings": 3}


def _run(tmp_path, settings, name, params):
    run_dir = tmp_path / name
    write_split(run_dir / "etl", clustered_choices())
    ctx = stages.make_context(run_id=name, work_dir=run_dir, settings=settings, params=params)
    for stage in ("baseline", "implicit_als", "ease", "compare_models", "ranking_gate", "ranking_promotion"):
        stages.run_stage(stage, ctx)
    return ctx, stages.report.write_report(ctx, stages.ORDER)


def test_ranking_candidates_the_second_gate_and_a_worse_ranker_kept_out(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    _, first = _run(tmp_path, settings, "first", SMALL)
    ranking = first["ranking"]
    assert set(ranking["candidates"]) == {"baseline", "implicit_als", "ease"}
    assert ranking["best_by_validation_ndcg"] in ("implicit_als", "ease")
    for candidate in ranking["candidates"].values():
        assert {"val_ndcg_at_10", "test_ndcg_at_10", "test_precision_at_10", "test_recall_at_10", "users",
                "test_lists"} <= set(candidate)
    assert ranking["popularity"]["test_ndcg_at_10"] < ranking["candidates"]["ease"]["test_ndcg_at_10"]
    promoted = first["ranking_promotion"]
    assert promoted["decision"] == "promoted" and promoted["champion_version"] == "1"
    assert promoted["challenger_test_ndcg_at_10"] > promoted["popularity_test_ndcg_at_10"]
    ease = first["models"]["ease"]
    assert {g["lambda"] for g in ease["grid"]} == {5.0, 50.0} and ease["best_lambda"] in (5.0, 50.0)

    # a sabotaged ranker (EASE with an enormous lambda, rank-1 implicit ALS) is kept out
    worse = {**SMALL, "ials_ranks": [1], "ials_max_iters": [1], "ease_lambdas": [1e8]}
    _, second = _run(tmp_path, settings, "second", worse)
    kept = second["ranking_promotion"]
    assert kept["decision"] == "kept" and kept["champion_version"] == "1"
    assert kept["challenger_test_ndcg_at_10"] < kept["champion_test_ndcg_at_10_before"]
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    assert str(client.get_model_version_by_alias(settings.registered_ranker, CHAMPION).version) == "1"
    # the ranker loads from the registry and ranks without Spark
    from pipeline.registry import load_registered

    model = load_registered(settings.registered_ranker, "1")
    assert model.top_k([1], 5, exclude={1: {101}}, history={1: {101, 102}})[1]


def _halving_run(tmp_path, monkeypatch, name, **extra):
    """baseline and implicit_als on the clustered choices, a 2 x 2 grid halved at eta 3 (tiny data counts as
    large), ``extra`` Params on top: (settings, the implicit_als report section)."""
    from pipeline.models import implicit_als

    monkeypatch.setattr(implicit_als, "HALVING_MIN_ROWS", 1)
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    run_dir = tmp_path / name
    write_split(run_dir / "etl", clustered_choices())
    params = {**SMALL, "ials_ranks": [2, 8], "ials_reg_params": [0.1, 1.0], "ials_max_iters": [9], "als_halving_eta": 3,
              **extra}
    ctx = stages.make_context(run_id=name, work_dir=run_dir, settings=settings, params=params)
    for stage in ("baseline", "implicit_als"):
        stages.run_stage(stage, ctx)
    return settings, stages.report.write_report(ctx, stages.ORDER)["models"]["implicit_als"]


def test_implicit_als_grid_halves_over_iterations_on_large_data(tmp_path, monkeypatch):
    settings, section = _halving_run(tmp_path, monkeypatch, "halving")
    grid = section["grid"]
    assert [g["rung_iters"] for g in grid].count([3]) == 2  # the two cut after the first rung (3 of 9 iterations)
    finalists = [g for g in grid if g["val_ndcg_at_10"] is not None]
    assert len(finalists) == 2 and all(g["rung_iters"] == [3, 9] for g in finalists)
    assert all(len(g["rung_val_ndcg_at_10"]) == len(g["rung_iters"]) for g in grid)
    # the model is the best validation NDCG@10 of every fit, the screen's 3-iteration fits included
    fits = [(score, iters == 9, {**g, "max_iter": iters}) for g in grid
            for score, iters in zip(g["rung_val_ndcg_at_10"], g["rung_iters"])]
    best = max(fits, key=lambda f: f[:2])[2]
    assert section["best_params"] == {k: best[k] for k in ("rank", "reg_param", "alpha", "max_iter")}
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    parent = client.get_run(section["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # one child run per fit: the 4 screens and the finalists' refits, each as long as its own fit
    assert len(children) == sum(len(rung["points"]) for rung in section["search"]["rungs"]) > 4


def test_implicit_als_keeps_a_screen_fit_that_ranks_better_than_the_refits(tmp_path, monkeypatch):
    """At 10 M and 25 M ratings a finalist's 3-iteration screen fit ranked better on validation than its
    10-iteration refit: the screen's fit is then the model, its iterations chosen on validation
    (docs/adr/0040-implicit-als-chooses-among-every-fit.md)."""
    from pipeline.models import implicit_als

    def scored(model, split, **kwargs):  # fewer iterations rank better here; then the higher rank, lower reg
        fitted = model.meta["params"]
        return {"val_ndcg_at_10": 0.3 + 0.01 * fitted["rank"] - 0.001 * fitted["reg_param"]
                + (0.1 if fitted["max_iter"] < 9 else 0.0)}

    monkeypatch.setattr(implicit_als, "evaluate_ranking", scored)
    settings, section = _halving_run(tmp_path, monkeypatch, "screen")
    assert section["best_params"] == {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3}
    assert any(g["rung_iters"] == [3, 9] for g in section["grid"])  # the refits ran and lost
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    assert client.get_run(section["mlflow_run_id"]).data.params["best_max_iter"] == "3"


@pytest.mark.spark
def test_implicit_als_on_spark_fits_its_ranks_side_by_side_and_chooses_as_one_at_a_time(spark, tmp_path,
                                                                                       monkeypatch):
    """On the Spark engine, below 2 M training rows the screen's regParam chains (one per rank) run side by side,
    the explicit grid's way: the same fits, scores and choice as one fit at a time (als_parallel_fits=1)."""
    import threading
    import time

    from pipeline.models import implicit_als

    fit_point, lock, running, most = implicit_als.spark_fit, threading.Lock(), [0], {}

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[name] = max(most.get(name, 0), running[0])
        time.sleep(0.5)  # long enough for the other chain's fit to start beside this one
        try:
            return fit_point(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(implicit_als, "spark_fit", counted)
    sections = {}
    spark_grid = {"ials_engine": "spark", "ials_spark_ranks": [2, 8], "ials_spark_reg_params": [0.1, 1.0],
                  "ials_spark_alphas": [1.0], "ials_spark_max_iters": [9]}
    for name, fits in (("together", 0), ("one", 1)):
        sections[name] = _halving_run(tmp_path, monkeypatch, name, als_parallel_fits=fits, **spark_grid)[1]
    assert most == {"together": 2, "one": 1}
    def timeless(grid):
        return [{k: v for k, v in g.items() if k != "fit_s"} for g in grid]

    assert timeless(sections["together"]["grid"]) == timeless(sections["one"]["grid"])
    assert sections["together"]["best_params"] == sections["one"]["best_params"]


def test_implicit_als_breaks_a_tie_by_all_the_iterations_then_the_earlier_grid_point(tmp_path, monkeypatch):
    """The fits run side by side, so which one finishes first varies: a tie goes to the fit with all its
    iterations, then to the earlier grid point, never to the order of completion."""
    from pipeline.models import implicit_als

    monkeypatch.setattr(implicit_als, "evaluate_ranking", lambda model, split, **kwargs: {"val_ndcg_at_10": 0.5})
    section = _halving_run(tmp_path, monkeypatch, "ties")[1]
    assert section["best_params"] == {"rank": 2, "reg_param": 0.1, "alpha": 1.0, "max_iter": 9}
