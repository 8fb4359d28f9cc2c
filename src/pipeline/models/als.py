"""Stage ``als``: explicit-feedback ALS (Spark ML) on the residuals of the bias baseline, grid-searched on
validation RMSE.

ALS has no bias terms, so it factorises what the damped user+item baseline leaves unexplained; predictions
add the baseline back (a biased matrix factorisation, docs/adr/0005-models-on-bias-baseline-residuals.md).
Selection uses validation RMSE only, computed by the shared evaluation (every validation row, cold pairs from
the baseline).

The grid search (``grid_search`` here, ``pipeline.models.grid_search.run_search`` without Spark) is shared with
the implicit stage (``implicit_als``), which passes another ``Objective``: successive halving over iterations
(docs/adr/0021-als-successive-halving.md, docs/adr/0025-halving-eta-5.md), a line search over regParam in the screen
(docs/adr/0031-regparam-line-search.md) and a walk over the finalists' ranks
(docs/adr/0035-rank-walk-over-finalists.md). What it does instead of a naive loop of fits (that loop is
``bench/als_grid.py``'s baseline):
- Spark's 200 default shuffle partitions for a few-MB table make every ALS iteration shuffle factor blocks
  through 200 tiny tasks: the Spark session runs the search with a partition per core, and ALS gets
  ``num_blocks`` = the cores' count of user/item blocks (default 10 each).
- the training frame is staged once, repartitioned and cached, not re-read and re-planned for every point
  (docs/adr/0050-als-training-rows-through-parquet.md);
- the factors (a few MB) are collected once and the validation rows scored in numpy, not through
  ``model.transform(validation)`` (a join) and a Spark evaluator per point;
- one fit at a time leaves cores idle while the driver collects and schedules: two fits run side by side,
  and below 2 M training rows, where a fit is mostly fixed cost, every rank's regParam chain
  (docs/adr/0054-als-chains-side-by-side-below-2m-rows.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage, tracking
from pipeline.models.factor_model import FactorModel
from pipeline.models.grid_search import (
    HALVING_MIN_ROWS,
    RMSE,
    Objective,
    Searched,
    best_first,
    reg_chains,
    run_search,
    search_rungs,
)
from pipeline.models.metrics import rating_metrics
from pipeline.models.plots import als_heatmap
from pipeline.models.protocol import Fitted, run_candidate

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


def id_maps(train: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(user_idx -> user_id, movie_idx -> movie_id) of the training rows (computed once per grid: at 10 M
    ratings each costs a second)."""
    return (train.drop_duplicates("user_idx").set_index("user_idx")["user_id"],
            train.drop_duplicates("movie_idx").set_index("movie_idx")["movie_id"])


def factor_model(als_model, train: pd.DataFrame, baseline, name: str = "als", meta: dict | None = None,
                 maps: tuple[pd.Series, pd.Series] | None = None, **bounds) -> FactorModel:
    """Collect an ALSModel's factors into a FactorModel keyed by the original ids (``bounds``: the
    FactorModel's min_rating / max_rating, for factors whose scores are not ratings; ``maps``: ``id_maps``)."""
    users, movies = maps if maps is not None else id_maps(train)
    uf = als_model.userFactors.toPandas()
    itf = als_model.itemFactors.toPandas()
    return FactorModel(
        name=name, user_ids=users.loc[uf["id"]].to_numpy(), movie_ids=movies.loc[itf["id"]].to_numpy(),
        user_factors=np.vstack(uf["features"].to_numpy()) if len(uf) else np.zeros((0, als_model.rank)),
        item_factors=np.vstack(itf["features"].to_numpy()) if len(itf) else np.zeros((0, als_model.rank)),
        baseline=baseline, fallback=baseline, meta=meta or {}, **bounds,
    )


FITS_AT_ONCE = 2  # ALS fits side by side from FIXED_COST_MAX_ROWS training rows (the compute-bound fits)
FIXED_COST_MAX_ROWS = 2_000_000  # below this a fit is mostly fixed cost: every rank's chain side by side
FITS_AT_ONCE_MAX = 4


def parallel_fits(requested: int, train_rows: int, chains: int, at_scale: int = FITS_AT_ONCE) -> int:
    """How many ALS fits run side by side: ``requested`` (Param ``als_parallel_fits``) where it is above 0, else
    by the data. Below FIXED_COST_MAX_ROWS training rows a fit (most of all a 3-iteration screen fit) is mostly
    fixed cost: Spark blocks the ratings anew and runs a dozen small jobs, which leave the cores idle between
    them, so every rank's regParam chain runs at once (``chains``, at least FITS_AT_ONCE, at most
    FITS_AT_ONCE_MAX). From there on a fit keeps the cores busy by itself, and more fits at once only add
    memory: ``at_scale`` (the explicit grid's FITS_AT_ONCE; the implicit grid's larger ranks take 1;
    docs/adr/0054-als-chains-side-by-side-below-2m-rows.md)."""
    if requested > 0:
        return requested
    return max(FITS_AT_ONCE, min(chains, FITS_AT_ONCE_MAX)) if train_rows < FIXED_COST_MAX_ROWS else at_scale


def blocks(spark) -> int:
    """ALS's user/item blocks (and the training frame's partitions): the cores, at most 4."""
    return max(1, min(spark.sparkContext.defaultParallelism, 4))


@contextlib.contextmanager
def training_frame(spark, rows: pd.DataFrame, num_blocks: int, staging: Path | None = None):
    """``rows`` as the Spark frame every fit of a grid trains on: staged once (``staging``: a folder Spark can
    read, ``pipeline.spark.frame_from_pandas``), repartitioned into ``num_blocks`` and cached; while it lasts
    the Spark session shuffles into a partition per core instead of its default 200."""
    from pipeline.spark import frame_from_pandas

    # imported before the fits' threads: a first import racing in two of them leaves a half-initialised
    # ``pyspark.ml`` that MLflow's Param check then trips over (AttributeError)
    importlib.import_module("pyspark.ml.recommendation")
    with frame_from_pandas(spark, rows, staging) as staged:
        frame = staged.repartition(num_blocks).cache()
        frame.count()
        previous = spark.conf.get("spark.sql.shuffle.partitions")
        spark.conf.set("spark.sql.shuffle.partitions", str(max(2, spark.sparkContext.defaultParallelism)))
        try:
            yield frame
        finally:
            spark.conf.set("spark.sql.shuffle.partitions", previous)
            frame.unpersist()


def grid_search(spark, rows: pd.DataFrame, points: list[dict], fit, score, objective: Objective, *,
                strategy: str = "full", eta: int = 3, min_rows: int = HALVING_MIN_ROWS, line_search: bool = False,
                workers: int = 0, at_scale: int = FITS_AT_ONCE, num_blocks: int | None = None, track=None,
                staging: Path | None = None, label: str = "ALS") -> Searched:
    """The grid search of both ALS stages: ``rows`` (the training rows ALS fits) staged once
    (``training_frame``), the rungs of ``strategy`` (``search_rungs``) run by ``run_search``.

    ``fit(frame, point, iters, num_blocks)`` fits one point on the staged frame; ``score``, ``objective``,
    ``line_search`` and ``track``: ``run_search``. ``workers``: fits side by side (0: ``parallel_fits``'s
    choice by the data, ``at_scale`` from FIXED_COST_MAX_ROWS training rows).
    """
    num_blocks = num_blocks or blocks(spark)
    workers = parallel_fits(workers, len(rows), len(reg_chains(points)), at_scale)
    rungs = search_rungs(len(rows), points, strategy, eta, min_rows)
    log.info("%s grid: %d points, %d training rows, %d fits at once", label, len(points), len(rows), workers)
    with training_frame(spark, rows, num_blocks, staging) as frame:
        searched = run_search(points, functools.partial(fit, frame, num_blocks=num_blocks), score, objective,
                              rungs, line_search=line_search, workers=workers, track=track, label=label)
    if len(rungs) > 1:
        searched.search["eta"] = eta
    return searched


def search_grid(spark, train: pd.DataFrame, validation: pd.DataFrame, baseline, points: list[dict], seed: int = 42,
                workers: int = 0, num_blocks: int | None = None, track=None, strategy: str = "full", eta: int = 3,
                min_rows: int = HALVING_MIN_ROWS, line_search: bool = False,
                staging: Path | None = None) -> tuple[list[dict], FactorModel]:
    """The explicit grid (``grid_search`` on ``RMSE``): ALS fitted on the baseline's residuals, each fit scored
    on every validation row by the shared evaluation; (results in grid order, the chosen FactorModel, its
    ``meta["search"]`` the plan as run).

    ``strategy``: "full" fits every point with all its iterations; "halving" is successive halving over
    iterations (``halving_rungs``), the full grid under ``min_rows`` training rows. Each result holds the point,
    ``val_rmse`` and ``val_mae`` of its full fit (None for a point only fitted with fewer iterations), and under
    halving ``rung_val_rmse`` (one value per rung it reached). ``workers``, ``line_search``, ``track``,
    ``staging``: ``grid_search``.
    """
    maps = id_maps(train)

    def fit(frame, point: dict, iters: int, num_blocks: int) -> FactorModel:
        model = _als({**point, "max_iter": iters}, seed, num_blocks).fit(frame)
        return factor_model(model, train, baseline, meta={"params": point}, maps=maps)

    def score(model: FactorModel) -> dict:
        return rating_metrics(validation, model.predict, baseline, train, split="val")  # the protocol's

    searched = grid_search(spark, residual_frame(train, baseline), points, fit, score, RMSE, strategy=strategy,
                           eta=eta, min_rows=min_rows, line_search=line_search, workers=workers,
                           num_blocks=num_blocks, track=track, staging=staging)
    searched.model.meta["search"] = searched.search
    return searched.results, searched.model


def best_point(results: list[dict]) -> dict:
    """Lowest validation RMSE among the points fitted on all the data (a diverged NaN last); the earlier grid
    point wins a tie."""
    fitted = [j for j in range(len(results)) if results[j]["val_rmse"] is not None]
    i = min(fitted, key=lambda j: (best_first(results[j]["val_rmse"], False), j))
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
                                     seed=p.seed, workers=p.als_parallel_fits, track=track, strategy=p.als_search,
                                     eta=p.als_halving_eta, line_search=p.als_line_search, staging=folder)
        grid_s = time.perf_counter() - started
        (folder / "grid.json").write_text(storage.strict_json(results, indent=2))  # a diverged point: null
        best, search = model.meta["params"], model.meta["search"]
        if search["strategy"] == "halving":  # the first rung scored the points, with fewer iterations
            heat = [{**r, "val_rmse": r["rung_val_rmse"][0] if r.get("rung_val_rmse") else None} for r in results]
            share = 100 * search["rungs"][0]["fraction"]
            title = f"ALS validation RMSE, first rung ({share:.0f} % of the iterations)"
        else:
            heat, title = results, "ALS validation RMSE (best over maxIter)"
        return Fitted(model, params={f"best_{k}": v for k, v in best.items()} | {
                          "grid_points": len(points), "search": p.als_search,
                          "fits": sum(len(r["points"]) for r in search["rungs"])},
                      metrics={"grid_seconds": grid_s},
                      artifacts=[als_heatmap(heat, folder / "als_val_rmse_heatmap.png", title), folder / "grid.json"],
                      section={"grid": points, "grid_val_rmse": [r["val_rmse"] for r in results], "best_params": best,
                               "grid_seconds": round(grid_s, 2), "search": search})

    return run_candidate(ctx, "als", fit)
