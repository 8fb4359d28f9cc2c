import pytest

from pipeline.data.olap import summarize_ratings
from stage_inputs import movies_frame, ratings_frame, write_validated

pytestmark = pytest.mark.spark

JAN_1997 = 852_076_800  # 1997-01-01T00:00:00Z
FEB_1997 = 854_755_200


@pytest.fixture(scope="module")
def olap_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("olap")


@pytest.fixture(scope="module")
def olap(spark, olap_dir):
    tmp_path = olap_dir
    ratings = ratings_frame([
        (1, 10, 4.0, JAN_1997), (1, 20, 2.0, JAN_1997 + 60), (1, 30, 5.0, FEB_1997),
        (2, 10, 5.0, FEB_1997), (2, 20, 3.0, FEB_1997 + 5),
        (3, 10, 3.0, FEB_1997 + 9),
    ])
    movies = movies_frame([(10, "Ten (1995)", 1995, ["Comedy", "Drama"]), (20, "Twenty (1995)", 1995, ["Drama"]),
                           (30, "Thirty", None, [])])
    import pandas as pd
    tags = pd.DataFrame({"user_id": [1, 2, 2, 3], "movie_id": [10, 10, 10, 20],
                         "tag": ["funny", "Funny ", "dark", "long"], "ts": [JAN_1997] * 4})
    folder = write_validated(tmp_path / "validate", ratings, movies, tags)
    out = summarize_ratings(spark, folder, tmp_path / "olap", min_ratings=2)["olap"]
    return {name: spark.read.parquet(path).toPandas() for name, path in out["tables"].items()}, out


def test_genre_year_grouping_sets_do_not_double_count_the_totals(olap):
    tables, _ = olap
    gy = tables["genre_year"]
    total = gy[gy.level == "all"].iloc[0]
    assert total.n_ratings == 6 and total.mean_rating == pytest.approx(22 / 6, abs=1e-4)
    drama = gy[(gy.level == "genre") & (gy.genre == "Drama")].iloc[0]
    assert drama.n_ratings == 5 and drama.n_movies == 2
    comedy_1995 = gy[(gy.level == "genre_year") & (gy.genre == "Comedy") & (gy.year == 1995)].iloc[0]
    assert comedy_1995.n_ratings == 3 and comedy_1995.mean_rating == pytest.approx(4.0)
    assert gy[(gy.level == "genre") & (gy.genre == "(no genres listed)")].iloc[0].n_ratings == 1
    y1995 = gy[(gy.level == "year") & (gy.year == 1995)].iloc[0]
    assert y1995.n_ratings == 5


def test_movie_popularity_keeps_movies_with_enough_ratings(olap):
    pop = olap[0]["movie_popularity"]
    assert pop.movie_id.tolist() == [10, 20]  # movie 30 has one rating < min_ratings=2
    assert pop.n_ratings.tolist() == [3, 2]
    assert pop.mean_rating.tolist() == [4.0, 2.5]


def test_ratings_per_month_user_activity_and_distribution(olap):
    tables, _ = olap
    monthly = tables["ratings_per_month"]
    assert monthly.n_ratings.tolist() == [2, 4]
    assert monthly.n_users.tolist() == [1, 3]
    activity = tables["user_activity"]
    assert activity.ratings_per_user.tolist() == ["1-19"] and activity.n_users.tolist() == [3]
    dist = tables["rating_distribution"].set_index("rating").n_ratings.to_dict()
    assert dist == {2.0: 1, 3.0: 2, 4.0: 1, 5.0: 2}


def test_tags_per_movie_counts_and_top_tags(olap):
    tags = olap[0]["tags_per_movie"].set_index("movie_id")
    assert tags.loc[10, "n_tags"] == 3 and tags.loc[10, "n_taggers"] == 2
    assert list(tags.loc[10, "top_tags"]) == ["funny", "dark"]  # 'funny' and 'Funny ' are one tag
    assert tags.loc[20, "n_distinct_tags"] == 1


def test_summary_is_written_with_its_plots(olap, olap_dir):
    _, out = olap
    tmp_path = olap_dir
    text = (tmp_path / "olap" / "summary.md").read_text()
    assert "## Most rated movies" in text and "Ten (1995)" in text
    assert (tmp_path / "olap" / "ratings_per_month.png").stat().st_size > 1000
    assert (tmp_path / "olap" / "activity_and_ratings.png").exists()


def test_the_manifest_counts_each_table_from_the_file_written(olap, olap_dir):
    """The queries run side by side; each table's row count in the manifest is that of its own file."""
    import json

    tables, out = olap
    manifest = json.loads((olap_dir / "olap" / "manifest.json").read_text())["tables"]
    assert set(manifest) == set(tables) == set(out["tables"])
    assert {name: info["rows"] for name, info in manifest.items()} == {name: len(t) for name, t in tables.items()}
    assert len(tables["movie_popularity"]) == 2 and len(tables["rating_distribution"]) == 4
