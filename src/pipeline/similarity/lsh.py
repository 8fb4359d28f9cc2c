"""Similar movies from the champion's item embeddings: exact Euclidean and cosine top-K, and a Spark LSH top-K.

Exact (``exact_top_k``): blocked float32 matrix products (BLAS) and a top-K selection per row (a strided
group-maximum prefilter, then a sort of the few survivors: ``_top_columns_of_rows``), row blocks on threads.
The best K+2 candidates of a row are re-scored in float64 and ordered by (score, movie_id), so a pair has one
score in every table and ties go to the lower movie_id.

LSH (``lsh_top_k``, approximates the cosine ranking). The hash functions are Spark ML's: ``Normalizer`` to
unit length, then a fitted ``BucketedRandomProjectionLSHModel``, whose every "hash table" is one
``floor(x . r / bucket_length)`` with ``r`` a random unit vector Spark draws from the seed. On the driver
(``rank_on="driver"``) the model's random vectors are read back from the JVM and applied in one matrix product
(``lsh_codes``): the same values as ``model.transform`` (a test checks them equal) without a Spark job, whose
~0.3 s of scheduling alone was twice the exact search at ml-latest-small scale. On unit vectors ``|x . r| <=
1``, so a bucket length >= 1 makes each hash the side of a random hyperplane (SimHash); shorter buckets cut a
projection into slabs and, measured (bench/similarity.py), find fewer neighbours for the same cost.

Spark's ``approxSimilarityJoin`` OR-s the tables: it self-joins every pair that shares one hash value. Buckets of
a single projection hold a large share of all items, so it enumerates most pairs and loses to the exact
products (60-75 s against 4.5 s for 10,000 vectors, docs/NOTES.md). Here the candidates come instead from
``num_orderings`` orderings. An ordering sorts the items by a compound key, all hashes in its own permutation
(leading hashes differing between orderings), Gray-decoded so that keys one hash apart are adjacent, and cuts
the sorted items into blocks of at most ``block_size``. An item's candidates in an ordering are its block: its
own bucket (all hashes equal) when that is small; a slice of it when it is big, the cap that rules out a
quadratic blow-up on duplicate or degenerate vectors; and the neighbouring buckets in key order otherwise, a
free multi-probe. One small matrix product ranks a block exactly; the per-ordering top-K lists are merged,
deduplicated and re-scored like the exact ones. A block holds at least min(n, block_size / 2) items, so no
list is shorter than K while block_size > 2K.

The ranking runs on the driver by default (``rank_on="driver"``: numpy, the fastest on one machine); with
``rank_on="spark"`` the hashing (``model.transform``), keys, blocks, block products and merge run as Spark jobs
(``applyInPandas`` per block) for inputs larger than one machine. Both find the same neighbours, up to
near-ties.

Parameters (``choose_lsh_params``) are chosen on a sample of query movies, then ``similar_items`` measures the
recall on every movie against the exact cosine table and, below the target, escalates to stronger parameters.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ConfigError, DataValidationError

log = logging.getLogger(__name__)

STAGE = "similarity"
TABLE = "similar_movies.parquet"
EMBEDDINGS = "embeddings.parquet"
EXACT_METRICS = ("cosine", "euclidean")
METRICS = ("euclidean", "cosine", "lsh")

_RESCORE_MARGIN = 2  # extra float32 candidates re-scored in float64, so float32 rounding cannot drop a top-K item
_BLOCK_ELEMENTS = 1 << 20  # float32 scores per work unit: a few MB, stays in cache
_SIGNED32 = np.int64(1 << 31)
TIE_TOLERANCE = 1e-6  # cosine scores this close to the exact k-th count as ties in lsh_recall_at_k_with_ties

TABLE_SCHEMA = pa.schema([
    ("movie_id", pa.int64()), ("similar_movie_id", pa.int64()), ("metric", pa.string()),
    ("rank", pa.int32()), ("score", pa.float64()),
])
EMBEDDINGS_SCHEMA = pa.schema([("movie_id", pa.int64()), ("vector", pa.list_(pa.float32()))])


@dataclass(frozen=True)
class LSHParams:
    """How the LSH stage hashes (Spark) and gathers candidates (orderings of the hashes, blocks)."""

    bucket_length: float = 1.0
    num_hash_tables: int = 64  # Spark's numHashTables: random projections hashed per item
    num_orderings: int = 16  # candidate passes, each ordering items by its own permutation of the hashes
    block_size: int = 256  # items ranked together in one block (caps the candidates per ordering)
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


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


# --- inputs ------------------------------------------------------------------------------------------------


@dataclass
class _Items:
    """Embeddings sorted by movie_id: raw float32 vectors, unit vectors, squared norms."""

    ids: np.ndarray
    x: np.ndarray
    unit: np.ndarray
    sqnorm: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ids)


def _embeddings_of(model_or_embeddings) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(model_or_embeddings, "item_embeddings"):
        return model_or_embeddings.item_embeddings()
    movie_ids, vectors = model_or_embeddings
    return movie_ids, vectors


def _prepare(movie_ids, vectors) -> _Items:
    ids = np.asarray(movie_ids, dtype=np.int64).ravel()
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise DataValidationError(f"embeddings: expected one vector per movie id, got vectors of shape {x.shape} "
                                  f"for {len(ids)} movie ids")
    if len(ids) == 0 or x.shape[1] == 0:
        raise DataValidationError("embeddings: no items (or zero dimensions)")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataValidationError(f"embeddings: {int(bad.sum())} vectors hold NaN/inf, "
                                  f"e.g. movie_id {ids[bad][:5].tolist()}")
    order = np.argsort(ids, kind="stable")
    ids, x = ids[order], np.ascontiguousarray(x[order])
    dup = ids[1:] == ids[:-1]
    if dup.any():
        raise DataValidationError(f"embeddings: duplicate movie ids, e.g. {ids[1:][dup][:5].tolist()}")
    norms = np.linalg.norm(x, axis=1)
    # a zero vector has no direction: it stays zero, so its cosine with every item is 0
    unit = x / np.where(norms > 0, norms, 1.0).astype(np.float32)[:, None]
    return _Items(ids, x, np.ascontiguousarray(unit, dtype=np.float32), np.einsum("ij,ij->i", x, x))


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"similar_k must be a positive integer, got {k!r}")
    return int(k)


# --- selection and re-scoring ------------------------------------------------------------------------------


def _order_key32(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 in [-2^31, 2^31) with the same order (NaN-free input). Its own inverse on int32."""
    bits = values.view(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)


def _top_columns(scores: np.ndarray, m: int) -> np.ndarray:
    """Column indexes of the m largest scores along the last axis, ties to the lower column (unordered)."""
    width = scores.shape[-1]
    if m >= width:
        return np.broadcast_to(np.arange(width), scores.shape).copy()
    # score and reversed column in one int64: a value partition then selects by (score, -column)
    keys = _order_key32(np.ascontiguousarray(scores, dtype=np.float32)) << 32
    keys |= (width - 1) - np.arange(width, dtype=np.int64)
    top = np.partition(keys, width - m, axis=-1)[..., width - m:]
    return (width - 1) - (top & 0xFFFFFFFF)


def _top_columns_of_rows(scores: np.ndarray, m: int, chunks: int = 32) -> np.ndarray:
    """_top_columns for long 2-D rows (unordered; ties to the lower column), by a prefilter.

    Each row's columns are dealt into ``width // chunks`` strided groups (group g: columns g, g + G, g + 2G,
    ...): one elementwise max over ``chunks`` contiguous slices gives every group's maximum. The m-th largest
    group maximum ``tau`` is a lower bound of the row's m-th largest score (m groups each hold a score
    >= tau), so the top m lie among the scores >= tau of the groups whose maximum reaches tau: usually a few
    groups. Only those are gathered and ranked by (score, -column). Measured 3-4x faster than an
    argpartition of the whole rows (bench/similarity.py).
    """
    rows, width = scores.shape
    groups = width // chunks
    if m >= width:
        return np.broadcast_to(np.arange(width), scores.shape).copy()
    if groups <= m:  # too few groups to bound anything: a plain partition
        return _argpartition_top(scores, m)
    body = scores[:, :groups * chunks].reshape(rows, chunks, groups)
    group_max = body.max(axis=1)
    tail = scores[:, groups * chunks:]  # the last width % chunks columns: compared one by one below
    tau = np.partition(group_max, groups - m, axis=1)[:, groups - m]
    r, g = np.nonzero(group_max >= tau[:, None])
    cols = g[:, None] + groups * np.arange(chunks)[None, :]
    vals = body[r[:, None], np.arange(chunks)[None, :], g[:, None]]
    keep = vals >= tau[r][:, None]
    cand_rows, cand_cols, cand_vals = np.broadcast_to(r[:, None], cols.shape)[keep], cols[keep], vals[keep]
    if tail.shape[1]:
        tr, tc = np.nonzero(tail >= tau[:, None])
        cand_rows = np.concatenate([cand_rows, tr])
        cand_cols = np.concatenate([cand_cols, tc + groups * chunks])
        cand_vals = np.concatenate([cand_vals, tail[tr, tc]])
    order = np.lexsort((cand_cols, -cand_vals, cand_rows))
    first = np.searchsorted(cand_rows[order], np.arange(rows))  # every row has >= m candidates
    return cand_cols[order][first[:, None] + np.arange(m)[None, :]]


def _argpartition_top(scores: np.ndarray, m: int) -> np.ndarray:
    width = scores.shape[1]
    # one extra column: the best score left out tells whether a tie crosses the cut
    sel = np.argpartition(scores, width - m - 1, axis=1)[:, width - m - 1:]
    values = np.take_along_axis(scores, sel, 1)
    cut = values[:, 1:].min(axis=1)
    top = sel[:, 1:]
    for r in np.nonzero(values[:, 0] >= cut)[0]:  # a tie crosses the cut (duplicate or zero vectors)
        row = scores[r]
        above = np.flatnonzero(row > cut[r])
        top[r] = np.concatenate([above, np.flatnonzero(row == cut[r])[:m - len(above)]])  # lower columns win
    return top


_THREADPOOLS = None  # threadpoolctl's controller, built once: a fresh threadpool_limits() costs ~2 ms a call
_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child builds its own


@contextlib.contextmanager
def _single_threaded_blas():
    """Our threads split the rows; BLAS threads inside them would only oversubscribe the cores."""
    global _THREADPOOLS
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own threads
        yield
        return
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    with _THREADPOOLS.limit(limits=1, user_api="blas"):
        yield


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _parallel(fn, tasks) -> None:
    """fn(task) for every task, on a pool kept for the process (the LSH search calls this dozens of times)."""
    global _EXECUTOR
    workers = _workers()
    if workers == 1 or len(tasks) < 2:
        for task in tasks:
            fn(task)
        return
    if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():  # a pool's threads do not survive a fork
        _EXECUTOR = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="recsys-similarity"))
    with _single_threaded_blas():
        for _ in _EXECUTOR[1].map(fn, tasks):
            pass


def _rescore(items: _Items, rows: np.ndarray, cand: np.ndarray, metric: str, k: int):
    """float64 scores of (row, candidate) pairs; each row's k best by (score, movie_id). cand < 0: no candidate."""
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    if metric == "euclidean":
        diff = items.x[safe].astype(np.float64) - items.x[rows].astype(np.float64)[:, None, :]
        score = np.sqrt(np.einsum("rmd,rmd->rm", diff, diff))
        sort_score = np.where(valid, score, np.inf)
    else:
        score = np.einsum("rmd,rd->rm", items.unit[safe].astype(np.float64), items.unit[rows].astype(np.float64))
        sort_score = np.where(valid, -score, np.inf)
    neighbour_ids = np.where(valid, items.ids[safe], np.iinfo(np.int64).max)
    order = np.lexsort((neighbour_ids, sort_score), axis=-1)[:, :k]
    return np.take_along_axis(np.where(valid, cand, -1), order, 1), np.take_along_axis(score, order, 1)


def _rescore_all(items: _Items, rows: np.ndarray, cand: np.ndarray, metric: str, k: int):
    kk = min(k, cand.shape[1])
    idx = np.empty((len(rows), kk), np.int64)
    score = np.empty((len(rows), kk), np.float64)
    step = max(1, (1 << 19) // max(1, cand.shape[1] * items.x.shape[1]))
    for start in range(0, len(rows), step):
        stop = start + step
        idx[start:stop], score[start:stop] = _rescore(items, rows[start:stop], cand[start:stop], metric, kk)
    return idx, score


def _frame(items: _Items, rows: np.ndarray, idx: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    valid = idx >= 0
    rank = np.cumsum(valid, axis=1)
    r, c = np.nonzero(valid)
    return pd.DataFrame({
        "movie_id": items.ids[rows[r]],
        "similar_movie_id": items.ids[idx[r, c]],
        "rank": rank[r, c].astype(np.int32),
        "score": score[r, c].astype(np.float64),
    })


# --- exact -------------------------------------------------------------------------------------------------


def _exact(items: _Items, k: int, metric: str, rows: np.ndarray | None = None):
    if metric not in EXACT_METRICS:
        raise ConfigError(f"metric must be one of {list(EXACT_METRICS)}, got {metric!r}")
    n = items.n
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    m = min(k + _RESCORE_MARGIN, n - 1)
    if m <= 0:
        return rows, np.empty((len(rows), 0), np.int64), np.empty((len(rows), 0))
    a = items.unit if metric == "cosine" else items.x
    half_sqnorm = 0.5 * items.sqnorm
    cand = np.empty((len(rows), m), np.int64)
    # rows per product: the fastest measured on 2 cores (about 4M scores per block; more rows for huge n)
    step = 128 if n > 150_000 else int(min(256, max(40, (1 << 22) // n)))

    def block(start: int) -> None:
        r = rows[start:start + step]
        s = a[r] @ a.T
        if metric == "euclidean":
            s -= half_sqnorm[None, :]  # x.y - |y|^2/2 grows as |x-y| shrinks
        s[np.arange(len(r)), r] = -np.inf
        cand[start:start + step] = _top_columns_of_rows(s, m)

    _parallel(block, list(range(0, len(rows), step)))
    idx, score = _rescore_all(items, rows, cand, metric, k)
    return rows, idx, score


def exact_top_k(movie_ids, vectors, k: int, metric: str = "cosine", queries=None) -> pd.DataFrame:
    """The k nearest other movies of each movie (or of the ``queries`` movie ids), by cosine or Euclidean distance.

    Columns movie_id, similar_movie_id, rank (1..k), score: cosine similarity (descending) or Euclidean
    distance (ascending); ties by similar_movie_id. A zero vector has cosine 0 with everything.
    """
    k = _check_k(k)
    items = _prepare(movie_ids, vectors)
    rows = None if queries is None else _rows_of(items, queries)
    rows, idx, score = _exact(items, k, metric, rows)
    return _frame(items, rows, idx, score)


def _rows_of(items: _Items, movie_ids) -> np.ndarray:
    wanted = np.asarray(movie_ids, dtype=np.int64)
    rows = np.searchsorted(items.ids, wanted)
    rows = np.minimum(rows, items.n - 1)
    missing = items.ids[rows] != wanted
    if missing.any():
        raise ConfigError(f"query movie ids not among the embeddings: {wanted[missing][:5].tolist()}")
    return rows


# --- LSH: hashing (Spark's model) --------------------------------------------------------------------------


def write_embeddings(path: Path, movie_ids, vectors) -> Path:
    """``movie_id int64, vector list<float>``, sorted by movie_id (deterministic bytes)."""
    return _write_items(Path(path), _prepare(movie_ids, vectors))


def _write_items(path: Path, items: _Items) -> Path:
    n, d = items.x.shape
    vector = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)),
                                      pa.array(items.x.ravel(), type=pa.float32()))
    table = pa.Table.from_arrays([pa.array(items.ids, pa.int64()), vector], schema=EMBEDDINGS_SCHEMA)
    # row groups of 16k rows: Spark reads big inputs as several tasks (it splits files at row groups)
    pq.write_table(table, path, row_group_size=1 << 14)
    return path


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(movie_ids, vectors) from ``embeddings.parquet``."""
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks()
    d = len(vectors[0]) if len(vectors) else 0
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return table.column("movie_id").to_numpy(), flat.reshape(len(vectors), d)


def _hash_dtype(bucket_length: float) -> str:
    return "byte" if 1.0 / bucket_length < 120 else "int"


def _spark_hashed(spark, embeddings_path: Path, params: LSHParams, dim: int):
    """Spark plan: embeddings parquet -> unit vectors (Normalizer) -> BucketedRandomProjectionLSH hashes."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH, Normalizer
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    df = spark.read.schema("movie_id long, vector array<float>").parquet(str(embeddings_path))
    # the size in the column metadata spares fit() a job to find the dimension
    df = df.select("movie_id", array_to_vector("vector").alias("raw", metadata={"ml_attr": {"num_attrs": dim}}))
    unit = Normalizer(inputCol="raw", outputCol="features", p=2.0).transform(df)
    lsh = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes", bucketLength=params.bucket_length,
                                      numHashTables=params.num_hash_tables, seed=params.seed)
    model = lsh.fit(unit)
    cast = _hash_dtype(params.bucket_length)
    # each hash is a 1-element vector: flatten to small integers in the JVM before anything is collected
    return model.transform(unit).select(
        "movie_id", F.transform("hashes", lambda h: vector_to_array(h)[0].cast(cast)).alias("codes"), "features")


def _spark_transform_codes(spark, embeddings_path: Path, params: LSHParams, items: _Items) -> np.ndarray:
    """Spark's LSH hash values of every item by ``model.transform`` (a Spark job), ``(n, num_hash_tables)``,
    rows in the order of ``items.ids``. lsh_codes computes the same values on the driver."""
    hashed = _spark_hashed(spark, embeddings_path, params, items.x.shape[1])
    table = hashed.select("movie_id", "codes").toArrow()
    codes = table.column("codes").combine_chunks()
    values = codes.flatten().to_numpy(zero_copy_only=False)
    if len(values) != len(codes) * params.num_hash_tables:
        raise RuntimeError("Spark LSH returned hash arrays of unexpected length")
    values = values.reshape(len(codes), params.num_hash_tables)
    out_ids = table.column("movie_id").to_numpy()
    rows = _rows_of(items, out_ids)
    if len(rows) != items.n or len(np.unique(rows)) != items.n:
        raise RuntimeError(f"Spark LSH hashed {len(rows)} rows for {items.n} items")
    out = np.empty_like(values)
    out[rows] = values
    return out


# Spark's random unit vectors by (dimension, seed): the widest matrix fetched so far (see spark_random_vectors)
_RANDOM_VECTORS: dict[tuple[int, int], np.ndarray] = {}


def spark_random_vectors(spark, dim: int, num_hash_tables: int, seed: int) -> np.ndarray | None:
    """The random unit vectors of Spark's fitted ``BucketedRandomProjectionLSHModel``, ``(tables, dim)`` float64.

    Spark fits the model on an empty DataFrame whose column metadata gives the dimension (fit() needs nothing
    else: no job runs) and the matrix is read back from the JVM model. They depend only on (dim, tables,
    seed), and Spark draws them one row after the other from the seed, so the widest matrix fetched is kept
    for the process and a narrower one is its leading rows. None under Spark Connect (no JVM model to read):
    callers then hash with model.transform.
    """
    cached = _RANDOM_VECTORS.get((dim, seed))
    if cached is not None and cached.shape[0] >= num_hash_tables:
        return cached[:num_hash_tables]
    from pyspark.ml.common import _java2py
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import StructField, StructType

    schema = StructType([StructField("features", VectorUDT(), metadata={"ml_attr": {"num_attrs": dim}})])
    model = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes", numHashTables=num_hash_tables,
                                        bucketLength=1.0, seed=seed).fit(spark.createDataFrame([], schema))
    java_model = getattr(model, "_java_obj", None)
    if java_model is None:
        return None
    matrix = np.asarray(_java2py(spark.sparkContext, java_model.randMatrix()).toArray(), dtype=np.float64)
    if matrix.shape != (num_hash_tables, dim):
        raise RuntimeError(f"Spark LSH model holds a {matrix.shape} matrix, expected {(num_hash_tables, dim)}")
    _RANDOM_VECTORS[(dim, seed)] = matrix
    return matrix


def lsh_codes(spark, items: _Items, params: LSHParams, embeddings_path: Path | None = None) -> np.ndarray:
    """Spark's BucketedRandomProjectionLSH hashes of the unit vectors, ``(n, num_hash_tables)``.

    The model's hash functions, ``floor(r . x / bucket_length)`` with x normalized in float64 as Spark's
    Normalizer does, applied on the driver in one matrix product: the values model.transform gives (checked
    in the tests) without a Spark job (~0.3 s on 10,000 items, more than the rest of the search).
    """
    matrix = spark_random_vectors(spark, items.x.shape[1], params.num_hash_tables, params.seed)
    if matrix is None:
        with _embeddings_file(items, embeddings_path) as path:
            return _spark_transform_codes(spark, path, params, items)
    dtype = np.int8 if _hash_dtype(params.bucket_length) == "byte" else np.int32
    out = np.empty((items.n, params.num_hash_tables), dtype)
    r_t = np.ascontiguousarray(matrix.T)
    step = max(256, (1 << 19) // params.num_hash_tables)  # small float64 temporaries: they stay in cache

    def work(start: int) -> None:
        x = items.x[start:start + step].astype(np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        x /= np.where(norm > 0, norm, 1.0)[:, None]
        projection = x @ r_t
        if params.bucket_length != 1.0:
            projection *= 1.0 / params.bucket_length  # Spark: gemv with alpha = 1 / bucket_length
        out[start:start + step] = np.floor(projection, out=projection)

    _parallel(work, list(range(0, items.n, step)))
    return out


# --- LSH: candidates (orderings and blocks) ----------------------------------------------------------------


def _lead_hashes(n: int, block_size: int) -> int:
    """How many leading hashes decide which block an item falls in."""
    return max(1, math.ceil(math.log2(max(2.0, n / max(1, block_size)))))


def _ordering_columns(num_hashes: int, num_orderings: int, lead: int, width: int, seed: int) -> list[np.ndarray]:
    """Each ordering's hash columns, most significant first: its own leading hashes, then the rest shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.permutation(num_hashes)
    plans = []
    for j in range(num_orderings):
        leading = np.roll(base, -((j * lead) % num_hashes))[:min(lead, num_hashes)]
        rest = np.setdiff1d(base, leading)
        plans.append(np.concatenate([leading, rng.permutation(rest)])[:width])
    return plans


def _code_range(bucket_length: float) -> tuple[int, int]:
    """Hash values of unit vectors lie in [floor(-1/w), ceil(1/w) - 1] (the top edge only for x == r: clipped)."""
    return math.floor(-1.0 / bucket_length), math.ceil(1.0 / bucket_length) - 1


class _Orderings:
    """Sort keys of the orderings: each one's hashes as bits, Gray-decoded, packed into 63 bits.

    Depends only on the parameters and n, so Spark partitions compute the same keys as the driver.
    """

    def __init__(self, params: LSHParams, n: int):
        self.lo, hi = _code_range(params.bucket_length)
        self.bits = max(1, math.ceil(math.log2(hi - self.lo + 1)))
        width = max(1, 63 // self.bits)
        lead = _lead_hashes(n, params.block_size)
        self.plans = _ordering_columns(params.num_hash_tables, params.num_orderings, lead, width, params.seed)

    def keys(self, codes: np.ndarray, j: int) -> np.ndarray:
        rows = codes.shape[0]
        values = codes[:, self.plans[j]]
        if self.bits == 1:
            bits = (values > self.lo).view(np.uint8)  # codes are lo or lo + 1
        else:
            values = np.clip(values.astype(np.int64) - self.lo, 0, (1 << self.bits) - 1)
            shifts = np.arange(self.bits - 1, -1, -1)
            bits = ((values[:, :, None] >> shifts) & 1).reshape(rows, -1).astype(np.uint8)
        padded = np.zeros((rows, 64), np.uint8)
        padded[:, 1:1 + min(63, bits.shape[1])] = bits[:, :63]
        key = np.packbits(padded, axis=1).view(">u8").ravel().astype(np.uint64)
        # Gray decode (prefix XOR from the top bit): keys one hash apart become adjacent
        for shift in (1, 2, 4, 8, 16, 32):
            key ^= key >> np.uint64(shift)
        return key.view(np.int64)

    def order(self, codes: np.ndarray, j: int) -> np.ndarray:
        # items are sorted by movie_id, so a stable sort breaks key ties by movie_id
        return np.argsort(self.keys(codes, j), kind="stable")


def _block_count(n: int, block_size: int) -> int:
    return max(1, -(-n // max(2, block_size)))


def _blocks(order: np.ndarray, block_size: int) -> np.ndarray:
    """(blocks, size) item indexes; position p falls in block p*blocks//n; short blocks end with the pad n."""
    n = len(order)
    nb = _block_count(n, block_size)
    starts = -(-(np.arange(nb + 1) * n) // nb)  # first position of each block
    size = int(np.diff(starts).max())
    pos = starts[:-1, None] + np.arange(size)[None, :]
    return np.where(pos < starts[1:, None], order[np.minimum(pos, n - 1)], n)


_MASKED = np.float32(-3.0e38)  # finite "no candidate" score: its low mantissa bits can carry a column too


def _rank_blocks(unit_padded: np.ndarray, blocks: np.ndarray, m: int, out_idx: np.ndarray, out_score: np.ndarray):
    """Top-m by cosine within every block, written to the rows of its items (each item is in one block).

    The column of each score rides in its low mantissa bits, so a plain (SIMD) sort of the float32 scores
    selects the candidates and their columns at once (measured 4x faster than argpartition on rows this
    short). Scores move by < 2^-14 relative, which only decides near-ties among candidates; the kept ones are
    re-scored exactly afterwards.
    """
    n = unit_padded.shape[0] - 1
    nb, size = blocks.shape
    m = min(m, size - 1)
    col_bits = max(1, int(size - 1).bit_length())
    col_mask = np.int32((1 << col_bits) - 1)
    columns = np.arange(size, dtype=np.int32)
    reversed_columns = col_mask - columns
    # enough work units for every thread, each small enough to stay in cache
    step = max(1, min(_BLOCK_ELEMENTS // (size * size), -(-nb // (4 * _workers()))))

    def work(start: int) -> None:
        members = blocks[start:start + step]
        x = unit_padded[members]
        s = np.matmul(x, x.transpose(0, 2, 1))
        s[:, columns, columns] = _MASKED
        pad = members == n
        if pad.any():
            s[np.broadcast_to(pad[:, None, :], s.shape)] = _MASKED
        bits = s.view(np.int32)
        bits &= ~col_mask
        bits |= reversed_columns  # among equal (non-negative) scores the lower column wins
        top = np.sort(s, axis=2)[:, :, size - m:]
        low = top.view(np.int32)
        cand = members[np.arange(len(members))[:, None, None], col_mask - (low & col_mask)]
        cand[top <= _MASKED / 2] = n
        low &= ~col_mask  # the same truncated score for a pair in every ordering: ties merge by lower index
        real = ~pad
        out_idx[members[real]] = cand[real]
        out_score[members[real]] = top[real]

    _parallel(work, list(range(0, nb, step)))


def _merge_rows(idx: np.ndarray, score: np.ndarray, keep: int, n: int):
    """Per row: drop repeated candidates, keep the ``keep`` best by (score, -index). idx == n: no candidate."""
    low = _order_key32(np.ascontiguousarray(score, dtype=np.float32)) + _SIGNED32  # as unsigned 32 bits
    by_item = np.sort((idx.astype(np.int64) << 32) | low, axis=1)
    cand = by_item >> 32
    low = by_item & 0xFFFFFFFF
    repeated = np.zeros(cand.shape, bool)
    repeated[:, :-1] = cand[:, :-1] == cand[:, 1:]  # sorted by (index, score): the last copy has the best score
    low[repeated | (cand == n)] = 0
    width = cand.shape[1]
    keep = min(keep, width)
    packed = ((low - _SIGNED32) << 32) | (0xFFFFFFFF - cand)
    top = np.partition(packed, width - keep, axis=1)[:, width - keep:]
    out_idx = 0xFFFFFFFF - (top & 0xFFFFFFFF)
    high = top >> 32
    out_idx[high == -_SIGNED32] = n
    float_bits = high.astype(np.int32)
    float_bits ^= (float_bits >> 31) & 0x7FFFFFFF
    return out_idx, float_bits.view(np.float32)


def _merge_into(best_idx: np.ndarray, best_score: np.ndarray, new_idx: np.ndarray, new_score: np.ndarray, n: int):
    """best <- the best of (best, new) per row, a few thousand rows at a time (small temporaries, threads)."""
    keep = best_idx.shape[1]
    step = max(256, (1 << 18) // (keep + new_idx.shape[1]))

    def work(start: int) -> None:
        sl = slice(start, start + step)
        best_idx[sl], best_score[sl] = _merge_rows(np.hstack([best_idx[sl], new_idx[sl]]),
                                                   np.hstack([best_score[sl], new_score[sl]]), keep, n)

    _parallel(work, list(range(0, best_idx.shape[0], step)))


def _lsh_candidates(items: _Items, codes: np.ndarray, params: LSHParams, k: int, timings: dict | None = None):
    """Every item's best LSH candidates (row indexes, ``n`` where none), merged over the orderings."""
    n = items.n
    m = min(k, n - 1)
    keep = min(k + _RESCORE_MARGIN, n - 1)
    unit_padded = np.vstack([items.unit, np.zeros((1, items.unit.shape[1]), np.float32)])
    orderings = _Orderings(params, n)
    group = min(params.num_orderings, max(1, 64 // m))  # orderings ranked between two merges
    # allocated once: fresh large arrays cost a page fault per 4 KiB
    buf_idx = np.empty((n, group * m), np.int64)
    buf_score = np.empty((n, group * m), np.float32)
    best_idx = np.full((n, keep), n, np.int64)
    best_score = np.full((n, keep), _MASKED, np.float32)
    t_order = t_rank = t_merge = 0.0
    for first in range(0, params.num_orderings, group):
        count = min(group, params.num_orderings - first)
        buf_idx.fill(n)
        buf_score.fill(_MASKED)
        for g in range(count):
            t0 = time.perf_counter()
            blocks = _blocks(orderings.order(codes, first + g), params.block_size)
            t1 = time.perf_counter()
            mm = min(m, blocks.shape[1] - 1)
            _rank_blocks(unit_padded, blocks, mm, buf_idx[:, g * m:g * m + mm], buf_score[:, g * m:g * m + mm])
            t_order += t1 - t0
            t_rank += time.perf_counter() - t1
        t0 = time.perf_counter()
        _merge_into(best_idx, best_score, buf_idx[:, :count * m], buf_score[:, :count * m], n)
        t_merge += time.perf_counter() - t0
    if timings is not None:
        timings.update(order=t_order, rank_blocks=t_rank, merge=t_merge)
    return best_idx


def _query_block_hits(items: _Items, unit_padded: np.ndarray, codes: np.ndarray, orderings: _Orderings, j: int,
                      block_size: int, rows: np.ndarray, m: int):
    """One ordering of _lsh_candidates for the given rows only: each row's top-m within its block."""
    n = items.n
    order = orderings.order(codes, j)
    blocks = _blocks(order, block_size)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    members = blocks[position[rows] * blocks.shape[0] // n]  # (queries, block size)
    s = np.einsum("qd,qsd->qs", items.unit[rows], unit_padded[members]).astype(np.float32)
    s[(members == rows[:, None]) | (members == n)] = _MASKED
    cols = _top_columns(s, min(m, members.shape[1] - 1))
    idx = np.take_along_axis(members, cols, 1)
    score = np.take_along_axis(s, cols, 1)
    idx[score <= _MASKED / 2] = n
    return idx, score


def _finish(items: _Items, rows: np.ndarray, cand: np.ndarray, k: int) -> pd.DataFrame:
    cand = np.where(cand >= items.n, -1, cand)
    idx, score = _rescore_all(items, rows, cand, "cosine", k)
    return _frame(items, rows, idx, score)


def _params(bucket_length, num_hash_tables, seed, num_orderings, block_size) -> LSHParams:
    if isinstance(bucket_length, LSHParams):
        return bucket_length
    params = LSHParams(float(bucket_length), int(num_hash_tables),
                       int(num_orderings if num_orderings is not None else max(1, num_hash_tables // 4)),
                       int(block_size), int(seed))
    _check_params(params)
    return params


def _check_params(params: LSHParams) -> None:
    if not params.bucket_length > 0 or params.num_hash_tables < 1 or params.num_orderings < 1 or params.block_size < 2:
        raise ConfigError(f"LSH parameters out of range: {params}")


@contextlib.contextmanager
def _embeddings_file(items: _Items, embeddings_path: Path | None):
    if embeddings_path is not None:
        yield Path(embeddings_path)
        return
    with tempfile.TemporaryDirectory(prefix="recsys-lsh-") as tmp:
        yield _write_items(Path(tmp) / EMBEDDINGS, items)


def lsh_top_k(spark, movie_ids, vectors, k: int, bucket_length=1.0, num_hash_tables: int = 64, seed: int = 42, *,
              num_orderings: int | None = None, block_size: int = 256, rank_on: str = "driver",
              embeddings_path: Path | None = None, timings: dict | None = None) -> pd.DataFrame:
    """Approximate cosine top-k: Spark LSH buckets, candidates ranked exactly within blocks (see the module doc).

    ``bucket_length`` may also be an LSHParams. ``num_orderings`` defaults to num_hash_tables // 4.
    ``embeddings_path``: the embeddings already written as parquet (Spark reads it instead of a temporary copy).
    Same columns as exact_top_k; score is the cosine similarity.
    """
    k = _check_k(k)
    params = _params(bucket_length, num_hash_tables, seed, num_orderings, block_size)
    if params.block_size <= 2 * k:
        raise ConfigError(f"LSH block_size {params.block_size} must exceed 2 x similar_k ({k}) for full lists")
    items = _prepare(movie_ids, vectors)
    timings = {} if timings is None else timings
    rows = np.arange(items.n)
    if items.n == 1:
        return _frame(items, rows, np.empty((1, 0), np.int64), np.empty((1, 0)))
    t0 = time.perf_counter()
    if rank_on == "spark":
        with _embeddings_file(items, embeddings_path) as path:
            cand = _spark_rank(spark, path, items, params, k)
    elif rank_on == "driver":
        codes = lsh_codes(spark, items, params, embeddings_path)
        timings["hash"] = time.perf_counter() - t0
        cand = _lsh_candidates(items, codes, params, k, timings)
    else:
        raise ConfigError(f"rank_on must be 'driver' or 'spark', got {rank_on!r}")
    t1 = time.perf_counter()
    frame = _finish(items, rows, cand, k)
    timings["rescore"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    return frame


# --- LSH: ranking as Spark jobs ----------------------------------------------------------------------------


def _spark_rank(spark, path: Path, items: _Items, params: LSHParams, k: int) -> np.ndarray:
    """The candidate search of _lsh_candidates as Spark jobs: keys per ordering (mapInPandas), blocks (window),
    block products (applyInPandas), merge (window). Returns the same (n, k+margin) candidate rows."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    n = items.n
    orderings = _Orderings(params, n)
    nb = _block_count(n, params.block_size)
    m = min(k, n - 1)
    keep = min(k + _RESCORE_MARGIN, n - 1)
    hashed = _spark_hashed(spark, path, params, items.x.shape[1])

    def keys_of(frames):
        for frame in frames:
            codes = np.stack(frame["codes"].to_numpy()) if len(frame) else np.empty((0, params.num_hash_tables))
            for j in range(params.num_orderings):
                yield pd.DataFrame({"movie_id": frame["movie_id"].to_numpy(), "ordering": np.int32(j),
                                    "key": orderings.keys(codes, j) if len(frame) else np.empty(0, np.int64)})

    def rank_block(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.sort_values("position")
        x = np.stack(frame["vector"].to_numpy()).astype(np.float32)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        cols = _top_columns(s, min(m, len(x) - 1))
        ids = frame["movie_id"].to_numpy()
        return pd.DataFrame({"movie_id": np.repeat(ids, cols.shape[1]), "cand": ids[cols].ravel(),
                             "score": np.take_along_axis(s, cols, 1).ravel()})

    keys = hashed.select("movie_id", "codes").mapInPandas(keys_of, "movie_id long, ordering int, key long")
    # positions within each ordering, sorted by (key, movie_id) as on the driver, cut into blocks
    position = F.row_number().over(Window.partitionBy("ordering").orderBy("key", "movie_id")) - 1
    placed = keys.withColumn("position", position).withColumn("block", F.expr(f"(position * {nb}L) div {n}L"))
    vectors = hashed.select("movie_id", vector_to_array("features", "float32").alias("vector"))
    pairs = (placed.join(vectors, "movie_id")
             .groupBy("ordering", "block")
             .applyInPandas(rank_block, "movie_id long, cand long, score float"))
    best = (pairs.groupBy("movie_id", "cand").agg(F.max("score").alias("score"))
            .withColumn("r", F.row_number().over(Window.partitionBy("movie_id").orderBy(F.desc("score"), "cand")))
            .where(F.col("r") <= keep)
            .select("movie_id", "cand", "r")
            .toPandas())
    out = np.full((n, keep), n, np.int64)
    rows = _rows_of(items, best["movie_id"].to_numpy())
    out[rows, best["r"].to_numpy() - 1] = _rows_of(items, best["cand"].to_numpy())
    return out


# --- recall and parameter choice ---------------------------------------------------------------------------


def recall_at_k(approx: pd.DataFrame, exact: pd.DataFrame, k: int, tie_tolerance: float | None = None) -> float:
    """Mean over the exact table's movies of |approx top-k & exact top-k| / |exact top-k| (k unless fewer exist).

    ``tie_tolerance`` (similarity scores only): also count an approximate neighbour whose score is within the
    tolerance of the exact k-th score, i.e. an equally good neighbour that lost a tie to a lower movie id.
    """
    k = _check_k(k)
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
    k = _check_k(k)
    items = _prepare(movie_ids, vectors)
    n = items.n
    # blocks must hold more than 2k items (see lsh_top_k); dict.fromkeys drops the duplicates this makes
    candidates = sorted(dict.fromkeys(replace(c, seed=seed, block_size=max(c.block_size, 2 * k + 2))
                                      for c in (candidates or DEFAULT_CANDIDATES)),
                        key=lambda c: estimated_cost(n, c))
    for c in candidates:
        _check_params(c)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    exact_frame = _frame(items, *_exact(items, k, "cosine", rows))
    unit_padded = np.vstack([items.unit, np.zeros((1, items.unit.shape[1]), np.float32)])
    m, keep = min(k, n - 1), min(k + _RESCORE_MARGIN, n - 1)
    codes_by_length: dict[float, np.ndarray] = {}
    hits: dict[tuple, tuple] = {}
    tried: list[dict] = []
    for params in candidates:
        if params.bucket_length not in codes_by_length:
            widest = max(c.num_hash_tables for c in candidates if c.bucket_length == params.bucket_length)
            codes_by_length[params.bucket_length] = lsh_codes(
                spark, items, replace(params, num_hash_tables=widest), embeddings_path)
        codes = codes_by_length[params.bucket_length][:, :params.num_hash_tables]
        orderings = _Orderings(params, n)
        found = []
        for j in range(params.num_orderings):
            key = (params.bucket_length, params.num_hash_tables, params.block_size, j)
            if key not in hits:
                hits[key] = _query_block_hits(items, unit_padded, codes, orderings, j, params.block_size, rows, m)
            found.append(hits[key])
        cand, _ = _merge_rows(np.hstack([f[0] for f in found]), np.hstack([f[1] for f in found]), keep, n)
        approx = _finish(items, rows, cand, k)
        recall = recall_at_k(approx, exact_frame, k)
        tried.append({"params": params.as_dict(), "recall": round(recall, 4),
                      "recall_with_ties": round(recall_at_k(approx, exact_frame, k, TIE_TOLERANCE), 4),
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


# --- the stage ---------------------------------------------------------------------------------------------


def _table(frames: dict[str, pd.DataFrame]) -> pa.Table:
    parts = []
    for metric in sorted(frames):
        f = frames[metric].sort_values(["movie_id", "rank"], kind="stable")
        parts.append(pa.Table.from_arrays([
            pa.array(f["movie_id"].to_numpy(np.int64)), pa.array(f["similar_movie_id"].to_numpy(np.int64)),
            pa.array(np.full(len(f), metric, dtype=object), pa.string()),
            pa.array(f["rank"].to_numpy(np.int32)), pa.array(f["score"].to_numpy(np.float64)),
        ], schema=TABLE_SCHEMA))
    return pa.concat_tables(parts)


def similar_items(spark, model_or_embeddings, k: int, out_dir: Path, lsh_params=None, *,
                  target_recall: float = 0.95, rank_on: str = "driver") -> dict:
    """Materialize the similar-movie table (euclidean, cosine, lsh) and the embeddings under ``out_dir``.

    ``model_or_embeddings``: a FactorModel (its item_embeddings()) or (movie_ids, vectors). ``lsh_params``: an
    LSHParams or dict; None chooses them with choose_lsh_params, and when the recall@k measured on all items
    misses ``target_recall`` the chooser's stronger steps are tried (each try in ``lsh_attempts``). The
    reported LSH recall@k is measured on all items against the exact cosine table written beside it.
    """
    k = _check_k(k)
    movie_ids, vectors = _embeddings_of(model_or_embeddings)
    items = _prepare(movie_ids, vectors)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    chosen = None
    with storage.atomic_dir(out_dir) as tmp:
        emb_path = _write_items(tmp / EMBEDDINGS, items)
        rows = np.arange(items.n)
        frames = {}
        for metric in EXACT_METRICS:
            t0 = time.perf_counter()
            _, idx, score = _exact(items, k, metric)
            frames[metric] = _frame(items, rows, idx, score)
            timings[f"exact_{metric}"] = time.perf_counter() - t0
        if lsh_params is None:
            t0 = time.perf_counter()
            chosen = choose_lsh_params(spark, items.ids, items.x, k, target_recall=target_recall,
                                       embeddings_path=emb_path)
            ladder = [chosen["params"], *chosen["stronger"]]
            timings["lsh_choose"] = time.perf_counter() - t0
        else:
            ladder = [lsh_params if isinstance(lsh_params, LSHParams) else LSHParams(**lsh_params)]
            _check_params(ladder[0])
        # The sample only estimates the recall: the one measured on every item, against the exact cosine table
        # above, decides. Below the target, the chooser's stronger steps are tried; the best run is kept.
        attempts = []
        for params in ladder:
            lsh_timings: dict[str, float] = {}
            frame = lsh_top_k(spark, items.ids, items.x, k, params, rank_on=rank_on, embeddings_path=emb_path,
                              timings=lsh_timings)
            recall = recall_at_k(frame, frames["cosine"], k)
            attempts.append({"params": params, "frame": frame, "recall": recall, "seconds": lsh_timings["total"]})
            if recall >= target_recall:
                break
            log.info("similarity: LSH recall@%d %.4f on all items with %s, below %.2f", k, recall, params,
                     target_recall)
        best = max(attempts, key=lambda a: a["recall"])  # the first (cheapest) on equal recall
        params, frames["lsh"], recall = best["params"], best["frame"], best["recall"]
        timings["lsh"] = best["seconds"]
        if len(attempts) > 1:
            timings["lsh_escalation"] = sum(a["seconds"] for a in attempts) - best["seconds"]
        if recall < target_recall:
            log.warning("similarity: LSH recall@%d %.4f on all items is below the target %.2f after %d tries "
                        "(serving the best)", k, recall, target_recall, len(attempts))
        recall_ties = recall_at_k(frames["lsh"], frames["cosine"], k, tie_tolerance=TIE_TOLERANCE)
        t0 = time.perf_counter()
        table = _table(frames)
        pq.write_table(table, tmp / TABLE)
        timings["write"] = time.perf_counter() - t0
        tables = {
            "similar_movies": {"rows": table.num_rows, "path": str(out_dir / TABLE), "columns": table.column_names,
                               "sha256": storage.file_sha256(tmp / TABLE)},
            "embeddings": {"rows": items.n, "path": str(out_dir / EMBEDDINGS), "columns": EMBEDDINGS_SCHEMA.names,
                           "sha256": storage.file_sha256(emb_path)},
        }
        summary = {
            "k": k, "items": items.n, "dimensions": int(items.x.shape[1]),
            "table": str((out_dir / TABLE).resolve()), "embeddings": str((out_dir / EMBEDDINGS).resolve()),
            "lsh_recall_at_k": recall, "lsh_recall_at_k_with_ties": recall_ties,
            "lsh_target_recall": target_recall, "lsh_target_reached": recall >= target_recall,
            "lsh_params": params.as_dict(),
            "lsh_attempts": [{"params": a["params"].as_dict(), "recall_at_k": round(a["recall"], 4),
                              "seconds": round(a["seconds"], 3)} for a in attempts],
            "lsh_params_search": None if chosen is None else {
                "sample_recall": round(chosen["recall"], 4), "reached": chosen["reached"],
                "sample": chosen["sample"], "candidates_tried": len(chosen["tried"])},
            "timings_s": {name: round(v, 3) for name, v in timings.items()},
        }
        # the manifest also keeps every candidate's sample recall (too long for the XCom summary)
        storage.write_manifest(tmp, STAGE, tables, **{key: v for key, v in summary.items() if key != "timings_s"},
                               lsh_candidates_tried=None if chosen is None else chosen["tried"])
    log.info("similarity: %d items, k=%d, LSH recall@k %.4f with %s", items.n, k, recall, params)
    return {"similarity": summary}
