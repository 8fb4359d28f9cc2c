"""Stage ``ingest``: every MovieLens layout and source loads into the common schema; unreadable files stop here."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import threading
import zipfile

import boto3
import pyarrow.parquet as pq
import pytest

from movielens_fixtures import (
    RATINGS,
    add_column,
    append_bytes,
    rename_header,
    truncate_last_row,
    write_1m,
    write_10m,
    write_100k,
    write_csv_variant,
    zip_folder,
)
from pipeline.config import load_settings
from pipeline.data.formats import detect_format
from pipeline.data.ingest import ingest_movielens
from pipeline.errors import DataFormatError, SourceError

WRITERS = {
    "ml-latest-small": (write_csv_variant, "csv", "halves"),
    "ml-100k": (write_100k, "100k", "whole"),
    "ml-1m": (write_1m, "dat-1m", "whole"),
    "ml-10m": (write_10m, "dat-10m", "halves"),
}


@pytest.fixture
def settings(tmp_path):
    return load_settings({"RECSYS_HOME": str(tmp_path / "home")})


@pytest.fixture
def no_proxy(monkeypatch):
    """Loopback servers must be reached directly, whatever proxy the machine is configured with."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _movies_by_id(out_dir) -> dict:
    return {row["movie_id"]: row for row in pq.read_table(out_dir / "movies.parquet").to_pylist()}


def _no_leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


# --- each layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_each_variant_loads_with_its_exact_counts(variant, tmp_path, settings):
    writer, fmt, scale = WRITERS[variant]
    written = writer(tmp_path / variant)

    result = ingest_movielens(str(written.folder), tmp_path / "out", settings)

    dataset = result["dataset"]
    assert (dataset["variant"], dataset["format"], dataset["rating_values"]) == (variant, fmt, scale)
    assert (dataset["ratings"], dataset["users"], dataset["movies"], dataset["tags"]) == (
        written.ratings, written.users, written.movies, written.tags)
    assert (written.ratings, written.users, written.movies) == (30, 6, 8)
    assert len(dataset["fingerprint"]) == 16
    assert (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_ratings_are_normalised_to_the_common_schema(variant, tmp_path, settings):
    writer, _, scale = WRITERS[variant]
    ingest_movielens(str(writer(tmp_path / variant).folder), tmp_path / "out", settings)

    table = pq.read_table(tmp_path / "out" / "ratings.parquet")
    types = {f.name: str(f.type) for f in table.schema}
    assert {k: types[k] for k in ("user_id", "movie_id", "rating", "ts")} == {
        "user_id": "int64", "movie_id": "int64", "rating": "double", "ts": "int64"}
    rows = table.to_pylist()
    # user 1 rated Twelve Monkeys 3.5 at 964983250: whole-star variants publish it as 4
    assert {k: rows[3][k] for k in ("user_id", "movie_id", "rating", "ts", "_line")} == {
        "user_id": 1, "movie_id": 32, "rating": 3.5 if scale == "halves" else 4.0, "ts": 964983250,
        "_line": 5 if variant == "ml-latest-small" else 4}
    assert sorted({r["rating"] for r in rows}) == (
        sorted({r for _, _, r, _ in RATINGS}) if scale == "halves" else [1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_movie_titles_years_and_genres_are_normalised(variant, tmp_path, settings):
    writer, _, _ = WRITERS[variant]
    ingest_movielens(str(writer(tmp_path / variant).folder), tmp_path / "out", settings)

    movies = _movies_by_id(tmp_path / "out")
    children = "Children's" if variant in ("ml-100k", "ml-1m") else "Children"
    assert {k: movies[2][k] for k in ("title", "year", "genres")} == {
        "title": "Jumanji (1995)", "year": 1995, "genres": ["Adventure", children, "Fantasy"]}
    # the "(a.k.a. ...)" parenthesis is not a year; the last "(1995)" is
    assert movies[32]["year"] == 1995
    assert movies[50]["title"] == "Usual Suspects, The (1995)"  # quoted comma in CSV
    assert (movies[260]["title"], movies[260]["year"]) == ("Star Wars: Episode IV - A New Hope (1977)", 1977)
    # "(no genres listed)" -- or ml-100k's lone "unknown" flag -- is an empty list
    assert movies[8606]["genres"] == []


@pytest.mark.parametrize("variant", ["ml-100k", "ml-1m"])
def test_latin1_titles_are_decoded(variant, tmp_path, settings):
    written = WRITERS[variant][0](tmp_path / variant)
    movies_file = "u.item" if variant == "ml-100k" else "movies.dat"
    assert "Misérables".encode("latin-1") in (written.folder / movies_file).read_bytes()

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    assert _movies_by_id(tmp_path / "out")[73]["title"] == "Misérables, Les (1995)"


def test_csv_variant_loads_tags_and_links(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    tags = pq.read_table(tmp_path / "out" / "tags.parquet").to_pylist()
    assert [(t["user_id"], t["movie_id"], t["tag"], t["ts"]) for t in tags][-1] == (
        6, 1, "pixar, animation", 1609372050)
    links = {r["movie_id"]: r for r in pq.read_table(tmp_path / "out" / "links.parquet").to_pylist()}
    assert (links[1]["imdb_id"], links[1]["tmdb_id"]) == ("0114709", 862)  # imdb keeps its leading zero
    assert links[8606]["tmdb_id"] is None  # blank in links.csv, as in the real files


@pytest.mark.parametrize(
    ("files", "fmt"),
    [
        ({"ratings.csv", "movies.csv", "tags.csv", "links.csv", "README.txt"}, "csv"),
        ({"u.data", "u.item", "u.user", "u.genre", "u1.base"}, "100k"),
        ({"ratings.dat", "movies.dat", "users.dat", "README"}, "dat-1m"),
        ({"ratings.dat", "movies.dat", "tags.dat"}, "dat-10m"),
    ],
)
def test_format_detection_follows_the_marker_files(files, fmt):
    assert detect_format(files).name == fmt


def test_folder_with_no_ratings_file_is_not_a_dataset():
    assert detect_format({"movies.csv", "README.txt"}) is None


# --- sources ----------------------------------------------------------------------------------------------


def test_folder_with_a_single_subfolder_holding_the_files_loads(tmp_path, settings):
    written = write_1m(tmp_path / "download" / "ml-1m")

    result = ingest_movielens(str(tmp_path / "download"), tmp_path / "out", settings)

    assert (result["dataset"]["variant"], result["dataset"]["ratings"]) == ("ml-1m", written.ratings)


def test_local_zip_loads_and_names_the_variant_after_the_archive(tmp_path, settings):
    written = write_10m(tmp_path / "build" / "ml-10M100K")
    archive = zip_folder(written.folder, tmp_path / "ml-10m.zip")

    result = ingest_movielens(str(archive), tmp_path / "out", settings)

    dataset = result["dataset"]
    assert (dataset["variant"], dataset["format"], dataset["ratings"], dataset["tags"]) == (
        "ml-10m", "dat-10m", written.ratings, written.tags)


@pytest.mark.parametrize("member", ["../escaped.txt", "ml-latest-small/../../escaped.txt", "/tmp/escaped.txt"])
def test_a_zip_member_pointing_outside_the_archive_is_refused(member, tmp_path, settings):
    written = write_csv_variant(tmp_path / "build" / "ml-latest-small")
    archive = zip_folder(written.folder, tmp_path / "ml-latest-small.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, b"x")

    with pytest.raises(SourceError, match=rf"ml-latest-small\.zip: member {re.escape(member)} points outside"):
        ingest_movielens(str(archive), tmp_path / "out", settings)
    assert not list(settings.cache_dir.rglob("escaped.txt"))


def test_missing_source_raises_source_error(tmp_path, settings):
    with pytest.raises(SourceError, match=r"does not exist.*grouplens:<name> or s3://"):
        ingest_movielens(str(tmp_path / "nowhere"), tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_folder_without_movielens_files_raises_source_error(tmp_path, settings):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("hello")

    with pytest.raises(SourceError, match=r"no MovieLens ratings file found.*README\.txt"):
        ingest_movielens(str(tmp_path / "notes"), tmp_path / "out", settings)


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def grouplens(tmp_path, no_proxy):
    """A stand-in for files.grouplens.org on loopback: serves ``tmp_path/served``, records each request path."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_RecordingHandler, directory=str(served)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, served, server.requests
    server.shutdown()
    server.server_close()


def _publish(served, tmp_path, name, md5=None):
    written = write_csv_variant(tmp_path / "build" / name)
    archive = zip_folder(written.folder, served / f"{name}.zip")
    digest = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    (served / f"{name}.zip.md5").write_text(f"MD5 ({name}.zip) = {digest}\n")
    return written


def test_grouplens_download_is_checksum_verified_and_cached(tmp_path, grouplens):
    url, served, requests = grouplens
    written = _publish(served, tmp_path, "ml-latest-small")
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_GROUPLENS_URL": url})

    first = ingest_movielens("grouplens:ml-latest-small", tmp_path / "run1", settings)
    assert requests == ["/ml-latest-small.zip.md5", "/ml-latest-small.zip"]
    second = ingest_movielens("grouplens:ml-latest-small", tmp_path / "run2", settings)

    assert requests == ["/ml-latest-small.zip.md5", "/ml-latest-small.zip"]  # the second run made no request
    assert first["dataset"] == second["dataset"]
    assert (first["dataset"]["variant"], first["dataset"]["ratings"], first["dataset"]["movies"]) == (
        "ml-latest-small", written.ratings, written.movies)
    assert (settings.cache_dir / "grouplens" / "ml-latest-small.zip").exists()


def test_grouplens_checksum_mismatch_raises_and_keeps_no_zip(tmp_path, grouplens):
    url, served, requests = grouplens
    _publish(served, tmp_path, "ml-latest-small", md5="0" * 32)
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_GROUPLENS_URL": url})

    with pytest.raises(SourceError, match=r"ml-latest-small\.zip: checksum mismatch .*published 0{32}"):
        ingest_movielens("grouplens:ml-latest-small", tmp_path / "out", settings)

    assert requests == ["/ml-latest-small.zip.md5", "/ml-latest-small.zip"]
    cache = settings.cache_dir / "grouplens"
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".zip" or ".tmp-" in p.name) == []
    assert not (cache / "ml-latest-small").exists()
    assert not (tmp_path / "out").exists()


def test_grouplens_unknown_dataset_raises_source_error(tmp_path, grouplens):
    url, _, requests = grouplens
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_GROUPLENS_URL": url})

    with pytest.raises(SourceError, match=r"cannot download .*/ml-nope\.zip\.md5: HTTP Error 404"):
        ingest_movielens("grouplens:ml-nope", tmp_path / "out", settings)
    assert requests == ["/ml-nope.zip.md5"]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, no_proxy, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return boto3.client("s3", endpoint_url=moto_endpoint), moto_endpoint


def test_s3_prefix_source_loads(tmp_path, s3):
    client, endpoint = s3
    written = write_100k(tmp_path / "build" / "ml-100k")
    client.create_bucket(Bucket="movielens")
    for path in written.folder.iterdir():
        client.upload_file(str(path), "movielens", f"datasets/ml-100k/{path.name}")
    client.put_object(Bucket="movielens", Key="datasets/ml-100k/old/u.data", Body=b"1\t1\t9\t0\n")  # not read
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_S3_ENDPOINT_URL": endpoint})

    result = ingest_movielens("s3://movielens/datasets/ml-100k", tmp_path / "out", settings)

    dataset = result["dataset"]
    assert (dataset["variant"], dataset["format"], dataset["ratings"], dataset["users"], dataset["movies"]) == (
        "ml-100k", "100k", written.ratings, written.users, written.movies)


def test_s3_empty_prefix_raises_source_error(tmp_path, s3):
    client, endpoint = s3
    client.create_bucket(Bucket="empty-bucket")
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_S3_ENDPOINT_URL": endpoint})

    with pytest.raises(SourceError, match=r"no files under s3://empty-bucket/ml-latest-small"):
        ingest_movielens("s3://empty-bucket/ml-latest-small", tmp_path / "out", settings)


# --- files that cannot be read as tables ------------------------------------------------------------------


def test_non_utf8_bytes_in_a_csv_variant_name_file_and_line(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    line = append_bytes(written.folder / "movies.csv", "9999,Amélie (2001),Comedy|Romance\n".encode("latin-1"))
    assert line == 10

    with pytest.raises(DataFormatError, match=r"movies\.csv: line 10: bytes b'\\xe9.*not valid UTF-8"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


@pytest.mark.parametrize(
    ("variant", "filename", "keep"),
    [("ml-latest-small", "ratings.csv", 3), ("ml-100k", "u.data", 3), ("ml-1m", "ratings.dat", 3),
     ("ml-10m", "movies.dat", 13)],  # "6,3" / "6\t3" / "6::" / "8606::Pull My"
)
def test_row_truncated_mid_row_names_file_and_line(variant, filename, keep, tmp_path, settings):
    written = WRITERS[variant][0](tmp_path / variant)
    line = truncate_last_row(written.folder / filename, keep=keep)

    with pytest.raises(DataFormatError, match=rf"{filename}: line {line}: expected \d fields, found 2"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


def test_a_bad_row_after_a_title_across_two_lines_is_named_by_its_own_line(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_movies=[(9001, "Two\nLines (2001)", "Drama")])
    line = append_bytes(written.folder / "movies.csv", b"9002,Cut Short (2002)\n")
    assert line == 12

    with pytest.raises(DataFormatError, match=r"movies\.csv: line 12: expected 3 fields, found 2: '9002,Cut Short"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


@pytest.mark.parametrize("filename", ["ratings.csv", "movies.csv", "tags.csv"])
def test_empty_file_raises_data_format_error(filename, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    (written.folder / filename).write_bytes(b"")

    with pytest.raises(DataFormatError, match=rf"{filename}: the file is empty \(0 bytes\)"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


def test_missing_movies_file_raises_source_error(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    (written.folder / "movies.csv").unlink()

    with pytest.raises(SourceError, match=r"movies\.csv is missing"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


def test_failed_ingest_leaves_no_output_and_no_temporary_folder(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    truncate_last_row(written.folder / "tags.csv")  # the third file: two tables were already written
    runs = tmp_path / "runs"
    runs.mkdir()

    with pytest.raises(DataFormatError):
        ingest_movielens(str(written.folder), runs / "ingest", settings)

    assert sorted(p.name for p in runs.iterdir()) == []


def test_failed_rerun_keeps_the_previous_output(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    ingest_movielens(str(written.folder), tmp_path / "runs" / "ingest", settings)
    before = (tmp_path / "runs" / "ingest" / "manifest.json").read_text()
    append_bytes(written.folder / "ratings.csv", b"7,1,4.0\n")

    with pytest.raises(DataFormatError, match=r"ratings\.csv: line 32: expected 4 fields, found 3"):
        ingest_movielens(str(written.folder), tmp_path / "runs" / "ingest", settings)

    assert (tmp_path / "runs" / "ingest" / "manifest.json").read_text() == before
    assert _no_leftovers(tmp_path / "runs") == []


# --- header names the pipeline could misread --------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "column", "value", "made_from"),
    [("ratings.csv", "user_id", lambda row: 999, "'userId'"),
     ("ratings.csv", "ts", lambda row: 0, "'timestamp'"),
     ("movies.csv", "year", lambda row: 1800, "the title"),
     ("links.csv", "tmdb_id", lambda row: 7, "'tmdbId'")],
)
def test_a_column_named_like_a_normalised_column_is_dropped_and_listed(filename, column, value, made_from,
                                                                      tmp_path, settings, caplog):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    path = written.folder / filename
    add_column(path, column, value)

    with caplog.at_level("WARNING", logger="pipeline.data.ingest"):
        result = ingest_movielens(str(written.folder), tmp_path / "out", settings)

    table = filename.removesuffix(".csv")
    (dropped,) = result["dataset"]["dropped_columns"][table]
    assert dropped["column"] == column and made_from in dropped["reason"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tables"][table]["dropped_columns"] == [dropped]
    assert f"{path}: column {column!r} dropped" in caplog.text
    rows = pq.read_table(tmp_path / "out" / f"{table}.parquet").to_pylist()
    if table == "ratings":
        assert [(r["user_id"], r["ts"]) for r in rows] == [(u, ts) for u, _, _, ts in RATINGS]
    elif table == "movies":
        assert _movies_by_id(tmp_path / "out")[260]["year"] == 1977
    else:
        assert {r["movie_id"]: r["tmdb_id"] for r in rows}[1] == 862


def test_clean_data_lists_no_dropped_columns(tmp_path, settings):
    result = ingest_movielens(str(write_csv_variant(tmp_path / "ml-latest-small").folder), tmp_path / "out", settings)

    assert "dropped_columns" not in result["dataset"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all("dropped_columns" not in info for info in manifest["tables"].values())


def test_a_normalised_name_in_place_of_the_formats_name_is_refused(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    rename_header(written.folder / "ratings.csv", "userId", "user_id")

    with pytest.raises(DataFormatError, match=r"ratings\.csv: line 1: column 'user_id': .*'userId'"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


@pytest.mark.parametrize(
    ("filename", "column"),
    [("ratings.csv", "rating"), ("movies.csv", "title"), ("ratings.csv", "comment")],
)
def test_a_column_named_twice_in_the_header_is_refused(filename, column, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    add_column(written.folder / filename, column, lambda row: "x")
    if column == "comment":
        add_column(written.folder / filename, column, lambda row: "y")

    with pytest.raises(DataFormatError, match=rf"{filename}: line 1: column '{column}' appears twice"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


@pytest.mark.parametrize("column", ["_line", "_raw", "_reason", "_note"])
def test_a_column_with_a_reserved_name_is_refused(column, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    add_column(written.folder / "ratings.csv", column, lambda row: 1)

    with pytest.raises(DataFormatError, match=rf"ratings\.csv: line 1: column '{column}': names starting with '_'"):
        ingest_movielens(str(written.folder), tmp_path / "out", settings)


# --- numbers: decimal ASCII text only ---------------------------------------------------------------------


def _last_rating(tmp_path) -> dict:
    return pq.read_table(tmp_path / "out" / "ratings.parquet").to_pylist()[-1]


@pytest.mark.parametrize("text", ["0x10", "1_000", "\u0661", "\uff11", "0b1", "1e3", "16.0", "1 6", "\u00a016", "--1",
                                  "99999999999999999999"])
def test_only_decimal_ascii_integer_text_is_an_id(text, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_ratings=[(text, 2, 3.0, 964982703)])

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    row = _last_rating(tmp_path)
    assert (row["user_id"], row["movie_id"], row["_raw"]) == (None, 2, f"{text},2,3.0,964982703")


@pytest.mark.parametrize(("text", "value"), [("16", 16), ("+16", 16), (" 16 ", 16), ("\t16", 16), ("0016", 16),
                                             ("-4", -4)])
def test_a_sign_leading_zeros_and_surrounding_spaces_are_accepted(text, value, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_ratings=[(text, 2, 3.0, 964982703)])

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    assert _last_rating(tmp_path)["user_id"] == value


@pytest.mark.parametrize("text", ["0x1p1", "inf", "-inf", "Infinity", "nan", "NaN", "1_0", "\u0663.\u0665", "4,5",
                                  "3.5.1", "0x3"])
def test_only_decimal_ascii_number_text_is_a_rating(text, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_ratings=[(1, 2, text, 964982703)])

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    row = _last_rating(tmp_path)
    assert (row["rating"], row["user_id"]) == (None, 1)
    assert row["_raw"] == ",".join(["1", "2", f'"{text}"' if "," in text else text, "964982703"])


@pytest.mark.parametrize(("text", "value"), [("3.5", 3.5), ("+3.5", 3.5), (" 4 ", 4.0), ("4.", 4.0), (".5", 0.5),
                                             ("35e-1", 3.5)])
def test_decimal_rating_forms_are_accepted(text, value, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_ratings=[(1, 2, text, 964982703)])

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    assert _last_rating(tmp_path)["rating"] == value


@pytest.mark.parametrize("text", ["0x3B9ACA00", "9.6e8", "964982703.0", "\u0669\u0666\u0664\u0669\u0668\u0662\u0667"])
def test_only_decimal_ascii_integer_text_is_a_timestamp(text, tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small", extra_ratings=[(1, 2, 3.0, text)])

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    row = _last_rating(tmp_path)
    assert (row["ts"], row["rating"], row["_raw"]) == (None, 3.0, f"1,2,3.0,{text}")


# --- line numbers and raw text ----------------------------------------------------------------------------


def test_line_is_the_physical_line_where_a_row_starts(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small",
                                extra_movies=[(9001, "Two\nLines (2001)", "Drama"), (9002, "After (2002)", "Drama")])
    movies = written.folder / "movies.csv"
    movies.write_bytes(movies.read_bytes() + b"\n9003,Blank Line Before (2003),Drama\n")
    text = movies.read_text().splitlines()
    assert text[9:11] == ['9001,"Two', 'Lines (2001)",Drama'] and text[13] == "9003,Blank Line Before (2003),Drama"

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    movies = _movies_by_id(tmp_path / "out")
    assert [movies[m]["_line"] for m in (8606, 9001, 9002, 9003)] == [9, 10, 12, 14]
    assert movies[9001]["title"] == "Two\nLines (2001)"
    assert movies[9001]["_raw"] == '9001,"Two\nLines (2001)",Drama'
    assert movies[50]["_raw"] == '50,"Usual Suspects, The (1995)",Crime|Mystery|Thriller'


def test_line_numbers_and_raw_text_with_crlf_line_endings(tmp_path, settings):
    written = write_csv_variant(tmp_path / "ml-latest-small")
    ratings = written.folder / "ratings.csv"
    ratings.write_bytes(ratings.read_bytes().replace(b"\n", b"\r\n").replace(b"\r\n2,1,", b"\r\n\r\n2,1,"))

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    rows = pq.read_table(tmp_path / "out" / "ratings.parquet").to_pylist()
    assert [(r["_line"], r["_raw"]) for r in rows[5:7]] == [(7, "1,8606,3.0,964985000"), (9, "2,1,3.0,1445714835")]
    assert rows[-1]["_line"] == 32


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_every_row_keeps_its_text_as_in_the_file(variant, tmp_path, settings):
    written = WRITERS[variant][0](tmp_path / variant)

    ingest_movielens(str(written.folder), tmp_path / "out", settings)

    rows = pq.read_table(tmp_path / "out" / "ratings.parquet").to_pylist()
    lines = next(p for p in written.folder.iterdir() if p.name in ("ratings.csv", "u.data", "ratings.dat")
                 ).read_text(encoding="latin-1").splitlines()
    assert [r["_raw"] for r in rows] == [lines[r["_line"] - 1] for r in rows]
    assert rows[3]["_raw"] == {"ml-latest-small": "1,32,3.5,964983250", "ml-100k": "1\t32\t4\t964983250",
                               "ml-1m": "1::32::4::964983250", "ml-10m": "1::32::3.5::964983250"}[variant]
    raw = _movies_by_id(tmp_path / "out")[73]["_raw"]  # decoded: the Latin-1 variants' bytes as text
    assert raw.startswith("73") and "Misérables, Les (1995)" in raw
