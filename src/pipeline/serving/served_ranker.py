"""The ranker as the registered pyfunc serves it: a ranking model of any kind plus what answering a request
needs without the run folder (docs/serving.md, ADR 0071).

It holds every user's rated movies and ratings the run saw (``recommend`` leaves the same movies out of the
served lists), the popularity list the cold-start path gives, and the titles. One list per request row:

- the row's own ``history`` (with its ``ratings``, if any) when given; else, for a ``user_id`` it holds, that
  user's stored history; else nothing;
- the history's movies are never listed; the ranker's top k come first (``source`` "model"), and an empty
  history, or one the ranker cannot score (no movie it knows; a factor model and a user it did not learn), gets
  the popularity list, as ``recsys recommend --ratings`` gives a new user (``source`` "popularity"), which also
  tops up a list shorter than k.

For a user it holds and no history in the row, the list equals the served list of the run that logged it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.models.ranking import Seen

HISTORY, POPULAR, TITLES = "history.parquet", "popular.parquet", "titles.parquet"


class ServedRanker:
    def __init__(self, model, history: Seen, popular: pd.DataFrame, titles: pd.Series):
        self.model = model
        self.history = history
        self.popular_ids = popular["movie_id"].to_numpy(np.int64)
        self.popular_scores = popular["n_ratings"].to_numpy(np.float64)
        self.titles = titles

    @classmethod
    def build(cls, model, ratings: pd.DataFrame, movies: pd.DataFrame | None) -> ServedRanker:
        """From the run's validated ratings (every user's history) and movies (titles)."""
        from pipeline.models.popularity import popular_movies

        ratings = ratings[["user_id", "movie_id", "rating"]]
        popular = popular_movies(ratings)[["movie_id", "n_ratings"]]
        titles = (pd.Series(dtype=object) if movies is None else  # a movie without one is "movie <id>" (_rows)
                  pd.Series(movies["title"].to_numpy(object), index=movies["movie_id"].to_numpy(np.int64)))
        return cls(model, Seen(ratings), popular, titles[~titles.index.duplicated()])

    # --- answering -------------------------------------------------------------------------------------------

    def answer(self, rows: list[tuple[int | None, list | None, list | None]], k: int) -> pd.DataFrame:
        """The lists of ``contract.ranker_rows``' rows: columns ``contract.RANKER_OUTPUTS``, row by row."""
        histories, keys = [], []
        for i, (user, history, ratings) in enumerate(rows):
            if history is not None:
                histories.append(dict(zip(history, ratings)) if ratings is not None else set(history))
            elif user is not None and user in self.history:
                _, movies, stored = self.history.rated_pairs([user])
                histories.append(dict(zip(movies.tolist(), stored.tolist())))
            else:
                histories.append(set())
            keys.append(user if user is not None else -(i + 1))  # a key no user has, for a row without one
        lists = self._ranked(keys, histories, k)
        frames = [self._rows(i, user, lists.get(i, ((), ())), histories[i], k)
                  for i, (user, _, _) in enumerate(rows)]
        from pipeline.serving.contract import RANKER_OUTPUTS

        return pd.concat(frames, ignore_index=True)[list(RANKER_OUTPUTS)] if frames else \
            pd.DataFrame({c: [] for c in RANKER_OUTPUTS})

    def _ranked(self, keys: list[int], histories: list, k: int) -> dict[int, tuple]:
        """{row: (movie ids, scores)} from the model, for the rows with a history. Rows go to the model in
        groups where no key repeats (two rows of one user are two lists) and histories are all with ratings or
        all without."""
        groups: dict[tuple, list[int]] = {}
        seen: dict[int, int] = {}
        for i, (key, history) in enumerate(zip(keys, histories)):
            if len(history):
                n = seen[key] = seen.get(key, -1) + 1
                groups.setdefault((n, isinstance(history, dict)), []).append(i)
        out = {}
        for rows in groups.values():
            found = self._scored([keys[i] for i in rows], {keys[i]: histories[i] for i in rows}, k)
            out.update({i: found[keys[i]] for i in rows if keys[i] in found})
        return out

    def _scored(self, keys: list[int], history: dict, k: int) -> dict[int, tuple]:
        model = self.model
        if hasattr(model, "top_k_scored"):
            return {u: (list(m), list(s)) for u, (m, s) in
                    model.top_k_scored(keys, k, exclude=history, history=history).items()}
        top = model.top_k(keys, k, exclude=history, history=history)
        users = np.fromiter((u for u in top for _ in top[u]), dtype=np.int64)
        movies = np.fromiter((m for u in top for m in top[u]), dtype=np.int64)
        scores = model.predict(users, movies) if hasattr(model, "predict") else model.pair_scores(users, movies,
                                                                                                  history)
        out, at = {}, 0
        for u, listed in top.items():
            out[u] = (list(listed), np.asarray(scores[at:at + len(listed)], dtype=np.float64).tolist())
            at += len(listed)
        return out

    def _rows(self, row: int, user: int | None, listed: tuple, history, k: int) -> pd.DataFrame:
        movies, scores = [int(m) for m in listed[0]][:k], [float(s) for s in listed[1]][:k]
        n_model = len(movies)
        if n_model < k:
            leave_out = np.fromiter((int(m) for m in (*history, *movies)), dtype=np.int64)
            more = ~np.isin(self.popular_ids, leave_out)
            movies += self.popular_ids[more][:k - n_model].tolist()
            scores += self.popular_scores[more][:k - n_model].tolist()
        n = len(movies)
        titles = self.titles.reindex(movies)
        return pd.DataFrame({
            "row": np.full(n, row, dtype=np.int64), "user_id": pd.Series([user] * n, dtype=object),
            "rank": np.arange(1, n + 1, dtype=np.int64), "movie_id": np.asarray(movies, dtype=np.int64),
            "title": [t if isinstance(t, str) else f"movie {m}" for t, m in zip(titles.tolist(), movies)],
            "score": np.asarray(scores, dtype=np.float64),
            "source": ["model"] * n_model + ["popularity"] * (n - n_model)})

    # --- files -----------------------------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        from pipeline import storage

        folder = Path(folder)
        self.model.save(folder / "model")
        rows, movies, ratings = self.history.rated_pairs(list(self.history))
        users = np.asarray(list(self.history), dtype=np.int64)[rows]
        pd.DataFrame({"user_id": users, "movie_id": movies, "rating": ratings}).to_parquet(folder / HISTORY,
                                                                                          index=False)
        pd.DataFrame({"movie_id": self.popular_ids, "n_ratings": self.popular_scores.astype(np.int64)}).to_parquet(
            folder / POPULAR, index=False)
        pd.DataFrame({"movie_id": self.titles.index.to_numpy(np.int64),
                      "title": self.titles.to_numpy(object)}).to_parquet(folder / TITLES, index=False)
        storage.write_json_atomic(folder / "served.json", {"kind": "served_ranker", "model": "model"})
        return folder

    @classmethod
    def load(cls, folder: Path) -> ServedRanker:
        from pipeline.models.saved import load_model

        folder = Path(folder)
        titles = pd.read_parquet(folder / TITLES)
        return cls(load_model(folder / "model"), Seen(pd.read_parquet(folder / HISTORY)),
                   pd.read_parquet(folder / POPULAR),
                   pd.Series(titles["title"].to_numpy(object), index=titles["movie_id"].to_numpy(np.int64)))
