"""Stage ``validate``: the GX suites quarantine bad rows with their reason, and stop the run on bad tables.

Each test ingests a tiny dataset with one kind of damage and validates it once (GX costs ~0.5 s a run).
Unreadable files (truncated rows, non-UTF-8 bytes, empty files) never get here: see test_ingest.py.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from movielens_fixtures import UNRATED_MOVIE, write_1m, write_100k, write_csv_variant
from pipeline.config import load_settings
from pipeline.data.ingest import ingest_movielens
from pipeline.data.validate import MIN_TS, validate_tables
from pipeline.errors import DataValidationError
from pipeline.params import PARAMS_BY_NAME

NOW = 1_700_000_000  # 2023-11-14: "now" for the timestamp expectation, so that the tests do not age
HIGH = 0.5  # a threshold no test reaches: the run goes on and the quarantine can be inspected
DEFAULT_THRESHOLD = PARAMS_BY_NAME["quarantine_threshold"].default
TS = 964982703


@pytest.fixture
def dataset(tmp_path):
    """Write a dataset with ``writer(**damage)``, ingest it, and return the ingest result."""
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})

    def make(writer=write_csv_variant, name="ml-latest-small", **damage):
        written = writer(tmp_path / "source" / name, **damage)
        return ingest_movielens(str(written.folder), tmp_path / "ingest", settings)

    return make


def _validate(tmp_path, threshold=HIGH):
    return validate_tables(tmp_path / "ingest", tmp_path / "validate", threshold, now=NOW)["validation"]


def _stopped(tmp_path, threshold=HIGH) -> str:
    with pytest.raises(DataValidationError) as info:
        validate_tables(tmp_path / "ingest", tmp_path / "validate", threshold, now=NOW)
    return str(info.value)


def _quarantine(tmp_path, table="ratings") -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "validate" / "quarantine" / f"{table}.parquet")


def _clean(tmp_path, table="ratings") -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "validate" / f"{table}.parquet")


def _pairs(df) -> set:
    return set(zip(df["user_id"], df["movie_id"]))


def _result_json(tmp_path) -> dict:
    return json.loads((tmp_path / "validate" / "result.json").read_text())


# --- clean data -------------------------------------------------------------------------------------------


def test_clean_data_passes_and_writes_clean_tables_and_data_docs(tmp_path, dataset):
    dataset()

    result = _validate(tmp_path)

    assert (result["success"], result["quarantined_rows"], result["failed_expectations"]) == (True, 0, [])
    out = tmp_path / "validate"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t: (info["rows"], info["quarantined"]) for t, info in manifest["tables"].items()} == {
        "movies": (8, 0), "ratings": (30, 0), "tags": (4, 0), "links": (8, 0)}
    ratings = _clean(tmp_path)
    assert dict(ratings.dtypes.astype(str)) == {
        "user_id": "int64", "movie_id": "int64", "rating": "float64", "ts": "int64", "_line": "int64"}
    assert not (out / "quarantine").exists()
    index = out / "data_docs" / "index.html"
    assert result["data_docs"] == str(index)
    html = index.read_text()
    assert all(f"{table}.row" in html for table in ("movies", "ratings", "tags", "links"))


# --- rows that are quarantined (threshold high enough for the run to go on) ------------------------------


def test_rating_out_of_range_is_quarantined(tmp_path, dataset):
    dataset(extra_ratings=[(1, 2, 7.0, TS)])

    result = _validate(tmp_path)

    assert (result["success"], result["quarantined_rows"]) == (True, 1)
    bad = _quarantine(tmp_path)
    assert bad[["user_id", "movie_id", "rating", "_line"]].values.tolist() == [[1, 2, 7.0, 32]]
    assert bad["_reason"].tolist() == [
        "expect_column_values_to_be_between(rating); expect_column_values_to_be_in_set(rating)"]
    assert bad["_file"].tolist() == [str(tmp_path / "source" / "ml-latest-small" / "ratings.csv")]
    between = next(f for f in result["failed_expectations"] if f["expectation"] == "expect_column_values_to_be_between")
    assert (between["unexpected_count"], between["sample"], between["lines"]) == (1, [7.0], [32])
    clean = _clean(tmp_path)
    assert (len(clean), (1, 2) in _pairs(clean), clean["rating"].max()) == (30, False, 5.0)


def test_rating_off_the_half_star_grid_is_quarantined(tmp_path, dataset):
    dataset(extra_ratings=[(1, 2, 3.25, TS)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 1
    bad = _quarantine(tmp_path)
    assert (bad["rating"].tolist(), bad["_reason"].tolist()) == ([3.25], ["expect_column_values_to_be_in_set(rating)"])
    assert 3.25 not in set(_clean(tmp_path)["rating"])


@pytest.mark.parametrize(("writer", "name"), [(write_100k, "ml-100k"), (write_1m, "ml-1m")])
def test_whole_star_variant_quarantines_half_stars(writer, name, tmp_path, dataset):
    dataset(writer, name, extra_ratings=[(1, 2, 3.5, TS)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 1
    bad = _quarantine(tmp_path)
    assert bad[["user_id", "movie_id", "rating"]].values.tolist() == [[1, 2, 3.5]]
    assert bad["_reason"].tolist() == ["expect_column_values_to_be_in_set(rating)"]
    clean = _clean(tmp_path)
    assert (len(clean), sorted(set(clean["rating"]))) == (30, [1.0, 2.0, 3.0, 4.0, 5.0])


def test_null_and_non_numeric_ids_are_quarantined_with_their_raw_text(tmp_path, dataset):
    dataset(extra_ratings=[("", 2, 3.0, TS), ("abc", 2, 3.0, TS)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 2
    bad = _quarantine(tmp_path)
    assert bad["_raw"].tolist() == [f",2,3.0,{TS}", f"abc,2,3.0,{TS}"]
    assert bad["user_id"].isna().tolist() == [True, True]
    # two rows with a missing user are not a duplicated (user, movie) pair
    assert bad["_reason"].tolist() == ["expect_column_values_to_not_be_null(user_id)"] * 2
    clean = _clean(tmp_path)
    assert (len(clean), str(clean["user_id"].dtype), "_raw" in clean) == (30, "int64", False)


def test_every_copy_of_a_duplicated_user_movie_pair_is_quarantined(tmp_path, dataset):
    dataset(extra_ratings=[(1, 1, 2.0, TS + 60), (2, 2, 2.5, 1445714994)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 4
    bad = _quarantine(tmp_path)
    assert sorted(zip(bad["user_id"], bad["movie_id"], bad["_line"])) == [(1, 1, 2), (1, 1, 32), (2, 2, 9), (2, 2, 33)]
    assert set(bad["_reason"]) == {"expect_compound_columns_to_be_unique(['user_id', 'movie_id'])"}
    clean = _clean(tmp_path)
    assert (len(clean), {(1, 1), (2, 2)} & _pairs(clean)) == (28, set())


def test_rating_for_a_movie_absent_from_movies_is_quarantined(tmp_path, dataset):
    dataset(extra_ratings=[(1, 999, 3.0, TS)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 1
    bad = _quarantine(tmp_path)
    assert (bad["movie_id"].tolist(), bad["_reason"].tolist()) == (
        [999], ["expect_column_values_to_be_in_set(_movie_known)"])
    clean = _clean(tmp_path)
    assert (999 in set(clean["movie_id"]), "_movie_known" in clean) == (False, False)


def test_negative_and_future_timestamps_are_quarantined(tmp_path, dataset):
    dataset(extra_ratings=[(1, 2, 3.0, -5), (2, 50, 3.0, NOW + 1), (3, 1, 3.0, NOW), (4, 8606, 3.0, MIN_TS)])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 2
    bad = _quarantine(tmp_path)
    assert bad["ts"].tolist() == [-5, NOW + 1]
    assert set(bad["_reason"]) == {"expect_column_values_to_be_between(ts)"}
    clean = _clean(tmp_path)
    assert (len(clean), clean["ts"].min(), clean["ts"].max()) == (32, MIN_TS, NOW)  # both bounds are inclusive


def test_both_copies_of_a_duplicated_movie_id_are_quarantined(tmp_path, dataset):
    dataset(extra_movies=[(UNRATED_MOVIE, "Cinema Paradiso (1988)", "Drama|Romance")])

    result = _validate(tmp_path)

    assert result["quarantined_rows"] == 2
    bad = _quarantine(tmp_path, "movies")
    assert (bad["movie_id"].tolist(), bad["_line"].tolist()) == ([UNRATED_MOVIE] * 2, [8, 10])
    assert set(bad["_reason"]) == {"expect_column_values_to_be_unique(movie_id)"}
    movies = _clean(tmp_path, "movies")
    assert (len(movies), UNRATED_MOVIE in set(movies["movie_id"])) == (7, False)
    assert not (tmp_path / "validate" / "quarantine" / "ratings.parquet").exists()


# --- tables that stop the run ----------------------------------------------------------------------------


def test_missing_column_stops_the_run_naming_the_column(tmp_path, dataset):
    dataset(ratings_columns=("userId", "movieId", "rating"))

    message = _stopped(tmp_path)

    assert "ratings.csv: the ratings table does not have the expected columns" in message
    assert "expect_table_columns_to_match_set(column_set=['user_id', 'movie_id', 'rating', 'ts']" in message
    assert "'missing': ['ts']" in message
    assert not (tmp_path / "validate" / "manifest.json").exists()
    assert _result_json(tmp_path)["success"] is False


def test_header_only_ratings_file_fails_the_row_count_expectation(tmp_path, dataset):
    ingested = dataset(ratings=[])
    assert ingested["dataset"]["ratings"] == 0

    message = _stopped(tmp_path)

    assert "ratings.csv: the ratings table failed table-level expectations" in message
    assert "expect_table_row_count_to_be_between(min_value=1) -- at least one valid rating: observed 0" in message


def test_wrong_delimiter_stops_the_run_with_a_hint(tmp_path, dataset):
    ingested = dataset(ratings_delimiter=";")
    assert (ingested["dataset"]["ratings"], ingested["dataset"]["users"]) == (30, 0)

    message = _stopped(tmp_path)

    assert "ratings.csv" in message
    assert "expect_table_columns_to_match_set" in message
    assert "(found column 'userId;movieId;rating;timestamp': wrong delimiter?)" in message


def test_bad_rows_above_the_default_threshold_stop_the_run_but_keep_the_evidence(tmp_path, dataset):
    assert DEFAULT_THRESHOLD == 0.001
    dataset(extra_ratings=[(1, 2, 7.0, TS), (2, 50, 3.25, TS)])

    message = _stopped(tmp_path, DEFAULT_THRESHOLD)

    assert "ratings.csv: 2 of 32 ratings rows (6.250%) failed row-level expectations" in message
    assert "above quarantine_threshold 0.100%" in message
    assert "expect_column_values_to_be_between(column=rating, min_value=0.5, max_value=5.0)" in message
    out = tmp_path / "validate"
    assert _quarantine(tmp_path)["rating"].tolist() == [7.0, 3.25]
    result = _result_json(tmp_path)
    assert (result["success"], result["quarantined_rows"]) == (False, 2)
    assert (out / "data_docs" / "index.html").exists()
    assert not (out / "manifest.json").exists()
    assert not (out / "ratings.parquet").exists()


# --- what a quarantined row keeps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "reason"),
    [((1, 2, 7.0, TS), "expect_column_values_to_be_between(rating); expect_column_values_to_be_in_set(rating)"),
     ((1, 2, 3.0, 788918399), "expect_column_values_to_be_between(ts)"),
     ((1, 999, 3.0, TS), "expect_column_values_to_be_in_set(_movie_known)"),
     ((1, "0x10", 3.0, TS),
      "expect_column_values_to_not_be_null(movie_id); expect_column_values_to_be_in_set(_movie_known)")],
    ids=["rating-7", "before-1995", "unknown-movie", "hex-id"],
)
def test_every_quarantined_row_keeps_its_text_line_and_reason(row, reason, tmp_path, dataset):
    dataset(extra_ratings=[row])

    assert _validate(tmp_path)["quarantined_rows"] == 1

    bad = _quarantine(tmp_path)
    assert bad[["_line", "_raw", "_reason"]].values.tolist() == [[32, ",".join(map(str, row)), reason]]


def test_a_quarantined_movie_keeps_its_quoted_text(tmp_path, dataset):
    dataset(extra_movies=[(UNRATED_MOVIE, "Paradiso, Cinema (1988)", "Drama")])

    _validate(tmp_path)

    bad = _quarantine(tmp_path, "movies")
    assert bad["_raw"].tolist() == ["1172,Cinema Paradiso (Nuovo cinema Paradiso) (1989),Drama",
                                    '1172,"Paradiso, Cinema (1988)",Drama']


def test_columns_dropped_at_ingest_are_listed_with_the_unknown_ones(tmp_path, dataset):
    from movielens_fixtures import add_column

    written = write_csv_variant(tmp_path / "source" / "ml-latest-small")
    add_column(written.folder / "ratings.csv", "user_id", lambda row: 1)
    add_column(written.folder / "ratings.csv", "comment", lambda row: "ok")
    ingest_movielens(str(written.folder), tmp_path / "ingest", load_settings({"RECSYS_HOME": str(tmp_path / "h")}))

    result = _validate(tmp_path)

    assert result["dropped_columns"] == {"ratings": ["user_id", "comment"]}
    clean = _clean(tmp_path)
    assert sorted(set(clean["user_id"])) == [1, 2, 3, 4, 5, 6] and "comment" not in clean
