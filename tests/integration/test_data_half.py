"""The data half on the real ml-latest-small: exact counts, split fractions, OLAP tables, idempotent re-run."""

import json

import pytest

from pipeline import cli

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.fixture(scope="module")
def report(real_pipeline):
    return real_pipeline["first"], real_pipeline["first_dir"]


def test_dataset_counts_are_exact(report):
    dataset = report[0]["dataset"]
    assert dataset["variant"] == "ml-latest-small"
    assert (dataset["ratings"], dataset["users"], dataset["movies"], dataset["tags"]) == (100_836, 610, 9_742, 3_683)
    assert report[0]["validation"]["success"] is True
    assert report[0]["validation"]["quarantined_rows"] == 0


def test_split_fractions_and_persisted_columns(report, spark):
    split = report[0]["split"]
    total = split["train"] + split["validation"] + split["test"]
    assert total == 100_836
    assert split["train"] / total == pytest.approx(0.8, abs=0.005)
    assert split["validation"] / total == pytest.approx(0.1, abs=0.005)
    assert split["test"] / total == pytest.approx(0.1, abs=0.005)
    test = spark.read.parquet(split["paths"]["test"])
    assert test.columns == ["user_id", "movie_id", "rating", "ts", "user_idx", "movie_idx"]
    assert test.select("user_id").distinct().count() == 610  # every user has test rows (>= 20 ratings each)
    idx = test.agg({"user_idx": "max", "movie_idx": "max"}).first()
    assert idx["max(user_idx)"] == 609 and idx["max(movie_idx)"] <= 9_723  # dense, 0-based


def test_olap_tables_hold_the_real_figures(report, spark):
    tables = report[0]["olap"]["tables"]
    gy = spark.read.parquet(tables["genre_year"]).toPandas()
    assert gy[gy.level == "all"].n_ratings.item() == 100_836
    pop = spark.read.parquet(tables["movie_popularity"]).toPandas().sort_values("popularity_rank")
    assert pop.iloc[0].title == "Forrest Gump (1994)" and pop.iloc[0].n_ratings == 329
    monthly = spark.read.parquet(tables["ratings_per_month"]).toPandas()
    assert monthly.n_ratings.sum() == 100_836
    tags = spark.read.parquet(tables["tags_per_movie"]).toPandas()
    assert tags.n_tags.sum() == 3_683


def test_rerunning_etl_gives_the_same_split(report, real_pipeline):
    first, work = report
    assert cli.main(["run", "--work-dir", str(work), "--stages", "etl"]) == 0
    again = json.loads((work / "report.json").read_text())
    assert again["run_id"] == first["run_id"]  # continued the same run
    assert again["split"]["test_fingerprint"] == first["split"]["test_fingerprint"]
    assert again["dataset"] == first["dataset"]
