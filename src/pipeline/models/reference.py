"""Stage ``baseline``: the references every model of the run is measured against, on the run's split.

- the damped user+item bias baseline (damping chosen on validation RMSE), saved as a rank-0 ``FactorModel`` so
  that it has the same interface and registry wrapper as the other models; every later model stage, the gate
  and the evaluation load it from this stage's output as the fallback for cold rows;
- the global mean (test RMSE/MAE);
- the popularity ranking (``pipeline.models.popularity``), scored with the ranking metrics.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline.models.baseline import GlobalMean, fit_best_damping
from pipeline.models.factor_model import FactorModel
from pipeline.models.metrics import ranking_metrics, rating_metrics
from pipeline.models.popularity import top_k_popular
from pipeline.models.protocol import RANKING_K, Fitted, Split, run_candidate


def bias_model(baseline) -> FactorModel:
    """The fitted bias baseline as a rank-0 factor model (its own fallback)."""
    users, movies = baseline.user_bias_.index.to_numpy(), baseline.item_bias_.index.to_numpy()
    return FactorModel("baseline", user_ids=users, movie_ids=movies, user_factors=np.zeros((len(users), 0)),
                       item_factors=np.zeros((len(movies), 0)), baseline=baseline, fallback=baseline,
                       meta={"params": {"damping_user": baseline.damping_user,
                                        "damping_item": baseline.damping_item}})


def popularity_metrics(split: Split) -> dict:
    """Ranking metrics of the popularity list (each user's training movies left out) on the test rows."""
    lists = top_k_popular(split.train, pd.unique(split.test["user_id"]), RANKING_K)
    return ranking_metrics(lists, split.test, k=RANKING_K)


def run_baseline(ctx) -> dict:
    """Stage ``baseline``: fit and score the references; the bias baseline is the other stages' fallback."""

    def fit(split: Split, _baseline, folder, _run) -> Fitted:
        baseline, damping_grid = fit_best_damping(split.train, split.validation)
        global_mean = GlobalMean().fit(split.train)
        gm = rating_metrics(split.test, global_mean.predict, baseline, split.train)
        (folder / "damping_grid.json").write_text(json.dumps({"damping_grid": damping_grid}, indent=2))
        chosen = {"damping_user": baseline.damping_user, "damping_item": baseline.damping_item}
        return Fitted(bias_model(baseline), params=chosen, metrics={"global_mean_test_rmse": gm["test_rmse"]},
                      artifacts=[folder / "damping_grid.json"],
                      section={"global_mean": {"test_rmse": gm["test_rmse"], "test_mae": gm["test_mae"]},
                               "damping_grid": damping_grid},
                      sections={"ranking": {"popularity": popularity_metrics(split)}})

    return run_candidate(ctx, "baseline", fit, eligible=False, log_model=False, needs_baseline=False)
