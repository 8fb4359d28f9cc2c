"""Implicit-feedback ALS (Spark ML ``ALS(implicitPrefs=True)``, Hu, Koren & Volinsky 2008) as a ranking model.

Every rating is an observed interaction (preference 1) whose confidence grows with the rating:
``c = 1 + alpha * rating``. A low rating still says "watched", which is what predicts the next movies a
user rates; the value only weighs it. (Keeping only ratings >= 4 as positives ranks worse on ml-latest-small:
it throws away most of the watching signal; docs/adr/0011-ranking-track.md.) A grid over rank, regParam and
alpha is chosen on validation NDCG@10, one MLflow child run per point, by the explicit grid's search
(``pipeline.models.als.grid_search`` with the ``NDCG`` objective of ``pipeline.models.grid_search``:
successive halving over iterations from 100,000 training rows, the same line searches). Under halving the
choice is the best validation NDCG@10 of every fit, the screen's included: a finalist's 3-iteration fit can
rank better than its 10-iteration refit (it did at 10 M and 25 M ratings), so the iterations are chosen on
validation like the other parameters (docs/adr/0040-implicit-als-chooses-among-every-fit.md).

The model is a ``FactorModel`` whose scores are preferences, not ratings: it has no baseline and no clipping
range, and it is a candidate of the ranking gate only.
"""

from __future__ import annotations

import itertools
import logging
import time

import pandas as pd

from pipeline import storage, tracking
from pipeline.models.als import factor_model, grid_search, id_maps
from pipeline.models.factor_model import FactorModel
from pipeline.models.grid_search import HALVING_MIN_ROWS, NDCG, SKIPPED_BY_LINE_SEARCH
from pipeline.models.protocol import Fitted, run_candidate
from pipeline.models.ranking import evaluate_ranking

log = logging.getLogger(__name__)

UNBOUNDED = 1e30  # preferences are not on the rating scale: no clipping


def grid_points(ranks, reg_params, alphas, max_iters) -> list[dict]:
    return [{"rank": int(r), "reg_param": float(g), "alpha": float(a), "max_iter": int(i)}
            for r, g, a, i in itertools.product(ranks, reg_params, alphas, max_iters)]


def fit_point(spark_frame, train: pd.DataFrame, point: dict, seed: int, num_blocks: int,
              maps: tuple | None = None) -> FactorModel:
    from pyspark.ml.recommendation import ALS

    als = ALS(rank=point["rank"], regParam=point["reg_param"], alpha=point["alpha"], maxIter=point["max_iter"],
              implicitPrefs=True, userCol="user_idx", itemCol="movie_idx", ratingCol="rating", seed=seed,
              numUserBlocks=num_blocks, numItemBlocks=num_blocks, intermediateStorageLevel="MEMORY_ONLY",
              finalStorageLevel="MEMORY_ONLY")
    return factor_model(als.fit(spark_frame), train, None, name="implicit_als", maps=maps,
                        meta={"params": point, "scores": "preference"}, min_rating=-UNBOUNDED, max_rating=UNBOUNDED)


def run_implicit_als(ctx) -> dict:
    """Stage ``implicit_als``: the grid on validation NDCG@10, the chosen point's lists scored on test."""
    from pipeline.spark import get_spark

    p = ctx.params
    points = grid_points(p.ials_ranks, p.ials_reg_params, p.ials_alphas, p.ials_max_iters)

    def fit(split, _baseline, folder, parent) -> Fitted:
        maps = id_maps(split.train)

        def fit_one(frame, point: dict, iters: int, num_blocks: int) -> FactorModel:
            # the model's params are what it ran: a screen fits fewer iterations
            return fit_point(frame, split.train, {**point, "max_iter": iters}, p.seed, num_blocks, maps)

        def score(model: FactorModel) -> dict:
            return {"val_ndcg_at_10": evaluate_ranking(model, split, splits=("val",))["val_ndcg_at_10"] or 0.0}

        def track(point: dict):
            name = (f"implicit als rank={point['rank']} reg={point['reg_param']:g} alpha={point['alpha']:g} "
                    f"iters={point['max_iter']}")
            return tracking.child_run(parent, ctx, name, split.summary)

        started = time.perf_counter()
        # the Params of the explicit grid (als_search, als_halving_eta, als_line_search, als_parallel_fits); from
        # FIXED_COST_MAX_ROWS training rows the larger ranks' fits keep the cores busy by themselves: one at a time
        # (docs/adr/0054-als-chains-side-by-side-below-2m-rows.md)
        searched = grid_search(get_spark(ctx.settings), split.train[["user_idx", "movie_idx", "rating"]], points,
                               fit_one, score, NDCG, strategy=p.als_search, eta=p.als_halving_eta,
                               min_rows=HALVING_MIN_ROWS, line_search=p.als_line_search, workers=p.als_parallel_fits,
                               at_scale=1, track=track, staging=folder, label="implicit ALS")
        results = [{**q, "skipped": r["skipped"]} if r.get("skipped") == SKIPPED_BY_LINE_SEARCH else r
                   for r, q in zip(searched.results, points)]  # a point never fitted: no scores, no seconds
        (folder / "grid.json").write_text(storage.strict_json(results, indent=2))  # a diverged fit: null
        point = searched.point
        if not searched.full:
            log.info("implicit ALS: the %d-iteration screen fit of rank=%d reg=%g alpha=%g ranks best on validation "
                     "(NDCG@10 %.4f, above every fit with all its iterations): it is the model", point["max_iter"],
                     point["rank"], point["reg_param"], point["alpha"], searched.score)
        return Fitted(searched.model, params={f"best_{k}": v for k, v in point.items()} | {"grid_points": len(points)},
                      metrics={"grid_seconds": time.perf_counter() - started}, artifacts=[folder / "grid.json"],
                      section={"grid": results, "best_params": point})

    return run_candidate(ctx, "implicit_als", fit, kind="ranking")
