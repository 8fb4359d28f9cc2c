"""Item-based kNN on the residuals of the bias baseline, with shrunk Pearson-baseline similarities.

    r^(u, i) = b(u, i) + sum_j s_ij z_uj / (sum_j |s_ij| + damping),   z_uj = r_uj - b(u, j)

over the movies j among movie i's K most similar movies that user u rated in training (``b``: the damped bias
baseline; ``damping`` pulls a prediction with little neighbourhood evidence towards the baseline). The
similarity is Pearson on the baseline residuals over the users who rated both movies, shrunk by their number
(Koren 2008; the "pearson_baseline" of KNNBaseline):

    s_ij = n_ij / (n_ij + shrinkage) * sum_u z_ui z_uj / sqrt(sum_u z_ui^2 * sum_u z_uj^2)   (u rated i and j)

Only the K best positive similarities of each movie are kept (``neighbours``/``sims``: movies x K), so the
model is O(movies x K) plus the training residuals (one float per rating): at 10 M ratings and K = 100, about
90 MB. Fitting computes the four co-rating sums by sparse products one block of movies at a time, a block
being at most ``block_entries`` (movie, movie) cells, so its memory is bounded whatever the catalogue.
Predictions are plain numpy/scipy (no Spark): the registered pyfunc scores pairs like the factor models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.models.baseline import BiasBaseline, fill_cold
from pipeline.models.metrics import RATING_MAX, RATING_MIN
from pipeline.models.ranking import map_threads, scoring_threads, top_k_by_score

log = logging.getLogger(__name__)

BLOCK_ENTRIES = 4_000_000  # (movie, movie) cells computed at once while fitting: 4 float64 blocks = 128 MB
EMBEDDING_RANK = 64
_PAIR_CHUNK = 100_000


def residual_matrix(train: pd.DataFrame, baseline: BiasBaseline, user_ids: np.ndarray,
                    movie_ids: np.ndarray) -> sp.csr_matrix:
    """Users x movies CSR of the training residuals r - b(u, i) (float32; rows/cols follow the ids)."""
    rows = pd.Index(user_ids).get_indexer(train["user_id"].to_numpy())
    cols = pd.Index(movie_ids).get_indexer(train["movie_id"].to_numpy())
    users, movies = train["user_id"].to_numpy(), train["movie_id"].to_numpy()
    z = train["rating"].to_numpy(np.float64) - baseline.predict(users, movies)
    # a residual of exactly 0 must stay a stored entry (the user rated the movie): nudge it
    z = np.where(z == 0.0, 1e-6, z).astype(np.float32)
    m = sp.csr_matrix((z, (rows, cols)), shape=(len(user_ids), len(movie_ids)), dtype=np.float32)
    m.sum_duplicates()
    return m


def same_pattern(m: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """A CSR matrix with ``m``'s stored entries (its index arrays shared, not copied) holding ``data``."""
    return sp.csr_matrix((data, m.indices, m.indptr), shape=m.shape)


def cap_user_ratings(z: sp.csr_matrix, most: int | None, seed: int = 0) -> sp.csr_matrix:
    """``z`` with each user's row cut to at most ``most`` ratings, a seeded random sample of them (rows at or
    under the cap, and ``most`` None or 0, stay whole). The similarities are estimated from the capped matrix:
    the co-rating sums cost sum over users of (ratings)^2, which the few heaviest users dominate (a user with
    5,000 ratings costs as much as 2,500 users with 100), while they add little to any one pair's evidence.
    Mahout's item similarity job samples heavy users the same way (maxPrefsPerUser)."""
    z = z.tocsr()
    lengths = np.diff(z.indptr)
    if not most or lengths.size == 0 or lengths.max() <= most:
        return z
    heavy = np.flatnonzero(lengths > most)
    counts = lengths[heavy]
    first = np.repeat(np.cumsum(counts) - counts, counts)  # where each heavy entry's row starts among them
    entries = np.repeat(z.indptr[heavy], counts) + np.arange(counts.sum()) - first
    # within each heavy row, a random order: sort by row + a key in [0, 1) (rows stay where they were)
    order = np.argsort(np.repeat(heavy, counts) + np.random.default_rng(seed).random(counts.sum()), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - first
    keep = np.ones(z.nnz, bool)
    keep[entries] = rank < most
    capped = sp.csr_matrix((z.data[keep], z.indices[keep], np.concatenate(([0], np.cumsum(np.minimum(lengths, most))))),
                           shape=z.shape)
    capped.has_sorted_indices = z.has_sorted_indices
    return capped


def neighbour_tables(z: sp.csr_matrix, shrinkages, k: int, block_entries: int = BLOCK_ENTRIES,
                     min_support: int = 2, workers: int | None = None) -> dict:
    """{shrinkage: (neighbours int32 movies x k, sims float32 movies x k)}: each movie's k most similar movies
    (positive shrunk Pearson-baseline similarity, best first; -1 / 0 where fewer exist). The co-rating sums are
    computed once for every shrinkage, one block of movies at a time, ``workers`` blocks at once (threads: the
    sparse products and numpy release the GIL; default ``scoring_threads()``); the blocks in flight hold
    ``block_entries`` (movie, movie) cells in all, whatever ``workers`` is. Each block fills its own rows, so
    the tables do not depend on ``workers``."""
    n = z.shape[1]
    zc = z.tocsc().astype(np.float64)  # blocks of movies are sliced from its columns
    # the right-hand sides of the products, in CSR: scipy converts any other format to CSR on every product,
    # which at 25 M ratings and 60 k movies (1,800 blocks) cost more than the products themselves
    # (docs/adr/0039-knn-heavy-users-sampled.md)
    zr = zc.tocsr()
    ones, sq = same_pattern(zr, np.ones(zr.nnz)), same_pattern(zr, zr.data ** 2)
    k = max(1, min(int(k), max(n - 1, 1)))
    out = {float(s): (np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)) for s in shrinkages}
    workers = max(1, int(workers or scoring_threads()))
    block = max(1, int(block_entries) // (max(n, 1) * workers))  # the blocks in flight hold block_entries in all

    def fill(start: int) -> int:
        stop = min(start + block, n)
        zb = zc[:, start:stop].T.tocsr()
        ob, sb = same_pattern(zb, np.ones(zb.nnz)), same_pattern(zb, zb.data ** 2)
        num = (zb @ zr).toarray()
        count = (ob @ ones).toarray()
        sq_i = (sb @ ones).toarray()
        sq_j = (ob @ sq).toarray()
        with np.errstate(divide="ignore", invalid="ignore"):
            pearson = num / np.sqrt(sq_i * sq_j)
        pearson[~np.isfinite(pearson) | (count < min_support)] = 0.0
        pearson[np.arange(stop - start), np.arange(start, stop)] = 0.0  # not its own neighbour
        for shrink, (nbr, sim) in out.items():
            s = pearson * (count / (count + shrink))
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (stop - start, 1))
            vals = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-vals, axis=1, kind="stable")
            top, vals = np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)
            keep = vals > 0
            nbr[start:stop] = np.where(keep, top, -1)
            sim[start:stop] = np.where(keep, vals, 0.0)
        return stop - start

    started, done, next_report = time.perf_counter(), 0, 0.1
    for filled in map_threads(fill, range(0, n, block), workers):
        done += filled
        if done / n >= next_report and done < n:  # the log shows a long table build move
            log.info("knn neighbour tables: %d of %d movies (%.0f %%, %.0f s)", done, n, 100 * done / n,
                     time.perf_counter() - started)
            next_report = done / n + 0.1
    return out


@dataclass
class ItemKNN:
    """The fitted neighbourhood model: neighbour tables, the users' training residuals and the baseline."""

    name: str
    user_ids: np.ndarray
    movie_ids: np.ndarray
    neighbours: np.ndarray  # movies x K column indices into movie_ids, -1 = none
    sims: np.ndarray  # movies x K similarities, 0 = none
    residuals: sp.csr_matrix  # users x movies training residuals
    baseline: BiasBaseline
    damping: float = 1.0
    fallback: BiasBaseline | None = None
    min_rating: float = RATING_MIN
    max_rating: float = RATING_MAX
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.user_ids = np.asarray(self.user_ids, dtype=np.int64)
        self.movie_ids = np.asarray(self.movie_ids, dtype=np.int64)
        self.neighbours = np.asarray(self.neighbours, dtype=np.int32)
        self.sims = np.asarray(self.sims, dtype=np.float32)
        self._users, self._movies = pd.Index(self.user_ids), pd.Index(self.movie_ids)
        n, k = self.neighbours.shape
        keep = self.neighbours >= 0
        rows = np.repeat(np.arange(n), k).reshape(n, k)[keep]
        self._s = sp.csr_matrix((self.sims[keep], (rows, self.neighbours[keep])), shape=(n, n), dtype=np.float32)
        self._abs_s = abs(self._s)
        # user_scores' right-hand sides, transposed once in CSR (scipy would convert a CSC one per product)
        self._s_t, self._abs_s_t = self._s.T.tocsr(), self._abs_s.T.tocsr()
        z = self.residuals
        # which movies each user rated: the residuals' structure (indices shared, not copied) with ones
        self._rated = same_pattern(z, np.ones(z.nnz, np.float32))

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    def _baseline_part(self, user_ids, movie_ids) -> np.ndarray:
        return self.baseline.predict(user_ids, movie_ids)

    def predict(self, user_ids, movie_ids) -> np.ndarray:
        """Predicted ratings, clipped; NaN where the user or movie is unknown to the model."""
        return self.predict_from(self.parts(user_ids, movie_ids))

    def parts(self, user_ids, movie_ids) -> tuple:
        """What ``predict`` combines, before the damping: (known pairs, baseline part, numerator, denominator).
        The same for every damping of one neighbour table, so a grid over dampings computes it once."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        movie_ids = np.asarray(movie_ids, dtype=np.int64)
        u, m = self._users.get_indexer(user_ids), self._movies.get_indexer(movie_ids)
        known = np.flatnonzero((u >= 0) & (m >= 0))
        num, den = np.zeros(len(known)), np.zeros(len(known))
        workers = scoring_threads()
        size = max(1, _PAIR_CHUNK // workers)  # the chunks in flight hold _PAIR_CHUNK pairs' rows in all

        def chunk(start: int) -> None:  # threads fill disjoint slices (scipy's products release the GIL)
            at = known[start:start + size]
            num[start:start + len(at)] = np.asarray(self._s[m[at]].multiply(self.residuals[u[at]]).sum(axis=1)).ravel()
            den[start:start + len(at)] = np.asarray(
                self._abs_s[m[at]].multiply(self._rated[u[at]]).sum(axis=1)).ravel()

        list(map_threads(chunk, range(0, len(known), size), workers))
        return len(u), known, self._baseline_part(user_ids[known], movie_ids[known]), num, den

    def predict_from(self, parts: tuple) -> np.ndarray:
        """``predict`` from ``parts`` (this model's damping)."""
        n, known, base, num, den = parts
        out = np.full(n, np.nan)
        out[known] = self._combine(base, num, den)
        return out

    def _combine(self, base, num, den):
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(den > 0, num / (den + self.damping), 0.0)
        return np.clip(base + delta, self.min_rating, self.max_rating)

    def predict_all(self, user_ids, movie_ids) -> np.ndarray:
        """Predictions for every pair: cold users/movies get the fallback baseline, as in the evaluation."""
        return fill_cold(self.predict(user_ids, movie_ids), self.fallback, user_ids, movie_ids, self.name)

    def user_scores(self, user_ids) -> np.ndarray:
        """Predicted ratings of the (known) users for every movie of ``movie_ids`` (users x movies), as
        ``predict`` computes them, by two sparse products."""
        rows = self._users.get_indexer(np.asarray(user_ids, dtype=np.int64))
        num = (self.residuals[rows] @ self._s_t).toarray()
        den = (self._rated[rows] @ self._abs_s_t).toarray()
        b = self.baseline
        base = np.clip(b.mu_ + b._lookup(b.user_bias_, self.user_ids[rows])[:, None]
                       + b._lookup(b.item_bias_, self.movie_ids)[None, :], b.min_rating, b.max_rating)
        return self._combine(base, num, den)

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None,
              batch: int = 256) -> dict:
        """The k best movies by predicted rating for each known user, skipping ``exclude[user]``; ties by
        movie_id. ``history`` is accepted for the ranker interface (the residuals hold what was rated)."""
        ids = np.asarray([int(u) for u in user_ids], dtype=np.int64)
        known = ids[self._users.get_indexer(ids) >= 0].tolist()
        return top_k_by_score(self.user_scores, known, self.movie_ids, k, exclude, batch)

    def item_embeddings(self, rank: int = EMBEDDING_RANK) -> tuple[np.ndarray, np.ndarray]:
        """(movie_ids, vectors) for the similar-movie tables: a rank-64 factorisation of the (symmetrised)
        sparse similarity matrix, so that cosine on the vectors follows the neighbourhoods."""
        from scipy.sparse.linalg import svds

        s = ((self._s + self._s.T) * 0.5).astype(np.float64)
        n = s.shape[0]
        r = max(1, min(rank, n - 2))
        if n <= 4 * r:
            u, sv, _ = np.linalg.svd(s.toarray())
            u, sv = u[:, :r], sv[:r]
        else:
            u, sv, _ = svds(s, k=r, v0=np.full(n, 1.0 / np.sqrt(n)))
        return self.movie_ids, (u * np.sqrt(np.maximum(sv, 0.0))).astype(np.float32)

    # --- persistence ------------------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        from pipeline.models.factor_model import baseline_arrays, write_model_files

        z = self.residuals.tocsr()
        arrays = dict(user_ids=self.user_ids, movie_ids=self.movie_ids, neighbours=self.neighbours, sims=self.sims,
                      z_indptr=z.indptr, z_indices=z.indices, z_data=z.data)
        meta = {"kind": "knn", "name": self.name, "damping": self.damping, "min_rating": self.min_rating,
                "max_rating": self.max_rating, "meta": self.meta}
        for key in ("baseline", "fallback"):
            meta[key] = baseline_arrays(getattr(self, key), key, arrays)
        return write_model_files(folder, "knn.npz", arrays, meta)

    @classmethod
    def load(cls, folder: Path) -> ItemKNN:
        from pipeline.models.factor_model import baseline_from_stored, read_model_files

        meta, a = read_model_files(folder, "knn.npz")
        z = sp.csr_matrix((a["z_data"], a["z_indices"], a["z_indptr"]), shape=(len(a["user_ids"]), len(a["movie_ids"])))
        stored = {key: baseline_from_stored(meta[key], key, a, meta["min_rating"], meta["max_rating"])
                  for key in ("baseline", "fallback")}
        return cls(meta["name"], a["user_ids"], a["movie_ids"], a["neighbours"], a["sims"], z, stored["baseline"],
                   damping=meta["damping"], fallback=stored["fallback"], min_rating=meta["min_rating"],
                   max_rating=meta["max_rating"], meta=meta.get("meta", {}))


def fit_knn_grid(train: pd.DataFrame, baseline: BiasBaseline, neighbours, shrinkages, dampings,
                 block_entries: int = BLOCK_ENTRIES, max_user_ratings: int | None = None,
                 seed: int = 0) -> Iterator[tuple[dict, ItemKNN]]:
    """(point, ItemKNN) for each (k, shrinkage, damping) point, sharing one pass of co-rating sums (done before
    this returns); the models are built one at a time as the caller iterates, so that a caller keeping only the
    best holds two models, not the grid. The similarities are estimated with each user's ratings capped at
    ``max_user_ratings`` (``cap_user_ratings``); the models predict from every training rating."""
    user_ids = np.sort(pd.unique(train["user_id"]).astype(np.int64))
    movie_ids = np.sort(pd.unique(train["movie_id"]).astype(np.int64))
    z = residual_matrix(train, baseline, user_ids, movie_ids)
    capped = cap_user_ratings(z, max_user_ratings, seed)
    if capped.nnz < z.nnz:
        log.info("knn similarities from %d of %d training ratings (%d users over %d ratings sampled down)",
                 capped.nnz, z.nnz, int((np.diff(z.indptr) > max_user_ratings).sum()), max_user_ratings)
    tables = neighbour_tables(capped, shrinkages, max(neighbours), block_entries)
    del capped

    def models():
        for shrink, (nbr, sim) in tables.items():
            for k in neighbours:
                kk = min(int(k), nbr.shape[1])
                for damping in dampings:
                    point = {"k": int(k), "shrinkage": float(shrink), "damping": float(damping)}
                    yield point, ItemKNN("knn", user_ids, movie_ids, nbr[:, :kk].copy(), sim[:, :kk].copy(), z,
                                         baseline, damping=float(damping), fallback=baseline, meta={"params": point})

    return models()
