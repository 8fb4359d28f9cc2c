"""The item-item ranking model (EASE's output): a user's score for a movie is the sum, over the movies in
their history, of one learnt weight per (history movie, movie) pair, each times the history movie's input
weight (``INPUTS``: 1 for every rated movie, or a function of its rating, the same as in training). Plain
numpy: it ranks without Spark."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

EMBEDDING_RANK = 64

# How a rating enters the user x movie matrix the weights are learnt from, and a history's row when scoring.
# A history without ratings (movie ids only) counts each movie as 1.
INPUTS = {
    "binary": lambda r: np.ones_like(r),  # rated or not
    "rating": lambda r: r / np.float32(5.0),  # the rating on a 0-1 scale: a 5 weighs twice a 2.5
    "liked": lambda r: (r >= np.float32(3.5)).astype(np.float32),  # only ratings of 3.5 and more
}


def input_weights(name: str, ratings: np.ndarray | None, size: int) -> np.ndarray:
    """The input weight of each of ``size`` history entries (float32); ``ratings`` None: all 1."""
    if name not in INPUTS:
        raise ValueError(f"unknown EASE input {name!r} (known: {', '.join(INPUTS)})")
    if ratings is None:
        return np.ones(size, np.float32)
    return INPUTS[name](np.asarray(ratings, dtype=np.float32)).astype(np.float32)


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

    @property
    def input(self) -> str:
        return self.meta.get("input", "binary")

    def scores(self, histories: list) -> np.ndarray:
        """float32 scores (len(histories) x movies); a history is an iterable of movie ids or a mapping
        {movie_id: rating}."""
        from pipeline.models.ranking import history_pairs

        rows, movies, ratings = history_pairs(dict(enumerate(histories)), range(len(histories)))
        return self._history_scores((rows, movies), len(histories), ratings)

    def _weights32(self) -> np.ndarray:
        """One float32 copy of the weights for the products (stored as float16)."""
        if getattr(self, "_w32", None) is None:
            self._w32 = self.weights.astype(np.float32, copy=False)
        return self._w32

    def _history_scores(self, pairs: tuple[np.ndarray, np.ndarray], n_rows: int,
                        ratings: np.ndarray | None = None) -> np.ndarray:
        """``scores`` of histories given as (row, movie_id) pairs and their ratings: the sparse history rows
        (input weights) times the weights (scipy's sparse x dense product: histories fill 1-3 % of the
        catalogue, where it beats dense BLAS, and the callers run batches on threads;
        docs/adr/0036-ease-sparse-histories.md)."""
        cols = self._movies.get_indexer(pairs[1])
        keep = cols >= 0
        values = input_weights(self.input, ratings, len(cols))[keep]
        return np.asarray(history_matrix(pairs[0][keep], cols[keep], values, (n_rows, len(self.movie_ids)))
                          @ self._weights32())

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None,
              batch: int = 512) -> dict:
        """Each user's k best catalogue movies by score, skipping ``exclude[user]``; ties by movie_id.

        ``history`` (default: ``exclude``) is what the user rated; users with nothing of it in the catalogue
        are left out (the caller gives them popularity).
        """
        from pipeline.models.ranking import best_k, exclusion_pairs, history_pairs, map_threads

        history = exclude if history is None else history
        user_ids = [int(u) for u in user_ids]

        def one(start: int) -> list:
            chunk = user_ids[start:start + batch]
            rows, movies, ratings = history_pairs(history, chunk)
            pairs = (rows, movies)
            known = self._movies.get_indexer(movies) >= 0
            has = np.bincount(rows[known], minlength=len(chunk)) > 0  # rated something in the catalogue
            excluded = pairs if exclude is history else exclusion_pairs(exclude, chunk)
            lists = best_k(self._history_scores(pairs, len(chunk), ratings), self.movie_ids, k, excluded,
                           index=self._movies)
            return [(user, top) for user, top, ok in zip(chunk, lists, has) if ok]

        out: dict = {}
        for part in map_threads(one, range(0, len(user_ids), batch)):  # batches of users side by side
            out.update(part)
        return out

    def pair_scores(self, user_ids, movie_ids, history, batch: int = 512) -> np.ndarray:
        """The score of each (user, movie) pair given the users' histories (NaN outside the catalogue)."""
        from pipeline.models.ranking import history_pairs

        user_ids = np.asarray(user_ids, dtype=np.int64)
        cols = self._movies.get_indexer(np.asarray(movie_ids, dtype=np.int64))
        out = np.full(len(user_ids), np.nan)
        users = list(dict.fromkeys(user_ids.tolist()))
        for start in range(0, len(users), batch):
            chunk = users[start:start + batch]
            rows, movies, ratings = history_pairs(history, chunk)
            scores = self._history_scores((rows, movies), len(chunk), ratings)
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



def history_matrix(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """The sparse (row, column) -> value matrix with a cell entered twice counted once (its first value): a
    movie rated twice is one history entry, not two."""
    key = rows.astype(np.int64) * shape[1] + cols
    _, first = np.unique(key, return_index=True)
    return sp.csr_matrix((values[first], (rows[first], cols[first])), shape=shape)
