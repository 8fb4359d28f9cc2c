"""Ranking: how every candidate's top-N lists are measured, the same way for all of them.

- Validation lists leave out each user's training movies; test lists leave out training *and* validation
  movies (a validation movie is known history at test time, not a miss). Every model scores from the
  training history only, so no candidate sees more than another.
- Relevance: a held-out rating >= 4.0. Precision, recall, NDCG and MAP at 10 over the users with a relevant
  held-out rating (``metrics.ranking_metrics``); ``users`` says how many.
- A user a model cannot score (unknown to it, or with no history in its catalogue) gets the popularity list
  with the same exclusions: a model gains nothing by skipping users.
- The exact test lists are written as parquet (``user_id, rank, movie_id``), so any metric can be recomputed
  from the files.
A ranker is anything with ``top_k(user_ids, k, exclude, history)`` -> {user_id: [movie_id, ...]}:
``FactorModel`` (ranks by predicted rating or preference), ``ItemItemModel`` (EASE), ``PopularityRanker``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.models.metrics import ranking_metrics
from pipeline.models.popularity import top_k_popular

RANKING_K = 10
LISTS_SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("movie_id", pa.int64())])


def histories(*frames: pd.DataFrame) -> dict[int, set]:
    """{user_id: the set of movies they rated} over ``frames``."""
    rows = pd.concat([f[["user_id", "movie_id"]] for f in frames], ignore_index=True)
    return {int(u): set(m) for u, m in rows.groupby("user_id")["movie_id"]}


def ranked_lists(model, user_ids, k: int, exclude: dict, history: dict, train: pd.DataFrame) -> dict:
    """{user_id: top-k} from ``model``; users it cannot score get the popularity list (same exclusions)."""
    user_ids = [int(u) for u in user_ids]
    top = model.top_k(user_ids, k, exclude=exclude, history=history)
    missing = [u for u in user_ids if not top.get(u)]
    if missing:
        seen = pd.DataFrame([(u, m) for u in missing for m in exclude.get(u, ())], columns=["user_id", "movie_id"],
                            dtype=np.int64)
        top.update(top_k_popular(train, missing, k, seen=seen))
    return {u: top[u] for u in user_ids}


def top_k_by_score(scores, user_ids: list, movie_ids: np.ndarray, k: int, exclude: dict | None = None,
                   batch: int = 256) -> dict:
    """{user: the k movies of ``movie_ids`` with the highest score}, skipping ``exclude[user]``; ties by
    movie_id. ``scores(user_ids)`` gives a users x movies matrix (the rating models that score densely)."""
    exclude = exclude or {}
    index = pd.Index(np.asarray(movie_ids, dtype=np.int64))
    n = len(index)
    kk = min(k, n)
    out: dict = {}
    for start in range(0, len(user_ids), batch):
        chunk = user_ids[start:start + batch]
        matrix = np.array(scores(chunk), dtype=np.float64)
        for user, row in zip(chunk, matrix):
            seen = exclude.get(user)
            if seen:
                cols = index.get_indexer(np.fromiter(seen, dtype=np.int64, count=len(seen)))
                row[cols[cols >= 0]] = -np.inf
            cut = np.partition(row, n - kk)[n - kk]
            cand = np.flatnonzero((row >= cut) & np.isfinite(row))
            order = np.lexsort((index.to_numpy()[cand], -row[cand]))[:kk]
            out[user] = index.to_numpy()[cand[order]].tolist()
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


def evaluate_ranking(model, split, lists_path: Path | None = None, k: int = RANKING_K) -> dict:
    """Validation and test ranking metrics of ``model`` by the protocol above (``split``: protocol.Split).

    Keys: val_{precision,recall,ndcg,map}_at_k, val_users, test_{...}_at_k, users (test users averaged
    over), and test_lists (the path written, when ``lists_path`` is given).
    """
    seen_train = histories(split.train)
    seen_known = histories(split.train, split.validation)
    val_top = ranked_lists(model, pd.unique(split.validation["user_id"]), k, seen_train, seen_train, split.train)
    test_top = ranked_lists(model, pd.unique(split.test["user_id"]), k, seen_known, seen_train, split.train)
    val = ranking_metrics(val_top, split.validation, k=k)
    test = ranking_metrics(test_top, split.test, k=k)
    out = {f"val_{name}": value for name, value in val.items() if name != "users"}
    out["val_users"] = val["users"]
    out.update({f"test_{name}": value for name, value in test.items() if name != "users"})
    out["users"] = test["users"]
    if lists_path is not None:
        out["test_lists"] = str(write_lists(test_top, lists_path))
    return out
