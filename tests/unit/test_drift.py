"""Drift statistics between two ratings tables, each pinned to a value computed by hand on tiny data."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.data.drift import (
    DEFAULT_THRESHOLDS,
    EPSILON,
    activity_drift,
    drift_summary,
    new_id_share,
    popularity_drift,
    psi,
    quantile_edges,
    rating_psi,
    time_range,
)

DAY = 86_400


def _ratings(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "ts"]).astype(
        {"user_id": "int64", "movie_id": "int64", "rating": "float64", "ts": "int64"})


def _generated(n_users=40, n_movies=60, first_user=1, seed=0) -> pd.DataFrame:
    """A small ratings table with uneven activity, popularity and half-star ratings."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(first_user, first_user + n_users):
        movies = rng.choice(n_movies, size=int(rng.integers(5, 30)), replace=False) + 1
        rows += [(user, int(m), float(rng.integers(1, 11)) / 2, 1_000_000_000 + int(rng.integers(0, 300 * DAY)))
                 for m in movies]
    return _ratings(rows)


def test_psi_of_two_two_bin_distributions():
    # shares e = (1/2, 1/2), a = (1/4, 3/4):
    # (1/4 - 1/2) ln(1/2) + (3/4 - 1/2) ln(3/2) = 1/4 (ln 2 + ln 3/2) = 1/4 ln 3 = 0.274653
    assert psi([1, 1, 2, 2], [1, 2, 2, 2], (1, 2), categorical=True) == pytest.approx(0.25 * math.log(3))
    assert psi([1, 1, 2, 2], [1, 1, 2, 2], (1, 2), categorical=True) == 0.0


def test_psi_bins_are_right_closed_and_the_end_bins_take_values_beyond_the_edges():
    # edges 0 | 10 | 20: expected 5, 15 -> (1/2, 1/2); actual -3, 5, 10 (10 <= 10: first bin), 25 -> (3/4, 1/4)
    # PSI = (3/4 - 1/2) ln(3/2) + (1/4 - 1/2) ln(1/2) = 1/4 ln 3
    assert psi([5, 15], [-3, 5, 10, 25], [0, 10, 20]) == pytest.approx(0.25 * math.log(3))


def test_an_empty_bin_gets_epsilon_instead_of_an_infinite_term():
    # e = (1, 0) -> (1, 1e-4); a = (1/2, 1/2):
    # (1/2 - 1) ln(1/2) + (1/2 - 1e-4) ln(1/2 / 1e-4) = 0.346574 + 0.4999 * 8.517193 = 4.604319
    assert EPSILON == 1e-4
    assert psi([1, 1], [1, 2], (1, 2), categorical=True) == pytest.approx(4.604319, abs=1e-6)


def test_values_outside_the_categories_count_in_their_own_bin():
    # categories (1, 2) plus "other": e = (1/2, 1/2, 0), a = (1/2, 0, 1/2) -> the 2 and "other" bins differ:
    # (1e-4 - 1/2) ln(1e-4 / (1/2)) + (1/2 - 1e-4) ln((1/2) / 1e-4) = 2 * 0.4999 * ln 5000 = 8.515490
    assert psi([1, 2], [1, 3], (1, 2), categorical=True) == pytest.approx(2 * 0.4999 * math.log(5000))


def test_psi_rejects_bad_edges_and_empty_samples():
    with pytest.raises(ValueError, match="increasing"):
        psi([1], [1], [3, 2])
    with pytest.raises(ValueError, match="empty sample"):
        psi([], [1], [0, 1])


def test_rating_psi_of_ratings_moved_up_one_star():
    reference = _ratings([(1, m, float(m), 0) for m in (1, 2, 3, 4)])
    shifted = reference.assign(rating=reference.rating + 1)
    # 1.0 loses its quarter, 5.0 gains one, 2.0 .. 4.0 unchanged; each changed bin adds
    # (1/4 - 1e-4) ln(1/4 / 1e-4) = 0.2499 * ln 2500 = 1.955229, so PSI = 3.910458
    assert rating_psi(reference, shifted) == pytest.approx(2 * 0.2499 * math.log(2500))
    assert rating_psi(reference, reference) == 0.0


def test_quantile_edges_collapse_ties_and_leave_the_ends_open():
    assert quantile_edges([1, 1, 1, 1, 5], n_bins=4).tolist() == [-math.inf, 1.0, math.inf]
    assert quantile_edges([1, 2, 3, 4], n_bins=2).tolist() == [-math.inf, 2.5, math.inf]


def test_activity_drift_by_psi_on_reference_quantiles_and_by_ks():
    # reference: users 1..4 rate 1, 2, 3, 4 movies; current: users rate 1, 1, 1, 4
    reference = _ratings([(u, m, 3.0, 0) for u in (1, 2, 3, 4) for m in range(u)])
    current = _ratings([(u, m, 3.0, 0) for u, n in ((1, 1), (2, 1), (3, 1), (4, 4)) for m in range(n)])
    out = activity_drift(reference, current, n_bins=2)
    # median 2.5 splits the reference (1/2, 1/2); current (3/4, 1/4) -> 1/4 ln 3
    assert out["psi"] == pytest.approx(0.25 * math.log(3))
    # ECDFs at 1: 1/4 vs 3/4, at 2: 1/2 vs 3/4, at 3: 3/4 vs 3/4 -> largest gap 1/2
    assert out["ks_statistic"] == pytest.approx(0.5)
    assert 0 < out["ks_pvalue"] <= 1 and out["bins"] == 2
    same = activity_drift(reference, reference, n_bins=2)
    assert (same["psi"], same["ks_statistic"], same["ks_pvalue"]) == (0.0, 0.0, 1.0)


def test_popularity_drift_counts_ratings_per_movie():
    # reference: movies 1..4 rated by 1, 2, 3, 4 users; current: every movie rated by 4 users
    reference = _ratings([(u, m, 3.0, 0) for m in (1, 2, 3, 4) for u in range(m)])
    current = _ratings([(u, m, 3.0, 0) for m in (1, 2, 3, 4) for u in range(4)])
    out = popularity_drift(reference, current, n_bins=2)
    # reference shares (1/2, 1/2) around 2.5; current (0, 1) -> (1e-4, 1):
    # (1e-4 - 1/2) ln(1e-4 / (1/2)) + (1 - 1/2) ln(1 / (1/2)) = 0.4999 ln 5000 + 0.5 ln 2 = 4.604319
    assert out["psi"] == pytest.approx(0.4999 * math.log(5000) + 0.5 * math.log(2))
    assert out["ks_statistic"] == pytest.approx(0.75)  # ECDFs at 3: 3/4 vs 0


def test_new_users_and_movies_by_ids_and_by_rows():
    reference = _ratings([(1, 10, 3.0, 0), (2, 20, 3.0, 0)])
    # users 3 and 4 are new: 2 of 4 ids, 2 of 6 rows; movie 30 is new: 1 of 3 ids, 3 of 6 rows
    current = _ratings([(1, 10, 3.0, 0), (1, 20, 3.0, 0), (1, 30, 3.0, 0),
                        (2, 10, 3.0, 0), (3, 30, 3.0, 0), (4, 30, 3.0, 0)])
    assert new_id_share(reference, current, "user_id") == {"count": 2, "share": 0.5, "row_share": pytest.approx(1 / 3)}
    assert new_id_share(reference, current, "movie_id") == {"count": 1, "share": pytest.approx(1 / 3),
                                                            "row_share": 0.5}


def test_time_range_in_iso_dates_and_the_share_of_newer_rows():
    reference = _ratings([(1, 1, 3.0, 0), (1, 2, 3.0, DAY)])
    current = _ratings([(1, 1, 3.0, DAY), (1, 2, 3.0, 2 * DAY), (1, 3, 3.0, 3 * DAY)])
    assert time_range(reference, current) == {
        "reference": {"min": "1970-01-01", "max": "1970-01-02"},
        "current": {"min": "1970-01-02", "max": "1970-01-04"},
        "newer_share": pytest.approx(2 / 3),  # the rows of days 3 and 4; day 2 equals the reference's last
    }


def test_identical_tables_drift_nowhere():
    ratings = _generated()
    out = drift_summary(ratings, ratings.copy())
    assert out["exceeded"] == []
    assert out["rating_psi"] == 0.0 and out["activity"]["psi"] == 0.0 and out["popularity"]["psi"] == 0.0
    assert out["activity"]["ks_statistic"] == 0.0 and out["new_users"]["share"] == 0.0
    assert out["new_movies"]["row_share"] == 0.0 and out["time_range"]["newer_share"] == 0.0
    assert out["thresholds"] == DEFAULT_THRESHOLDS and out["rows"] == {"reference": len(ratings),
                                                                     "current": len(ratings)}
    assert json.loads(json.dumps(out)) == out  # plain JSON types only


def test_ratings_moved_up_one_star_exceed_the_rating_threshold_only():
    reference = _generated()
    current = reference.assign(rating=(reference.rating + 1).clip(upper=5.0))
    out = drift_summary(reference, current)
    assert out["rating_psi"] > 1.0
    assert out["exceeded"] == ["rating_psi"]


def test_many_new_users_exceed_the_new_user_threshold():
    reference = _generated(n_users=20)
    newcomers = _generated(n_users=30, first_user=1000, seed=1)  # 30 of 50 users new: share 0.6 > 0.5
    out = drift_summary(reference, pd.concat([reference, newcomers], ignore_index=True))
    assert out["new_users"]["share"] == pytest.approx(0.6)
    assert "new_user_share" in out["exceeded"] and "rating_psi" not in out["exceeded"]


def test_thresholds_are_an_argument_none_turns_one_off_and_unknown_names_are_refused():
    reference = _generated()
    current = reference.assign(rating=(reference.rating + 1).clip(upper=5.0))
    assert drift_summary(reference, current, {"rating_psi": None})["exceeded"] == []
    assert drift_summary(reference, current, {"rating_psi": 10.0, "activity_ks": -1})["exceeded"] == ["activity_ks"]
    with pytest.raises(ValueError, match="unknown statistics \\['rating_drift'\\]"):
        drift_summary(reference, current, {"rating_drift": 0.1})


@pytest.mark.parametrize("empty", ["reference", "current"])
def test_an_empty_table_is_named_in_the_error(empty):
    tables = {"reference": _generated(), "current": _generated()}
    tables[empty] = tables[empty].iloc[:0]
    with pytest.raises(ValueError, match=f"the {empty} ratings table is empty"):
        drift_summary(tables["reference"], tables["current"])


def test_a_table_without_a_column_is_named_in_the_error():
    with pytest.raises(ValueError, match="the current ratings table lacks the columns \\['ts'\\]"):
        drift_summary(_generated(), _generated().drop(columns="ts"))
