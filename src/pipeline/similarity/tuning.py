"""How good an LSH table is and which LSH parameters to use: recall against the exact table, a cost model,
and the choice of the cheapest parameters that reach a target recall on a sample of movies."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import check_k
from pipeline.similarity.exact import RESCORE_MARGIN, exact_rows, prepare, result_frame
from pipeline.similarity.hashing import LSHParams, check_lsh_params, lsh_codes
from pipeline.similarity.lsh import (
    Orderings,
    finish_rows,
    merge_rows,
    query_block_hits,
)

log = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-6  # cosine scores this close to the exact k-th count as ties in lsh_recall_at_k_with_ties


# The grid choose_lsh_params searches, cheapest first for the input's size (estimated_cost): the candidates on
# the recall/cost frontier measured on clustered embeddings of 10^4..10^5 items and ml-latest-small's ALS
# factors. On unit vectors a bucket length >= 1 gives SimHash (see the module doc); more hash tables cost
# Spark time, more orderings and bigger blocks driver time.
DEFAULT_CANDIDATES = tuple(
    [LSHParams(1.0, tables, orderings, 256)
     for tables in (32, 64, 128, 256) for orderings in (8, 12, 16, 24, 32, 48, 64, 96, 128) if orderings <= tables]
    + [LSHParams(1.0, tables, orderings, 512)
       for tables, orderings in ((32, 8), (64, 12), (64, 16), (128, 16), (256, 32))]
)


# --- recall and parameter choice ---------------------------------------------------------------------------


def neighbour_recall(approx: pd.DataFrame, exact: pd.DataFrame, k: int, tie_tolerance: float | None = None) -> float:
    """Mean over the exact table's movies of |approx top-k & exact top-k| / |exact top-k| (k unless fewer exist).

    ``tie_tolerance`` (similarity scores only): also count an approximate neighbour whose score is within the
    tolerance of the exact k-th score, i.e. an equally good neighbour that lost a tie to a lower movie id.
    """
    k = check_k(k, "similar_k")
    a = approx.loc[approx["rank"] <= k, ["movie_id", "similar_movie_id", "score"]]
    e = exact.loc[exact["rank"] <= k, ["movie_id", "similar_movie_id", "score"]]
    if e.empty:
        return float("nan")
    per_item = e.groupby("movie_id").size()
    if tie_tolerance is None:
        pairs = a[["movie_id", "similar_movie_id"]].drop_duplicates()
        hits = e.merge(pairs, on=["movie_id", "similar_movie_id"]).groupby("movie_id").size()
    else:
        kth = e.groupby("movie_id")["score"].min()
        good = a[a["score"].to_numpy() >= a["movie_id"].map(kth).to_numpy() - tie_tolerance]
        hits = good.groupby("movie_id").size()
        hits = np.minimum(hits, per_item.reindex(hits.index))
    return float((hits.reindex(per_item.index, fill_value=0) / per_item).mean())


def estimated_cost(n: int, params: LSHParams) -> float:
    """Rough seconds of lsh_top_k on a 2-core machine (measured): hashing (one product with Spark's random
    vectors), then per ordering a sort, the block products and a merge."""
    return 0.01 + n * (params.num_hash_tables * 3e-9 + params.num_orderings * (params.block_size * 2.6e-9 + 2.3e-7))


def choose_lsh_params(spark, movie_ids, vectors, k: int, target_recall: float = 0.95, seed: int = 42,
                      sample: int = 1000, candidates=None, margin: float = 0.01,
                      embeddings_path: Path | None = None) -> dict:
    """The cheapest candidate LSHParams whose recall@k on ``sample`` query movies (against all movies) reaches
    ``target_recall + margin`` (the margin absorbs the sample's error).

    Spark hashes once per bucket length, with the most hash tables any candidate needs: its
    BucketedRandomProjectionLSH draws the random vectors one after the other from the seed, so a candidate with
    fewer tables gets the leading ones. Orderings are drawn the same way, so a candidate with more orderings
    reuses the query results of the ones before. Returns {"params", "recall", "reached", "sample", "tried":
    [{params, recall, recall_with_ties, estimated_s}, ...], "stronger": [LSHParams, ...]}; when no candidate
    reaches the target, reached is False and params the fallback described at the end. "stronger" lists the
    escalation steps (more candidates per item) similar_items tries when the recall measured on every item
    misses the target that the sample's estimate reached.
    """
    k = check_k(k, "similar_k")
    items = prepare(movie_ids, vectors)
    n = items.n
    # blocks must hold more than 2k items (see lsh_top_k); dict.fromkeys drops the duplicates this makes
    candidates = sorted(dict.fromkeys(replace(c, seed=seed, block_size=max(c.block_size, 2 * k + 2))
                                      for c in (candidates or DEFAULT_CANDIDATES)),
                        key=lambda c: estimated_cost(n, c))
    for c in candidates:
        check_lsh_params(c)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    exact_frame = result_frame(items, *exact_rows(items, k, "cosine", rows))
    unit_padded = np.vstack([items.unit, np.zeros((1, items.unit.shape[1]), np.float32)])
    m, keep = min(k, n - 1), min(k + RESCORE_MARGIN, n - 1)
    codes_by_length: dict[float, np.ndarray] = {}
    hits: dict[tuple, tuple] = {}
    tried: list[dict] = []
    for params in candidates:
        if params.bucket_length not in codes_by_length:
            widest = max(c.num_hash_tables for c in candidates if c.bucket_length == params.bucket_length)
            codes_by_length[params.bucket_length] = lsh_codes(
                spark, items, replace(params, num_hash_tables=widest), embeddings_path)
        codes = codes_by_length[params.bucket_length][:, :params.num_hash_tables]
        orderings = Orderings(params, n)
        found = []
        for j in range(params.num_orderings):
            key = (params.bucket_length, params.num_hash_tables, params.block_size, j)
            if key not in hits:
                hits[key] = query_block_hits(items, unit_padded, codes, orderings, j, params.block_size, rows, m)
            found.append(hits[key])
        cand, _ = merge_rows(np.hstack([f[0] for f in found]), np.hstack([f[1] for f in found]), keep, n)
        approx = finish_rows(items, rows, cand, k)
        recall = neighbour_recall(approx, exact_frame, k)
        tried.append({"params": params.as_dict(), "recall": round(recall, 4),
                      "recall_with_ties": round(neighbour_recall(approx, exact_frame, k, TIE_TOLERANCE), 4),
                      "estimated_s": round(estimated_cost(n, params), 3)})
        log.debug("LSH candidate %s: sample recall@%d %.4f", params, k, recall)
        if recall >= target_recall + margin:
            return {"params": params, "recall": recall, "reached": True, "sample": len(rows), "tried": tried,
                    "stronger": _stronger(params, candidates)}
    # Recall can have a ceiling: the exact ties of a group of identical directions (e.g. ALS factors of movies
    # rated by one user) go to the lowest movie ids, which only a search of the whole group finds. Then take
    # the cheapest candidate whose neighbours are as good as the exact ones (recall with ties), else the
    # cheapest within half a point of the best recall.
    best = max(t["recall"] for t in tried)
    fallback = next((t for t in tried if t["recall_with_ties"] >= target_recall + margin),
                    next(t for t in tried if t["recall"] >= best - 0.005))
    params = LSHParams(**fallback["params"])
    log.warning("no LSH candidate reached recall@%d %.3f on the sample (best %.4f); using %s (recall %.4f, with "
                "ties %.4f)", k, target_recall, best, params, fallback["recall"], fallback["recall_with_ties"])
    return {"params": params, "recall": fallback["recall"], "reached": False, "sample": len(rows), "tried": tried,
            "stronger": _stronger(params, candidates)}


def _volume(params: LSHParams) -> int:
    return params.num_orderings * params.block_size  # candidates ranked per item, summed over the orderings


def _stronger(params: LSHParams, candidates, factors=(1.5, 2.0, 3.0)) -> list[LSHParams]:
    """Escalation steps after ``params``: for each factor, the cheapest candidate (``candidates`` are in cost
    order) that ranks at least factor x as many candidates per item."""
    out: list[LSHParams] = []
    for factor in factors:
        step = next((c for c in candidates if _volume(c) >= factor * _volume(params) and c not in out), None)
        if step is not None:
            out.append(step)
    return out
