"""Implicit-feedback ALS (Spark ML ``ALS(implicitPrefs=True)``, Hu, Koren & Volinsky 2008) as a ranking model.

Every rating is an observed interaction (preference 1) whose confidence grows with the rating:
``c = 1 + alpha * rating``. A low rating still says "watched", which is what predicts the next movies a
user rates; the value only weighs it. (Keeping only ratings >= 4 as positives was measured too and ranks
worse on ml-latest-small: it throws away most of the watching signal.) A grid over rank, regParam and alpha
is chosen on validation NDCG@10, one MLflow child run per point, like the explicit grid, and searched the
same way (``als_search``: successive halving over iterations from 100,000 training rows). Under halving the
choice is the best validation NDCG@10 of every fit, the screen's included: a finalist's 3-iteration fit
ranked better than its 10-iteration refit at 10 M and 25 M ratings, so the iterations are chosen on
validation like the other parameters (docs/decisions.md).

The model is a ``FactorModel`` whose scores are preferences, not ratings: it has no baseline and no clipping
range, and it is a candidate of the ranking gate only.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from pipeline import tracking
from pipeline.models.als import (
    HALVING_MIN_ROWS,
    SKIPPED_BY_LINE_SEARCH,
    SKIPPED_BY_RANK_WALK,
    best_first,
    factor_model,
    halving_rungs,
    id_maps,
    is_nan,
    parallel_fits,
    rank_groups,
    reg_chains,
    rung_iters,
    walk_chain,
    walk_ranks,
)
from pipeline.models.factor_model import FactorModel
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
    from pipeline.spark import frame_from_pandas, get_spark

    p = ctx.params
    points = grid_points(p.ials_ranks, p.ials_reg_params, p.ials_alphas, p.ials_max_iters)

    def fit(split, _baseline, folder, parent) -> Fitted:
        spark = get_spark(ctx.settings)
        # imported before the fits' threads, as the explicit grid does: a first import racing in two of them
        # leaves a half-initialised pyspark.ml
        importlib.import_module("pyspark.ml.recommendation")
        num_blocks = max(1, min(spark.sparkContext.defaultParallelism, 4))
        inputs = contextlib.ExitStack()
        frame = inputs.enter_context(frame_from_pandas(spark, split.train[["user_idx", "movie_idx", "rating"]], folder))
        frame = frame.repartition(num_blocks).cache()
        frame.count()
        previous = spark.conf.get("spark.sql.shuffle.partitions")
        spark.conf.set("spark.sql.shuffle.partitions", str(max(2, spark.sparkContext.defaultParallelism)))
        started, results, best = time.perf_counter(), [None] * len(points), None
        # successive halving over iterations from HALVING_MIN_ROWS training rows, as the explicit grid
        # (Params als_search, als_halving_eta): the rank-128 points cost ~4x the rank-64 ones at 1 M ratings
        rungs = halving_rungs(len(points), max(q["max_iter"] for q in points), p.als_halving_eta) \
            if p.als_search == "halving" and len(split.train) >= HALVING_MIN_ROWS else \
            [{"fraction": 1.0, "points": len(points), "keep": 1}]
        alive, records, maps = list(range(len(points))), {}, id_maps(split.train)
        line_search = p.als_line_search and len(rungs) > 1  # Param als_line_search, as the explicit grid
        # below 2 M training rows, where a 3-iteration fit is mostly Spark's fixed cost, the ranks' regParam
        # chains side by side as the explicit grid's (Param als_parallel_fits); from there on the fits are
        # compute-bound (at 10 M two at once gained nothing) and run one at a time unless the Param says otherwise
        workers = parallel_fits(p.als_parallel_fits, len(split.train), len(reg_chains(points)), at_scale=1)
        lock = threading.Lock()
        better = lambda new, old: new > old  # noqa: E731
        try:
            with contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=workers) as pool:
                for rung_no, rung in enumerate(rungs):
                    scores = {}

                    def score(i):
                        nonlocal best
                        point = points[i]
                        iters = rung_iters(point, rung["fraction"])
                        name = (f"implicit als rank={point['rank']} reg={point['reg_param']:g} "
                                f"alpha={point['alpha']:g} iters={point['max_iter']}")
                        with lock:
                            if i not in records:
                                records[i] = stack.enter_context(tracking.child_run(parent, ctx, name, split.summary))
                                records[i](point, {})
                        t0 = time.perf_counter()
                        fitted = {**point, "max_iter": iters}  # what this model ran: a screen fits fewer iterations
                        model = fit_point(frame, split.train, fitted, p.seed, num_blocks, maps)
                        fit_s = time.perf_counter() - t0
                        ndcg = evaluate_ranking(model, split, splits=("val",))["val_ndcg_at_10"] or 0.0
                        full = rung["fraction"] >= 1.0
                        with lock:
                            scores[i] = ndcg
                            records[i]({}, {"val_ndcg_at_10" if full else f"rung{rung_no}_val_ndcg_at_10": ndcg,
                                            "fit_s": fit_s})
                            result = results[i] = results[i] or {**point, "val_ndcg_at_10": None, "fit_s": 0.0}
                            result["fit_s"] = round(result["fit_s"] + fit_s, 3)
                            if full:
                                result["val_ndcg_at_10"] = ndcg
                            if len(rungs) > 1:
                                result.setdefault("rung_val_ndcg_at_10", []).append(ndcg)
                                result.setdefault("rung_iters", []).append(iters)
                            log.info("implicit ALS %s point %d/%d (%s, %d iterations): validation NDCG@10 %.4f "
                                     "(%.1f s)", f"rung {rung_no + 1}/{len(rungs)}" if len(rungs) > 1 else "grid",
                                     len(scores), len(alive), name, iters, ndcg, fit_s)
                            # every fit is a candidate, a screen's too (the iterations chosen on validation); on a
                            # tie the fit with all its iterations, then the earlier grid point (the fits run side
                            # by side, so not the one that finished first)
                            key = (not is_nan(ndcg), 0.0 if is_nan(ndcg) else ndcg, full, -i)  # NaN lowest
                            if best is None or key > best[0]:
                                best = (key, model, fitted)
                        return ndcg

                    groups = rank_groups(points, alive)
                    if line_search and rung_no == 0:  # each rank's regParams upwards, up to the first worse one
                        chains = [[alive[j] for j in chain] for chain in reg_chains([points[i] for i in alive])]
                        list(pool.map(lambda chain: walk_chain(chain, score, better), chains))
                    elif line_search and rung_no == len(rungs) - 1 and len(groups) > 1:  # finalists rank by rank
                        walk_ranks(groups, lambda group: list(pool.map(score, group)), better)
                        for i in set(alive) - set(scores):
                            results[i]["skipped"] = SKIPPED_BY_RANK_WALK
                    else:
                        list(pool.map(score, alive))
                    alive = sorted(scores, key=lambda j: (best_first(scores[j], True), j))[:rung["keep"]]
        finally:
            spark.conf.set("spark.sql.shuffle.partitions", previous)
            frame.unpersist()
            inputs.close()
        results = [r or {**q, "skipped": SKIPPED_BY_LINE_SEARCH}
                   for r, q in zip(results, points)]
        (folder / "grid.json").write_text(json.dumps(results, indent=2))
        (_, ndcg, full, _), model, point = best
        if not full:
            log.info("implicit ALS: the %d-iteration screen fit of rank=%d reg=%g alpha=%g ranks best on validation "
                     "(NDCG@10 %.4f, above every fit with all its iterations): it is the model", point["max_iter"],
                     point["rank"], point["reg_param"], point["alpha"], ndcg)
        return Fitted(model, params={f"best_{k}": v for k, v in point.items()} | {"grid_points": len(points)},
                      metrics={"grid_seconds": time.perf_counter() - started}, artifacts=[folder / "grid.json"],
                      section={"grid": results, "best_params": point})

    return run_candidate(ctx, "implicit_als", fit, kind="ranking")
