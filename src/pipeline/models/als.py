"""Stage ``als``: explicit-feedback ALS (Spark ML) on the residuals of the bias baseline, grid-searched on
validation RMSE.

ALS has no bias terms, so it factorises what the damped user+item baseline leaves unexplained; predictions
add the baseline back (a biased matrix factorisation). Selection uses validation RMSE only, computed by the
shared evaluation (every validation row, cold pairs from the baseline).

Where the naive grid search spends its time, and what ``search_grid`` does instead (``bench/als_grid.py``
measures both on the same grid and split):
- Spark's 200 default shuffle partitions for a few-MB table: every ALS iteration shuffles factor blocks
  through 200 tiny tasks; the session runs with a handful instead, and ALS gets ``num_blocks`` = the
  cores' count of user/item blocks (default 10 each).
- the training frame re-read and re-planned for every point: it is built once, repartitioned and cached;
- scoring through ``model.transform(validation)`` (a join) and a Spark evaluator per point: the factors
  (a few MB) are collected once and the validation rows scored in numpy;
- one fit at a time leaves cores idle while the driver collects and schedules: two fits run concurrently.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from pipeline import storage, tracking
from pipeline.models.metrics import rating_metrics
from pipeline.models.plots import als_heatmap
from pipeline.models.protocol import Fitted, run_candidate
from pipeline.models.factor_model import FactorModel

log = logging.getLogger(__name__)

def grid_points(ranks, reg_params, max_iters) -> list[dict]:
    return [{"rank": int(r), "reg_param": float(g), "max_iter": int(i)}
            for r, g, i in itertools.product(ranks, reg_params, max_iters)]


def residual_frame(train: pd.DataFrame, baseline) -> pd.DataFrame:
    """What ALS fits: each training rating minus the baseline's prediction."""
    residual = train["rating"].to_numpy() - baseline.predict(train["user_id"].to_numpy(), train["movie_id"].to_numpy())
    return pd.DataFrame({"user_idx": train["user_idx"].to_numpy(np.int32),
                         "movie_idx": train["movie_idx"].to_numpy(np.int32),
                         "residual": residual.astype(np.float32)})


def _als(point: dict, seed: int, num_blocks: int | None = None):
    from pyspark.ml.recommendation import ALS

    kwargs = {}
    if num_blocks:
        kwargs.update(numUserBlocks=num_blocks, numItemBlocks=num_blocks,
                      intermediateStorageLevel="MEMORY_ONLY", finalStorageLevel="MEMORY_ONLY")
    return ALS(rank=point["rank"], regParam=point["reg_param"], maxIter=point["max_iter"], userCol="user_idx",
               itemCol="movie_idx", ratingCol="residual", seed=seed, coldStartStrategy="nan", **kwargs)


def factor_model(als_model, train: pd.DataFrame, baseline, name: str = "als", meta: dict | None = None,
                 **bounds) -> FactorModel:
    """Collect an ALSModel's factors into a FactorModel keyed by the original ids (``bounds``: the
    FactorModel's min_rating / max_rating, for factors whose scores are not ratings)."""
    users = train.drop_duplicates("user_idx").set_index("user_idx")["user_id"]
    movies = train.drop_duplicates("movie_idx").set_index("movie_idx")["movie_id"]
    uf = als_model.userFactors.toPandas()
    itf = als_model.itemFactors.toPandas()
    return FactorModel(
        name=name, user_ids=users.loc[uf["id"]].to_numpy(), movie_ids=movies.loc[itf["id"]].to_numpy(),
        user_factors=np.vstack(uf["features"].to_numpy()) if len(uf) else np.zeros((0, als_model.rank)),
        item_factors=np.vstack(itf["features"].to_numpy()) if len(itf) else np.zeros((0, als_model.rank)),
        baseline=baseline, fallback=baseline, meta=meta or {}, **bounds,
    )


def search_grid(spark, train: pd.DataFrame, validation: pd.DataFrame, baseline, points: list[dict], seed: int = 42,
                workers: int = 2, num_blocks: int | None = None, track=None) -> tuple[list[dict], FactorModel]:
    """Fit every grid point; (results in grid order, the FactorModel with the lowest validation RMSE).

    ``track(point)``, if given, is a context manager opened around each point's fit (from the worker thread)
    that yields ``log(params, metrics)``: the stage opens one MLflow child run per point with it.
    """
    parallelism = spark.sparkContext.defaultParallelism
    num_blocks = num_blocks or max(1, min(parallelism, 4))
    frame = spark.createDataFrame(residual_frame(train, baseline)).repartition(num_blocks).cache()
    frame.count()
    best: dict = {}
    lock = threading.Lock()

    done = []

    def fit(i_point):
        i, point = i_point
        with (track(point) if track else contextlib.nullcontext(lambda params, metrics: None)) as record:
            started = time.perf_counter()
            model = _als(point, seed, num_blocks).fit(frame)
            fm = factor_model(model, train, baseline, meta={"params": point})
            fit_s = time.perf_counter() - started
            scores = rating_metrics(validation, fm.predict, baseline, train, split="val")  # the protocol's
            result = {**point, "val_rmse": scores["val_rmse"], "val_mae": scores["val_mae"], "fit_s": round(fit_s, 3)}
            record(point, {k: result[k] for k in ("val_rmse", "val_mae", "fit_s")})
        with lock:
            if not best or (result["val_rmse"], i) < (best["result"]["val_rmse"], best["i"]):
                best.update(result=result, model=fm, i=i)
            done.append(i)
            log.info("ALS grid point %d/%d (rank=%d reg=%.3g iters=%d): validation RMSE %.4f (%.1f s)", len(done),
                     len(points), point["rank"], point["reg_param"], point["max_iter"], result["val_rmse"], fit_s)
        return result

    previous = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", str(max(2, parallelism)))
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(fit, enumerate(points)))
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)
        frame.unpersist()
    return results, best["model"]


def search_grid_naive(spark, train_path: str, validation: pd.DataFrame, baseline, points: list[dict],
                      seed: int = 42) -> list[dict]:
    """The naive way, for the benchmark only: a sequential loop of ``ALS.fit`` + ``transform`` + evaluator
    with Spark's defaults (200 shuffle partitions, 10 blocks, the training data read for every point)."""
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.sql import functions as F

    previous = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "200")
    val = validation[["user_id", "movie_id", "user_idx", "movie_idx", "rating"]].copy()
    val["base"] = baseline.predict(val["user_id"].to_numpy(), val["movie_id"].to_numpy())
    val_sdf = spark.createDataFrame(val)
    results = []
    try:
        for point in points:
            started = time.perf_counter()
            train = spark.read.parquet(train_path)
            model = _als(point, seed).fit(train)
            scored = model.transform(val_sdf).withColumn(
                # cold pairs come back NaN: residual 0, i.e. the baseline (Spark orders NaN above every number,
                # so NaN must be replaced before clipping or least() would turn it into 5.0)
                "pred", F.least(F.greatest(F.nanvl(F.col("prediction"), F.lit(0.0)) + F.col("base"), F.lit(0.5)),
                                F.lit(5.0)))
            val_rmse = RegressionEvaluator(metricName="rmse", labelCol="rating", predictionCol="pred").evaluate(scored)
            results.append({**point, "val_rmse": val_rmse, "fit_s": round(time.perf_counter() - started, 3)})
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)
    return results


def best_point(results: list[dict]) -> dict:
    """Lowest validation RMSE; the earlier grid point wins a tie."""
    i = min(range(len(results)), key=lambda j: (results[j]["val_rmse"], j))
    return {k: results[i][k] for k in ("rank", "reg_param", "max_iter")}


# --- the stage ----------------------------------------------------------------------------------------------


def run_als(ctx) -> dict:
    """Stage ``als``: grid-search ALS on validation RMSE, one MLflow child run per point; score the best."""
    from pipeline.spark import get_spark

    p = ctx.params
    points = grid_points(p.als_ranks, p.als_reg_params, p.als_max_iters)

    def fit(split, baseline, folder, parent) -> Fitted:
        def track(point):
            name = f"als rank={point['rank']} reg={point['reg_param']:g} iters={point['max_iter']}"
            return tracking.child_run(parent, ctx, name, split.summary)

        started = time.perf_counter()
        results, model = search_grid(get_spark(ctx.settings), split.train, split.validation, baseline, points,
                                     seed=p.seed, workers=p.als_parallel_fits, track=track)
        grid_s = time.perf_counter() - started
        (folder / "grid.json").write_text(storage.strict_json(results, indent=2))  # a diverged point: null
        best = model.meta["params"]
        return Fitted(model, params={f"best_{k}": v for k, v in best.items()} | {"grid_points": len(points)},
                      metrics={"grid_seconds": grid_s},
                      artifacts=[als_heatmap(results, folder / "als_val_rmse_heatmap.png"), folder / "grid.json"],
                      section={"grid": points, "grid_val_rmse": [r["val_rmse"] for r in results], "best_params": best,
                               "grid_seconds": round(grid_s, 2)})

    return run_candidate(ctx, "als", fit)
