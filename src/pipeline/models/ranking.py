"""Ranking: how every candidate's top-N lists are measured, the same way for all of them.

- Validation lists leave out each user's training movies; test lists leave out training *and* validation
  movies (a validation movie is known history at test time, not a miss). Every model scores from the
  training history only, so no candidate sees more than another.
- Relevance: a held-out rating >= 4.0. Precision, recall, NDCG and MAP at 10 over the users with a relevant
  held-out rating (``metrics.ranking_metrics``); ``users`` says how many.
- A user a model cannot score (unknown to it, or with no history in its catalogue) gets the popularity list
  with the same exclusions: a model gains nothing by skipping users.
- Each user is ranked once for both splits, deep enough to hold their validation movies: the validation
  list is its start, the test list its start without them (``ranked_lists_both``).
- The exact test lists are written as parquet (``user_id, rank, movie_id``), so any metric can be recomputed
  from the files.
A ranker is anything with ``top_k(user_ids, k, exclude, history)`` -> {user_id: [movie_id, ...]}:
``FactorModel`` (ranks by predicted rating or preference), ``ItemItemModel`` (EASE), ``PopularityRanker``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.models.metrics import RELEVANCE_THRESHOLD, ranking_metrics
from pipeline.models.popularity import top_k_popular

RANKING_K = 10
LISTS_SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("movie_id", pa.int64())])


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every i, concatenated (a ragged gather's
    index: CSR rows, the first n of a ranked list per user)."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)


class Seen(Mapping):
    """{user_id: the movie ids they rated (a numpy array)} over rating frames, held as one array sorted by user
    (CSR-like): built once per split and shared by every evaluation; ``pairs`` gives a batch of users' movies at
    once, so the top-k exclusions are one fancy-index assignment per batch instead of a loop over users."""

    def __init__(self, *frames: pd.DataFrame):
        users = np.concatenate([f["user_id"].to_numpy(np.int64) for f in frames]) if frames else np.zeros(0, np.int64)
        movies = np.concatenate([f["movie_id"].to_numpy(np.int64) for f in frames]) if frames else users
        order = np.lexsort((movies, users))
        users, self._movies = users[order], movies[order]
        # the ratings beside the movies when every frame has them (rankers that weigh a history by its ratings)
        rated = bool(frames) and all("rating" in f.columns for f in frames)
        self._ratings = np.concatenate([f["rating"].to_numpy(np.float32) for f in frames])[order] if rated else None
        ids, starts = np.unique(users, return_index=True)
        self._ids = pd.Index(ids)
        self._bounds = np.append(starts, len(users))

    def __getitem__(self, user) -> np.ndarray:
        i = self._ids.get_loc(int(user))
        return self._movies[self._bounds[i]:self._bounds[i + 1]]

    def __iter__(self):
        return iter(self._ids.tolist())

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, user) -> bool:
        return int(user) in self._ids

    def counts(self, user_ids) -> np.ndarray:
        """How many movies each user of ``user_ids`` has (0 for a user it does not hold)."""
        pos = self._ids.get_indexer(np.asarray(user_ids, dtype=np.int64))
        return np.where(pos >= 0, self._bounds[np.maximum(pos, 0) + 1] - self._bounds[np.maximum(pos, 0)], 0)

    def pairs(self, user_ids) -> tuple[np.ndarray, np.ndarray]:
        """(row, movie_id) for every movie of every user of ``user_ids``; row: the user's position in it."""
        rows, at = self._positions(user_ids)
        return rows, self._movies[at]

    def rated_pairs(self, user_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``pairs`` and the rating of each (None when the frames had no ratings)."""
        rows, at = self._positions(user_ids)
        return rows, self._movies[at], None if self._ratings is None else self._ratings[at]

    def _positions(self, user_ids) -> tuple[np.ndarray, np.ndarray]:
        if not len(self._ids):  # no user at all (an empty ratings table)
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos = self._ids.get_indexer(np.asarray(user_ids, dtype=np.int64))
        start = np.where(pos >= 0, self._bounds[np.maximum(pos, 0)], 0)
        lens = np.where(pos >= 0, self._bounds[np.maximum(pos, 0) + 1], 0) - start
        return np.repeat(np.arange(len(pos)), lens), concat_ranges(start, lens)


def histories(*frames: pd.DataFrame) -> Seen:
    """{user_id: the movies they rated} over ``frames`` (a ``Seen``)."""
    return Seen(*frames)


def exclusion_pairs(exclude: Mapping | None, user_ids) -> tuple[np.ndarray, np.ndarray]:
    """(row, movie_id) pairs of ``exclude[user]`` for the users of ``user_ids`` (row: position in it)."""
    if exclude is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if isinstance(exclude, Seen):
        return exclude.pairs(user_ids)
    rows, movies = [], []
    for r, user in enumerate(user_ids):
        seen = exclude.get(user)
        if seen is not None and len(seen):
            movies.append(np.fromiter(seen, dtype=np.int64, count=len(seen)))
            rows.append(np.full(len(seen), r, dtype=np.int64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(movies)


def history_pairs(history: Mapping | None, user_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(row, movie_id, rating) of ``history[user]`` for the users of ``user_ids``; rating None when the history
    holds no ratings. A history is a ``Seen`` or a mapping user -> movie ids, or user -> {movie_id: rating}."""
    if isinstance(history, Seen):
        return history.rated_pairs(user_ids)
    rows, movies = exclusion_pairs(history, user_ids)
    rated = [history.get(u) for u in user_ids] if history is not None else []
    if not rated or not all(isinstance(h, Mapping) for h in rated if h is not None and len(h)):
        return rows, movies, None
    ratings = [np.fromiter(h.values(), dtype=np.float32, count=len(h)) for h in rated if h is not None and len(h)]
    return rows, movies, np.concatenate(ratings) if ratings else np.zeros(0, np.float32)


def best_k(shown: np.ndarray, movie_ids: np.ndarray, k: int, excluded: tuple | None = None,
           raw: np.ndarray | None = None, index: pd.Index | None = None) -> list[list[int]]:
    """Row by row, the ids (of ``movie_ids``, the columns) of the ``k`` highest finite ``shown`` scores, best
    first; ties by ``raw`` (higher first, when given), then by movie id. ``excluded``: (row, movie_id) pairs
    scored -inf first (movies outside ``movie_ids`` ignored). ``shown`` is overwritten.

    One argpartition over the batch; only rows with a tie at the k-th score (or fewer than k finite scores)
    are finished one by one, so every row gets exactly what a full sort by (score, raw, id) gives.
    """
    m, n = shown.shape
    movie_ids = np.asarray(movie_ids, dtype=np.int64)
    kk = min(k, n)
    if m == 0 or kk <= 0:
        return [[] for _ in range(m)]
    shown[np.isnan(shown)] = -np.inf
    if excluded is not None and len(excluded[0]):
        cols = (index if index is not None else pd.Index(movie_ids)).get_indexer(excluded[1])
        keep = cols >= 0
        shown[excluded[0][keep], cols[keep]] = -np.inf
    top = np.argpartition(shown, n - kk, axis=1)[:, n - kk:]
    values = np.take_along_axis(shown, top, 1)
    cut = values.min(axis=1)
    slow = ~np.isfinite(cut) | ((shown >= cut[:, None]).sum(axis=1) > kk)
    keys = [movie_ids[top].ravel()] + ([-np.take_along_axis(raw, top, 1).ravel()] if raw is not None else [])
    order = np.lexsort(keys + [-values.ravel(), np.repeat(np.arange(m), kk)])
    out = movie_ids[top.ravel()[order]].reshape(m, kk).tolist()
    for r in np.flatnonzero(slow):
        row = shown[r]
        cand = np.flatnonzero((row >= cut[r]) & np.isfinite(row))
        keys = [movie_ids[cand]] + ([-raw[r, cand]] if raw is not None else [])
        out[r] = movie_ids[cand[np.lexsort(keys + [-row[cand]])[:kk]]].tolist()
    return out


def fill_with_popularity(lists: dict, user_ids, exclude: Mapping | None, train: pd.DataFrame, k: int) -> dict:
    """Give each user of ``user_ids`` without a list in ``lists`` the popularity list, leaving out
    ``exclude[user]`` (in place; ``lists`` is returned)."""
    missing = [u for u in user_ids if not lists.get(u)]
    if missing:
        rows, movies = exclusion_pairs(exclude, missing)
        seen = pd.DataFrame({"user_id": np.asarray(missing, dtype=np.int64)[rows], "movie_id": movies})
        lists.update(top_k_popular(train, missing, k, seen=seen))
    return lists


def ranked_lists(model, user_ids, k: int, exclude: dict, history: dict, train: pd.DataFrame) -> dict:
    """{user_id: top-k} from ``model``; users it cannot score get the popularity list (same exclusions)."""
    user_ids = [int(u) for u in user_ids]
    top = model.top_k(user_ids, k, exclude=exclude, history=history)
    fill_with_popularity(top, user_ids, exclude, train, k)
    return {u: top[u] for u in user_ids}


def ranked_lists_both(model, val_users, test_users, k: int, seen_train: Seen, seen_known: Seen,
                      train: pd.DataFrame) -> tuple[dict, dict]:
    """(validation lists, test lists): what ``ranked_lists`` gives for each split, from one ranking per user.

    The two splits' lists differ only in what they leave out: validation the training movies, test the
    validation movies too, and every model scores from the training history in both. So each user is ranked
    once, leaving out the training movies, k + (their validation movies) deep: the first k are the validation
    list, and the first k that are not validation movies the test list, exactly what a second ranking that
    leaves those out gives (a ranker's top k is the start of its top k + n; ties are broken by a fixed order).
    Users are ranked in groups of equal depth (powers of two), so a heavy user does not deepen the others'."""
    val_users, test_users = [int(u) for u in val_users], [int(u) for u in test_users]
    users = np.asarray(list(dict.fromkeys(val_users + test_users)), dtype=np.int64)
    extra = seen_known.counts(users) - seen_train.counts(users)
    depth = np.maximum(k, 2 ** np.ceil(np.log2(np.maximum(k + extra, 1))).astype(np.int64))
    top: dict = {}
    for d in np.unique(depth):
        top.update(model.top_k(users[depth == d].tolist(), int(d), exclude=seen_train, history=seen_train))
    val = {u: list(top.get(u) or [])[:k] for u in val_users}
    test = dict(zip(test_users, _first_unseen(top, test_users, seen_known, k)))
    for lists, seen in ((val, seen_train), (test, seen_known)):
        fill_with_popularity(lists, list(lists), seen, train, k)
    return val, test


def _first_unseen(top: dict, user_ids: list, seen: Seen, k: int) -> list[list[int]]:
    """Per user of ``user_ids``: the first k movies of ``top[user]`` that are not in ``seen[user]``."""
    ranked = [top.get(u) or [] for u in user_ids]
    lens = np.fromiter(map(len, ranked), dtype=np.int64, count=len(ranked))
    flat = np.fromiter(itertools.chain.from_iterable(ranked), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(ranked), dtype=np.int64), lens)
    seen_rows, seen_movies = seen.pairs(user_ids)
    width = int(max(flat.max(initial=0), seen_movies.max(initial=0))) + 1
    keys, seen_keys = rows * width + flat, seen_rows * width + seen_movies  # seen_keys ascend (pairs' order)
    at = np.minimum(np.searchsorted(seen_keys, keys), max(len(seen_keys) - 1, 0))
    keep = ~(seen_keys[at] == keys) if len(seen_keys) else np.ones(len(keys), dtype=bool)
    flat, rows = flat[keep], rows[keep]
    counts = np.bincount(rows, minlength=len(ranked))
    place = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # position among the kept
    first = place < k
    return [part.tolist() for part in np.split(flat[first], np.cumsum(np.minimum(counts, k))[:-1])]


def scoring_threads(limit: int = 4) -> int:
    """Threads for the numpy/scipy scoring loops that release the GIL: the cores, at most ``limit`` (each
    thread holds its own batch in memory)."""
    return max(1, min(os.cpu_count() or 1, limit))


def map_threads(fn, items, workers: int | None = None) -> Iterator:
    """``fn(item)`` for each of ``items``, yielded in order as they finish, computed on ``workers`` threads
    (default ``scoring_threads()``); nothing runs until it is iterated. The first call runs on this thread
    before the others start: it builds whatever ``fn`` initialises lazily, and pandas builds an Index's hash
    table on first use in a way that is not thread-safe (two threads doing it at once raised "Reindexing only
    valid with uniquely valued Index objects")."""
    items = list(items)
    if not items:
        return
    yield fn(items[0])
    with ThreadPoolExecutor(max_workers=workers or scoring_threads()) as pool:
        yield from pool.map(fn, items[1:])


def top_k_by_score(scores, user_ids: list, movie_ids: np.ndarray, k: int, exclude: Mapping | None = None,
                   batch: int = 256, workers: int | None = None) -> dict:
    """{user: the k movies of ``movie_ids`` with the highest score}, skipping ``exclude[user]``; ties by
    movie_id. ``scores(user_ids)`` gives a users x movies matrix (the rating models that score densely); it
    is called from ``workers`` threads at once (default ``scoring_threads()``), one batch of users each, so it
    must only read its model. The lists do not depend on ``workers``."""
    index = pd.Index(np.asarray(movie_ids, dtype=np.int64))
    ids = index.to_numpy()

    def one(start: int) -> tuple[list, list]:
        chunk = user_ids[start:start + batch]
        matrix = np.array(scores(chunk), dtype=np.float64)
        return chunk, best_k(matrix, ids, k, exclusion_pairs(exclude, chunk), index=index)

    out: dict = {}
    for chunk, lists in map_threads(one, range(0, len(user_ids), batch), workers):
        out.update(zip(chunk, lists))
    return out


def lists_frame(top: dict) -> pd.DataFrame:
    rows = [(u, r, m) for u, movies in top.items() for r, m in enumerate(movies, start=1)]
    return pd.DataFrame(rows, columns=["user_id", "rank", "movie_id"]).astype(
        {"user_id": np.int64, "rank": np.int32, "movie_id": np.int64})


def write_lists(top: dict, path: Path) -> Path:
    frame = lists_frame(top).sort_values(["user_id", "rank"], ignore_index=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=LISTS_SCHEMA, preserve_index=False), path)
    return path


def measured_users(held_out: pd.DataFrame, max_users: int | None, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """(users whose lists are measured, their held-out rows): every user of ``held_out``, or, when more than
    ``max_users`` have a relevant held-out rating, a seeded sample of ``max_users`` of those (only they count
    in the means). Deterministic, so every model of a run is measured on the same users."""
    users = pd.unique(held_out["user_id"])
    if max_users is None:
        return users, held_out
    relevant = np.sort(pd.unique(held_out.loc[held_out["rating"] >= RELEVANCE_THRESHOLD, "user_id"]))
    if len(relevant) <= max_users:
        return users, held_out
    chosen = np.sort(np.random.default_rng(seed).choice(relevant, max_users, replace=False))
    return chosen, held_out[held_out["user_id"].isin(chosen)]


def evaluate_ranking(model, split, lists_path: Path | None = None, k: int = RANKING_K,
                     splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Validation and test ranking metrics of ``model`` by the protocol above (``split``: protocol.Split).

    Keys: val_{precision,recall,ndcg,map}_at_k, val_users, test_{...}_at_k, users (test users averaged
    over), and test_lists (the path written, when ``lists_path`` is given). ``splits``: which of "val" and
    "test" to measure (a grid search choosing on validation needs no test lists for every point).
    """
    seen_train, seen_known = split.seen
    sample = split.ranking_sample or (None, 0)
    out: dict = {}
    val_users, val_rows = measured_users(split.validation, *sample) if "val" in splits else (None, None)
    test_users, test_rows = measured_users(split.test, *sample) if "test" in splits else (None, None)
    # one ranking per user serves both (ranked_lists_both), unless the model's list depends on what it leaves
    # out (a reranker's candidates and features do): then each split is ranked with its own exclusions
    if "val" in splits and "test" in splits and getattr(model, "prefix_consistent", True):
        val_top, test_top = ranked_lists_both(model, val_users, test_users, k, seen_train, seen_known, split.train)
    else:
        val_top = ranked_lists(model, val_users, k, seen_train, seen_train, split.train) if "val" in splits else None
        test_top = ranked_lists(model, test_users, k, seen_known, seen_train, split.train) \
            if "test" in splits else None
    if "val" in splits:
        val = ranking_metrics(val_top, val_rows, k=k)
        out.update({f"val_{name}": value for name, value in val.items() if name != "users"})
        out["val_users"] = val["users"]
    if "test" in splits:
        test = ranking_metrics(test_top, test_rows, k=k)
        out.update({f"test_{name}": value for name, value in test.items() if name != "users"})
        out["users"] = test["users"]
        if lists_path is not None:
            out["test_lists"] = str(write_lists(test_top, lists_path))
    return out
