"""A damaged served set, a broken ``current`` pointer and odd id text against ``recsys similar`` / ``recommend``:
exit 6 with one line naming the damaged file or the pointer, exit 2 naming the id text; never a traceback.

One small set is published once (``serving.publish``, no Spark); each case works on a copy of its home.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hostile.conftest import RECSYS, recsys

MOVIES = 3000  # enough rows that `recommend --popular -k 3000` overflows a pipe's buffer


def _tables() -> dict:
    ids = np.arange(1, MOVIES + 1)
    titles = ["Toy Story (1995)", "Jumanji (1995)", *(f"Movie {i} ({1950 + i % 70})" for i in ids[2:])]
    genres = [["Animation", "Children", "Comedy"] if i % 2 else ["Drama"] for i in ids]
    movies = pd.DataFrame({"movie_id": ids, "title": titles, "year": 1995, "genres": genres})
    sources, ranks = np.repeat(ids, 3), np.tile(np.array([1, 2, 3], np.int32), MOVIES)
    similar = pd.DataFrame({"movie_id": sources, "similar_movie_id": (sources + ranks) % MOVIES + 1,
                            "metric": "cosine", "rank": ranks, "score": np.tile([0.9, 0.6, 0.3], MOVIES)})
    recs = pd.DataFrame({"user_id": np.repeat([1, 5], 3), "rank": np.tile(np.array([1, 2, 3], np.int32), 2),
                         "movie_id": [3, 4, 5, 6, 7, 8], "score": [4.8, 4.5, 4.1, 4.2, 3.9, 3.5]})
    popular = pd.DataFrame({"movie_id": ids, "title": titles, "genres": genres, "n_ratings": MOVIES + 1 - ids,
                            "mean_rating": 3.5, "score": (MOVIES + 1 - ids).astype(np.float64)})
    return {"similar_movies": similar, "recommendations": recs, "movies": movies, "popular": popular}


@pytest.fixture(scope="module")
def published_home(tmp_path_factory) -> Path:
    from pipeline.config import load_settings
    from pipeline.serving import publish as serving

    home = tmp_path_factory.mktemp("served") / "home"
    serving.publish(load_settings({"RECSYS_HOME": str(home)}).serving_dir, _tables())
    return home


@pytest.fixture
def home(published_home, tmp_path) -> Path:
    """A copy of the published home, for one case to damage."""
    copy = tmp_path / "home"
    shutil.copytree(published_home, copy, symlinks=True)
    return copy


def _serving(home: Path) -> Path:
    return home / "data" / "serving"


def _version(home: Path) -> Path:
    return (_serving(home) / "current").resolve()


# --- damage: each returns what the error line must name --------------------------------------------------------


def garbage(name):
    def damage(home):
        path = _version(home) / name
        path.write_bytes(os.urandom(4096))
        return [str(path), "damaged"]
    return damage


def truncated(name):
    def damage(home):
        path = _version(home) / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return [str(path), "damaged"]
    return damage


def other_columns(name):
    def damage(home):
        path = _version(home) / name
        pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), path)
        return [str(path), "damaged"]
    return damage


def ids_as_text(home):
    """A schema the manifest agrees with, but a column of the wrong type: the manifest is rewritten to match."""
    import json

    version = _version(home)
    path = version / "recommendations.parquet"
    table = pq.read_table(path)
    table = table.set_column(0, "user_id", pa.array([str(v) for v in table["user_id"].to_pylist()]))
    pq.write_table(table, path)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["tables"]["recommendations"]["schema"]["user_id"] = "string"
    (version / "manifest.json").write_text(json.dumps(manifest))
    return [str(path), "user_id"]


def fewer_rows(home):
    path = _version(home) / "popular.parquet"
    pq.write_table(pq.read_table(path).slice(0, 10), path)
    return [str(path), "rows"]


def missing_table(home):
    path = _version(home) / "movies.parquet"
    path.unlink()
    return [str(path), "missing"]


def manifest_text(text):
    def damage(home):
        path = _version(home) / "manifest.json"
        path.write_text(text)
        return [str(path), "damaged"]
    return damage


def manifest_missing(home):
    path = _version(home) / "manifest.json"
    path.unlink()
    return [str(path), "missing"]


def current_dangling(home):
    current = _serving(home) / "current"
    current.unlink()
    current.symlink_to("versions/0123456789abcdef")
    return [str(current), "versions/0123456789abcdef", "does not exist"]


def current_absolute_elsewhere(home):
    """An absolute link into another home (e.g. left by copying a data root): not this serving folder's set."""
    current = _serving(home) / "current"
    elsewhere = home.parent / "elsewhere"
    shutil.copytree(_version(home), elsewhere)
    current.unlink()
    current.symlink_to(elsewhere)
    return [str(current), str(elsewhere), "versions"]


def current_absolute_missing(home):
    current = _serving(home) / "current"
    current.unlink()
    current.symlink_to("/nonexistent/serving/versions/abc")
    return [str(current), "/nonexistent/serving/versions/abc", "does not exist"]


def current_folder(home):
    current = _serving(home) / "current"
    version = _version(home)
    current.unlink()
    shutil.copytree(version, current)
    return [str(current), "not a link"]


def current_file(home):
    current = _serving(home) / "current"
    current.unlink()
    current.write_text("versions/abc\n")
    return [str(current), "not a link"]


def current_loop(home):
    current = _serving(home) / "current"
    current.unlink()
    current.symlink_to("current")
    return [str(current)]


def current_to_a_file(home):
    current = _serving(home) / "current"
    target = _version(home) / "movies.parquet"
    current.unlink()
    current.symlink_to(os.path.relpath(target, current.parent))
    return [str(current), "not a version folder"]


SIMILAR = ["similar", "--movie", "Toy Story (1995)"]
USER = ["recommend", "--user", "1"]
POPULAR = ["recommend", "--popular"]
RATINGS = ["recommend", "--ratings", "1:5,2:4"]

DAMAGED = [
    pytest.param(garbage("movies.parquet"), SIMILAR, id="garbage-movies"),
    pytest.param(garbage("similar_movies.parquet"), SIMILAR, id="garbage-similar"),
    pytest.param(garbage("recommendations.parquet"), USER, id="garbage-recommendations"),
    pytest.param(truncated("popular.parquet"), POPULAR, id="truncated-popular"),
    pytest.param(truncated("similar_movies.parquet"), RATINGS, id="truncated-similar-cold-start"),
    pytest.param(truncated("movies.parquet"), USER, id="truncated-movies"),
    pytest.param(other_columns("recommendations.parquet"), USER, id="wrong-schema-recommendations"),
    pytest.param(other_columns("movies.parquet"), SIMILAR, id="wrong-schema-movies"),
    pytest.param(ids_as_text, USER, id="wrong-type-matching-manifest"),
    pytest.param(fewer_rows, POPULAR, id="fewer-rows-than-manifest"),
    pytest.param(missing_table, SIMILAR, id="table-missing"),
    pytest.param(manifest_text('{"stage": "serving", "tables": '), SIMILAR, id="manifest-truncated"),
    pytest.param(manifest_text("\x00\xff garbage"), POPULAR, id="manifest-garbage"),
    pytest.param(manifest_text("[]"), USER, id="manifest-not-an-object"),
    pytest.param(manifest_text('{"stage": "serving"}'), USER, id="manifest-without-tables"),
    pytest.param(manifest_missing, SIMILAR, id="manifest-missing"),
    pytest.param(current_dangling, SIMILAR, id="current-dangling"),
    pytest.param(current_absolute_elsewhere, POPULAR, id="current-absolute-elsewhere"),
    pytest.param(current_absolute_missing, USER, id="current-absolute-missing"),
    pytest.param(current_folder, SIMILAR, id="current-is-a-folder"),
    pytest.param(current_file, SIMILAR, id="current-is-a-file"),
    pytest.param(current_loop, POPULAR, id="current-links-to-itself"),
    pytest.param(current_to_a_file, SIMILAR, id="current-links-to-a-file"),
]


@pytest.mark.parametrize("damage, argv", DAMAGED)
def test_a_damaged_served_set_is_named_not_a_traceback(home, damage, argv):
    named = damage(home)
    recsys(*argv, env={"RECSYS_HOME": home}).refused(6, *named)


def test_an_absolute_current_into_its_own_versions_folder_is_served(home):
    current = _serving(home) / "current"
    target = _version(home)
    current.unlink()
    current.symlink_to(target)
    recsys(*SIMILAR, env={"RECSYS_HOME": home}).succeeded()


# --- odd arguments and the cases that already held ----------------------------------------------------------------

REFUSED = [
    pytest.param(["similar", "--movie", "Toy Stroy"], 2, ["Toy Stroy", "did you mean"], id="unknown-title"),
    pytest.param(["similar", "--movie", "424242"], 2, ["424242"], id="unknown-movie-id"),
    pytest.param(["similar", "--movie", "\u0661"], 2, ["\u0661"], id="arabic-indic-movie-id"),
    pytest.param(["similar", "--movie", "\uff11"], 2, ["\uff11"], id="fullwidth-movie-id"),
    pytest.param(["recommend", "--user", "999"], 2, ["999", "--ratings"], id="unknown-user"),
    pytest.param(["recommend", "--ratings", "\u0661:5"], 2, ["\u0661:5"], id="arabic-indic-id-in-ratings"),
    pytest.param(["recommend", "--ratings", "1:\u0665"], 2, ["1:\u0665"], id="arabic-indic-rating"),
    pytest.param(["recommend", "--ratings", "1:nan"], 2, ["1:nan"], id="nan-rating"),
    pytest.param(["recommend", "--ratings", "1:inf"], 2, ["1:inf"], id="infinite-rating"),
    pytest.param(["recommend", "--ratings", "1:1e1"], 2, ["1:1e1"], id="exponent-rating"),
    pytest.param(["recommend", "--ratings", "1:5.5"], 2, ["5.5", "0.5..5"], id="rating-above-range"),
    pytest.param(["recommend", "--ratings", "1:0"], 2, ["0", "0.5..5"], id="rating-below-range"),
    pytest.param(["recommend", "--ratings=-1:4"], 2, ["-1:4"], id="negative-id-in-ratings"),
]


@pytest.mark.parametrize("argv, code, named", REFUSED)
def test_an_odd_query_is_refused_naming_what_was_given(home, argv, code, named):
    recsys(*argv, env={"RECSYS_HOME": home}).refused(code, *named)


@pytest.mark.parametrize("user", ["\u0661", "\uff15", "abc", "1.0"],
                         ids=["arabic-indic", "fullwidth", "letters", "decimal"])
def test_a_user_id_not_in_ascii_digits_is_refused(home, user):
    recsys("recommend", "--user", user, env={"RECSYS_HOME": home}).refused(2, user)


def test_nothing_published_yet_says_so(tmp_path):
    recsys(*SIMILAR, env={"RECSYS_HOME": tmp_path / "empty"}).refused(6, "nothing has been published yet")


def test_a_reader_that_stops_early_is_no_error(home):
    """`recsys recommend --popular -k 3000 | head -1`: the closed pipe ends the output, not in a traceback."""
    env = {**os.environ, "RECSYS_HOME": str(home)}
    proc = subprocess.Popen([str(RECSYS), *POPULAR, "-k", str(MOVIES)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert first.split() == [b"rank", b"title", b"score", b"reason"]
    assert "Traceback" not in err and "error" not in err
