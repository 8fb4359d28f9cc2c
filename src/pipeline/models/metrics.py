"""The one evaluation every model goes through: rating error on every test row, and top-k ranking quality.

Rating error (docs/models.md, the evaluation protocol): every test row is predicted. Rows whose user or movie is
absent from the training split ("cold" rows), and rows the model cannot score (it returns NaN), get the
bias baseline's prediction instead of being dropped; all predictions are clipped to the rating scale.
RMSE and MAE are over all test rows, with the count and RMSE of the cold rows beside them.

Ranking quality: each model's top-k lists (training movies already excluded by the model) are compared with
the test ratings >= ``threshold`` (binary relevance). Pure numpy/pandas, so it runs wherever a model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from pipeline.errors import DataValidationError
from pipeline.params import check_k

RATING_MIN, RATING_MAX = 0.5, 5.0
RELEVANCE_THRESHOLD = 4.0

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Fallback(Protocol):
    """What scores the rows a model cannot (the bias baseline): a prediction for any (user, movie) pair."""

    def predict(self, user_ids, movie_ids) -> np.ndarray: ...


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("cannot compute an error over zero ratings")
    return y_true, y_pred


def rmse(y_true, y_pred) -> float:
    """Root mean squared error."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mae(y_true, y_pred) -> float:
    """Mean absolute error."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def clip_ratings(pred, lo: float = RATING_MIN, hi: float = RATING_MAX) -> np.ndarray:
    """Predictions clipped to the rating scale [lo, hi] (NaN stays NaN)."""
    return np.clip(np.asarray(pred, dtype=np.float64), lo, hi)


def precision_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Share of the first k recommendations that are relevant; divided by k even when fewer were recommended."""
    hits = sum(1 for item in list(recommended)[:k] if item in relevant)
    return hits / k


def recall_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Share of the relevant items found in the first k recommendations; 0.0 when nothing is relevant."""
    if not relevant:
        return 0.0
    hits = sum(1 for item in list(recommended)[:k] if item in relevant)
    return hits / len(relevant)


def ndcg_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Binary-relevance NDCG@k with a log2 discount; the ideal list holds min(k, |relevant|) hits.

    0.0 when nothing is relevant.
    """
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(list(recommended)[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return dcg / ideal


def average_precision_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Mean of precision@i over the ranks i <= k holding a relevant item, divided by min(k, |relevant|).

    0.0 when nothing is relevant.
    """
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, item in enumerate(list(recommended)[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / rank
    return total / min(k, len(relevant))


def ranking_metrics(top_k: Mapping, test: pd.DataFrame, k: int = 10,
                    threshold: float = RELEVANCE_THRESHOLD) -> dict:
    """Mean precision@k, recall@k, NDCG@k and MAP@k of ``top_k`` (user_id -> movie_ids) against ``test``.

    Averaged over the test users with at least one relevant test rating (rating >= threshold): a user with
    nothing relevant has no defined recall or NDCG, so counting them would only dilute every model alike.
    A user missing from ``top_k`` counts as recommending nothing (zeros), so a model cannot gain by skipping
    users. ``users`` is how many users were averaged; the means are None when there are none.
    """
    k = check_k(k)
    liked = test["rating"].to_numpy() >= threshold
    users, movies = test["user_id"].to_numpy()[liked], test["movie_id"].to_numpy()[liked]
    order = np.argsort(users, kind="stable")  # users in id order, each one's movies as a set
    ids, starts = np.unique(users[order], return_index=True)
    relevant_by_user = dict(zip(ids.tolist(), (set(part.tolist()) for part in np.split(movies[order], starts[1:]))))
    sums = np.zeros(4)
    for user_id, relevant in relevant_by_user.items():
        recommended = top_k.get(user_id, ())
        sums += (precision_at_k(recommended, relevant, k), recall_at_k(recommended, relevant, k),
                 ndcg_at_k(recommended, relevant, k), average_precision_at_k(recommended, relevant, k))
    n_users = len(relevant_by_user)
    means = [float(s / n_users) if n_users else None for s in sums]
    return {f"precision_at_{k}": means[0], f"recall_at_{k}": means[1], f"ndcg_at_{k}": means[2],
            f"map_at_{k}": means[3], "users": int(n_users)}


def predictions_with_fallback(test: pd.DataFrame, predict: Predict, fallback: Fallback,
                              train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, cold): a clipped prediction for every test row, and the mask of cold rows.

    ``predict(user_ids, movie_ids)`` is only asked about warm rows (user and movie both in ``train``); where
    it returns NaN (or any non-finite value) the row gets ``fallback``'s prediction, as cold rows do.
    """
    users = test["user_id"].to_numpy()
    movies = test["movie_id"].to_numpy()
    cold = ~(test["user_id"].isin(pd.unique(train["user_id"])).to_numpy()
             & test["movie_id"].isin(pd.unique(train["movie_id"])).to_numpy())
    pred = np.full(len(test), np.nan)
    warm = ~cold
    if warm.any():
        scored = np.asarray(predict(users[warm], movies[warm]), dtype=np.float64)
        if scored.shape != (int(warm.sum()),):
            raise ValueError(f"predict returned shape {scored.shape} for {int(warm.sum())} (user, movie) pairs")
        pred[warm] = scored
    missing = ~np.isfinite(pred)
    if missing.any():
        pred[missing] = fallback.predict(users[missing], movies[missing])
    return clip_ratings(pred), cold


def rating_metrics(rows: pd.DataFrame, predict: Predict, fallback: Fallback, train: pd.DataFrame,
                   split: str = "test") -> dict:
    """RMSE and MAE over every row of ``rows`` (cold or unscorable rows take ``fallback``), plus the cold rows'.

    Keys are named after ``split`` ("test" or "val"): {split}_rmse, {split}_mae, {split}_rows,
    cold_{split}_rows, cold_{split}_rmse (None when no row is cold).
    """
    if len(rows) == 0:
        raise DataValidationError(f"the {split} split has no rows: there is nothing to evaluate")
    pred, cold = predictions_with_fallback(rows, predict, fallback, train)
    return metrics_of_predictions(rows, pred, cold, split)


def metrics_of_predictions(rows: pd.DataFrame, pred: np.ndarray, cold: np.ndarray, split: str = "test") -> dict:
    """``rating_metrics``' figures for predictions already made for every row (``cold``: the cold rows)."""
    pred = clip_ratings(pred)
    truth = rows["rating"].to_numpy(dtype=np.float64)
    n_cold = int(cold.sum())
    return {
        f"{split}_rmse": rmse(truth, pred),
        f"{split}_mae": mae(truth, pred),
        f"{split}_rows": int(len(rows)),
        f"cold_{split}_rows": n_cold,
        f"cold_{split}_rmse": rmse(truth[cold], pred[cold]) if n_cold else None,
    }
