"""Popularity: the one definition that is evaluated as a ranking baseline and served to users without history.

A movie's popularity is its number of ratings (ties: the smaller movie_id). The ranking baseline scores this
order against the test ratings, and the served ``popular`` table (cold start, ``recsys recommend --popular``,
the fill-in of short lists) is the same order, so what is measured is what users get.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.params import check_k

POPULAR_COLUMNS = ["movie_id", "title", "genres", "n_ratings", "mean_rating", "score"]


def popularity_ranking(train: pd.DataFrame, k: int | None = None) -> np.ndarray:
    """movie_ids by number of training ratings, most rated first (ties: smaller movie_id first); top k if given."""
    counts = train.groupby("movie_id", sort=True).size()
    movie_ids = counts.index.to_numpy()
    order = np.lexsort((movie_ids, -counts.to_numpy()))
    ranking = movie_ids[order]
    return ranking if k is None else ranking[:k]


def top_k_popular(train: pd.DataFrame, user_ids: Iterable, k: int, exclude_seen: bool = True,
                  seen: pd.DataFrame | None = None) -> dict:
    """{user_id: the k most popular movies of ``train``}, leaving out each user's movies in ``seen`` (default:
    ``train``) when ``exclude_seen``.

    A user with nothing seen gets the plain popularity top k; a list is shorter than k only when the user
    has rated nearly every movie.
    """
    k = check_k(k)
    ranking = popularity_ranking(train)
    user_ids = list(dict.fromkeys(np.asarray(list(user_ids)).tolist()))  # unique, order kept, plain ints
    head = ranking[:k].tolist()
    if not exclude_seen:
        return {user: list(head) for user in user_ids}
    # Each user's seen movies as positions in the ranking, grouped by user once (no per-row Python).
    seen = train if seen is None else seen
    ranks = pd.Index(ranking).get_indexer(seen["movie_id"].to_numpy())
    keep = ranks >= 0  # a seen movie outside the ranking (not in train) takes no place in it
    seen = seen[keep]
    ranks = ranks[keep]
    user_codes, seen_users = pd.factorize(seen["user_id"])
    order = np.argsort(user_codes, kind="stable")
    groups = np.split(ranks[order], np.cumsum(np.bincount(user_codes))[:-1])
    seen_by_user = dict(zip(seen_users.tolist(), groups))
    out = {}
    for user in user_ids:
        seen = seen_by_user.get(user)
        if seen is None:
            out[user] = list(head)
            continue
        # The k unseen movies lie within the first k + |seen| positions of the ranking.
        limit = min(k + len(seen), len(ranking))
        free = np.ones(limit, dtype=bool)
        free[seen[seen < limit]] = False
        out[user] = ranking[np.flatnonzero(free)[:k]].tolist()
    return out


def popular_movies(ratings: pd.DataFrame, movies: pd.DataFrame | None = None, min_ratings: int = 1) -> pd.DataFrame:
    """The served popularity table: every rated movie in ``popularity_ranking``'s order, most popular first.

    Columns: movie_id, title, genres, n_ratings, mean_rating, score (= n_ratings). Movies with fewer than
    ``min_ratings`` ratings are left out; a rated movie missing from the catalog keeps a placeholder title.
    """
    stats = ratings.groupby("movie_id", sort=True)["rating"].agg(["size", "mean"])
    order = popularity_ranking(ratings)
    stats = stats.loc[order]
    out = pd.DataFrame({"movie_id": stats.index.to_numpy(np.int64), "n_ratings": stats["size"].to_numpy(np.int64),
                        "mean_rating": stats["mean"].to_numpy(np.float64)})
    out["score"] = out["n_ratings"].astype(np.float64)
    out = out[out["n_ratings"] >= max(int(min_ratings), 1)].reset_index(drop=True)
    catalog = movies[["movie_id", "title", "genres"]] if movies is not None else pd.DataFrame(
        {"movie_id": pd.Series([], dtype=np.int64), "title": pd.Series([], dtype=object),
         "genres": pd.Series([], dtype=object)})
    out = out.merge(catalog, on="movie_id", how="left", sort=False)
    missing = out["title"].isna()
    out.loc[missing, "title"] = "movie " + out.loc[missing, "movie_id"].astype(str)
    out["genres"] = [list(g) if isinstance(g, (list, tuple, np.ndarray)) else [] for g in out["genres"]]
    return out[POPULAR_COLUMNS]


class PopularityRanker:
    """The popularity list as a ranker (same ``top_k`` as the models), so it goes through the same protocol."""

    name = "popularity"

    def __init__(self, train: pd.DataFrame):
        self.train = train[["user_id", "movie_id"]]

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None) -> dict:
        seen = _frame_of(exclude) if exclude else self.train.iloc[:0]
        return top_k_popular(self.train, user_ids, k, seen=seen)


def _frame_of(by_user: dict) -> pd.DataFrame:
    users = [u for u, movies in by_user.items() for _ in movies]
    movies = [m for movies in by_user.values() for m in movies]
    return pd.DataFrame({"user_id": np.asarray(users, dtype=np.int64), "movie_id": np.asarray(movies, dtype=np.int64)})
