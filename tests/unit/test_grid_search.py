"""The one grid search both ALS stages run (``pipeline.models.als``): which fit it chooses when a fit diverges
(NaN) or two fits tie, the same way for the explicit grid (lower validation RMSE is better) and the implicit
one (higher validation NDCG@10 is better)."""

from __future__ import annotations

import contextlib
import json

import pytest
from test_ranking import clustered_choices

from pipeline import stages
from pipeline.config import load_settings
from pipeline.models import als, implicit_als
from pipeline.models.grid_search import NDCG, RMSE, SKIPPED_BY_LINE_SEARCH, halving_rungs, run_search
from stage_inputs import write_split

NAN = float("nan")


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
IMPLICIT_GRID = implicit_als.grid_points([2, 8], [0.1, 1.0], [1.0], [9])


def _fake(score_of):
    """(fit, score, fits) for ``run_search`` without Spark: a "model" is the point with the iterations it ran,
    scored ``score_of(model)`` on every metric; ``fits`` lists (rank, regParam, iterations) in fitting order."""
    fits = []

    def fit(point, iters):
        fits.append((point["rank"], point["reg_param"], iters))
        return {**point, "max_iter": iters}

    def score(model):
        return dict.fromkeys(("val_rmse", "val_mae", "val_ndcg_at_10"), score_of(model))

    return fit, score, fits


def test_the_explicit_search_chooses_the_best_finite_fit_when_the_first_one_diverged():
    points = als.grid_points([1, 2, 3], [0.1], [5])
    fit, score, fits = _fake(lambda m: {1: NAN, 2: 0.90, 3: 0.85}[m["rank"]])
    searched = run_search(points, fit, score, RMSE, [{"fraction": 1.0, "points": 3, "keep": 1}])
    assert fits == [(1, 0.1, 5), (2, 0.1, 5), (3, 0.1, 5)]
    assert searched.point == {"rank": 3, "reg_param": 0.1, "max_iter": 5} and searched.score == 0.85
    assert searched.model == searched.point and searched.full
    assert [r["val_rmse"] for r in searched.results][1:] == [0.90, 0.85]


def test_the_implicit_search_skips_a_diverged_fit_and_breaks_a_tie_by_all_the_iterations_then_the_grid():
    """Halving at eta 3 with the line searches, one fit at a time: the first point diverges, every other fit
    scores the same."""
    fit, score, fits = _fake(lambda m: NAN if (m["rank"], m["reg_param"]) == (2, 0.1) else 0.5)
    logged = []

    @contextlib.contextmanager
    def track(point):
        yield lambda params, metrics: logged.append((point["rank"], point["reg_param"], point["max_iter"],
                                                     sorted(metrics)))

    searched = run_search(IMPLICIT_GRID, fit, score, NDCG, halving_rungs(4, 9, 3), line_search=True, track=track)
    # the screen walks both ranks' regParams (past the diverged one), the finalists go rank by rank
    assert fits == [(2, 0.1, 3), (2, 1.0, 3), (8, 0.1, 3), (8, 1.0, 3), (2, 1.0, 9), (8, 0.1, 9)]
    assert searched.point == {"rank": 2, "reg_param": 1.0, "alpha": 1.0, "max_iter": 9} and searched.full
    assert [r["rung_iters"] for r in searched.results] == [[3], [3, 9], [3, 9], [3]]
    assert searched.search["rungs"][0]["points"] == [0, 1, 2, 3] and searched.search["line_search"]
    # one child run per fit, named by the iterations it runs: a screen fit logs its rung's NDCG, a full fit the
    # NDCG itself
    assert (2, 1.0, 3, ["fit_s", "rung0_val_ndcg_at_10"]) in logged
    assert (2, 1.0, 9, ["fit_s", "val_ndcg_at_10"]) in logged
    assert sorted(run[:3] for run in logged if not run[3]) == sorted(fits)  # each fit's params, once


def test_only_the_implicit_search_chooses_among_the_screen_fits_too():
    """The same fits, whose 3-iteration screens score better than the refits with all 9 iterations, under both
    objectives: the explicit grid chooses among the fits with all their iterations, the implicit one among
    every fit (its iterations chosen on validation)."""
    fit, score, _ = _fake(lambda m: {3: 0.7, 9: 0.6}[m["max_iter"]] + 0.01 * m["rank"])
    implicit = run_search(IMPLICIT_GRID, fit, score, NDCG, halving_rungs(4, 9, 3))
    assert implicit.point == {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3} and not implicit.full
    fit, score, _ = _fake(lambda m: {3: 0.6, 9: 0.7}[m["max_iter"]] - 0.01 * m["rank"])  # as an error
    explicit = run_search(IMPLICIT_GRID, fit, score, RMSE, halving_rungs(4, 9, 3))
    assert explicit.point == {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 9} and explicit.full
    assert explicit.results[2]["val_rmse"] == pytest.approx(0.62) and explicit.results[0]["val_rmse"] is None


def test_a_point_the_line_search_never_fitted_is_marked_skipped():
    fit, score, fits = _fake(lambda m: {0.1: 0.5, 1.0: 0.4}[m["reg_param"]])  # NDCG falls past regParam 0.1
    points = implicit_als.grid_points([2], [0.1, 1.0, 5.0], [1.0], [9])
    searched = run_search(points, fit, score, NDCG, halving_rungs(3, 9, 3), line_search=True)
    assert fits == [(2, 0.1, 3), (2, 1.0, 3), (2, 0.1, 9)]
    assert searched.results[2] == {**points[2], "val_ndcg_at_10": None, "fit_s": 0.0, "skipped": SKIPPED_BY_LINE_SEARCH}


@pytest.fixture
def searches(monkeypatch):
    """The objectives ``run_search`` is called with, in order (it still runs): by the ALS grids on Spark
    (``als.grid_search``) and by implicit ALS on the ``implicit`` library."""
    seen, real = [], als.run_search

    def spy(points, fit, score, objective, rungs, **kwargs):
        seen.append(objective)
        return real(points, fit, score, objective, rungs, **kwargs)

    monkeypatch.setattr(als, "run_search", spy)
    monkeypatch.setattr(implicit_als, "run_search", spy)
    return seen


@pytest.mark.spark
def test_the_explicit_grid_goes_through_the_one_search(spark, searches):
    from pipeline.models.baseline import BiasBaseline
    from stage_inputs import planted_ratings

    ratings = planted_ratings(n_users=30, n_movies=20)
    base = BiasBaseline().fit(ratings)
    results, model = als.search_grid(spark, ratings, ratings, base, als.grid_points([1, 2], [0.1], [3]))
    assert searches == [RMSE] and model.meta["params"] == als.best_point(results)


def _implicit_section(tmp_path, monkeypatch, ndcg_of, **params) -> dict:
    """The implicit_als stage on the clustered choices, a 2 x 2 grid halved at eta 3 (tiny data counts as large),
    every fit scored ``ndcg_of(fitted point)`` on validation: its report section."""
    from pipeline.models import implicit_als

    monkeypatch.setattr(implicit_als, "HALVING_MIN_ROWS", 1)
    monkeypatch.setattr(implicit_als, "evaluate_ranking",
                        lambda model, split, **kwargs: {"val_ndcg_at_10": ndcg_of(model.meta["params"])})
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    write_split(tmp_path / "run" / "etl", clustered_choices())
    ctx = stages.make_context(run_id="grid", work_dir=tmp_path / "run", settings=settings, params={
        "ials_ranks": [2, 8], "ials_reg_params": [0.1, 1.0], "ials_alphas": [1.0], "ials_max_iters": [9],
        "als_halving_eta": 3, **params})
    for stage in ("baseline", "implicit_als"):
        stages.run_stage(stage, ctx)
    return stages.report.write_report(ctx, stages.ORDER)["models"]["implicit_als"]


def test_the_implicit_search_never_chooses_a_diverged_fit_and_breaks_a_tie_by_the_earlier_point(
        tmp_path, monkeypatch, searches):
    """Regression: the grid's first fit (rank 2, regParam 0.1) diverges and every other fit ties. The choice was
    ``(ndcg, full, -i) > best``, False against a NaN, so the first fit, scored first one fit at a time, stayed the
    model; now the NaN ranks below every score and the tie goes to the fit with all its iterations, then to the
    earlier grid point."""
    section = _implicit_section(tmp_path, monkeypatch,
                                lambda p: NAN if (p["rank"], p["reg_param"]) == (2, 0.1) else 0.5,
                                als_parallel_fits=1)
    assert section["best_params"] == {"rank": 2, "reg_param": 1.0, "alpha": 1.0, "max_iter": 9}
    grid = section["grid"]
    assert grid[0]["rung_iters"] == [3]  # the diverged screen fit is cut, however NaN compares
    assert [g["rung_iters"] for g in grid[1:]] == [[3, 9], [3, 9], [3]]
    assert searches == [NDCG]  # the explicit grid's search, with the implicit objective (on the library)
    written = json.loads((tmp_path / "run" / "implicit_als" / "grid.json").read_text(), parse_constant=_refuse)
    assert written[0]["rung_val_ndcg_at_10"] == [None]  # strict JSON: the diverged score is null, not NaN
