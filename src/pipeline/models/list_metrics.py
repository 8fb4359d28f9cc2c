"""More than one number per list: what a candidate's test lists hold besides their hits.

``list_quality(lists, train, test, genres)`` is one pure function over a candidate's test lists (the
``user_id, rank, movie_id`` parquet every ranking measurement writes), the training split, the measured test
rows and the movies' genres (docs/adr/0068-list-quality-beyond-ndcg.md):

- ``coverage``: share of the catalogue (the movies of the training split) in at least one list;
- ``long_tail_share``: share of the list slots holding a long-tail movie; the head is the smallest set of
  most-rated training movies (``popularity_ranking``'s order) holding ``HEAD_SHARE`` of the training ratings,
  the tail every other movie;
- ``novelty``: mean over the list slots of a movie's self-information, -log2(share of the training users who
  rated it), in bits;
- ``diversity``: mean over the lists of two or more movies of the mean pairwise genre dissimilarity,
  1 - |A & B| / |A | B| of the two genre sets (two movies without genres count as alike); None without genres;
- ``segments``: {cold, light, heavy: {users, test_ndcg_at_10}}, the users by their number of training ratings
  (cold: at most ``COLD_MAX``, light: at most ``LIGHT_MAX``, heavy: more), NDCG@10 over the users of each with
  a relevant test rating, as ``metrics.ranking_metrics`` averages them (their user-weighted mean is the
  candidate's test NDCG@10).

A listed movie outside the training split (no ranker lists one) counts as a tail movie rated once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.models.metrics import RELEVANCE_THRESHOLD
from pipeline.models.popularity import popularity_ranking
from pipeline.models.ranking import RANKING_K, measured_users

HEAD_SHARE = 0.5  # the head: the most-rated movies holding half the training ratings
COLD_MAX, LIGHT_MAX = 5, 50  # training ratings: cold <= 5 < light <= 50 < heavy
SEGMENTS = ("cold", "light", "heavy")
LIST_KEYS = ("coverage", "long_tail_share", "novelty", "diversity", "segments")
_BATCH = 4096  # lists per block of the pairwise genre comparison


def head_movies(train: pd.DataFrame, share: float = HEAD_SHARE) -> np.ndarray:
    """The head: the fewest most-rated training movies (ties: smaller movie_id first) whose ratings reach
    ``share`` of the training ratings."""
    ranking = popularity_ranking(train)
    if not len(ranking):
        return ranking
    counts = train["movie_id"].value_counts().reindex(ranking).to_numpy()
    need = math.ceil(share * counts.sum() - 1e-9)
    return ranking[:int(np.searchsorted(np.cumsum(counts), need)) + 1]


def user_segments(counts) -> np.ndarray:
    """Each user's segment name from their number of training ratings."""
    counts = np.asarray(counts)
    return np.where(counts <= COLD_MAX, SEGMENTS[0], np.where(counts <= LIGHT_MAX, SEGMENTS[1], SEGMENTS[2]))


def list_quality(lists: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame, genres: pd.Series | None,
                 k: int = RANKING_K) -> dict:
    """The figures of the module docstring for ``lists`` (user_id, rank, movie_id; rank from 1). ``test``: the
    measured users' test rows; ``genres``: movie_id -> list of genres (None: no diversity)."""
    lists = lists.loc[lists["rank"] <= k, ["user_id", "rank", "movie_id"]].sort_values(["user_id", "rank"])
    listed = lists["movie_id"].to_numpy(np.int64)
    raters = train["movie_id"].value_counts()
    n_users = max(train["user_id"].nunique(), 1)
    empty = not len(listed)
    share = np.minimum(raters.reindex(listed, fill_value=1).to_numpy(np.float64) / n_users, 1.0)
    return {
        "coverage": float(len(np.intersect1d(listed, raters.index.to_numpy()))) / max(len(raters), 1),
        "long_tail_share": None if empty else float(np.mean(~np.isin(listed, head_movies(train)))),
        "novelty": None if empty else float(np.mean(-np.log2(share))),
        "diversity": None if genres is None else genre_diversity(lists, genres),
        "segments": segment_ndcg(lists, train, test, k),
    }


def genre_diversity(lists: pd.DataFrame, genres: pd.Series) -> float | None:
    """Mean over the lists of two or more movies of their mean pairwise 1 - Jaccard of genre sets (``lists``
    sorted by user and rank); None when no list has two movies."""
    users = lists["user_id"].to_numpy(np.int64)
    movies = lists["movie_id"].to_numpy(np.int64)
    if not len(movies):
        return None
    codes, distinct = pd.factorize(movies)
    sets = genres.reindex(distinct)
    names = sorted({g for gs in sets for g in _genre_list(gs)})
    column = {g: j for j, g in enumerate(names)}
    flags = np.zeros((len(distinct) + 1, max(len(names), 1)), dtype=np.float32)  # last row: an empty slot
    for i, gs in enumerate(sets):
        flags[i, [column[g] for g in _genre_list(gs)]] = 1.0
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, len(users)])
    slots = np.full((len(starts), int(lengths.max())), len(distinct), dtype=np.int64)
    slots[np.repeat(np.arange(len(starts)), lengths), np.arange(len(users)) - np.repeat(starts, lengths)] = codes
    width = slots.shape[1]
    upper = np.triu(np.ones((width, width), dtype=bool), 1)
    means = []
    for lo in range(0, len(slots), _BATCH):
        x = flags[slots[lo:lo + _BATCH]]  # lists x slots x genres
        both = np.einsum("ukg,ulg->ukl", x, x)
        size = x.sum(axis=2)
        union = size[:, :, None] + size[:, None, :] - both
        unlike = 1.0 - np.divide(both, union, out=np.ones_like(both), where=union > 0)
        n = lengths[lo:lo + _BATCH]
        pairs = upper & (np.arange(width) < n[:, None])[:, :, None] & (np.arange(width) < n[:, None])[:, None, :]
        has = n >= 2
        means.append((unlike * pairs).sum(axis=(1, 2))[has] / (n[has] * (n[has] - 1) / 2))
    means = np.concatenate(means)
    return float(means.mean()) if len(means) else None


def segment_ndcg(lists: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame, k: int = RANKING_K) -> dict:
    """{segment: {users, test_ndcg_at_k}}: binary NDCG@k (``metrics.ndcg_at_k``) of the users with a relevant
    test rating, by segment; a user without a list scores 0; None for a segment without users."""
    liked = test.loc[test["rating"] >= RELEVANCE_THRESHOLD, ["user_id", "movie_id"]].drop_duplicates()
    relevant = liked.groupby("user_id").size()
    hits = lists.merge(liked, on=["user_id", "movie_id"])
    dcg = (1.0 / np.log2(hits["rank"].to_numpy(np.float64) + 1)).astype(np.float64)
    dcg = pd.Series(dcg).groupby(hits["user_id"].to_numpy()).sum().reindex(relevant.index, fill_value=0.0)
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[np.minimum(relevant.to_numpy(), k) - 1]
    ndcg = dcg.to_numpy() / ideal
    segment = user_segments(train["user_id"].value_counts().reindex(relevant.index, fill_value=0).to_numpy())
    out = {}
    for name in SEGMENTS:
        mine = ndcg[segment == name]
        out[name] = {"users": int(len(mine)), f"test_ndcg_at_{k}": float(mine.mean()) if len(mine) else None}
    return out


def quality_of_lists(lists_path: Path, split) -> dict:
    """``list_quality`` of the test lists written at ``lists_path`` for ``split`` (``protocol.Split``): the
    measured users' test rows as the ranking measurement sampled them, the genres of the validate stage."""
    sample = split.ranking_sample or (None, 0)
    _, rows = measured_users(split.test, *sample)
    return list_quality(pd.read_parquet(lists_path), split.train, rows, split.genres)


def mlflow_metrics(ranking: dict, prefix: str = "test_", k: int = RANKING_K) -> dict:
    """The list figures of ``ranking`` as flat MLflow metrics: {prefix}coverage, ..., and per segment
    {prefix}segment_{name}_ndcg_at_{k} and {prefix}segment_{name}_users (None figures left out)."""
    flat = {f"{prefix}{key}": ranking.get(key) for key in LIST_KEYS[:-1]}
    for name, figures in (ranking.get("segments") or {}).items():
        flat[f"{prefix}segment_{name}_ndcg_at_{k}"] = figures.get(f"test_ndcg_at_{k}")
        flat[f"{prefix}segment_{name}_users"] = figures.get("users")
    return {key: value for key, value in flat.items() if value is not None}


def list_quality_lines(listed: list[tuple[str, dict]], k: int = RANKING_K) -> list[str]:
    """models.md's table of the list figures: one row per (name, ranking section) of ``listed``."""
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    ranges = {"cold": f"<= {COLD_MAX}", "light": f"{COLD_MAX + 1}-{LIGHT_MAX}", "heavy": f"> {LIGHT_MAX}"}
    lines = ["## Beyond hits (test lists; docs/adr/0068-list-quality-beyond-ndcg.md)", "",
             f"Coverage: share of the training movies in some list; long tail: the movies outside the most rated "
             f"that hold {HEAD_SHARE:.0%} of the training ratings; novelty: mean -log2(share of the training users "
             f"who rated the movie), in bits; diversity: mean pairwise 1 - Jaccard of the genres within a list; "
             f"NDCG@{k} by the user's training ratings (users with a relevant test rating).", "",
             "| model | coverage | long-tail share | novelty | genre diversity | "
             + " | ".join(f"NDCG@{k} {name} ({ranges[name]}) | users" for name in SEGMENTS) + " |",
             "|---" * (5 + 2 * len(SEGMENTS)) + "|"]
    for name, figures in listed:
        segments = figures.get("segments") or {}
        cells = [fmt(figures.get(key)) for key in LIST_KEYS[:-1]]
        for segment in SEGMENTS:
            one = segments.get(segment) or {}
            cells += [fmt(one.get(f"test_ndcg_at_{k}")), str(one.get("users", ""))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def read_genres(movies_path: Path | None) -> pd.Series | None:
    """movie_id -> list of genres from the validate stage's movies table; None when it is not there."""
    if movies_path is None or not Path(movies_path).exists():
        return None
    movies = pd.read_parquet(movies_path, columns=["movie_id", "genres"]).drop_duplicates("movie_id")
    return pd.Series(movies["genres"].to_numpy(), index=movies["movie_id"].to_numpy(np.int64))


def _genre_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
