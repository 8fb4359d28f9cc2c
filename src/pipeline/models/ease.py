"""EASE (Steck 2019): a closed-form item-item ranking model on the training matrix X.

    B = argmin ||X - X B||^2 + lambda ||B||^2  subject to diag(B) = 0
      = I - P diag(1 / diag(P)),  P = (X^T X + lambda I)^-1

X[u, i] is the input weight of u's rating of i (``item_item.INPUTS``: 1 for every rating, the rating / 5, or 1 for
ratings of 3.5 and more), and a user's score for movie j is the sum of X[u, i] B[i, j] over the movies i in their
history. The input and ``lambda`` are chosen together on validation NDCG@10
(docs/adr/0069-ease-input-from-the-rating.md). The catalogue is the movies with at least ``min_ratings`` training
ratings (a movie rated once or twice is almost never a useful top-10 pick; on ml-latest-small keeping those with >=
3 leaves NDCG unchanged and makes the inverse 8x cheaper); the stage is skipped, with the reason logged, when that
catalogue exceeds ``ease_max_items`` (the items x items matrices must fit in memory: 3 float32 copies). The inverse
comes from a Cholesky factorisation (float32, LAPACK potrf + potri); the weights are stored as float16 (the same
top-10 lists on ml-latest-small, half the size).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.errors import DataValidationError
from pipeline.models.item_item import ItemItemModel, history_matrix, input_weights
from pipeline.models.protocol import Fitted, load_split, run_candidate
from pipeline.models.ranking import evaluate_ranking, map_threads

log = logging.getLogger(__name__)


def catalogue(train: pd.DataFrame, min_ratings: int) -> np.ndarray:
    """Movie ids with at least ``min_ratings`` training ratings, sorted."""
    counts = train.groupby("movie_id").size()
    return np.sort(counts.index[counts.to_numpy() >= min_ratings].to_numpy(np.int64))


GRAM_BLOCK_ENTRIES = 4_000_000  # (movie, movie) cells of X^T X computed per block


def gram_matrix(train: pd.DataFrame, movie_ids: np.ndarray, workers: int | None = None,
                input: str = "binary") -> np.ndarray:
    """X^T X of the user x movie matrix of ``input`` weights restricted to ``movie_ids`` (float32, dense; exact for
    binary input: sums of ones). A block of columns at a time, only its rows on and above the diagonal (the matrix
    is symmetric: half the sparse products; the lower triangle is copied), ``workers`` blocks side by side (default
    ``map_threads``; scipy's products release the GIL; docs/adr/0036-ease-sparse-histories.md)."""
    n = len(movie_ids)
    cols = pd.Index(movie_ids).get_indexer(train["movie_id"].to_numpy())
    keep = cols >= 0
    users, _ = pd.factorize(train["user_id"].to_numpy()[keep])
    ratings = train["rating"].to_numpy(np.float32)[keep] if "rating" in train.columns else None
    x = history_matrix(users, cols[keep], input_weights(input, ratings, int(keep.sum())),
                       (int(users.max()) + 1 if len(users) else 0, n)).tocsc()
    gram = np.zeros((n, n), dtype=np.float32)
    width = max(1, GRAM_BLOCK_ENTRIES // max(n, 1))

    def block(start: int) -> None:
        stop = min(start + width, n)
        gram[:stop, start:stop] = (x[:, :stop].T @ x[:, start:stop]).toarray()  # rows up to the block's end

    list(map_threads(block, range(0, n, width), workers))
    _upper_to_symmetric(gram)
    return gram


def _upper_to_symmetric(m: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle of the square ``m`` onto its lower one, in place, a block of rows at a time
    (no second n x n matrix)."""
    n = len(m)
    for s in range(0, n, block):
        e = min(s + block, n)
        m[e:, s:e] = m[s:e, e:].T
        m[s:e, s:e] = np.triu(m[s:e, s:e]) + np.triu(m[s:e, s:e], 1).T


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """B for one lambda from the Gram matrix (float32; the Gram matrix is not modified).

    The inverse is LAPACK's Cholesky inverse (potrf + potri, ~n^3 flops) rather than a Cholesky solve against
    the identity (~2.3 n^3): half the time at 5,000-10,000 movies, the same matrix to float32 rounding.
    """
    from scipy.linalg import lapack

    g = gram.copy()
    g[np.diag_indices_from(g)] += np.float32(lam)
    # g is symmetric, so its transpose is the same matrix in Fortran order: LAPACK factorises it in place
    factor, info = lapack.spotrf(g.T, lower=1, overwrite_a=1, clean=0)
    if info == 0:
        factor, info = lapack.spotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: X^T X + {lam:g} I is not positive definite (LAPACK info {info})")
    b = factor.T  # C order again; LAPACK's lower triangle (Fortran order) is this view's upper one
    del g, factor
    _upper_to_symmetric(b)
    b /= -np.diag(b).copy()[None, :]  # in place: one items x items matrix less at the peak (400 MB at 10,000)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32, copy=False)


def fit_ease(train: pd.DataFrame, lam: float, min_ratings: int = 3, gram: np.ndarray | None = None,
             movie_ids: np.ndarray | None = None, input: str = "binary") -> ItemItemModel:
    if movie_ids is None:
        movie_ids = catalogue(train, min_ratings)
    if len(movie_ids) == 0:
        raise DataValidationError(f"EASE: no movie has {min_ratings} or more training ratings")
    gram = gram_matrix(train, movie_ids, input=input) if gram is None else gram
    # float16, as stored and registered: the lists evaluated here are those the registry's copy ranks
    return ItemItemModel("ease", movie_ids, ease_weights(gram, lam).astype(np.float16),
                         meta={"lambda": float(lam), "input": input, "min_ratings": int(min_ratings),
                               "items": int(len(movie_ids))})


# --- the stage ----------------------------------------------------------------------------------------------


def run_ease(ctx) -> dict:
    """Stage ``ease``: input and lambda chosen on validation NDCG@10 (one MLflow child run per pair); score on
    test. One Gram matrix per input, one inverse per pair."""
    p = ctx.params

    def fit(split, _baseline, folder, parent) -> Fitted:
        movie_ids = catalogue(split.train, p.ease_min_ratings)
        started = time.perf_counter()
        results, best = [], None
        points = [(name, lam) for name in p.ease_inputs for lam in p.ease_lambdas]
        for name in p.ease_inputs:
            gram = gram_matrix(split.train, movie_ids, input=name)
            for lam in p.ease_lambdas:
                i = points.index((name, lam)) + 1
                with tracking.child_run(parent, ctx, f"ease input={name} lambda={lam:g}", split.summary) as record:
                    t0 = time.perf_counter()
                    model = fit_ease(split.train, lam, p.ease_min_ratings, gram=gram, movie_ids=movie_ids,
                                     input=name)
                    fit_s = time.perf_counter() - t0
                    val = evaluate_ranking(model, split, splits=("val",))
                    result = {"input": name, "lambda": lam, "val_ndcg_at_10": val["val_ndcg_at_10"],
                              "fit_s": round(fit_s, 3)}
                    record({"input": name, "lambda": lam}, {"val_ndcg_at_10": val["val_ndcg_at_10"] or 0.0,
                                                            "fit_s": fit_s})
                results.append(result)
                log.info("EASE %d/%d (input %s, lambda %g): validation NDCG@10 %.4f (%.1f s)", i, len(points), name,
                         lam, result["val_ndcg_at_10"] or 0.0, fit_s)
                if best is None or (result["val_ndcg_at_10"] or 0.0) > (best[0]["val_ndcg_at_10"] or 0.0):
                    best = (result, model)
            del gram
        (folder / "grid.json").write_text(json.dumps(results, indent=2))
        chosen, model = best
        return Fitted(model, params={"best_input": chosen["input"], "best_lambda": chosen["lambda"],
                                     "items": int(len(movie_ids)), "min_ratings": p.ease_min_ratings},
                      metrics={"grid_seconds": time.perf_counter() - started}, artifacts=[folder / "grid.json"],
                      section={"grid": results, "best_input": chosen["input"], "best_lambda": chosen["lambda"],
                               "items": int(len(movie_ids))})

    movie_ids = catalogue(load_split(ctx, "ease").train, p.ease_min_ratings)
    if len(movie_ids) > p.ease_max_items:
        reason = (f"catalogue of {len(movie_ids):,} movies with >= {p.ease_min_ratings} ratings exceeds "
                  f"ease_max_items={p.ease_max_items:,} (its item x item matrices would not fit comfortably)")
        log.warning("ease: skipped: %s", reason)
        return {"models": {"ease": {"skipped": reason}}}
    if len(movie_ids) == 0:  # too few users (2 users: no movie has 3 training ratings)
        reason = (f"no movie has {p.ease_min_ratings} or more training ratings (ease_min_ratings="
                  f"{p.ease_min_ratings}): EASE has no catalogue to rank")
        log.warning("ease: skipped: %s", reason)
        return {"models": {"ease": {"skipped": reason}}}
    return run_candidate(ctx, "ease", fit, kind="ranking")
