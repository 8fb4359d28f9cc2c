"""Queries on the served tables, as ``recsys similar`` and ``recsys recommend`` run them (no Spark, no model).

Every function takes a ``serving.served.ServedTables`` and returns a DataFrame with titles joined:
rank, movie_id, title, score, reason (``similar_to_title`` has metric instead of reason).
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, UnknownMovieError, UnknownUserError
from pipeline.params import check_k
from pipeline.serving import recommend
from pipeline.serving.served import ServedTables

MAX_SUGGESTIONS = 5
RATING_RANGE = (0.5, 5.0)
_ASCII_DIGITS = re.compile(r"[0-9]+")
_ARTICLE = re.compile(r"^(?P<name>.*), (?P<article>the|a|an|les|la|le|l'|il|el|der|die|das)(?P<rest> \(.*)?$",
                      re.IGNORECASE)


# --- ids and ratings as typed ------------------------------------------------------------------------------


def ascii_id(text: str | int, what: str) -> int:
    """An id as typed: ASCII digits only (``int()`` also reads "\u0661" or "\uff11" as 1, which would
    answer for another movie or user); ConfigError naming ``what`` and the text otherwise."""
    typed = str(text).strip()
    if not _ASCII_DIGITS.fullmatch(typed):
        raise ConfigError(f"{what} is a whole number written in the digits 0-9, got {str(text)!r}")
    return int(typed)


def check_rating(movie_id: int, rating: float, where: str = "--ratings") -> float:
    """A rating a new user gave: a finite number in ``RATING_RANGE``; ConfigError naming the movie otherwise."""
    low, high = RATING_RANGE
    rating = float(rating)
    if not low <= rating <= high:  # NaN fails both comparisons
        raise ConfigError(f"rating {rating:g} for movie {movie_id} in {where} is outside {low:g}..{high:g}")
    return rating


# --- movies by title ---------------------------------------------------------------------------------------


def _normalized(title: str) -> str:
    """Lower case, with MovieLens' trailing article moved to the front: "Matrix, The (1999)" -> "the matrix (1999)".

    Unicode is compared in NFC: "Misérables" typed as e + combining accent (NFD, e.g. from macOS) matches."""
    title = " ".join(unicodedata.normalize("NFC", str(title)).split()).lower()
    match = _ARTICLE.match(title)
    if match:
        title = f"{match['article']} {match['name']}{match['rest'] or ''}"
    return title


def resolve_movie(movies: pd.DataFrame, text: str | int) -> int:
    """The movie id for a title (exact, case-insensitive) or an id; UnknownMovieError with suggestions otherwise."""
    text = str(text).strip()
    ids = movies["movie_id"].to_numpy(np.int64)
    if _ASCII_DIGITS.fullmatch(text):
        movie_id = int(text)
        if movie_id not in set(ids.tolist()):
            raise UnknownMovieError(f"no movie with id {movie_id} in the served catalog")
        return movie_id
    titles = movies["title"].astype(str).tolist()
    wanted = _normalized(text)
    exact = [i for i, (mid, title) in enumerate(zip(ids, titles)) if _normalized(title) == wanted]
    if len(exact) == 1:
        return int(ids[exact[0]])
    if len(exact) > 1:
        listed = "; ".join(f"{int(ids[i])}: {titles[i]}" for i in exact)
        raise UnknownMovieError(f"{text!r} names {len(exact)} movies ({listed}); pass the movie id instead")
    suggestions = suggest_titles(titles, text)
    hint = ("; did you mean: " + "; ".join(suggestions)) if suggestions else ""
    if text.isdigit():  # digits of another script: not an id
        hint += "; a movie id is written in the digits 0-9"
    raise UnknownMovieError(f"no movie titled {text!r} in the served catalog{hint}")


def suggest_titles(titles: list[str], text: str, n: int = MAX_SUGGESTIONS) -> list[str]:
    """Up to n catalog titles close to ``text``: those containing it first, then difflib's close matches."""
    wanted = _normalized(text)
    by_key: dict[str, str] = {}
    for title in titles:
        by_key.setdefault(_normalized(title), title)
    bare = re.sub(r"\s*\(\d{4}\)$", "", wanted)
    containing = [key for key in by_key if bare and bare in key]
    containing.sort(key=lambda key: (len(key), key))
    close = difflib.get_close_matches(wanted, list(by_key), n=n, cutoff=0.6)
    out = list(dict.fromkeys(containing[:n] + close))
    return [by_key[key] for key in out[:n]]


def _with_titles(frame: pd.DataFrame, movies: pd.DataFrame) -> pd.DataFrame:
    titles = frame["movie_id"].map(movies.set_index(movies["movie_id"].astype(np.int64))["title"])
    titles = titles.where(titles.notna(), "movie " + frame["movie_id"].astype(str)).astype(str)
    out = frame.copy()
    out.insert(out.columns.get_loc("movie_id") + 1, "title", titles)
    return out


# --- queries -----------------------------------------------------------------------------------------------


def similar_to_title(served: ServedTables, title: str | int, k: int = 10, metric: str = "cosine") -> pd.DataFrame:
    """The k movies most similar to ``title`` (a title or a movie id) under ``metric``.

    score: cosine similarity for cosine and lsh (higher is closer), Euclidean distance for euclidean (lower).
    """
    k = check_k(k)
    recommend.check_metric(metric)
    movie_id = resolve_movie(served.movies, title)
    rows = served.table("similar_movies", filters=[("metric", "=", metric), ("movie_id", "=", movie_id)])
    if rows.empty:
        metrics = sorted(served.table("similar_movies", columns=["metric"])["metric"].unique().tolist())
        if metric not in metrics:
            raise ConfigError(f"the served set has no {metric!r} similarities; it has {', '.join(metrics) or 'none'}")
        raise UnknownMovieError(f"{_title_of(served, movie_id)!r} (id {movie_id}) has no similar-movie entries: "
                                f"the model did not see enough ratings of it")
    stored = len(rows)
    rows = rows.sort_values("rank", kind="stable").head(k)
    out = pd.DataFrame({"rank": rows["rank"].to_numpy(np.int32),
                        "movie_id": rows["similar_movie_id"].to_numpy(np.int64),
                        "score": rows["score"].to_numpy(np.float64), "metric": metric})
    out = _with_titles(out, served.movies)
    if k > stored:
        _note(out, f"the served set keeps {stored} similar movies for this movie (the run's similar_k); "
                   f"showing {stored}, not the {k} asked for")
    return out


def _note(frame: pd.DataFrame, text: str) -> None:
    """A remark for the person asking (the command line prints it on stderr): a cap or a filter applied."""
    frame.attrs.setdefault("notes", []).append(text)


def _title_of(served: ServedTables, movie_id: int) -> str:
    match = served.movies.loc[served.movies["movie_id"] == movie_id, "title"]
    return str(match.iloc[0]) if len(match) else f"movie {movie_id}"


def recommend_user(served: ServedTables, user_id: int | str, k: int = 10,
                   genres: str | Iterable[str] | None = None) -> pd.DataFrame:
    """A known user's served top-N (at most the k the stage stored), within ``genres`` when given."""
    k = check_k(k)
    user_id = ascii_id(user_id, "a user id (--user)")
    if not -2**63 <= user_id < 2**63:  # beyond any stored id (and beyond what a parquet filter takes)
        raise UnknownUserError(f"user {user_id} has no served recommendations: user ids are 64-bit integers; "
                               f"for a new user pass --ratings 'MOVIE_ID:RATING,...' or ask for --popular movies")
    rows = served.table("recommendations", filters=[("user_id", "=", user_id)])
    if rows.empty:
        users = served.table("recommendations", columns=["user_id"])["user_id"]
        span = f"{users.nunique()} users, ids {users.min()}..{users.max()}" if len(users) else "no users"
        raise UnknownUserError(
            f"user {user_id} has no served recommendations (the model knows {span}); for a new user pass "
            f"their ratings with --ratings 'MOVIE_ID:RATING,...' or ask for --popular movies"
        )
    rows = rows.sort_values("rank", kind="stable")
    stored = len(rows)
    chosen = recommend.parse_genres(genres)
    if chosen:
        genre_of = served.movies.set_index(served.movies["movie_id"].astype(np.int64))["genres"]
        rows = rows[recommend.genre_mask(rows["movie_id"].map(genre_of), chosen, known_from=served.movies["genres"])]
    rows = rows.head(k)
    out = pd.DataFrame({"rank": np.arange(1, len(rows) + 1, dtype=np.int32),
                        "movie_id": rows["movie_id"].to_numpy(np.int64),
                        "score": rows["score"].to_numpy(np.float64), "reason": recommend.REASON_MODEL})
    out = _with_titles(out, served.movies)
    if len(out) < k:
        within = f"; {len(out)} of them are in {', '.join(chosen)}" if chosen else ""
        _note(out, f"the served set keeps {stored} recommendations for user {user_id} (the run's recommend_k)"
                   f"{within}: showing {len(out)}, not the {k} asked for")
    return out


def parse_ratings(text: str) -> dict[int, float]:
    """``"1:5,260:4.5"`` -> {1: 5.0, 260: 4.5}; ConfigError saying which part is wrong."""
    example = "e.g. --ratings '1:5,260:4.5'"
    rated: dict[int, float] = {}
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--ratings is empty: give MOVIE_ID:RATING pairs separated by commas, {example}")
    for part in parts:  # ASCII digits only: no "\u0661:5", "1:nan", "1:inf" or "1:1e1"
        match = re.fullmatch(r"([0-9]+)\s*[:=]\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)", part, re.ASCII)
        if not match:
            raise ConfigError(f"cannot read {part!r} in --ratings: expected MOVIE_ID:RATING, a movie id and a "
                              f"rating in the digits 0-9, {example}")
        movie_id, rating = int(match[1]), check_rating(int(match[1]), float(match[2]))
        if movie_id in rated:
            raise ConfigError(f"movie {movie_id} is rated twice in --ratings")
        rated[movie_id] = rating
    return rated


def recommend_ratings(served: ServedTables, ratings: str | dict, k: int = 10,
                      genres: str | Iterable[str] | None = None, metric: str = "cosine") -> pd.DataFrame:
    """Item-based cold start for a new user given as ``"movie_id:rating,..."`` (or a dict)."""
    if isinstance(ratings, str):
        rated = parse_ratings(ratings)
    else:
        rated = {ascii_id(m, "a rated movie id"): check_rating(m, r, "ratings") for m, r in ratings.items()}
    known = set(served.movies["movie_id"].astype(np.int64).tolist())
    unknown = sorted(set(rated) - known)
    if unknown:
        raise UnknownMovieError(f"movie id(s) {unknown} in --ratings are not in the served catalog "
                                f"(find ids with `recsys similar --movie TITLE`)")
    recommend.check_metric(metric)
    liked = list(recommend.liked_movies(rated))
    # Only the liked movies' neighbours are read (row groups are sorted by metric, movie_id).
    similar = served.table("similar_movies", filters=[("metric", "=", metric), ("movie_id", "in", liked or [-1])])
    recs = recommend.recommend_from_ratings(rated, similar, served.popular, k, metric=metric, genres=genres,
                                            movies=served.movies)
    return _fewer_note(_with_titles(recs, served.movies), k, genres)


def recommend_popular(served: ServedTables, k: int = 10, genres: str | Iterable[str] | None = None) -> pd.DataFrame:
    """Popular movies for a user with nothing rated, within any of ``genres`` when given."""
    return _fewer_note(_with_titles(recommend.recommend_cold_user(served.popular, k, genres), served.movies), k,
                       genres)


def _fewer_note(frame: pd.DataFrame, k: int, genres) -> pd.DataFrame:
    chosen = recommend.parse_genres(genres)
    if len(frame) < k:
        within = f" in {', '.join(chosen)}" if chosen else ""
        _note(frame, f"only {len(frame)} served movies{within} are left to recommend: showing {len(frame)}, "
                     f"not the {k} asked for")
    return frame


# --- printing ----------------------------------------------------------------------------------------------


def format_table(frame: pd.DataFrame, score_label: str = "score") -> str:
    """A plain text table: rank, title, score, and the reason (or metric) column."""
    extra = "reason" if "reason" in frame.columns else "metric"
    header = ["rank", "title", score_label, extra]
    rows = [[str(r["rank"]), str(r["title"]), f"{r['score']:.4f}", str(r.get(extra, ""))]
            for r in frame.to_dict("records")]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    align = [str.rjust, str.ljust, str.rjust, str.ljust]
    lines = ["  ".join(a(c, w) for a, c, w in zip(align, header, widths)).rstrip()]
    lines += ["  ".join(a(c, w) for a, c, w in zip(align, row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
