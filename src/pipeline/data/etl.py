"""Stage ``etl`` (Spark): dense user/movie indices and the persisted train/validation/test split.

Indices follow the seed's ``userIndex``/``movieIndex``: dense, most frequent first (ties in the ids' string
order, as Spark's StringIndexer orders them), numbered on the driver and kept as mapping tables. The split is
per user: each user's ratings are ordered by a seeded hash of (user, movie) -- or by time, newest first, for
the temporal strategy -- and the first ``round(n * test_fraction)`` go to test, the next
``round(n * validation_fraction)`` to validation, the rest to train (never fewer than one training row per
user). A hash, unlike ``rand()``, gives the same split whatever the partitioning, so the split is reproducible
on any cluster.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline import storage

SPLIT_COLUMNS = ["user_id", "movie_id", "rating", "ts", "user_idx", "movie_idx"]
SPLITS = ("train", "validation", "test")


def index_ids(ratings):
    """(users, movies): mapping tables ``user_id -> user_idx`` and ``movie_id -> movie_idx`` (dense, 0-based),
    most frequent first, ties in the ids' string order: the order of Spark's ``StringIndexer`` with
    ``stringOrderType="frequencyDesc"``, which indexed them before. One aggregation per column; its counts are
    numbered on the driver, where StringIndexer collects its labels too, and come back as a small local table
    (StringIndexer's fit, its counts and its transform each aggregated the ratings again;
    docs/adr/0056-etl-numbers-ids-on-the-driver.md)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    spark = ratings.sparkSession
    out = []
    for col, idx in (("user_id", "user_idx"), ("movie_id", "movie_idx")):
        counts = ratings.groupBy(col).agg(F.count(F.lit(1)).alias("n_ratings")).toPandas()
        counts = (counts.assign(_label=counts[col].astype(str))  # StringIndexer's labels: the ids cast to string
                  .sort_values(["n_ratings", "_label"], ascending=[False, True], kind="stable", ignore_index=True))
        counts[idx] = np.arange(len(counts), dtype=np.int32)
        schema = StructType([StructField(col, ratings.schema[col].dataType), StructField(idx, IntegerType()),
                             StructField("n_ratings", LongType(), nullable=False)])
        out.append(spark.createDataFrame(counts[[col, idx, "n_ratings"]], schema=schema))
    return tuple(out)


def assign_split(ratings, strategy: str, seed: int, validation_fraction: float, test_fraction: float):
    """``ratings`` with a ``split`` column: 'train' | 'validation' | 'test'."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if strategy == "random":
        order = [F.xxhash64(F.lit(seed), "user_id", "movie_id"), F.col("movie_id")]
    elif strategy == "temporal":
        order = [F.col("ts").desc(), F.col("movie_id").desc()]
    else:
        raise ValueError(f"unknown split strategy {strategy!r}")
    by_user = Window.partitionBy("user_id")
    n = F.count(F.lit(1)).over(by_user)
    pos = F.row_number().over(by_user.orderBy(*order)) - 1
    n_test = F.least(F.floor(n * test_fraction + 0.5), n - 1)
    n_val = F.greatest(F.least(F.floor(n * validation_fraction + 0.5), n - 1 - n_test), F.lit(0))
    return (
        ratings.withColumn("_n", n)
        .withColumn("_pos", pos)
        .withColumn("_n_test", n_test)
        .withColumn("_n_val", n_val)
        .withColumn(
            "split",
            F.when(F.col("_pos") < F.col("_n_test"), "test")
            .when(F.col("_pos") < F.col("_n_test") + F.col("_n_val"), "validation")
            .otherwise("train"),
        )
        .drop("_n", "_pos", "_n_test", "_n_val")
    )


def rows_fingerprint(df) -> str:
    """Order-independent fingerprint of (user_id, movie_id, rating, ts) rows: same rows, same value."""
    return count_and_fingerprint(df)[1]


def count_and_fingerprint(df) -> tuple[int, str]:
    """(rows, ``rows_fingerprint``) of ``df`` in one pass."""
    from pyspark.sql import functions as F

    row = df.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("user_id", "movie_id", "rating", "ts").cast("decimal(38,0)")).alias("h"),
    ).first()
    return int(row["n"]), hashlib.sha256(f"{row['n']}:{row['h']}".encode()).hexdigest()[:16]


def split_ratings(spark, validate_dir: Path, out_dir: Path, strategy: str = "random", seed: int = 42,
                  validation_fraction: float = 0.1, test_fraction: float = 0.1) -> dict:
    """Index ids, split the validated ratings and persist splits, index tables and a manifest."""
    from pyspark.sql import functions as F

    manifest = storage.read_manifest(validate_dir, "etl")
    ratings = spark.read.parquet(manifest["tables"]["ratings"]["path"]).select("user_id", "movie_id", "rating", "ts")
    users, movies = index_ids(ratings)
    indexed = ratings.join(F.broadcast(users.select("user_id", "user_idx")), "user_id").join(
        F.broadcast(movies.select("movie_id", "movie_idx")), "movie_id"
    )
    split = assign_split(indexed, strategy, seed, validation_fraction, test_fraction).cache()
    out_dir = Path(out_dir)
    tables, counts, paths = {}, {}, {}
    with storage.atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            part = split.where(F.col("split") == name).select(*SPLIT_COLUMNS)
            part.write.parquet(str(tmp / f"{name}.parquet"))
            paths[name] = str(out_dir / f"{name}.parquet")
        for name in SPLITS:  # counts and fingerprints from what was written, not from the plan
            counts[name], fingerprint = count_and_fingerprint(spark.read.parquet(str(tmp / f"{name}.parquet")))
            tables[name] = {"rows": counts[name], "path": paths[name], "columns": SPLIT_COLUMNS,
                            "fingerprint": fingerprint}
        for name, mapping in (("user_index", users), ("movie_index", movies)):
            mapping.coalesce(1).write.parquet(str(tmp / f"{name}.parquet"))  # counted from the file just written
            rows = spark.read.parquet(str(tmp / f"{name}.parquet")).count()
            tables[name] = {"rows": rows, "path": str(out_dir / f"{name}.parquet")}
        summary = {
            "strategy": strategy,
            "seed": seed,
            "train": counts["train"],
            "validation": counts["validation"],
            "test": counts["test"],
            "test_fingerprint": tables["test"]["fingerprint"],
            "paths": paths,
        }
        storage.write_manifest(tmp, "etl", tables, split=summary, dataset=manifest["dataset"],
                               fractions={"validation": validation_fraction, "test": test_fraction})
    split.unpersist()
    return {"split": summary}
