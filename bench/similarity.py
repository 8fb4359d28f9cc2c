"""Similar movies: exact BLAS top-10 against the LSH stage (Spark's LSH model + block ranking), time and recall@10.

    flock /tmp/heavy.lock .venv/bin/python bench/similarity.py [--sizes mls,100000,300000] [--dim 50]
                                                            [--als] [--embeddings FILE.parquet] [--repeats 3]

Sizes: ``mls`` is ml-latest-small scale (9,742 items); numbers are synthetic clustered embeddings of that many
items (``clustered_embeddings``: clusters of ~100 items with Dirichlet sizes, Gaussian centres, per-cluster
spread 0.3-0.8 of the centre scale, so the 10th neighbour's cosine is ~0.8 in the median, as for ALS rank-50
factors of ml-latest-small). ``--als`` adds a row for the real ALS factors (Spark ALS rank 50 on
ml-latest-small, trained here); ``--embeddings`` adds a row for any ``movie_id, vector`` parquet.

For each size: exact = ``exact_top_k`` cosine on all items (BLAS products + a group-max prefilter top-K, 2
threads); LSH = ``lsh_top_k`` with the parameters ``choose_lsh_params`` picked for that size (its own time is
reported apart), Spark session start excluded (one warm-up run on a small input first), hashing and ranking
included. Those runs re-use Spark's random vectors, which the chooser already read from the fitted model (as
the stage does); ``lsh_first_call_s`` is one more run that fits the Spark model and reads them again. Recall@10
is measured on all items against the exact table. Sizes below 50,000 items report the median of ``--repeats``
runs. At ml-latest-small scale it also times ``rank_on="spark"`` and runs the whole stage (``similar_items``),
then recomputes the LSH recall from the exported ``embeddings.parquet`` and checks it equals the reported one.
Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MLS_ITEMS = 9742


def clustered_embeddings(n: int, dim: int, per_cluster: int = 100, spread=(0.3, 0.8), seed: int = 0):
    """(movie_ids, vectors): n items in ~n/per_cluster Gaussian clusters of Dirichlet(2) sizes."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // per_cluster)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    label = rng.choice(clusters, size=n, p=rng.dirichlet(np.full(clusters, 2.0)))
    scale = rng.uniform(*spread, size=clusters).astype(np.float32)
    vectors = centres[label] + scale[label, None] * rng.standard_normal((n, dim)).astype(np.float32)
    movie_ids = np.sort(rng.choice(np.arange(1, 20 * n), size=n, replace=False))
    return movie_ids, vectors


def als_embeddings(spark, ratings_csv: Path, rank: int = 50):
    """Item factors of a plain Spark ALS (rank 50, reg 0.1, 15 iterations) on mean-centred ratings."""
    import pandas as pd
    from pyspark.ml.recommendation import ALS

    ratings = pd.read_csv(ratings_csv)
    ratings["rating"] -= ratings["rating"].mean()
    frame = spark.createDataFrame(ratings[["userId", "movieId", "rating"]])
    model = ALS(rank=rank, regParam=0.1, maxIter=15, userCol="userId", itemCol="movieId", ratingCol="rating",
                seed=0).fit(frame)
    factors = model.itemFactors.toPandas().sort_values("id")
    return factors["id"].to_numpy(np.int64), np.vstack(factors["features"].to_numpy()).astype(np.float32)


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times), times


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def bench_size(spark, name: str, movie_ids, vectors, k: int, repeats: int, full_stage: bool) -> dict:
    from pipeline import similarity as sim
    from pipeline.similarity import hashing as lsh_hashing

    n = len(movie_ids)
    repeats = repeats if n < 50_000 else 1
    exact, exact_s, exact_runs = timed(lambda: sim.exact_top_k(movie_ids, vectors, k, "cosine"), repeats)

    t0 = time.perf_counter()
    chosen = sim.choose_lsh_params(spark, movie_ids, vectors, k, target_recall=0.95)
    choose_s = time.perf_counter() - t0
    params = chosen["params"]

    parts: dict = {}

    def run_lsh():
        parts.clear()
        return sim.lsh_top_k(spark, movie_ids, vectors, k, params, timings=parts)

    lsh, lsh_s, lsh_runs = timed(run_lsh, repeats)
    recall = sim.neighbour_recall(lsh, exact, k)
    warm_parts = dict(parts)
    # the first call of a process also fits Spark's model and reads its random vectors from the JVM
    lsh_hashing._RANDOM_VECTORS.clear()
    _, first_s, _ = timed(run_lsh, 1)
    record = emit({
        "size": name, "items": n, "dim": int(np.asarray(vectors).shape[1]), "k": k,
        "exact_s": round(exact_s, 3), "lsh_s": round(lsh_s, 3), "lsh_over_exact": round(lsh_s / exact_s, 3),
        "recall_at_10": round(recall, 4),
        "recall_at_10_with_ties": round(sim.neighbour_recall(lsh, exact, k, tie_tolerance=sim.TIE_TOLERANCE), 4),
        "lsh_first_call_s": round(first_s, 3),
        "lsh_parts_s": {key: round(v, 3) for key, v in warm_parts.items()},
        "lsh_first_call_parts_s": {key: round(v, 3) for key, v in parts.items()},
        "lsh_params": params.as_dict(), "choose_s": round(choose_s, 2),
        "choose_sample_recall": round(chosen["recall"], 4), "choose_tried": len(chosen["tried"]),
        "exact_runs_s": [round(t, 3) for t in exact_runs], "lsh_runs_s": [round(t, 3) for t in lsh_runs],
    })
    if full_stage:
        record["bucket_lengths"] = bench_bucket_lengths(spark, movie_ids, vectors, k, params, exact)
        record["spark_ranking"] = bench_spark_ranking(spark, movie_ids, vectors, k, params, lsh)
        record["stage"] = bench_stage(spark, movie_ids, vectors, k, params)
    return record


def bench_bucket_lengths(spark, movie_ids, vectors, k, params, exact) -> list:
    """The chosen hash tables, orderings and blocks with shorter buckets (several slabs per projection)."""
    from dataclasses import replace

    from pipeline import similarity as sim

    out = []
    for length in (params.bucket_length, 0.5, 0.25, 0.1):
        t0 = time.perf_counter()
        table = sim.lsh_top_k(spark, movie_ids, vectors, k, replace(params, bucket_length=length))
        out.append(emit({"what": "bucket length", "bucket_length": length, "lsh_s": round(time.perf_counter() - t0, 3),
                         "recall_at_10": round(sim.neighbour_recall(table, exact, k), 4)}))
    return out


def bench_spark_ranking(spark, movie_ids, vectors, k, params, driver_table) -> dict:
    """The same candidates ranked by Spark jobs (applyInPandas per block) instead of the driver."""
    from pipeline import similarity as sim

    t0 = time.perf_counter()
    table = sim.lsh_top_k(spark, movie_ids, vectors, k, params, rank_on="spark")
    seconds = time.perf_counter() - t0
    same = table.reset_index(drop=True).equals(driver_table.reset_index(drop=True))
    return emit({"what": "lsh rank_on=spark", "lsh_s": round(seconds, 3), "same_table_as_driver": bool(same)})


def bench_stage(spark, movie_ids, vectors, k, params) -> dict:
    """similar_items end to end, then the LSH recall recomputed from the exported files."""
    import pandas as pd

    from pipeline import similarity as sim

    out = Path(tempfile.mkdtemp(prefix="bench-similarity-")) / "similarity"
    t0 = time.perf_counter()
    summary = sim.similar_items(spark, (movie_ids, vectors), k, out, lsh_params=params)["similarity"]
    seconds = time.perf_counter() - t0
    table = pd.read_parquet(summary["table"])
    ids, vecs = sim.read_embeddings(Path(summary["embeddings"]))
    recomputed = sim.neighbour_recall(table[table.metric == "lsh"], sim.exact_top_k(ids, vecs, k, "cosine"), k)
    return emit({"what": "similar_items stage", "stage_s": round(seconds, 3), "timings_s": summary["timings_s"],
                 "reported_recall": summary["lsh_recall_at_k"], "recomputed_recall": recomputed,
                 "reported_recall_with_ties": summary["lsh_recall_at_k_with_ties"],
                 "recall_matches": recomputed == summary["lsh_recall_at_k"]})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="mls,100000,300000")
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--als", action="store_true", help="add a row for Spark ALS rank-50 factors of ml-latest-small")
    parser.add_argument("--embeddings", help="add a row for this movie_id, vector parquet")
    default_source = os.environ.get("MOVIELENS_DIR",
                                    str(Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"))
    parser.add_argument("--source", default=default_source)
    args = parser.parse_args()

    from pipeline import similarity as sim
    from pipeline.config import load_settings
    from pipeline.spark import get_spark

    os.environ.setdefault("RECSYS_HOME", tempfile.mkdtemp(prefix="bench-similarity-home-"))
    spark = get_spark(load_settings())
    # warm-up: JVM classes and code generation, so that no measured run pays them
    warm_ids, warm_vectors = clustered_embeddings(3000, args.dim, seed=99)
    sim.lsh_top_k(spark, warm_ids, warm_vectors, args.k, sim.LSHParams(1.0, 16, 4, 256))
    sim.lsh_top_k(spark, warm_ids, warm_vectors, args.k, sim.LSHParams(1.0, 16, 4, 256), rank_on="spark")

    rows = []
    inputs = []
    if args.als:
        ratings = Path(args.source) / "ratings.csv"
        if ratings.exists():
            inputs.append(("ml-latest-small ALS rank 50", *als_embeddings(spark, ratings)))
        else:
            print(f"no {ratings}: skipping the ALS row", file=sys.stderr)
    if args.embeddings:
        inputs.append((Path(args.embeddings).name, *sim.read_embeddings(Path(args.embeddings))))
    for size in args.sizes.split(","):
        n = MLS_ITEMS if size == "mls" else int(size)
        label = f"ml-latest-small-like synthetic ({n})" if size == "mls" else f"synthetic {n}"
        inputs.append((label, *clustered_embeddings(n, args.dim, seed=n)))
    for label, ids, vectors in inputs:
        rows.append(bench_size(spark, label, ids, vectors, args.k, args.repeats, full_stage=len(ids) < 50_000))

    print()
    print(f"{'embeddings':42} {'items':>8} {'exact s':>9} {'LSH s':>8} {'LSH/exact':>10} {'recall@10':>10}  params")
    for r in rows:
        p = r["lsh_params"]
        print(f"{r['size']:42} {r['items']:>8} {r['exact_s']:>9.2f} {r['lsh_s']:>8.2f} {r['lsh_over_exact']:>10.2f} "
              f"{r['recall_at_10']:>10.4f}  w={p['bucket_length']} tables={p['num_hash_tables']} "
              f"orderings={p['num_orderings']} block={p['block_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
