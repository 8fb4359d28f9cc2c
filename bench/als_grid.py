"""ALS grid search, same grid, same split, one process: the pipeline's full grid (``search_grid``) against the
naive loop (``--compare naive``, the default), or successive halving against the full grid
(``--compare halving``).

    .venv/bin/python bench/als_grid.py [--source DIR] [--compare naive|halving] [--ranks 10,25,50]
                                      [--regs 0.05,0.1,0.125,0.15,0.2] [--iters 15]
    # e.g. on 1 M synthetic ratings:
    .venv/bin/recsys synth --ratings 1000000 --users 7000 --movies 5000 --out /tmp/syn1m
    .venv/bin/python bench/als_grid.py --source /tmp/syn1m --compare halving

Prints both wall times, the ratio, and both chosen grid points; for halving also the full grid's validation
RMSE of halving's choice and its gap to the full grid's best (the target: within 0.003). The naive way: a
sequential loop of ``ALS.fit`` on the training parquet + ``transform`` + RegressionEvaluator per point, with
Spark's defaults (200 shuffle partitions, 10 user/item blocks). Both fit the same target (ratings minus the bias
baseline) and score validation the same way (cold pairs from the baseline, clipped), so they choose among the same
models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    shared = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"
    default_source = os.environ.get("MOVIELENS_DIR", str(shared))
    parser.add_argument("--source", default=default_source)
    parser.add_argument("--ranks", default="10,25,50")
    parser.add_argument("--regs", default="0.05,0.1,0.125,0.15,0.2")
    parser.add_argument("--iters", default="15")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", choices=("naive", "halving"), default="naive")
    parser.add_argument("--eta", type=int, default=3)
    args = parser.parse_args()

    from pipeline import stages
    from pipeline.config import load_settings
    from pipeline.models.als import best_point, grid_points, residual_frame, search_grid
    from pipeline.models.protocol import load_baseline, load_split
    from pipeline.spark import get_spark

    work = Path(tempfile.mkdtemp(prefix="bench-als-"))
    os.environ.setdefault("RECSYS_HOME", str(work / "home"))
    ctx = stages.make_context(work_dir=work, params={"source": args.source}, settings=load_settings())
    stages.run_pipeline(ctx, ["ingest", "validate", "etl", "baseline"])
    split = load_split(ctx, "bench")
    frames = {"train": split.train, "validation": split.validation}
    baseline = load_baseline(ctx, "bench")
    points = grid_points([int(x) for x in args.ranks.split(",")], [float(x) for x in args.regs.split(",")],
                         [int(x) for x in args.iters.split(",")])
    spark = get_spark(ctx.settings)
    if args.compare == "halving":
        return _halving(spark, ctx, frames, baseline, points, args)
    train_path = str(work / "residuals.parquet")
    spark.createDataFrame(residual_frame(frames["train"], baseline)).write.parquet(train_path)

    # warm-up (JIT, first job) so that neither side pays it alone
    search_grid(spark, frames["train"], frames["validation"], baseline, points[:1], workers=1)

    t0 = time.perf_counter()
    naive = search_grid_naive(spark, train_path, frames["validation"], baseline, points)
    naive_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast, _ = search_grid(spark, frames["train"], frames["validation"], baseline, points, workers=args.workers)
    fast_s = time.perf_counter() - t0

    out = {
        "dataset": ctx.source, "grid_points": len(points), "train_rows": len(frames["train"]),
        "spark_master": ctx.settings.spark_master,
        "naive_seconds": round(naive_s, 1), "pipeline_seconds": round(fast_s, 1),
        "speedup": round(naive_s / fast_s, 2),
        "naive_choice": best_point(naive), "pipeline_choice": best_point(fast),
        "same_choice": best_point(naive) == best_point(fast),
        "naive_best_val_rmse": round(min(r["val_rmse"] for r in naive), 5),
        "pipeline_best_val_rmse": round(min(r["val_rmse"] for r in fast), 5),
    }
    print(json.dumps(out, indent=2))
    return 0


def search_grid_naive(spark, train_path: str, validation, baseline, points: list[dict], seed: int = 42) -> list[dict]:
    """The naive way: a sequential loop of ``ALS.fit`` + ``transform`` + evaluator with Spark's defaults (200
    shuffle partitions, 10 user/item blocks, the training data read for every point); results as
    ``search_grid``'s (point, ``val_rmse``, ``fit_s``)."""
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
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
            model = ALS(rank=point["rank"], regParam=point["reg_param"], maxIter=point["max_iter"],
                        userCol="user_idx", itemCol="movie_idx", ratingCol="residual", seed=seed,
                        coldStartStrategy="nan").fit(train)
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


def _halving(spark, ctx, frames, baseline, points, args) -> int:
    from pipeline.models.als import best_point, search_grid

    search_grid(spark, frames["train"], frames["validation"], baseline, points[:1], workers=1)  # warm-up
    t0 = time.perf_counter()
    full, _ = search_grid(spark, frames["train"], frames["validation"], baseline, points, workers=args.workers)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    halving, model = search_grid(spark, frames["train"], frames["validation"], baseline, points,
                                 workers=args.workers, strategy="halving", eta=args.eta)
    halving_s = time.perf_counter() - t0
    full_best, halving_choice = best_point(full), best_point(halving)
    rmse_of = {tuple(best_point([r]).values()): r["val_rmse"] for r in full}
    chosen_rmse = rmse_of[tuple(halving_choice.values())]
    best_rmse = min(r["val_rmse"] for r in full)
    out = {
        "dataset": ctx.source, "grid_points": len(points), "train_rows": len(frames["train"]),
        "validation_rows": len(frames["validation"]), "spark_master": ctx.settings.spark_master,
        "full_seconds": round(full_s, 1), "halving_seconds": round(halving_s, 1),
        "time_ratio": round(halving_s / full_s, 3), "speedup": round(full_s / halving_s, 2),
        "full_choice": full_best, "halving_choice": halving_choice,
        "full_best_val_rmse": round(best_rmse, 5), "halving_choice_val_rmse_in_full_grid": round(chosen_rmse, 5),
        "halving_refit_val_rmse": round(min(r["val_rmse"] for r in halving if r["val_rmse"] is not None), 5),
        "gap": round(chosen_rmse - best_rmse, 5), "within_0.003": chosen_rmse - best_rmse <= 0.003,
        "halving_plan": model.meta["search"],
        "full_grid": [{k: r[k] for k in ("rank", "reg_param", "max_iter", "val_rmse", "fit_s")} for r in full],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
