"""Stage ``baseline``: the references every model of the run is measured against, on the run's split.

- the damped user+item bias baseline (damping chosen on validation RMSE), saved as a rank-0 ``FactorModel`` so
  that it has the same interface and registry wrapper as the other models; every later model stage, the gate
  and the evaluation load it from this stage's output as the fallback for cold rows;
- the global mean (test RMSE/MAE);
- the popularity ranking (``pipeline.models.popularity``), scored with the ranking metrics and the list figures
  (``pipeline.models.list_metrics``) as every candidate is.
"""

from __future__ import annotations

import numpy as np

from pipeline import storage
from pipeline.models.baseline import GlobalMean, fit_best_damping
from pipeline.models.factor_model import FactorModel
from pipeline.models.list_metrics import mlflow_metrics, quality_of_lists
from pipeline.models.metrics import rating_metrics
from pipeline.models.popularity import PopularityRanker
from pipeline.models.protocol import Fitted, Split, load_split, require_enough_data, run_candidate
from pipeline.models.ranking import evaluate_ranking


def bias_model(baseline) -> FactorModel:
    """The fitted bias baseline as a rank-0 factor model (its own fallback)."""
    users, movies = baseline.user_bias_.index.to_numpy(), baseline.item_bias_.index.to_numpy()
    return FactorModel("baseline", user_ids=users, movie_ids=movies, user_factors=np.zeros((len(users), 0)),
                       item_factors=np.zeros((len(movies), 0)), baseline=baseline, fallback=baseline,
                       meta={"params": {"damping_user": baseline.damping_user,
                                        "damping_item": baseline.damping_item}})


def popularity_metrics(split: Split, lists_path=None) -> dict:
    """The popularity list through the ranking protocol (the bar every ranker must beat), with the list figures
    of its test lists when they are written (``lists_path``)."""
    scores = evaluate_ranking(PopularityRanker(split.train), split, lists_path)
    if lists_path is not None:
        scores.update(quality_of_lists(lists_path, split))
    return scores


def run_baseline(ctx) -> dict:
    """Stage ``baseline``: fit and score the references; the bias baseline is the other stages' fallback.

    First, a split too small for the models stops the run here, before any model trains
    (``protocol.require_enough_data``); its counts go into the manifest for the stages after it."""
    counts = require_enough_data(load_split(ctx, "baseline"), ctx.stage_dir("etl"))

    def fit(split: Split, _baseline, folder, _run) -> Fitted:
        baseline, damping_grid = fit_best_damping(split.train, split.validation)
        global_mean = GlobalMean().fit(split.train)
        gm = rating_metrics(split.test, global_mean.predict, baseline, split.train)
        (folder / "damping_grid.json").write_text(storage.strict_json({"damping_grid": damping_grid}, indent=2))
        chosen = {"damping_user": baseline.damping_user, "damping_item": baseline.damping_item}
        popularity = popularity_metrics(split, folder / "popularity_test_lists.parquet")
        popularity["test_lists"] = str(ctx.stage_dir("baseline") / "popularity_test_lists.parquet")
        return Fitted(bias_model(baseline), params=chosen,
                      metrics={"global_mean_test_rmse": gm["test_rmse"],
                               "popularity_test_ndcg_at_10": popularity["test_ndcg_at_10"] or 0.0,
                               **mlflow_metrics(popularity, "popularity_test_")},
                      artifacts=[folder / "damping_grid.json"],
                      section={"global_mean": {"test_rmse": gm["test_rmse"], "test_mae": gm["test_mae"]},
                               "damping_grid": damping_grid},
                      sections={"ranking": {"popularity": popularity}},
                      manifest={"popularity": popularity, "split_counts": counts})

    return run_candidate(ctx, "baseline", fit, eligible=False, log_model=False, needs_baseline=False)
