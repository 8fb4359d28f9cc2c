"""Similar movies from item embeddings: exact Euclidean and cosine top-K, and an LSH top-K (Spark ML's hashing).

- ``exact``: blocked float32 BLAS products and a top-K selection per row (the reference every table is
  checked against);
- ``hashing``: LSH parameters and Spark's ``BucketedRandomProjectionLSH`` hash functions, applied on the driver;
- ``lsh``: candidates from several orderings of the hashes, ranked exactly within blocks;
- ``tuning``: recall against the exact table, and the choice of the cheapest parameters reaching a target;
- ``stage``: the ``similarity`` stage that writes ``similar_movies.parquet`` from the champion's embeddings.
"""

from pipeline.similarity.exact import EMBEDDINGS, exact_top_k, prepare, read_embeddings, write_embeddings
from pipeline.similarity.hashing import LSHParams, embeddings_file, lsh_codes, spark_random_vectors
from pipeline.similarity.lsh import lsh_top_k
from pipeline.similarity.stage import TABLE, similar_items
from pipeline.similarity.tuning import (
    DEFAULT_CANDIDATES,
    TIE_TOLERANCE,
    choose_lsh_params,
    estimated_cost,
    neighbour_recall,
)

METRICS = ("euclidean", "cosine", "lsh")  # the similar-movie table's metric column (and the query options)

__all__ = [
    "DEFAULT_CANDIDATES", "EMBEDDINGS", "METRICS", "TABLE", "TIE_TOLERANCE", "LSHParams", "choose_lsh_params",
    "embeddings_file", "estimated_cost", "exact_top_k", "lsh_codes", "lsh_top_k", "neighbour_recall", "prepare",
    "read_embeddings", "similar_items", "spark_random_vectors", "write_embeddings",
]
