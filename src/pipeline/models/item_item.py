"""The item-item ranking model (EASE's output): a user's score for a movie is the sum, over the movies in
their history, of one learnt weight per (history movie, movie) pair. Plain numpy: it ranks without Spark."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

EMBEDDING_RANK = 64


@dataclass
class ItemItemModel:
    """Scores = history (binary) x item-item weights; the ranker interface of ``pipeline.models.ranking``."""

    name: str
    movie_ids: np.ndarray
    weights: np.ndarray  # movies x movies, B[i, j]: how much having rated i adds to j's score
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.movie_ids = np.asarray(self.movie_ids, dtype=np.int64)
        self._movies = pd.Index(self.movie_ids)

    def scores(self, histories: list) -> np.ndarray:
        """float32 scores (len(histories) x movies); a history is an iterable of movie ids."""
        rows = [np.full(len(h), r, dtype=np.int64) for r, h in enumerate(histories)]
        movies = [np.fromiter(h, dtype=np.int64, count=len(h)) for h in histories]
        return self._history_scores((np.concatenate(rows) if rows else np.zeros(0, np.int64),
                                     np.concatenate(movies) if movies else np.zeros(0, np.int64)), len(histories))

    def _weights32(self) -> np.ndarray:
        """One float32 copy of the weights for the products (stored as float16)."""
        if getattr(self, "_w32", None) is None:
            self._w32 = self.weights.astype(np.float32, copy=False)
        return self._w32

    def _history_scores(self, pairs: tuple[np.ndarray, np.ndarray], n_rows: int) -> np.ndarray:
        """``scores`` of histories given as (row, movie_id) pairs: the sparse 0/1 history rows times the weights
        (scipy's sparse x dense product: histories fill 1-3 % of the catalogue, where it beats dense BLAS, and the
        callers run batches on threads; docs/adr/0036-ease-sparse-histories.md)."""
        cols = self._movies.get_indexer(pairs[1])
        keep = cols >= 0
        rows = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (pairs[0][keep], cols[keep])),
                             shape=(n_rows, len(self.movie_ids)))
        rows.sum_duplicates()
        rows.data[:] = 1.0  # a movie rated twice counts once
        return np.asarray(rows @ self._weights32())

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None,
              batch: int = 512) -> dict:
        """Each user's k best catalogue movies by score, skipping ``exclude[user]``; ties by movie_id.

        ``history`` (default: ``exclude``) is what the user rated; users with nothing of it in the catalogue
        are left out (the caller gives them popularity).
        """
        from pipeline.models.ranking import best_k, exclusion_pairs, map_threads

        history = exclude if history is None else history
        user_ids = [int(u) for u in user_ids]

        def one(start: int) -> list:
            chunk = user_ids[start:start + batch]
            pairs = exclusion_pairs(history, chunk)
            known = self._movies.get_indexer(pairs[1]) >= 0
            has = np.bincount(pairs[0][known], minlength=len(chunk)) > 0  # rated something in the catalogue
            excluded = pairs if exclude is history else exclusion_pairs(exclude, chunk)
            lists = best_k(self._history_scores(pairs, len(chunk)), self.movie_ids, k, excluded, index=self._movies)
            return [(user, top) for user, top, ok in zip(chunk, lists, has) if ok]

        out: dict = {}
        for part in map_threads(one, range(0, len(user_ids), batch)):  # batches of users side by side
            out.update(part)
        return out

    def pair_scores(self, user_ids, movie_ids, history: dict, batch: int = 512) -> np.ndarray:
        """The score of each (user, movie) pair given the users' histories (NaN outside the catalogue)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        cols = self._movies.get_indexer(np.asarray(movie_ids, dtype=np.int64))
        out = np.full(len(user_ids), np.nan)
        users = list(dict.fromkeys(user_ids.tolist()))
        for start in range(0, len(users), batch):
            chunk = users[start:start + batch]
            scores = self.scores([history.get(u, ()) for u in chunk])
            for row, user in enumerate(chunk):
                at = np.flatnonzero((user_ids == user) & (cols >= 0))
                out[at] = scores[row, cols[at]]
        return out

    def item_embeddings(self, rank: int = EMBEDDING_RANK) -> tuple[np.ndarray, np.ndarray]:
        """(movie_ids, vectors) for the similar-movie tables: a rank-64 factorisation of the weights
        (B ~ U S V^T, vectors U sqrt(S), deterministic start). Cosine on them ranks neighbours like cosine on
        B's rows (ml-latest-small cold start, validation NDCG@10 0.1205 against 0.1227; test 0.1387 against
        0.1388) with 64 dimensions instead of one per movie, which the LSH search needs."""
        b = self.weights.astype(np.float32)
        n = b.shape[0]
        r = max(1, min(rank, n - 1))
        if n <= 4 * r:  # small catalogues: a dense SVD
            u, s, _ = np.linalg.svd(b)
            u, s = u[:, :r], s[:r]
        else:
            from scipy.sparse.linalg import svds

            u, s, _ = svds(b, k=r, v0=np.full(n, 1.0 / np.sqrt(n), dtype=np.float32))
            order = np.argsort(-s)
            u, s = u[:, order], s[order]
        return self.movie_ids, (u * np.sqrt(np.maximum(s, 0.0))).astype(np.float32)

    def save(self, folder: Path) -> Path:
        from pipeline.models.factor_model import write_model_files

        return write_model_files(folder, "weights.npz",
                                 {"movie_ids": self.movie_ids, "weights": self.weights.astype(np.float16)},
                                 {"kind": "item_item", "name": self.name, "meta": self.meta})

    @classmethod
    def load(cls, folder: Path) -> ItemItemModel:
        from pipeline.models.factor_model import read_model_files

        meta, z = read_model_files(folder, "weights.npz")
        return cls(meta["name"], z["movie_ids"], z["weights"], meta.get("meta", {}))
