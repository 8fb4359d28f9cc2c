"""Rating baselines every model is compared with: the global mean and the damped user+item bias baseline.

The bias baseline is also the fallback prediction for cold rows in ``pipeline.models.metrics``, and what the
factor models add their interactions to. (The popularity ranking lives in ``pipeline.models.popularity``.) Vectorised
numpy/pandas (np.bincount over factorized ids), so fitting on ML-25M takes seconds, not a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataValidationError
from pipeline.models.metrics import RATING_MAX, RATING_MIN, clip_ratings, rmse

# Best of DAMPING_GRID on ml-latest-small's validation split (0.865 vs 0.879 for Koren's 10/25, which suits
# Netflix-sized data); a run should still choose with fit_best_damping.
DEFAULT_DAMPING_USER = 5.0
DEFAULT_DAMPING_ITEM = 5.0
# (damping_user, damping_item) pairs tried by fit_best_damping: 0 = undamped means.
DAMPING_GRID = tuple((u, i) for u in (0.0, 5.0, 10.0, 25.0) for i in (0.0, 5.0, 10.0, 25.0, 50.0))


def _require_ratings(train: pd.DataFrame, what: str = "training split") -> None:
    if len(train) == 0:
        raise DataValidationError(f"the {what} has no rows: a baseline needs at least one rating")


class GlobalMean:
    """Predicts the mean training rating for every (user, movie)."""

    def __init__(self, min_rating: float = RATING_MIN, max_rating: float = RATING_MAX):
        self.min_rating, self.max_rating = min_rating, max_rating

    def fit(self, train: pd.DataFrame) -> GlobalMean:
        _require_ratings(train)
        self.mu_ = float(train["rating"].mean())
        return self

    def predict(self, user_ids, movie_ids) -> np.ndarray:
        return clip_ratings(np.full(len(np.asarray(user_ids)), self.mu_), self.min_rating, self.max_rating)


class BiasBaseline:
    """Damped user+item bias baseline: mu + b_u + b_i, with b = 0 for a user or movie unseen in training.

    b_i = sum(r - mu) / (n_i + damping_item), then b_u = sum(r - mu - b_i) / (n_u + damping_user): the
    damping shrinks the biases of users and movies with few ratings towards zero.
    """

    def __init__(self, damping_user: float = DEFAULT_DAMPING_USER, damping_item: float = DEFAULT_DAMPING_ITEM,
                 min_rating: float = RATING_MIN, max_rating: float = RATING_MAX):
        for name, value in (("damping_user", damping_user), ("damping_item", damping_item)):
            if not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        self.damping_user, self.damping_item = float(damping_user), float(damping_item)
        self.min_rating, self.max_rating = min_rating, max_rating

    def fit(self, train: pd.DataFrame) -> BiasBaseline:
        _require_ratings(train)
        return self._fit_codes(_Codes(train))

    def _fit_codes(self, codes: _Codes) -> BiasBaseline:
        mu = codes.ratings.mean()
        residual = codes.ratings - mu
        b_i = np.bincount(codes.item, weights=residual, minlength=len(codes.items)) / (codes.n_item + self.damping_item)
        residual -= b_i[codes.item]
        b_u = np.bincount(codes.user, weights=residual, minlength=len(codes.users)) / (codes.n_user + self.damping_user)
        self.mu_ = float(mu)
        self.user_bias_ = pd.Series(b_u, index=codes.users)
        self.item_bias_ = pd.Series(b_i, index=codes.items)
        return self

    @staticmethod
    def _lookup(bias: pd.Series, ids) -> np.ndarray:
        pos = bias.index.get_indexer(np.asarray(ids))
        return np.where(pos >= 0, bias.to_numpy()[pos], 0.0)

    def known_users(self, user_ids) -> np.ndarray:
        """Boolean mask: which of ``user_ids`` were in the training split."""
        return self.user_bias_.index.get_indexer(np.asarray(user_ids)) >= 0

    def known_movies(self, movie_ids) -> np.ndarray:
        """Boolean mask: which of ``movie_ids`` were in the training split."""
        return self.item_bias_.index.get_indexer(np.asarray(movie_ids)) >= 0

    def predict(self, user_ids, movie_ids) -> np.ndarray:
        raw = self.mu_ + self._lookup(self.user_bias_, user_ids) + self._lookup(self.item_bias_, movie_ids)
        return clip_ratings(raw, self.min_rating, self.max_rating)


def fill_cold(pred: np.ndarray, fallback, user_ids, movie_ids, model_name: str) -> np.ndarray:
    """``pred`` with the pairs a model could not score (NaN: cold users or movies) predicted by ``fallback``, as
    the evaluation does: every rating model's ``predict_all``."""
    missing = ~np.isfinite(pred)
    if missing.any():
        if fallback is None:
            raise ValueError(f"model {model_name!r} has no fallback baseline for {int(missing.sum())} cold pairs")
        pred[missing] = fallback.predict(np.asarray(user_ids)[missing], np.asarray(movie_ids)[missing])
    return pred


class _Codes:
    """A training split factorized once, so that a damping grid refits with two bincounts per point."""

    def __init__(self, train: pd.DataFrame):
        self.ratings = train["rating"].to_numpy(dtype=np.float64)
        user, users = pd.factorize(train["user_id"], sort=True)
        item, items = pd.factorize(train["movie_id"], sort=True)
        self.user, self.item = user, item
        self.users = pd.Index(users, name="user_id")
        self.items = pd.Index(items, name="movie_id")
        self.n_user = np.bincount(user, minlength=len(users))
        self.n_item = np.bincount(item, minlength=len(items))


def fit_best_damping(train: pd.DataFrame, validation: pd.DataFrame,
                     grid: Iterable[tuple[float, float]] = DAMPING_GRID) -> tuple[BiasBaseline, list[dict]]:
    """(model, results): the BiasBaseline whose (damping_user, damping_item) has the lowest validation RMSE.

    ``results`` has one {"damping_user", "damping_item", "validation_rmse"} per grid point; ties go to the
    earlier point. Validation rows with unseen users or movies are scored like any other (biases 0).
    """
    _require_ratings(train)
    _require_ratings(validation, "validation split")
    grid = list(grid)
    if not grid:
        raise ConfigError("the damping grid is empty: give at least one (damping_user, damping_item) pair")
    codes = _Codes(train)
    truth = validation["rating"].to_numpy(dtype=np.float64)
    best, best_rmse, results = None, np.inf, []
    for damping_user, damping_item in grid:
        model = BiasBaseline(damping_user, damping_item)._fit_codes(codes)
        score = rmse(truth, model.predict(validation["user_id"], validation["movie_id"]))
        results.append({"damping_user": float(damping_user), "damping_item": float(damping_item),
                        "validation_rmse": score})
        if score < best_rmse:
            best, best_rmse = model, score
    return best, results
