import pandas as pd
import pytest

from pipeline.data.etl import rows_fingerprint, split_ratings
from stage_inputs import movies_frame, ratings_frame, write_validated

pytestmark = pytest.mark.spark

T0 = 1_000_000_000


@pytest.fixture
def validated(tmp_path):
    # user 1: 20 ratings, user 2: 10, user 3: 5, user 4: a single rating; movie m gets ratings from many users
    rows = [(1, m, 1.0 + (m % 9) / 2, T0 + m) for m in range(1, 21)]
    rows += [(2, m, 3.0, T0 + 100 + m) for m in range(1, 11)]
    rows += [(3, m, 4.0, T0 + 200 + m) for m in range(1, 6)]
    rows += [(4, 7, 5.0, T0)]
    movies = movies_frame([(m, f"Movie {m} (2000)", 2000, ["Drama"]) for m in range(1, 21)])
    return write_validated(tmp_path / "validate", ratings_frame(rows), movies)


def _read(spark, path):
    return spark.read.parquet(path).toPandas()


def test_split_is_per_user_with_rounded_fractions_and_at_least_one_training_row(spark, validated, tmp_path):
    out = split_ratings(spark, validated, tmp_path / "etl", seed=42)["split"]
    assert (out["train"], out["validation"], out["test"]) == (28, 4, 4)
    test = _read(spark, out["paths"]["test"])
    val = _read(spark, out["paths"]["validation"])
    train = _read(spark, out["paths"]["train"])
    # round half up: 20 -> 2, 10 -> 1, 5 -> 1 (0.5), 1 -> 0 (a lone rating stays in train)
    assert test.groupby("user_id").size().to_dict() == {1: 2, 2: 1, 3: 1}
    assert val.groupby("user_id").size().to_dict() == {1: 2, 2: 1, 3: 1}
    assert train.groupby("user_id").size().to_dict() == {1: 16, 2: 8, 3: 3, 4: 1}
    all_rows = pd.concat([train, val, test])
    assert len(all_rows.drop_duplicates(["user_id", "movie_id"])) == 36  # a partition: nothing lost or doubled
    assert list(test.columns) == ["user_id", "movie_id", "rating", "ts", "user_idx", "movie_idx"]


def test_indices_are_dense_and_most_frequent_first(spark, validated, tmp_path):
    split_ratings(spark, validated, tmp_path / "etl")
    users = _read(spark, str(tmp_path / "etl" / "user_index.parquet")).sort_values("user_idx")
    assert users.user_idx.tolist() == [0, 1, 2, 3]
    assert users.user_id.tolist() == [1, 2, 3, 4]  # 20, 10, 5, 1 ratings
    movies = _read(spark, str(tmp_path / "etl" / "movie_index.parquet"))
    assert sorted(movies.movie_idx) == list(range(20))
    # movies 1-5 and 7 have 3 ratings, then 6, 8, 9, 10 have 2: ties go by the ids' string order (like
    # StringIndexer on the seed's ids), so "10" comes before "6"
    order = movies.sort_values("movie_idx").movie_id.tolist()
    assert order[:10] == [1, 2, 3, 4, 5, 7, 10, 6, 8, 9]


def test_same_seed_same_split_other_seed_other_split(spark, validated, tmp_path):
    a = split_ratings(spark, validated, tmp_path / "a", seed=42)["split"]
    again = split_ratings(spark, validated, tmp_path / "a", seed=42)["split"]  # re-run overwrites in place
    b = split_ratings(spark, validated, tmp_path / "b", seed=7)["split"]
    assert a["test_fingerprint"] == again["test_fingerprint"]
    assert a["test_fingerprint"] != b["test_fingerprint"]
    assert a["test_fingerprint"] == rows_fingerprint(spark.read.parquet(a["paths"]["test"]))


def test_temporal_split_holds_out_each_users_latest_ratings(spark, validated, tmp_path):
    out = split_ratings(spark, validated, tmp_path / "etl", strategy="temporal")["split"]
    test = _read(spark, out["paths"]["test"])
    assert sorted(test[test.user_id == 1].movie_id) == [19, 20]  # the two newest of user 1
    assert sorted(test[test.user_id == 2].movie_id) == [10]
    val = _read(spark, out["paths"]["validation"])
    assert sorted(val[val.user_id == 1].movie_id) == [17, 18]


def test_indices_are_the_order_stringindexer_gives_ties_included(spark):
    """index_ids numbers the ids on the driver; the order is StringIndexer's (frequencyDesc, which indexed them
    before), so splits and models are unchanged: most frequent first, equal counts in the ids' string order."""
    import numpy as np
    from pyspark.ml.feature import StringIndexer

    from pipeline.data.etl import index_ids

    rng = np.random.default_rng(3)
    users, movies = rng.integers(1, 400, 3000), rng.integers(1, 1200, 3000)  # few ratings per id: many ties
    ratings = spark.createDataFrame(pd.DataFrame({"user_id": users, "movie_id": movies, "rating": 3.0, "ts": T0}))
    for mapping, col, idx in zip(index_ids(ratings), ("user_id", "movie_id"), ("user_idx", "movie_idx")):
        ours = mapping.toPandas().sort_values(col, ignore_index=True)
        model = StringIndexer(inputCol=col, outputCol=idx, stringOrderType="frequencyDesc").fit(ratings)
        theirs = model.transform(ratings.select(col).distinct()).toPandas().sort_values(col, ignore_index=True)
        assert ours[idx].tolist() == theirs[idx].astype(int).tolist()
        counts = pd.Series(users if col == "user_id" else movies).value_counts()
        assert ours.set_index(col)["n_ratings"].to_dict() == counts.to_dict()
        assert sorted(ours[idx]) == list(range(len(ours)))
        assert [f.dataType.typeName() for f in mapping.schema] == ["long", "integer", "long"]
