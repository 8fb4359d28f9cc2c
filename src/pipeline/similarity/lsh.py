"""Approximate cosine top-K by Spark ML's locality-sensitive hashing.

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
products (docs/adr/0010-lsh-hashes-on-the-driver.md). Here the candidates come instead from
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

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.params import check_k
from pipeline.similarity.exact import (
    BLOCK_ELEMENTS,
    RESCORE_MARGIN,
    Items,
    order_key32,
    parallel,
    prepare,
    rescore_all,
    result_frame,
    rows_of,
    top_columns,
    worker_count,
)
from pipeline.similarity.hashing import LSHParams, embeddings_file, lsh_codes, lsh_params, spark_hashed

log = logging.getLogger(__name__)

_SIGNED32 = np.int64(1 << 31)


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


class Orderings:
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
    step = max(1, min(BLOCK_ELEMENTS // (size * size), -(-nb // (4 * worker_count()))))

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

    parallel(work, list(range(0, nb, step)))


def merge_rows(idx: np.ndarray, score: np.ndarray, keep: int, n: int):
    """Per row: drop repeated candidates, keep the ``keep`` best by (score, -index). idx == n: no candidate."""
    low = order_key32(np.ascontiguousarray(score, dtype=np.float32)) + _SIGNED32  # as unsigned 32 bits
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
        best_idx[sl], best_score[sl] = merge_rows(np.hstack([best_idx[sl], new_idx[sl]]),
                                                   np.hstack([best_score[sl], new_score[sl]]), keep, n)

    parallel(work, list(range(0, best_idx.shape[0], step)))


def _lsh_candidates(items: Items, codes: np.ndarray, params: LSHParams, k: int, timings: dict | None = None):
    """Every item's best LSH candidates (row indexes, ``n`` where none), merged over the orderings."""
    n = items.n
    m = min(k, n - 1)
    keep = min(k + RESCORE_MARGIN, n - 1)
    unit_padded = np.vstack([items.unit, np.zeros((1, items.unit.shape[1]), np.float32)])
    orderings = Orderings(params, n)
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


def query_block_hits(items: Items, unit_padded: np.ndarray, codes: np.ndarray, orderings: Orderings, j: int,
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
    cols = top_columns(s, min(m, members.shape[1] - 1))
    idx = np.take_along_axis(members, cols, 1)
    score = np.take_along_axis(s, cols, 1)
    idx[score <= _MASKED / 2] = n
    return idx, score


def finish_rows(items: Items, rows: np.ndarray, cand: np.ndarray, k: int) -> pd.DataFrame:
    cand = np.where(cand >= items.n, -1, cand)
    idx, score = rescore_all(items, rows, cand, "cosine", k)
    return result_frame(items, rows, idx, score)


def lsh_top_k(spark, movie_ids, vectors, k: int, bucket_length=1.0, num_hash_tables: int = 64, seed: int = 42, *,
              num_orderings: int | None = None, block_size: int = 256, rank_on: str = "driver",
              embeddings_path: Path | None = None, timings: dict | None = None) -> pd.DataFrame:
    """Approximate cosine top-k: Spark LSH buckets, candidates ranked exactly within blocks (see the module doc).

    ``bucket_length`` may also be an LSHParams. ``num_orderings`` defaults to num_hash_tables // 4.
    ``embeddings_path``: the embeddings already written as parquet (Spark reads it instead of a temporary copy).
    Same columns as exact_top_k; score is the cosine similarity.
    """
    k = check_k(k, "similar_k")
    params = lsh_params(bucket_length, num_hash_tables, seed, num_orderings, block_size)
    if params.block_size <= 2 * k:
        raise ConfigError(f"LSH block_size {params.block_size} must exceed 2 x similar_k ({k}) for full lists")
    items = prepare(movie_ids, vectors)
    timings = {} if timings is None else timings
    rows = np.arange(items.n)
    if items.n == 1:
        return result_frame(items, rows, np.empty((1, 0), np.int64), np.empty((1, 0)))
    t0 = time.perf_counter()
    if rank_on == "spark":
        with embeddings_file(items, embeddings_path) as path:
            cand = _spark_rank(spark, path, items, params, k)
    elif rank_on == "driver":
        codes = lsh_codes(spark, items, params, embeddings_path)
        timings["hash"] = time.perf_counter() - t0
        cand = _lsh_candidates(items, codes, params, k, timings)
    else:
        raise ConfigError(f"rank_on must be 'driver' or 'spark', got {rank_on!r}")
    t1 = time.perf_counter()
    frame = finish_rows(items, rows, cand, k)
    timings["rescore"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    return frame


# --- LSH: ranking as Spark jobs ----------------------------------------------------------------------------


def _spark_rank(spark, path: Path, items: Items, params: LSHParams, k: int) -> np.ndarray:
    """The candidate search of _lsh_candidates as Spark jobs: keys per ordering (mapInPandas), blocks (window),
    block products (applyInPandas), merge (window). Returns the same (n, k+margin) candidate rows."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    n = items.n
    orderings = Orderings(params, n)
    nb = _block_count(n, params.block_size)
    m = min(k, n - 1)
    keep = min(k + RESCORE_MARGIN, n - 1)
    hashed = spark_hashed(spark, path, params, items.x.shape[1])

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
        cols = top_columns(s, min(m, len(x) - 1))
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
    rows = rows_of(items, best["movie_id"].to_numpy())
    out[rows, best["r"].to_numpy() - 1] = rows_of(items, best["cand"].to_numpy())
    return out
