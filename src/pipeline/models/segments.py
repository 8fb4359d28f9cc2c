"""Challenger against champion per segment: who pays for an average gain?

Users are segmented by activity, movies by popularity, both from the **training** ratings of the run:

- users (:func:`user_segments`): ``cold`` has at most ``cold_max`` (5) training ratings; the others split at
  the median training count of the non-cold users: ``light`` at or below it, ``heavy`` above it (so with an
  even split of counts heavy is the smaller half, and when every non-cold user has the same count all are
  light). A user with no training rating (absent from ``train``) is cold.
- movies (:func:`movie_segments`): ``head`` is the top ``head_share`` (20%) of the training movies by
  ratings count, rounded up to a whole movie; ties at the boundary count go to the head too, so a movie's
  segment depends on its count alone and the head may hold slightly more than the share. The rest, and
  movies absent from ``train``, are ``tail``.

Both models are scored with the project's own definitions: RMSE (``metrics.rmse``, predictions clipped to the
rating scale as ``metrics.metrics_of_predictions`` does) and NDCG@10 (``metrics.ranking_metrics``: relevance
is a held-out rating >= 4, averaged over the users with a relevant rating). :func:`regressions` then names the
segments the challenger loses by more than a tolerance, and the segments too small to judge. Pure
numpy/pandas, no I/O: the gates (issue #34) call it with predictions and lists they already made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from pipeline.models.metrics import clip_ratings, ranking_metrics, rmse

COLD_MAX = 5  # a user with at most this many training ratings is cold
HEAD_SHARE = 0.2  # the share of training movies, most rated first, that is the head
MIN_COUNT = 20  # a segment with fewer rows (rating) or users (ranking) is not judged
USER_SEGMENTS = ("cold", "light", "heavy")
MOVIE_SEGMENTS = ("head", "tail")
RANKING_K = 10


def user_segments(train: pd.DataFrame, cold_max: int = COLD_MAX) -> pd.Series:
    """user_id -> "cold" | "light" | "heavy" for every user of ``train``, by their number of training ratings."""
    if cold_max < 0:
        raise ValueError(f"cold_max must be >= 0, got {cold_max}")
    counts = train.groupby("user_id").size()
    segments = pd.Series("cold", index=counts.index, name="segment", dtype=object)
    warm = counts > cold_max
    if warm.any():
        median = float(counts[warm].median())
        segments[warm] = np.where(counts[warm] > median, "heavy", "light")
    segments.index.name = "user_id"
    return segments


def movie_segments(train: pd.DataFrame, head_share: float = HEAD_SHARE) -> pd.Series:
    """movie_id -> "head" | "tail" for every movie of ``train``, by its number of training ratings."""
    if not 0 < head_share <= 1:
        raise ValueError(f"head_share must be in (0, 1], got {head_share}")
    counts = train.groupby("movie_id").size()
    segments = pd.Series("tail", index=counts.index, name="segment", dtype=object)
    if len(counts):
        n_head = math.ceil(head_share * len(counts) - 1e-9)  # 0.07 * 100 is 7.000000000000001 in floats
        boundary = int(np.sort(counts.to_numpy())[::-1][n_head - 1])
        segments[counts >= boundary] = "head"
    segments.index.name = "movie_id"
    return segments


def _segment_of(ids, by: pd.Series, default: str) -> np.ndarray:
    """The segment of each id of ``ids`` in ``by``; ``default`` for an id ``by`` does not hold."""
    return by.reindex(pd.Index(np.asarray(ids))).fillna(default).to_numpy(dtype=object)


def rating_by_segment(test: pd.DataFrame, predictions_a, predictions_b, by_user: pd.Series,
                      by_movie: pd.Series) -> dict:
    """RMSE of the challenger (``predictions_a``) and the champion (``predictions_b``) on the same ``test`` rows,
    per user segment and per movie segment.

    Predictions are arrays aligned with the rows of ``test`` (e.g. ``metrics.predictions_with_fallback``'s).
    ``by_user`` / ``by_movie``: :func:`user_segments` / :func:`movie_segments` of the training data; a test
    user they do not hold is cold, a test movie tail. Returns ``{"user": {segment: {"challenger", "champion",
    "rows"}}, "movie": {...}}`` with every segment present; a segment with no row has None scores.
    """
    truth = test["rating"].to_numpy(dtype=np.float64)
    a, b = (clip_ratings(p) for p in (predictions_a, predictions_b))
    for name, pred in (("predictions_a", a), ("predictions_b", b)):
        if pred.shape != truth.shape:
            raise ValueError(f"{name} has shape {pred.shape} but test has {len(truth)} rows")
        if not np.isfinite(pred).all():
            raise ValueError(f"{name} holds {int((~np.isfinite(pred)).sum())} non-finite predictions")
    out: dict = {}
    for dimension, labels, names in (("user", _segment_of(test["user_id"], by_user, "cold"), USER_SEGMENTS),
                                     ("movie", _segment_of(test["movie_id"], by_movie, "tail"), MOVIE_SEGMENTS)):
        out[dimension] = {}
        for segment in names:
            rows = labels == segment
            n = int(rows.sum())
            out[dimension][segment] = {
                "challenger": rmse(truth[rows], a[rows]) if n else None,
                "champion": rmse(truth[rows], b[rows]) if n else None,
                "rows": n,
            }
    return out


def ranking_by_segment(lists_a: Mapping, lists_b: Mapping, held_out: pd.DataFrame, by_user: pd.Series,
                       k: int = RANKING_K) -> dict:
    """NDCG@k of the challenger's (``lists_a``) and the champion's (``lists_b``) top-k lists ({user_id: [movie
    ids]}) on the same ``held_out`` ratings, per user segment.

    Each segment is ``metrics.ranking_metrics`` on the held-out rows of its users, so ``users`` counts those
    with a relevant held-out rating (the users averaged over), and a user without a list counts as zeros.
    A held-out user ``by_user`` does not hold is cold. Returns ``{"user": {segment: {"challenger",
    "champion", "users"}}}`` with every segment present; None scores where no user is averaged.
    """
    labels = _segment_of(held_out["user_id"], by_user, "cold")
    metric = f"ndcg_at_{k}"
    segments = {}
    for segment in USER_SEGMENTS:
        rows = held_out[labels == segment]
        a, b = ranking_metrics(lists_a, rows, k=k), ranking_metrics(lists_b, rows, k=k)
        segments[segment] = {"challenger": a[metric], "champion": b[metric], "users": a["users"]}
    return {"user": segments}


def regressions(by_segment: Mapping, tolerance: float, lower_is_better: bool,
                min_count: int = MIN_COUNT) -> list[dict]:
    """The segments of ``by_segment`` (:func:`rating_by_segment` or :func:`ranking_by_segment`) where the
    challenger is worse than the champion by more than ``tolerance``, and those too small to judge.

    Each entry: ``dimension`` ("user" | "movie"), ``segment``, ``challenger``, ``champion``, ``difference``
    (challenger minus champion, in the metric's units: positive is worse for RMSE, negative for NDCG; None
    without both scores), the count (``rows`` or ``users``), and ``verdict``: "regression", or "not judged"
    for a segment with fewer than ``min_count`` rows/users (or no score), whichever way it went. Segments the
    challenger wins, ties or loses by at most ``tolerance`` are not listed: a segment stands in the way of
    an automatic promotion iff its verdict is "regression".
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    found = []
    for dimension, segments in by_segment.items():
        for segment, score in segments.items():
            count_key = "rows" if "rows" in score else "users"
            challenger, champion, count = score["challenger"], score["champion"], score[count_key]
            scored = challenger is not None and champion is not None
            difference = challenger - champion if scored else None
            entry = {"dimension": dimension, "segment": segment, "challenger": challenger, "champion": champion,
                     "difference": difference, count_key: count}
            if count < min_count or not scored:
                found.append({**entry, "verdict": "not judged"})
            elif (difference if lower_is_better else -difference) > tolerance:
                found.append({**entry, "verdict": "regression"})
    return found
