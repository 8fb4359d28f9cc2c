"""Has the data moved since the champion was trained? Drift statistics between two ratings tables.

``reference`` is the champion's training data, ``current`` this run's validated ratings; both have the columns
``user_id``, ``movie_id``, ``rating`` and ``ts`` (seconds since the epoch), as in the validated ratings parquet.
Pure functions on pandas frames: no I/O, no Spark. :func:`drift_summary` gathers every statistic into one
JSON-able dict and names those above their threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = ("user_id", "movie_id", "rating", "ts")
RATING_VALUES = tuple(k / 2 for k in range(1, 11))  # the half-star scale 0.5 .. 5.0
EPSILON = 1e-4  # the share given to an empty bin, so that ln(a/e) stays finite
DEFAULT_BINS = 10  # deciles of the reference
DEFAULT_THRESHOLDS = {
    "rating_psi": 0.1,
    "activity_psi": 0.2,
    "popularity_psi": 0.2,
    "new_user_share": 0.5,
    "new_movie_share": 0.2,
}
# where each statistic that a threshold may name sits in drift_summary's dict
STATISTICS = {
    "rating_psi": ("rating_psi",),
    "activity_psi": ("activity", "psi"),
    "activity_ks": ("activity", "ks_statistic"),
    "popularity_psi": ("popularity", "psi"),
    "popularity_ks": ("popularity", "ks_statistic"),
    "new_user_share": ("new_users", "share"),
    "new_user_row_share": ("new_users", "row_share"),
    "new_movie_share": ("new_movies", "share"),
    "new_movie_row_share": ("new_movies", "row_share"),
    "newer_share": ("time_range", "newer_share"),
}


def psi(expected, actual, bins, *, categorical: bool = False) -> float:
    """Population stability index of the sample ``actual`` against the sample ``expected``.

    ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` where ``e_i`` and ``a_i`` are the shares of each sample in bin
    ``i``. A share of 0 is replaced by :data:`EPSILON` (1e-4), so a bin empty in one sample adds a large but
    finite term; bins empty in both add 0. Rules of thumb: under 0.1 stable, 0.1 to 0.25 moderate, above 0.25
    a major shift.

    ``bins`` are edges ``b_0 < b_1 < ... < b_n`` (bin ``i`` holds ``b_i < x <= b_{i+1}``; values beyond the outer
    edges count in the end bins), or with ``categorical=True`` the categories themselves, plus one implicit
    bin for every value that is none of them.
    """
    e, a = _shares(expected, bins, categorical), _shares(actual, bins, categorical)
    return psi_of_shares(e, a)


def psi_of_shares(expected_shares, actual_shares) -> float:
    """PSI of two share vectors over the same bins (see :func:`psi`); zero shares become :data:`EPSILON`."""
    e = np.maximum(np.asarray(expected_shares, dtype=float), EPSILON)
    a = np.maximum(np.asarray(actual_shares, dtype=float), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def _shares(values, bins, categorical: bool) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("psi: cannot take shares of an empty sample")
    bins = np.asarray(bins, dtype=float)
    if categorical:
        counts = np.array([np.count_nonzero(values == c) for c in bins] + [0])
        counts[-1] = values.size - counts[:-1].sum()  # the "none of them" bin
    else:
        if bins.size < 2 or np.any(np.diff(bins) <= 0):
            raise ValueError(f"psi: bin edges must be at least two increasing numbers, got {bins.tolist()}")
        index = np.searchsorted(bins[1:-1], values, side="left")  # right-closed bins, ends open
        counts = np.bincount(index, minlength=bins.size - 1)
    return counts / values.size


def rating_psi(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """PSI of the current rating values against the reference's, over the half stars 0.5 .. 5.0."""
    return psi(reference["rating"], current["rating"], RATING_VALUES, categorical=True)


def quantile_edges(reference_values, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin edges at the reference's ``1/n .. (n-1)/n`` quantiles, with open ends (-inf, +inf).

    Quantiles do not change under a log transform, so heavy-tailed counts need no rescaling; tied quantiles
    (many users with the same count) collapse into one edge, so there may be fewer than ``n_bins`` bins.
    """
    inner = np.quantile(np.asarray(reference_values, dtype=float), np.arange(1, n_bins) / n_bins)
    return np.concatenate([[-np.inf], np.unique(inner), [np.inf]])


def count_drift(reference_counts, current_counts, n_bins: int = DEFAULT_BINS) -> dict:
    """Compare two samples of counts: PSI on the reference's quantile bins and the two-sample KS test."""
    edges = quantile_edges(reference_counts, n_bins)
    ks = stats.ks_2samp(np.asarray(reference_counts), np.asarray(current_counts))
    return {
        "psi": psi(reference_counts, current_counts, edges),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "bins": int(edges.size - 1),
    }


def activity_drift(reference: pd.DataFrame, current: pd.DataFrame, n_bins: int = DEFAULT_BINS) -> dict:
    """Drift of per-user activity (ratings per user), see :func:`count_drift`."""
    return count_drift(reference.groupby("user_id").size(), current.groupby("user_id").size(), n_bins)


def popularity_drift(reference: pd.DataFrame, current: pd.DataFrame, n_bins: int = DEFAULT_BINS) -> dict:
    """Drift of per-movie popularity (ratings per movie), see :func:`count_drift`."""
    return count_drift(reference.groupby("movie_id").size(), current.groupby("movie_id").size(), n_bins)


def new_id_share(reference: pd.DataFrame, current: pd.DataFrame, column: str) -> dict:
    """Ids of ``column`` in ``current`` that ``reference`` lacks: how many, their share of the current ids
    (``share``) and the share of current rows that carry one (``row_share``)."""
    is_new = ~current[column].isin(reference[column].unique())
    ids = current[column].nunique()
    new_ids = current.loc[is_new, column].nunique()
    return {"count": int(new_ids), "share": new_ids / ids, "row_share": float(is_new.mean())}


def time_range(reference: pd.DataFrame, current: pd.DataFrame) -> dict:
    """First and last rating date (ISO, UTC) of each table and the share of current rows newer than the
    reference's last rating."""
    last = reference["ts"].max()
    return {
        "reference": {"min": _iso_date(reference["ts"].min()), "max": _iso_date(last)},
        "current": {"min": _iso_date(current["ts"].min()), "max": _iso_date(current["ts"].max())},
        "newer_share": float((current["ts"] > last).mean()),
    }


def _iso_date(ts) -> str:
    return datetime.fromtimestamp(int(ts), UTC).date().isoformat()


def exceeded(summary: dict, thresholds: dict) -> list[str]:
    """Names of the statistics in ``summary`` strictly above their threshold (a threshold of None is off)."""
    unknown = sorted(set(thresholds) - set(STATISTICS))
    if unknown:
        raise ValueError(f"drift thresholds name unknown statistics {unknown}; known: {sorted(STATISTICS)}")
    above = []
    for name, limit in thresholds.items():
        if limit is None:
            continue
        value = summary
        for key in STATISTICS[name]:
            value = value[key]
        if value > limit:
            above.append(name)
    return above


def drift_summary(reference: pd.DataFrame, current: pd.DataFrame, thresholds: dict | None = None,
                  n_bins: int = DEFAULT_BINS) -> dict:
    """Every drift statistic of ``current`` against ``reference`` as a JSON-able dict, with ``thresholds``
    (default :data:`DEFAULT_THRESHOLDS`; keys from :data:`STATISTICS`) and ``exceeded``, the names above them.

    Raises ValueError when either table is empty or lacks one of the columns.
    """
    _check(reference, "reference")
    _check(current, "current")
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    summary = {
        "rows": {"reference": int(len(reference)), "current": int(len(current))},
        "rating_psi": rating_psi(reference, current),
        "activity": activity_drift(reference, current, n_bins),
        "popularity": popularity_drift(reference, current, n_bins),
        "new_users": new_id_share(reference, current, "user_id"),
        "new_movies": new_id_share(reference, current, "movie_id"),
        "time_range": time_range(reference, current),
        "thresholds": thresholds,
    }
    summary["exceeded"] = exceeded(summary, thresholds)
    return summary


def _check(table: pd.DataFrame, name: str, columns: Sequence[str] = COLUMNS) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"drift: the {name} ratings table lacks the columns {missing}")
    if len(table) == 0:
        raise ValueError(f"drift: the {name} ratings table is empty (0 rows)")
