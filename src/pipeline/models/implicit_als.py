"""Implicit-feedback ALS (Spark ML ``ALS(implicitPrefs=True)``, Hu, Koren & Volinsky 2008) as a ranking model.

Every rating is an observed interaction (preference 1) whose confidence grows with the rating:
``c = 1 + alpha * rating``. A low rating still says "watched", which is what predicts the next movies a
user rates; the value only weighs it. (Keeping only ratings >= 4 as positives was measured too and ranks
worse on ml-latest-small: it throws away most of the watching signal.) A grid over rank, regParam and alpha
is chosen on validation NDCG@10, one MLflow child run per point, like the explicit grid.

The model is a ``FactorModel`` whose scores are preferences, not ratings: it has no baseline and no clipping
range, and it is a candidate of the ranking gate only.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

import pandas as pd

from pipeline import tracking
from pipeline.models.als import factor_model
from pipeline.models.factor_model import FactorModel
from pipeline.models.protocol import Fitted, run_candidate
from pipeline.models.ranking import evaluate_ranking

log = logging.getLogger(__name__)

UNBOUNDED = 1e30  # preferences are not on the rating scale: no clipping


def grid_points(ranks, reg_params, alphas, max_iters) -> list[dict]:
    return [{"rank": int(r), "reg_param": float(g), "alpha": float(a), "max_iter": int(i)}
            for r, g, a, i in itertools.product(ranks, reg_params, alphas, max_iters)]


def fit_point(spark_frame, train: pd.DataFrame, point: dict, seed: int, num_blocks: int) -> FactorModel:
    from pyspark.ml.recommendation import ALS

    als = ALS(rank=point["rank"], regParam=point["reg_param"], alpha=point["alpha"], maxIter=point["max_iter"],
              implicitPrefs=True, userCol="user_idx", itemCol="movie_idx", ratingCol="rating", seed=seed,
              numUserBlocks=num_blocks, numItemBlocks=num_blocks, intermediateStorageLevel="MEMORY_ONLY",
              finalStorageLevel="MEMORY_ONLY")
    return factor_model(als.fit(spark_frame), train, None, name="implicit_als",
                        meta={"params": point, "scores": "preference"}, min_rating=-UNBOUNDED, max_rating=UNBOUNDED)


def run_implicit_als(ctx) -> dict:
    """Stage ``implicit_als``: the grid on validation NDCG@10, the chosen point's lists scored on test."""
    from pipeline.spark import get_spark

    p = ctx.params
    points = grid_points(p.ials_ranks, p.ials_reg_params, p.ials_alphas, p.ials_max_iters)

    def fit(split, _baseline, folder, parent) -> Fitted:
        spark = get_spark(ctx.settings)
        num_blocks = max(1, min(spark.sparkContext.defaultParallelism, 4))
        frame = spark.createDataFrame(split.train[["user_idx", "movie_idx", "rating"]]).repartition(num_blocks)
        frame = frame.cache()
        frame.count()
        previous = spark.conf.get("spark.sql.shuffle.partitions")
        spark.conf.set("spark.sql.shuffle.partitions", str(max(2, spark.sparkContext.defaultParallelism)))
        started, results, best = time.perf_counter(), [], None
        try:
            for i, point in enumerate(points, start=1):
                name = (f"implicit als rank={point['rank']} reg={point['reg_param']:g} alpha={point['alpha']:g} "
                        f"iters={point['max_iter']}")
                with tracking.child_run(parent, ctx, name, split.summary) as record:
                    t0 = time.perf_counter()
                    model = fit_point(frame, split.train, point, p.seed, num_blocks)
                    fit_s = time.perf_counter() - t0
                    ndcg = evaluate_ranking(model, split)["val_ndcg_at_10"] or 0.0
                    record(point, {"val_ndcg_at_10": ndcg, "fit_s": fit_s})
                results.append({**point, "val_ndcg_at_10": ndcg, "fit_s": round(fit_s, 3)})
                log.info("implicit ALS grid point %d/%d (%s): validation NDCG@10 %.4f (%.1f s)", i, len(points),
                         name, ndcg, fit_s)
                if best is None or ndcg > best[0]:
                    best = (ndcg, model, point)
        finally:
            spark.conf.set("spark.sql.shuffle.partitions", previous)
            frame.unpersist()
        (folder / "grid.json").write_text(json.dumps(results, indent=2))
        _, model, point = best
        return Fitted(model, params={f"best_{k}": v for k, v in point.items()} | {"grid_points": len(points)},
                      metrics={"grid_seconds": time.perf_counter() - started}, artifacts=[folder / "grid.json"],
                      section={"grid": results, "best_params": point})

    return run_candidate(ctx, "implicit_als", fit, kind="ranking")
