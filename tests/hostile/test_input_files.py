"""Hostile input files through ``recsys run --stages ingest,validate``: each case damages a copy of a sample of the
real ml-latest-small and asserts the exit code, one error line naming the file (and line or column), no traceback,
and for the rows that are quarantined, their reason, their line in the file and their text as it is there.

The sample keeps the first 3,000 ratings and every movie, with their CRLF line ends; without tags and links a
case runs two Great Expectations suites, so one that reaches validation takes a second or two. No case needs
Spark.
"""

from __future__ import annotations

import codecs
import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from hostile.conftest import recsys
from movielens_fixtures import add_column, rename_header, truncate_last_row

SAMPLE_RATINGS = 3000
TS = 964982703  # 2000-07-30, inside MovieLens history
NEW_USER = 611  # ml-latest-small's users are 1..610: (611, movie) is a new pair for any movie


@pytest.fixture(scope="module")
def sample(real_movielens, tmp_path_factory) -> Path:
    """ml-latest-small cut to its first 3,000 ratings, with every movie."""
    folder = tmp_path_factory.mktemp("sample") / "ml-sample"
    folder.mkdir()
    lines = (real_movielens / "ratings.csv").read_bytes().split(b"\n")
    (folder / "ratings.csv").write_bytes(b"\n".join(lines[:SAMPLE_RATINGS + 1]) + b"\n")
    shutil.copyfile(real_movielens / "movies.csv", folder / "movies.csv")
    return folder


@pytest.fixture
def source(sample, tmp_path) -> Path:
    """A writable copy of the sample, for one case to damage."""
    return Path(shutil.copytree(sample, tmp_path / "ml-sample"))


def _run(source, work, threshold: float | None = None):
    args = ["run", "--source", source, "--work-dir", work, "--stages", "ingest,validate"]
    if threshold is not None:
        args += ["--param", f"quarantine_threshold={threshold}"]
    return recsys(*args)


def _append(path: Path, rows: list[str]) -> list[int]:
    """Append text rows to a file (each ended by LF, after the CRLF lines of ml-latest-small); return the line
    each starts on."""
    old = path.read_bytes()
    path.write_bytes(old + "".join(f"{row}\n" for row in rows).encode())
    first = old.count(b"\n") + 1
    return list(range(first, first + len(rows)))


def _new_ratings(source: Path, fields: list[dict]) -> list[tuple[int, str]]:
    """Append one rating per dict (user 611, movies 1, 2, 3, ..., rating 3.0, ts ``TS``, fields replaced by the
    dict's); return (line, text) of each."""
    rows = []
    for movie, replaced in enumerate(fields, start=1):
        values = {"userId": NEW_USER, "movieId": movie, "rating": "3.0", "timestamp": TS, **replaced}
        rows.append(",".join(str(values[c]) for c in ("userId", "movieId", "rating", "timestamp")))
    return list(zip(_append(source / "ratings.csv", rows), rows))


# --- files refused before any row is used ---------------------------------------------------------------------


def _bad_utf8(source):
    movies = source / "movies.csv"
    data = movies.read_bytes()
    at = data.index("é".encode())
    movies.write_bytes(data[:at] + b"\xe9" + data[at + 2:])
    line = data.count(b"\n", 0, at) + 1
    return source, [movies, f"line {line}", "not valid UTF-8"]


def _truncated_last_row(source):
    line = truncate_last_row(source / "ratings.csv", keep=5)
    return source, [source / "ratings.csv", f"line {line}", "expected 4 fields, found 2"]


def _empty_ratings(source):
    (source / "ratings.csv").write_bytes(b"")
    return source, [source / "ratings.csv", "empty"]


def _header(column, value=1):
    def damage(source):
        add_column(source / "ratings.csv", column, lambda row: value)
        return source, [source / "ratings.csv", "line 1", f"'{column}'"]
    return damage


def _normalised_name_instead_of_the_formats(source):
    rename_header(source / "ratings.csv", "userId", "user_id")
    return source, [source / "ratings.csv", "line 1", "'user_id'", "'userId'"]


def _carriage_return_in_header(source):
    ratings = source / "ratings.csv"
    ratings.write_bytes(ratings.read_bytes().replace(b"movieId,", b"movieId\r,", 1))
    return source, [ratings, "line 1", "carriage return"]


def _cr_line_endings(source):
    ratings = source / "ratings.csv"  # old Mac files: a lone CR ends each line
    ratings.write_bytes(ratings.read_bytes().replace(b"\r\n", b"\r"))
    return source, [ratings, "line 1", "carriage return", "userId,movieId,rating,timestamp\\r1,1,4.0"]


def _plain_file(source):
    return source / "ratings.csv", [source / "ratings.csv", "is a file"]


def _missing_folder(source):
    return source.parent / "nowhere", [source.parent / "nowhere", "does not exist"]


def _zip(source, name, extra: dict) -> Path:
    archive = source.parent / name
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.iterdir()):
            zf.write(path, f"ml-sample/{path.name}")
        for member, data in extra.items():
            zf.writestr(member, data)
    return archive


def _zip_traversal(source):
    archive = _zip(source, "traversal.zip", {"../../escaped.txt": b"x"})
    return archive, [archive, "../../escaped.txt", "not extracted"]


def _zip_bomb(source):
    archive = _zip(source, "bomb.zip", {"ml-sample/padding.bin": b"\0" * (8 * 2**20)})  # ~1000-fold
    return archive, [archive, "padding.bin expands", "not extracted"]


def _above_threshold(source):
    _new_ratings(source, [{"rating": 7}] * 4)
    return source, [source / "ratings.csv", "4 of 3004 ratings rows", "above quarantine_threshold"]


def _wrong_delimiter(source):
    ratings = source / "ratings.csv"
    ratings.write_bytes(ratings.read_bytes().replace(b",", b";"))
    return source, [ratings, "does not have the expected columns"]


@pytest.mark.parametrize(("damage", "code"), [
    pytest.param(_bad_utf8, 4, id="bad-utf8-bytes"),
    pytest.param(_truncated_last_row, 4, id="truncated-last-row"),
    pytest.param(_empty_ratings, 4, id="empty-ratings"),
    pytest.param(_header("rating", "4.0"), 4, id="rating-column-twice"),
    pytest.param(_header("_line"), 4, id="column-named-_line"),
    pytest.param(_header("_raw", "x"), 4, id="column-named-_raw"),
    pytest.param(_normalised_name_instead_of_the_formats, 4, id="user_id-instead-of-userId"),
    pytest.param(_carriage_return_in_header, 4, id="carriage-return-in-header"),
    pytest.param(_cr_line_endings, 4, id="cr-line-endings"),
    pytest.param(_plain_file, 3, id="source-is-a-plain-file"),
    pytest.param(_missing_folder, 3, id="source-missing"),
    pytest.param(_zip_traversal, 3, id="zip-path-traversal"),
    pytest.param(_zip_bomb, 3, id="zip-bomb"),
    pytest.param(_above_threshold, 5, id="quarantine-above-threshold"),
    pytest.param(_wrong_delimiter, 5, id="wrong-delimiter"),
])
def test_a_file_that_cannot_be_used_is_refused_naming_it(damage, code, source, tmp_path):
    given, named = damage(source)

    outcome = _run(given, tmp_path / "run")

    line = outcome.refused(code, *named)
    assert len(line) < 600, line
    if code != 5:
        assert not (tmp_path / "run" / "validate").exists()


# --- rows that are quarantined with their reason, line and text ---------------------------------------------

NOT_NULL, BETWEEN, IN_SET = ("expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
                            "expect_column_values_to_be_in_set")


def _ratings(cases):
    """Damage: append one rating per (fields, expected reason or None for a row that must be kept)."""
    def damage(source):
        rows = _new_ratings(source, [fields for fields, _ in cases])
        return [("ratings", line, text, reason) for (line, text), (_, reason) in zip(rows, cases)]
    return damage


def _ratings_with_lf(source):
    ratings = source / "ratings.csv"  # ml-latest-small's files end their lines with CRLF
    ratings.write_bytes(ratings.read_bytes().replace(b"\r\n", b"\n"))
    return _ratings([({"rating": 7}, f"{BETWEEN}(rating)")])(source)


def _title_across_two_lines(source):
    movies = source / "movies.csv"
    lines = movies.read_text(encoding="utf-8").split("\n")
    two_lines = '200001,"Two\nLines (2001)",Drama'
    movies.write_text("\n".join([*lines[:10], two_lines, *lines[10:]]), encoding="utf-8")
    (after,) = _append(movies, ["200001,Same Id (2002),Drama"])
    unique = "expect_column_values_to_be_unique(movie_id)"
    return [("movies", 11, two_lines, unique), ("movies", after, "200001,Same Id (2002),Drama", unique),
            ("movies", 15, lines[12], None)]


@pytest.mark.parametrize("damage", [
    pytest.param(_ratings([({"rating": 7}, f"{BETWEEN}(rating)"), ({"rating": "3.25"}, f"{IN_SET}(rating)"),
                           ({"rating": 0}, f"{BETWEEN}(rating)"), ({"rating": ""}, f"{NOT_NULL}(rating)")]),
                 id="ratings-off-the-scale"),
    pytest.param(_ratings([({"rating": text}, f"{NOT_NULL}(rating)")
                           for text in ("0x1p1", "inf", "nan", "1_0", "٣.٥", "abc")]),
                 id="ratings-not-decimal-numbers"),
    pytest.param(_ratings([({"userId": text}, f"{NOT_NULL}(user_id)")
                           for text in ("0x10", "١", "１", "1e3", "0b1", "1_000", "6.1e2")]
                          + [({"userId": "+611"}, None), ({"userId": " 611 "}, None)]),
                 id="ids-not-decimal-ascii-integers"),
    pytest.param(_ratings([({"movieId": "0x10"}, f"{NOT_NULL}(movie_id)"),
                           ({"movieId": 999999}, f"{IN_SET}(_movie_known)")]),
                 id="movie-ids-bad-or-unknown"),
    pytest.param(_ratings([({"timestamp": 788918399}, f"{BETWEEN}(ts)"),
                           ({"timestamp": 99999999999}, f"{BETWEEN}(ts)"),
                           ({"timestamp": "0x3B9ACA00"}, f"{NOT_NULL}(ts)"),
                           ({"timestamp": "9.6e8"}, f"{NOT_NULL}(ts)")]),
                 id="timestamps-bad"),
    pytest.param(_ratings_with_lf, id="lf-line-endings"),
    pytest.param(_title_across_two_lines, id="quoted-title-across-two-lines"),
])
def test_bad_rows_are_quarantined_with_reason_line_and_text(damage, source, tmp_path):
    expected = damage(source)

    outcome = _run(source, tmp_path / "run", threshold=0.01)

    outcome.succeeded()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    quarantined = sum(1 for *_, reason in expected if reason)
    assert report["validation"]["quarantined_rows"] == quarantined
    for table in {t for t, *_ in expected}:
        bad = pd.read_parquet(tmp_path / "run" / "validate" / "quarantine" / f"{table}.parquet")
        by_line = {int(line): (raw, reason) for line, raw, reason in bad[["_line", "_raw", "_reason"]].values}
        kept = set(pd.read_parquet(tmp_path / "run" / "validate" / f"{table}.parquet")["_line"])
        for _, line, text, reason in [e for e in expected if e[0] == table]:
            if reason is None:
                assert line in kept and line not in by_line
            else:
                assert by_line[line][0] == text and reason in by_line[line][1], (line, by_line.get(line))
        assert bad["_raw"].notna().all() and bad["_file"].str.endswith(f"{table}.csv").all()


# --- files read as they are meant, whatever their form --------------------------------------------------------


def _sample_ratings(sample) -> list[tuple]:
    df = pd.read_csv(sample / "ratings.csv")
    return sorted(df.itertuples(index=False, name=None))


def _clean_ratings(work) -> list[tuple]:
    df = pd.read_parquet(work / "validate" / "ratings.parquet")
    return sorted(df[["user_id", "movie_id", "rating", "ts"]].itertuples(index=False, name=None))


def _bom(source):
    ratings = source / "ratings.csv"
    ratings.write_bytes(codecs.BOM_UTF8 + ratings.read_bytes())


def _reordered_columns(source):
    df = pd.read_csv(source / "ratings.csv", dtype=str)
    df[["timestamp", "rating", "userId", "movieId"]].to_csv(source / "ratings.csv", index=False)


def _extra_column(filename, column, value):
    def damage(source):
        add_column(source / filename, column, lambda row: value)
    return damage


@pytest.mark.parametrize(("damage", "dropped"), [
    pytest.param(_bom, {}, id="utf8-bom"),
    pytest.param(_reordered_columns, {}, id="reordered-columns"),
    pytest.param(_extra_column("ratings.csv", "user_id", 1), {"ratings": "user_id"}, id="extra-user_id-column"),
    pytest.param(_extra_column("ratings.csv", "ts", 0), {"ratings": "ts"}, id="extra-ts-column"),
    pytest.param(_extra_column("movies.csv", "year", 1800), {"movies": "year"}, id="extra-year-column"),
    pytest.param(_extra_column("ratings.csv", "comment", "ok"), {"ratings": "comment"}, id="extra-unknown-column"),
])
def test_a_file_in_another_form_is_read_as_meant(damage, dropped, source, sample, tmp_path, caplog):
    damage(source)
    work = tmp_path / "run"

    with caplog.at_level("WARNING", logger="pipeline.data"):
        outcome = _run(source, work)

    outcome.succeeded()
    report = json.loads((work / "report.json").read_text())
    assert report["validation"]["quarantined_rows"] == 0
    assert _clean_ratings(work) == _sample_ratings(sample)
    years = pd.read_parquet(work / "validate" / "movies.parquet").set_index("movie_id")["year"]
    assert (years[1], years[260]) == (1995, 1977)
    # every column not used is listed by validation; one named like a column the pipeline makes, also by ingest
    assert report["validation"].get("dropped_columns", {}) == {table: [column] for table, column in dropped.items()}
    by_ingest = report["dataset"].get("dropped_columns", {})
    assert {table: [d["column"] for d in columns] for table, columns in by_ingest.items()} == \
        {table: [column] for table, column in dropped.items() if column != "comment"}
    for table, columns in by_ingest.items():
        assert "never used" in columns[0]["reason"]
        assert f"{source / (table + '.csv')}: column {columns[0]['column']!r} dropped" in caplog.text
