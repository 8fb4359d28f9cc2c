"""LSH parameters and hashing with Spark ML's ``BucketedRandomProjectionLSH`` (applied on the driver).

The random unit vectors of a fitted model are read back from the JVM and applied in one matrix product: the
same values as ``model.transform`` (a test checks them equal) without a Spark job. Under Spark Connect (no JVM
model to read) the hashes come from ``model.transform``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.similarity.exact import EMBEDDINGS, Items, parallel, rows_of, write_items

log = logging.getLogger(__name__)


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


def lsh_params(bucket_length, num_hash_tables, seed, num_orderings, block_size) -> LSHParams:
    if isinstance(bucket_length, LSHParams):
        return bucket_length
    params = LSHParams(float(bucket_length), int(num_hash_tables),
                       int(num_orderings if num_orderings is not None else max(1, num_hash_tables // 4)),
                       int(block_size), int(seed))
    check_lsh_params(params)
    return params


def check_lsh_params(params: LSHParams) -> None:
    if not params.bucket_length > 0 or params.num_hash_tables < 1 or params.num_orderings < 1 or params.block_size < 2:
        raise ConfigError(f"LSH parameters out of range: {params}")


@contextlib.contextmanager
def embeddings_file(items: Items, embeddings_path: Path | None):
    if embeddings_path is not None:
        yield Path(embeddings_path)
        return
    with tempfile.TemporaryDirectory(prefix="recsys-lsh-") as tmp:
        yield write_items(Path(tmp) / EMBEDDINGS, items)


def _hash_dtype(bucket_length: float) -> str:
    return "byte" if 1.0 / bucket_length < 120 else "int"


def spark_hashed(spark, embeddings_path: Path, params: LSHParams, dim: int):
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


def _spark_transform_codes(spark, embeddings_path: Path, params: LSHParams, items: Items) -> np.ndarray:
    """Spark's LSH hash values of every item by ``model.transform`` (a Spark job), ``(n, num_hash_tables)``,
    rows in the order of ``items.ids``. lsh_codes computes the same values on the driver."""
    hashed = spark_hashed(spark, embeddings_path, params, items.x.shape[1])
    table = hashed.select("movie_id", "codes").toArrow()
    codes = table.column("codes").combine_chunks()
    values = codes.flatten().to_numpy(zero_copy_only=False)
    if len(values) != len(codes) * params.num_hash_tables:
        raise RuntimeError("Spark LSH returned hash arrays of unexpected length")
    values = values.reshape(len(codes), params.num_hash_tables)
    out_ids = table.column("movie_id").to_numpy()
    rows = rows_of(items, out_ids)
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


def lsh_codes(spark, items: Items, params: LSHParams, embeddings_path: Path | None = None) -> np.ndarray:
    """Spark's BucketedRandomProjectionLSH hashes of the unit vectors, ``(n, num_hash_tables)``.

    The model's hash functions, ``floor(r . x / bucket_length)`` with x normalized in float64 as Spark's
    Normalizer does, applied on the driver in one matrix product: the values model.transform gives (checked
    in the tests) without a Spark job (~0.3 s on 10,000 items, more than the rest of the search).
    """
    matrix = spark_random_vectors(spark, items.x.shape[1], params.num_hash_tables, params.seed)
    if matrix is None:
        with embeddings_file(items, embeddings_path) as path:
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

    parallel(work, list(range(0, items.n, step)))
    return out
