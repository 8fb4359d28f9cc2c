"""One model interface for every trained recommender: ratings as dot products of user and item factors.

    r(u, m) = offset + user_bias[u] + item_bias[m] + user_factors[u] . item_factors[m]  (+ baseline(u, m))

ALS exports its factors (trained on the residuals of the bias baseline, which is then added back); AutoRec
exports its item codes as item factors and its decoder weights as user factors. Predictions are plain numpy,
so a registered model scores any (user_id, movie_id) pairs without Spark or TensorFlow. Pairs whose user or
movie the model never saw in training come back NaN: the evaluation (and the registry wrapper) fill them
with the bias baseline, never drop them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.models.baseline import BiasBaseline, fill_cold
from pipeline.models.metrics import RATING_MAX, RATING_MIN


def _index(ids: np.ndarray) -> pd.Index:
    return pd.Index(np.asarray(ids, dtype=np.int64))


def _biases(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, np.float32) if values is None else np.asarray(values, np.float32)


@dataclass
class FactorModel:
    name: str
    user_ids: np.ndarray
    movie_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray | None = None
    item_bias: np.ndarray | None = None
    offset: float = 0.0
    baseline: BiasBaseline | None = None  # added to the dot product when the factors model residuals
    fallback: BiasBaseline | None = None  # predicts the pairs the factors cannot (cold users and movies)
    min_rating: float = RATING_MIN
    max_rating: float = RATING_MAX
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.user_ids = np.asarray(self.user_ids, dtype=np.int64)
        self.movie_ids = np.asarray(self.movie_ids, dtype=np.int64)
        self.user_factors = np.asarray(self.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(self.item_factors, dtype=np.float32)
        n_users, n_items = len(self.user_ids), len(self.movie_ids)
        self.user_bias = _biases(self.user_bias, n_users)
        self.item_bias = _biases(self.item_bias, n_items)
        if self.user_factors.shape[0] != n_users or self.item_factors.shape[0] != n_items:
            raise ValueError("factor rows must match the ids")
        self._users = _index(self.user_ids)
        self._movies = _index(self.movie_ids)

    @property
    def rank(self) -> int:
        return int(self.item_factors.shape[1])

    def _rows(self, user_ids, movie_ids):
        return (self._users.get_indexer(np.asarray(user_ids, dtype=np.int64)),
                self._movies.get_indexer(np.asarray(movie_ids, dtype=np.int64)))

    def predict(self, user_ids, movie_ids) -> np.ndarray:
        """Predicted ratings, clipped to the scale; NaN where the user or movie is unknown to the model."""
        u, m = self._rows(user_ids, movie_ids)
        known = (u >= 0) & (m >= 0)
        out = np.full(len(u), np.nan)
        uk, mk = u[known], m[known]
        dots = np.einsum("ij,ij->i", self.user_factors[uk], self.item_factors[mk]).astype(np.float64)
        value = self.offset + self.user_bias[uk] + self.item_bias[mk] + dots
        if self.baseline is not None:
            value = value + self.baseline.predict(np.asarray(user_ids)[known], np.asarray(movie_ids)[known])
        out[known] = np.clip(value, self.min_rating, self.max_rating)
        return out

    def predict_all(self, user_ids, movie_ids) -> np.ndarray:
        """Predictions for every pair: cold users/movies get the fallback baseline, as in the evaluation."""
        return fill_cold(self.predict(user_ids, movie_ids), self.fallback, user_ids, movie_ids, self.name)

    def _scores(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shown, raw) scores of the users at ``rows`` for every movie: ``shown`` is exactly what predict
        returns (clipped, the baseline part clipped first); ``raw`` the same before the final clip."""
        raw = (self.user_factors[rows] @ self.item_factors.T).astype(np.float64)
        raw += self.item_bias.astype(np.float64)[None, :]
        raw += (self.offset + self.user_bias[rows].astype(np.float64))[:, None]
        if self.baseline is not None:
            b = self.baseline
            part = (b.mu_ + b._lookup(b.user_bias_, self.user_ids[rows])[:, None]
                    + b._lookup(b.item_bias_, self.movie_ids)[None, :])
            raw += np.clip(part, b.min_rating, b.max_rating)
        return np.clip(raw, self.min_rating, self.max_rating), raw

    def user_scores(self, user_ids) -> np.ndarray:
        """What predict() returns for the (known) users and every movie of ``movie_ids`` (users x movies)."""
        return self._scores(self._users.get_indexer(np.asarray(user_ids, dtype=np.int64)))[0]

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None,
              batch: int = 512) -> dict:
        """The k best known movies for each known user, skipping ``exclude[user]`` (e.g. seen movies).

        ``history`` is accepted for the ranker interface and not used: the user factors hold what was learnt.

        Ranked by the predicted rating that predict() returns, so the list is the k best of what is shown;
        ties (several movies clipped to the top of the scale) by the score before clipping, then by movie_id.
        """
        from pipeline.models.ranking import best_k, exclusion_pairs

        user_ids = [int(u) for u in user_ids]
        rows = self._users.get_indexer(np.asarray(user_ids, dtype=np.int64))
        out = {}
        known = [(u, r) for u, r in zip(user_ids, rows) if r >= 0]
        for start in range(0, len(known), batch):
            chunk = known[start:start + batch]
            users = [u for u, _ in chunk]
            shown, raw = self._scores(np.array([r for _, r in chunk], dtype=np.int64))
            out.update(zip(users, best_k(shown, self.movie_ids, k, exclusion_pairs(exclude, users), raw=raw,
                                         index=self._movies)))
        return out

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(movie_ids, vectors): what the similar-movie tables are computed from."""
        return self.movie_ids, self.item_factors

    # --- persistence (the MLflow pyfunc wrapper stores exactly these files) ------------------------------

    def save(self, folder: Path) -> Path:
        arrays = dict(user_ids=self.user_ids, movie_ids=self.movie_ids, user_factors=self.user_factors,
                      item_factors=self.item_factors, user_bias=self.user_bias, item_bias=self.item_bias)
        meta = {"name": self.name, "offset": self.offset, "min_rating": self.min_rating,
                "max_rating": self.max_rating, "meta": self.meta}
        for key in ("baseline", "fallback"):
            meta[key] = baseline_arrays(getattr(self, key), key, arrays)
        return write_model_files(folder, "factors.npz", arrays, meta)

    @classmethod
    def load(cls, folder: Path) -> FactorModel:
        meta, z = read_model_files(folder, "factors.npz")
        stored = {key: baseline_from_stored(meta.get(key), key, z, meta["min_rating"], meta["max_rating"])
                  for key in ("baseline", "fallback")}
        return cls(name=meta["name"], user_ids=z["user_ids"], movie_ids=z["movie_ids"],
                   user_factors=z["user_factors"], item_factors=z["item_factors"], user_bias=z["user_bias"],
                   item_bias=z["item_bias"], offset=meta["offset"], baseline=stored["baseline"],
                   fallback=stored["fallback"],
                   min_rating=meta["min_rating"], max_rating=meta["max_rating"], meta=meta.get("meta", {}))


def write_model_files(folder: Path, npz_name: str, arrays: dict, meta: dict) -> Path:
    """The one saved-model layout of every kind: its arrays in ``npz_name``, its metadata in ``model.json``
    (strict JSON: NaN and Infinity as null)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / npz_name, **arrays)
    (folder / "model.json").write_text(storage.strict_json(meta, indent=2, default=float))
    return folder


def read_model_files(folder: Path, npz_name: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    """(metadata, arrays) as ``write_model_files`` left them."""
    folder = Path(folder)
    return json.loads((folder / "model.json").read_text()), np.load(folder / npz_name)


def baseline_arrays(b: BiasBaseline | None, key: str, arrays: dict) -> dict | None:
    """Add a fitted baseline's biases to ``arrays`` (an npz's contents) under ``key``; its meta (None: none)."""
    if b is None:
        return None
    arrays.update({f"{key}_user_ids": b.user_bias_.index.to_numpy(np.int64),
                   f"{key}_user_bias": b.user_bias_.to_numpy(),
                   f"{key}_movie_ids": b.item_bias_.index.to_numpy(np.int64),
                   f"{key}_item_bias": b.item_bias_.to_numpy()})
    return {"mu": b.mu_, "damping_user": b.damping_user, "damping_item": b.damping_item}


def baseline_from_stored(info: dict | None, key: str, arrays, lo=RATING_MIN, hi=RATING_MAX) -> BiasBaseline | None:
    """The baseline ``baseline_arrays`` stored under ``key`` (None if none was)."""
    if info is None:
        return None
    return baseline_from_arrays(info, arrays[f"{key}_user_ids"], arrays[f"{key}_user_bias"],
                                arrays[f"{key}_movie_ids"], arrays[f"{key}_item_bias"], lo, hi)


def baseline_from_arrays(info: dict, user_ids, user_bias, movie_ids, item_bias, lo=RATING_MIN, hi=RATING_MAX):
    """A fitted BiasBaseline rebuilt from its stored biases."""
    b = BiasBaseline(info["damping_user"], info["damping_item"], lo, hi)
    b.mu_ = float(info["mu"])
    b.user_bias_ = pd.Series(np.asarray(user_bias, dtype=np.float64), index=pd.Index(user_ids, dtype=np.int64))
    b.item_bias_ = pd.Series(np.asarray(item_bias, dtype=np.float64), index=pd.Index(movie_ids, dtype=np.int64))
    return b
