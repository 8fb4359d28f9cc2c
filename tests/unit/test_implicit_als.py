"""Implicit-feedback ALS on its two engines (``pipeline.models.implicit_als``): the ``implicit`` library's fit
on tiny generated data (the confidence it is given, BLAS at one thread, a planted preference ranked first) and
the Param ``ials_engine`` choosing the engine and its grid in the stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ranking import clustered_choices

from pipeline import stages
from pipeline.config import load_settings
from pipeline.models import implicit_als
from pipeline.models.implicit_als import Interactions, library_fit
from stage_inputs import write_split

POINT = {"rank": 8, "reg_param": 0.1, "alpha": 10.0, "max_iter": 15}


def _ratings(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"])
    return df.assign(user_idx=pd.factorize(df["user_id"])[0].astype("int32"),
                     movie_idx=pd.factorize(df["movie_id"])[0].astype("int32"))


def planted_taste(n_per_group: int = 30) -> pd.DataFrame:
    """Two groups of users with disjoint tastes: group A watches movies 1-6 and one popular movie 99, group B
    movies 11-16 and 99. User 1000 of group A has watched 1-5 and 99 (and B's 11): movie 6, which every other A
    user watched, is the planted preference."""
    rows = []
    for u in range(n_per_group):
        rows += [(u, m, 4.0 + (m % 2) * 0.5) for m in (1, 2, 3, 4, 5, 6, 99)]
        rows += [(100 + u, m, 4.0) for m in (11, 12, 13, 14, 15, 16, 99)]
    rows += [(1000, m, 4.5) for m in (1, 2, 3, 4, 5, 99)] + [(1000, 11, 2.0)]
    return _ratings(rows)


def test_the_confidence_is_one_plus_alpha_times_the_rating_share():
    train = _ratings([(7, 50, 5.0), (7, 60, 2.5), (8, 60, 1.0)])
    c = Interactions(train).confidence(10.0)
    assert c.shape == (2, 2) and c.dtype == np.float32
    assert np.allclose(c.toarray(), [[1 + 10 * 5.0 / 5, 1 + 10 * 2.5 / 5], [0.0, 1 + 10 * 1.0 / 5]])


def test_the_library_ranks_a_planted_preference_first_with_blas_at_one_thread(monkeypatch):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_info, threadpool_limits

    blas_threads, fit = [], AlternatingLeastSquares.fit

    def recorded(self, *args, **kwargs):
        blas_threads.extend(api["num_threads"] for api in threadpool_info() if api["user_api"] == "blas")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AlternatingLeastSquares, "fit", recorded)
    train = planted_taste()
    with threadpool_limits(limits=2, user_api="blas"):  # more than one outside the fit
        model = library_fit(Interactions(train), POINT, seed=3)[0]
        outside = [api["num_threads"] for api in threadpool_info() if api["user_api"] == "blas"]
    assert blas_threads and set(blas_threads) == {1} and max(outside) == 2
    seen = {1000: set(train.loc[train.user_id == 1000, "movie_id"])}
    top = model.top_k([1000], 3, exclude=seen)[1000]
    assert top[0] == 6, top
    assert set(top[1:]) <= {12, 13, 14, 15, 16}  # the rest of the catalogue, unseen by the user
    assert model.meta == {"params": POINT, "scores": "preference", "engine": "implicit"}
    assert model.user_factors.shape == (61, 8) and model.item_factors.shape == (13, 8)
    again = library_fit(Interactions(train), POINT, seed=3)[0]  # seeded: the same factors
    assert np.allclose(again.item_factors, model.item_factors, atol=1e-5)


def test_a_fit_that_goes_on_from_fewer_iterations_is_the_longer_fit():
    """Successive halving's later rung goes on from the earlier rung's library model: the same factors as one
    fit with all the iterations, and the earlier rung's FactorModel keeps its own."""
    data = Interactions(planted_taste())
    screen, als = library_fit(data, {**POINT, "max_iter": 3}, seed=5)
    before = screen.user_factors.copy()
    resumed = library_fit(data, POINT, seed=5, resume=(als, 3))[0]
    whole = library_fit(data, POINT, seed=5)[0]
    assert np.allclose(resumed.user_factors, whole.user_factors, atol=1e-4)
    assert np.allclose(resumed.item_factors, whole.item_factors, atol=1e-4)
    assert np.array_equal(screen.user_factors, before) and not np.allclose(before, whole.user_factors, atol=1e-3)
    assert resumed.meta["params"]["max_iter"] == 15


def _stage(tmp_path, **params) -> dict:
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    write_split(tmp_path / "run" / "etl", clustered_choices())
    ctx = stages.make_context(run_id="engine", work_dir=tmp_path / "run", settings=settings, params={
        "ials_ranks": [4, 8], "ials_reg_params": [1.0], "ials_alphas": [10.0], "ials_max_iters": [6],
        "ials_spark_ranks": [3], "ials_spark_reg_params": [0.1, 0.3], "ials_spark_alphas": [1.0],
        "ials_spark_max_iters": [4], **params})
    for stage in ("baseline", "implicit_als"):
        stages.run_stage(stage, ctx)
    return stages.report.write_report(ctx, stages.ORDER)["models"]["implicit_als"]


def _refused(*args, **kwargs):
    raise AssertionError("the other engine ran")


def test_the_library_is_the_default_engine_with_its_own_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(implicit_als, "spark_fit", _refused)
    section = _stage(tmp_path)
    assert section["engine"] == "implicit"
    assert [(g["rank"], g["reg_param"], g["alpha"], g["max_iter"]) for g in section["grid"]] == [
        (4, 1.0, 10.0, 6), (8, 1.0, 10.0, 6)]
    assert all(g["val_ndcg_at_10"] > 0.3 for g in section["grid"])
    assert section["best_params"]["rank"] in (4, 8) and section["search"]["strategy"] == "full"


@pytest.mark.spark
def test_the_spark_engine_runs_its_own_grid(spark, tmp_path, monkeypatch):
    monkeypatch.setattr(implicit_als, "library_fit", _refused)
    section = _stage(tmp_path, ials_engine="spark")
    assert section["engine"] == "spark"
    assert [(g["rank"], g["reg_param"], g["alpha"], g["max_iter"]) for g in section["grid"]] == [
        (3, 0.1, 1.0, 4), (3, 0.3, 1.0, 4)]
    assert section["best_params"]["rank"] == 3


def test_an_unknown_engine_is_refused_by_the_params():
    from pipeline.errors import ConfigError
    from pipeline.params import resolve_params

    assert resolve_params({}).ials_engine == "implicit"
    assert resolve_params({"ials_engine": "spark"}).ials_engine == "spark"
    with pytest.raises(ConfigError):
        resolve_params({"ials_engine": "gpu"})


def test_under_halving_a_finalist_adds_only_the_iterations_it_lacks(tmp_path, monkeypatch):
    from implicit.cpu.als import AlternatingLeastSquares

    sweeps, fit = [], AlternatingLeastSquares.fit

    def counted(self, *args, **kwargs):
        sweeps.append(self.iterations)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AlternatingLeastSquares, "fit", counted)
    monkeypatch.setattr(implicit_als, "HALVING_MIN_ROWS", 1)  # tiny data counts as large
    section = _stage(tmp_path, ials_max_iters=[9], ials_reg_params=[0.5, 1.0], als_halving_eta=3,
                     als_line_search=False)
    assert [g["rung_iters"] for g in section["grid"]].count([3, 9]) == 2  # 2 of the 4 points go on
    assert sweeps == [3, 3, 3, 3, 6, 6]
