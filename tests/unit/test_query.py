"""The query command line on a tiny published set: `recsys similar` and `recsys recommend`, without Spark."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import cli, errors
from pipeline.config import load_settings
from pipeline.serving import publish as serving
from pipeline.serving import query, served

MOVIES = pd.DataFrame({
    "movie_id": [1, 2, 3, 260, 2571, 3114, 7],
    "title": ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Star Wars: Episode IV - A New Hope (1977)",
              "Matrix, The (1999)", "Toy Story 2 (1999)", "Sabrina (1995)"],
    "year": [1995, 1995, 1995, 1977, 1999, 1999, 1995],
    "genres": [["Animation", "Children", "Comedy"], ["Adventure", "Fantasy"], ["Action", "Crime"],
               ["Action", "Sci-Fi"], ["Action", "Sci-Fi"], ["Animation", "Children", "Comedy"],
               ["Comedy", "Romance"]],
    "_line": range(2, 9),
})


def _similar():
    rows = []
    neighbours = {1: [3114, 2, 7], 2: [1, 3114, 3], 3: [2571, 260, 2], 260: [2571, 3, 2], 2571: [260, 3, 1],
                  3114: [1, 2, 7], 7: [1, 3114, 2]}
    for metric, scores in (("cosine", [0.95, 0.6, 0.3]), ("euclidean", [0.2, 0.8, 1.5]), ("lsh", [0.9, 0.5, 0.2])):
        for movie, others in neighbours.items():
            rows += [(movie, other, metric, rank, score)
                     for rank, (other, score) in enumerate(zip(others, scores), start=1)]
    frame = pd.DataFrame(rows, columns=["movie_id", "similar_movie_id", "metric", "rank", "score"])
    return frame.astype({"rank": "int32"})


RECS = pd.DataFrame({"user_id": [1, 1, 1, 5, 5], "rank": pd.array([1, 2, 3, 1, 2], dtype="int32"),
                     "movie_id": [2571, 3114, 7, 1, 2], "score": [4.8, 4.5, 4.1, 4.2, 3.9]})
POPULAR = pd.DataFrame({
    "movie_id": [260, 2571, 1, 3, 7, 2, 3114],
    "title": MOVIES.set_index("movie_id").loc[[260, 2571, 1, 3, 7, 2, 3114], "title"].tolist(),
    "genres": MOVIES.set_index("movie_id").loc[[260, 2571, 1, 3, 7, 2, 3114], "genres"].tolist(),
    "n_ratings": [50, 40, 30, 20, 10, 5, 4], "mean_rating": [4.3, 4.2, 4.0, 3.9, 3.8, 3.5, 3.6],
    "score": [4.2, 4.1, 3.95, 3.8, 3.7, 3.5, 3.45],
})


@pytest.fixture
def home(tmp_path, monkeypatch):
    """RECSYS_HOME with one published set; the command line reads <home>/data/serving."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    serving.publish(load_settings({"RECSYS_HOME": str(tmp_path)}).serving_dir,
                    {"similar_movies": _similar(), "recommendations": RECS, "movies": MOVIES, "popular": POPULAR})
    return tmp_path


def _run_json(capsys, *argv):
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_similar_finds_a_movie_by_title_in_any_case_and_by_id(home, capsys):
    by_title = _run_json(capsys, "similar", "--movie", "toy story (1995)", "-k", "2")
    assert [(r["rank"], r["title"], r["score"]) for r in by_title] == [
        (1, "Toy Story 2 (1999)", 0.95), (2, "Jumanji (1995)", 0.6)]
    assert _run_json(capsys, "similar", "--movie", "1", "-k", "2") == by_title
    matrix = _run_json(capsys, "similar", "--movie", "The Matrix (1999)", "--metric", "euclidean", "-k", "1")
    assert matrix[0]["title"] == "Star Wars: Episode IV - A New Hope (1977)" and matrix[0]["metric"] == "euclidean"


def test_similar_prints_a_readable_table_with_distances_for_euclidean(home, capsys):
    assert cli.main(["similar", "--movie", "Heat (1995)", "--metric", "euclidean", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "title", "distance", "metric"]
    assert lines[1].split()[:2] == ["1", "Matrix,"] and "0.2000" in lines[1]
    assert len(lines) == 4


def test_an_unknown_title_suggests_close_matches(home):
    with pytest.raises(errors.UnknownMovieError, match=r"no movie titled 'Toy Story'.*did you mean: "
                                                      r"Toy Story \(1995\); Toy Story 2 \(1999\)"):
        query.similar_to_title(served.open_served(load_settings().serving_dir), "Toy Story", 5)


def test_recommend_a_known_user_from_the_served_table(home, capsys):
    recs = _run_json(capsys, "recommend", "--user", "1", "-k", "2")
    assert [(r["movie_id"], r["title"], r["score"], r["reason"]) for r in recs] == [
        (2571, "Matrix, The (1999)", 4.8, "recommended for you"),
        (3114, "Toy Story 2 (1999)", 4.5, "recommended for you")]
    comedies = _run_json(capsys, "recommend", "--user", "1", "--genres", "romance")
    assert [r["movie_id"] for r in comedies] == [7] and comedies[0]["rank"] == 1


def test_an_unknown_user_is_told_to_pass_ratings(home, capsys):
    assert cli.main(["recommend", "--user", "999"]) == 2
    err = capsys.readouterr().err
    assert "recsys: error: user 999 has no served recommendations" in err and "--ratings" in err


def test_recommend_from_a_new_users_ratings_uses_their_liked_movies(home, capsys):
    recs = _run_json(capsys, "recommend", "--ratings", "1:5, 3:1", "-k", "4")
    # neighbours of Toy Story (3114: 0.95, 2: 0.6, 7: 0.3) plus each movie's popularity prior: the two popular
    # movies 260 and 2571 outrank the weak neighbour 7
    assert [r["movie_id"] for r in recs] == [3114, 2, 260, 2571]
    assert [r["reason"] for r in recs] == ["similar to Toy Story (1995)"] * 2 + ["popular"] * 2
    assert all(r["movie_id"] not in (1, 3) for r in recs)


@pytest.mark.parametrize("ratings, message", [
    ("1-5", r"cannot read '1-5' in --ratings: expected MOVIE_ID:RATING"),
    ("1:7", r"rating 7 for movie 1 in --ratings is outside 0.5..5"),
    ("1:5,1:4", r"movie 1 is rated twice"),
    ("1:5,424242:4", r"movie id\(s\) \[424242\] in --ratings are not in the served catalog"),
])
def test_bad_ratings_are_clear_errors(home, capsys, ratings, message):
    assert cli.main(["recommend", "--ratings", ratings]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("text", ["\u0661", "\uff11", "\u0967", "1.0", "-1", "+1", "0x1", "", "1 2"],
                         ids=["arabic-indic", "fullwidth", "devanagari", "decimal", "negative", "plus", "hex", "empty",
                              "two"])
def test_an_id_is_ascii_digits_only(text):
    with pytest.raises(errors.ConfigError, match=re.escape(f"a user id is a whole number written in the digits "
                                                           f"0-9, got {text!r}")):
        query.ascii_id(text, "a user id")
    assert query.ascii_id(" 042 ", "a user id") == 42 and query.ascii_id(7, "a user id") == 7


def test_digits_of_another_script_name_no_movie_and_no_user(home):
    current_set = served.open_served(load_settings().serving_dir)
    with pytest.raises(errors.UnknownMovieError, match="no movie titled '\u0661'.*written in the digits 0-9"):
        query.resolve_movie(current_set.movies, "\u0661")
    with pytest.raises(errors.ConfigError, match="got '\u0661'"):
        query.recommend_user(current_set, "\u0661")
    assert query.resolve_movie(current_set.movies, "1") == 1


@pytest.mark.parametrize("text", ["\u0661:5", "1:\u0665", "\uff11:4", "1:nan", "1:inf", "1:-inf", "1:1e0"])
def test_ratings_take_ascii_digits_and_finite_numbers_only(text):
    with pytest.raises(errors.ConfigError, match=re.escape(f"cannot read {text!r} in --ratings")):
        query.parse_ratings(text)


def test_ratings_given_as_a_mapping_are_checked_too(home):
    current_set = served.open_served(load_settings().serving_dir)
    with pytest.raises(errors.ConfigError, match="rating nan for movie 1 in ratings is outside 0.5..5"):
        query.recommend_ratings(current_set, {1: float("nan")})
    with pytest.raises(errors.ConfigError, match="a rated movie id is a whole number"):
        query.recommend_ratings(current_set, {"\u0661": 5.0})


def test_popular_movies_within_genres_and_unknown_genres(home, capsys):
    recs = _run_json(capsys, "recommend", "--popular", "--genres", "Comedy,children", "-k", "3")
    assert [r["title"] for r in recs] == ["Toy Story (1995)", "Sabrina (1995)", "Toy Story 2 (1999)"]
    assert cli.main(["recommend", "--popular", "--genres", "Westrn"]) == 2
    assert "unknown genre(s) ['westrn']; known genres: Action, Adventure" in capsys.readouterr().err


def test_queries_before_anything_is_published_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    assert cli.main(["recommend", "--popular"]) == 6
    assert "nothing has been published yet under" in capsys.readouterr().err


def _env(home: Path) -> dict:
    return {**os.environ, "RECSYS_HOME": str(home)}


def test_unknown_title_through_the_console_script_exits_non_zero_with_suggestions(home):
    recsys = Path(sys.executable).with_name("recsys")
    proc = subprocess.run([str(recsys), "similar", "--movie", "Toy Story"], capture_output=True, text=True,
                          env=_env(home), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "did you mean: Toy Story (1995)" in proc.stderr


def test_query_commands_import_no_spark_tensorflow_or_mlflow(home):
    script = (
        "import json, sys\n"
        "from pipeline import cli\n"
        "codes = [cli.main(['similar', '--movie', 'Toy Story (1995)']),\n"
        "         cli.main(['recommend', '--user', '1']),\n"
        "         cli.main(['recommend', '--ratings', '1:5,260:4.5', '--json'])]\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('pyspark', 'tensorflow', 'keras', 'mlflow', 'py4j'))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(home), timeout=60)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "heavy": []}
    assert "Toy Story 2 (1999)" in proc.stdout
