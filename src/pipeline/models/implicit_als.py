"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008) as a ranking model, on one of two engines (Param
``ials_engine``; docs/adr/0067-implicit-als-on-the-implicit-library.md):

- ``implicit`` (the default): the ``implicit`` library's CPU ALS (conjugate-gradient solver, Takács et al. 2011)
  in this process. Every training rating is an observed interaction (preference 1) with confidence
  ``c = 1 + alpha * rating / 5``; the unobserved pairs are preference 0 with confidence 1. The confidence matrix
  (users x movies, CSR) holds ``c`` itself and the library's own ``alpha`` stays 1: the library takes each
  stored value as the confidence of a positive. Its regularisation is one plain L2 weight for every user and
  movie. Grid ``ials_ranks`` x ``ials_reg_params`` x ``ials_alphas`` x ``ials_max_iters``. BLAS runs one thread
  while the library fits (the library's advice: its own threads split the users and movies).
- ``spark``: Spark ML ``ALS(implicitPrefs=True)``, confidence ``c = 1 + alpha * rating``, regParam scaled by
  each user's and movie's number of ratings; for a cluster. Its own grid, ``ials_spark_*`` (the scales differ).

A low rating still says "watched", which is what predicts the next movies a user rates; the value only weighs
it. (Keeping only ratings >= 4 as positives ranks worse on ml-latest-small: it throws away most of the watching
signal; docs/adr/0011-ranking-track.md.) Either grid is chosen on validation NDCG@10, one MLflow child run per
point, by the explicit grid's search (``pipeline.models.grid_search.run_search`` with the ``NDCG`` objective:
successive halving over iterations from 100,000 training rows, the same line searches). Under halving the
choice is the best validation NDCG@10 of every fit, the screen's included: a finalist's 3-iteration fit can
rank better than its full refit, so the iterations are chosen on validation like the other parameters
(docs/adr/0040-implicit-als-chooses-among-every-fit.md).

The model is a ``FactorModel`` whose scores are preferences, not ratings: it has no baseline and no clipping
range, and it is a candidate of the ranking gate only.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pandas as pd

from pipeline import storage, tracking
from pipeline.models.als import factor_model, grid_search, id_maps
from pipeline.models.factor_model import FactorModel
from pipeline.models.grid_search import HALVING_MIN_ROWS, NDCG, SKIPPED_BY_LINE_SEARCH, run_search, search_rungs
from pipeline.models.metrics import RATING_MAX
from pipeline.models.protocol import Fitted, run_candidate
from pipeline.models.ranking import evaluate_ranking

log = logging.getLogger(__name__)

UNBOUNDED = 1e30  # preferences are not on the rating scale: no clipping


def grid_points(ranks, reg_params, alphas, max_iters) -> list[dict]:
    return [{"rank": int(r), "reg_param": float(g), "alpha": float(a), "max_iter": int(i)}
            for r, g, a, i in itertools.product(ranks, reg_params, alphas, max_iters)]


def engine_grid(p) -> list[dict]:
    """The grid of the engine ``p.ials_engine`` runs."""
    if p.ials_engine == "spark":
        return grid_points(p.ials_spark_ranks, p.ials_spark_reg_params, p.ials_spark_alphas, p.ials_spark_max_iters)
    return grid_points(p.ials_ranks, p.ials_reg_params, p.ials_alphas, p.ials_max_iters)


# --- the implicit library ------------------------------------------------------------------------------------

class Interactions:
    """The training ratings as the library's users x movies matrix: rows and columns in ``id_maps`` order, each
    stored value the rating's share of the top of the scale (``rating / 5``), built once per grid."""

    def __init__(self, train: pd.DataFrame, maps: tuple[pd.Series, pd.Series] | None = None):
        import scipy.sparse as sp

        self.users, self.movies = maps if maps is not None else id_maps(train)
        rows = pd.Index(self.users.index).get_indexer(train["user_idx"].to_numpy())
        cols = pd.Index(self.movies.index).get_indexer(train["movie_idx"].to_numpy())
        share = (train["rating"].to_numpy(np.float32) / np.float32(RATING_MAX)).astype(np.float32)
        self.share = sp.csr_matrix((share, (rows, cols)), shape=(len(self.users), len(self.movies)),
                                   dtype=np.float32)
        self.share.sum_duplicates()
        self.share.sort_indices()

    def confidence(self, alpha: float):
        """The confidence matrix ``1 + alpha * rating / 5`` of the stored pairs (the structure shared)."""
        c = self.share.copy()
        c.data = (np.float32(1.0) + np.float32(alpha) * c.data).astype(np.float32)
        return c


def library_fit(data: Interactions, point: dict, seed: int, threads: int = 0, resume: tuple | None = None):
    """The ``implicit`` library's CPU ALS at ``point`` (``rank`` factors, ``reg_param`` regularization, ``alpha``
    in the confidence, ``max_iter`` iterations) on ``data``; ``threads`` 0: every core. ``resume``: (the library's
    model, its iterations) of the same point fitted with fewer iterations, which goes on from its factors: ALS
    from where it stopped is the longer fit (the same seeded start, the same sweeps). Returns (the FactorModel,
    the library's model), the FactorModel holding copies of the factors."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # constructed inside: the library checks BLAS's threads
        if resume is not None and resume[1] < point["max_iter"]:
            als, done = resume
        else:
            als, done = AlternatingLeastSquares(
                factors=point["rank"], regularization=point["reg_param"], alpha=1.0, iterations=point["max_iter"],
                calculate_training_loss=False, num_threads=threads, random_state=seed), 0
        als.iterations = point["max_iter"] - done
        als.fit(data.confidence(point["alpha"]), show_progress=False)
    model = FactorModel(name="implicit_als", user_ids=data.users.to_numpy(), movie_ids=data.movies.to_numpy(),
                        user_factors=np.array(als.user_factors), item_factors=np.array(als.item_factors),
                        min_rating=-UNBOUNDED, max_rating=UNBOUNDED,
                        meta={"params": dict(point), "scores": "preference", "engine": "implicit"})
    return model, als


# --- Spark ML ------------------------------------------------------------------------------------------------

def spark_fit(spark_frame, train: pd.DataFrame, point: dict, seed: int, num_blocks: int,
              maps: tuple | None = None) -> FactorModel:
    from pyspark.ml.recommendation import ALS

    als = ALS(rank=point["rank"], regParam=point["reg_param"], alpha=point["alpha"], maxIter=point["max_iter"],
              implicitPrefs=True, userCol="user_idx", itemCol="movie_idx", ratingCol="rating", seed=seed,
              numUserBlocks=num_blocks, numItemBlocks=num_blocks, intermediateStorageLevel="MEMORY_ONLY",
              finalStorageLevel="MEMORY_ONLY")
    return factor_model(als.fit(spark_frame), train, None, name="implicit_als", maps=maps,
                        meta={"params": point, "scores": "preference", "engine": "spark"}, min_rating=-UNBOUNDED,
                        max_rating=UNBOUNDED)


# --- the stage -----------------------------------------------------------------------------------------------

def search_library(p, train: pd.DataFrame, points: list[dict], maps, score, track):
    """The grid on the library: the fits one at a time (each keeps every core busy), the rungs of ``als_search``
    (``search_rungs``), the line searches of ``als_line_search``. A point that goes on to a later rung goes on
    from its earlier rung's factors: its finalist fit costs only the iterations it adds."""
    started = time.perf_counter()
    data = Interactions(train, maps)
    log.info("implicit ALS (implicit library): %d users x %d movies, %d ratings, matrix built in %.1f s",
             *data.share.shape, data.share.nnz, time.perf_counter() - started)
    rungs = search_rungs(len(train), points, p.als_search, p.als_halving_eta, HALVING_MIN_ROWS)
    going_on: dict[tuple, object] = {}  # a point's library model after a rung with fewer than all its iterations

    def fit(point: dict, iters: int) -> FactorModel:
        key = tuple(sorted(point.items()))
        model, als = library_fit(data, {**point, "max_iter": iters}, p.seed, resume=going_on.pop(key, None))
        if iters < point["max_iter"]:
            going_on[key] = (als, iters)
        return model

    searched = run_search(points, fit, score, NDCG, rungs, line_search=p.als_line_search, workers=1, track=track,
                          label="implicit ALS")
    going_on.clear()
    if len(rungs) > 1:
        searched.search["eta"] = p.als_halving_eta
    return searched


def search_spark(ctx, train: pd.DataFrame, points: list[dict], maps, score, track, folder):
    """The grid on Spark ML: the explicit grid's search (``pipeline.models.als.grid_search``) and its Params
    (als_search, als_halving_eta, als_line_search, als_parallel_fits); from FIXED_COST_MAX_ROWS training rows the
    larger ranks' fits keep the cores busy by themselves: one at a time
    (docs/adr/0054-als-chains-side-by-side-below-2m-rows.md)."""
    from pipeline.spark import get_spark

    p = ctx.params

    def fit_one(frame, point: dict, iters: int, num_blocks: int) -> FactorModel:
        # the model's params are what it ran: a screen fits fewer iterations
        return spark_fit(frame, train, {**point, "max_iter": iters}, p.seed, num_blocks, maps)

    return grid_search(get_spark(ctx.settings), train[["user_idx", "movie_idx", "rating"]], points, fit_one, score,
                       NDCG, strategy=p.als_search, eta=p.als_halving_eta, min_rows=HALVING_MIN_ROWS,
                       line_search=p.als_line_search, workers=p.als_parallel_fits, at_scale=1, track=track,
                       staging=folder, label="implicit ALS")


def run_implicit_als(ctx) -> dict:
    """Stage ``implicit_als``: the engine's grid on validation NDCG@10, the chosen point's lists scored on test."""
    p = ctx.params
    engine = p.ials_engine  # one of the Param's choices (resolve_params checks them)
    points = engine_grid(p)

    def fit(split, _baseline, folder, parent) -> Fitted:
        maps = id_maps(split.train)

        def score(model: FactorModel) -> dict:
            return {"val_ndcg_at_10": evaluate_ranking(model, split, splits=("val",))["val_ndcg_at_10"] or 0.0}

        def track(point: dict):
            name = (f"implicit als rank={point['rank']} reg={point['reg_param']:g} alpha={point['alpha']:g} "
                    f"iters={point['max_iter']}")
            return tracking.child_run(parent, ctx, name, split.summary)

        started = time.perf_counter()
        if engine == "spark":
            searched = search_spark(ctx, split.train, points, maps, score, track, folder)
        else:
            searched = search_library(p, split.train, points, maps, score, track)
        results = [{**q, "skipped": r["skipped"]} if r.get("skipped") == SKIPPED_BY_LINE_SEARCH else r
                   for r, q in zip(searched.results, points)]  # a point never fitted: no scores, no seconds
        (folder / "grid.json").write_text(storage.strict_json(results, indent=2))  # a diverged fit: null
        point = searched.point
        if not searched.full:
            log.info("implicit ALS: the %d-iteration screen fit of rank=%d reg=%g alpha=%g ranks best on validation "
                     "(NDCG@10 %.4f, above every fit with all its iterations): it is the model", point["max_iter"],
                     point["rank"], point["reg_param"], point["alpha"], searched.score)
        return Fitted(searched.model, params={f"best_{k}": v for k, v in point.items()}
                      | {"grid_points": len(points), "engine": engine},
                      metrics={"grid_seconds": time.perf_counter() - started}, artifacts=[folder / "grid.json"],
                      section={"engine": engine, "grid": results, "best_params": point, "search": searched.search})

    return run_candidate(ctx, "implicit_als", fit, kind="ranking")
