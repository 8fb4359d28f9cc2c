"""Challenger against champion per segment: the segment rules at their boundaries, per-segment RMSE and
NDCG@10 against hand-computed values, and which segments count as regressions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.models.metrics import rmse
from pipeline.models.segments import (
    movie_segments,
    ranking_by_segment,
    rating_by_segment,
    regressions,
    user_segments,
)

LOG2_3 = math.log2(3)


def _ratings(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"]).astype(
        {"user_id": "int64", "movie_id": "int64", "rating": "float64"})


def _train(user_counts: dict | None = None, movie_counts: dict | None = None) -> pd.DataFrame:
    """Ratings where each user (or movie) of the dict has exactly that many rows."""
    rows = [(u, 1000 + i, 3.0) for u, n in (user_counts or {}).items() for i in range(n)]
    rows += [(1000 + i, m, 3.0) for m, n in (movie_counts or {}).items() for i in range(n)]
    return _ratings(rows)


def test_users_with_at_most_five_training_ratings_are_cold_and_the_rest_split_at_their_median():
    # non-cold counts 6, 7, 8, 10: median 7.5, so 6 and 7 are light, 8 and 10 heavy
    segments = user_segments(_train({1: 1, 2: 5, 3: 6, 4: 7, 5: 8, 6: 10}))
    assert segments.to_dict() == {1: "cold", 2: "cold", 3: "light", 4: "light", 5: "heavy", 6: "heavy"}
    assert segments.index.name == "user_id"


def test_a_user_at_the_median_is_light_and_equal_counts_are_all_light():
    # non-cold counts 6, 7, 8: median 7, which is light (heavy is strictly above)
    assert user_segments(_train({1: 6, 2: 7, 3: 8})).to_dict() == {1: "light", 2: "light", 3: "heavy"}
    assert user_segments(_train({1: 9, 2: 9})).to_dict() == {1: "light", 2: "light"}
    assert user_segments(_train({1: 2, 2: 5})).to_dict() == {1: "cold", 2: "cold"}


def test_the_cold_limit_is_an_argument():
    # cold_max=6: user 3 (6 ratings) turns cold; non-cold 7, 8, 10 have median 8
    segments = user_segments(_train({2: 5, 3: 6, 4: 7, 5: 8, 6: 10}), cold_max=6)
    assert segments.to_dict() == {2: "cold", 3: "cold", 4: "light", 5: "light", 6: "heavy"}
    with pytest.raises(ValueError, match="cold_max"):
        user_segments(_train({1: 1}), cold_max=-1)


# ten movies; the top 20% is two movies (counts 9 and 7)
MOVIE_COUNTS = {1: 9, 2: 7, 3: 5, 4: 5, 5: 3, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1}


def test_the_head_is_the_top_share_of_movies_by_training_count():
    segments = movie_segments(_train(movie_counts=MOVIE_COUNTS))
    assert sorted(segments[segments == "head"].index) == [1, 2]
    assert (segments.drop([1, 2]) == "tail").all() and segments.index.name == "movie_id"
    assert sorted(segments[movie_segments(_train(movie_counts=MOVIE_COUNTS), 0.1) == "head"].index) == [1]


def test_the_head_rounds_up_to_a_whole_movie_and_takes_every_movie_tied_at_the_boundary():
    # 25% of 10 movies is 2.5: rounded up to 3, the third movie has count 5, and so has the fourth: both head
    for share in (0.25, 0.3):
        segments = movie_segments(_train(movie_counts=MOVIE_COUNTS), head_share=share)
        assert sorted(segments[segments == "head"].index) == [1, 2, 3, 4]
    # 7% of 100 is 7 (7.000000000000001 in floats): exactly seven movies, not eight
    segments = movie_segments(_train(movie_counts={m: 200 - m for m in range(1, 101)}), head_share=0.07)
    assert sorted(segments[segments == "head"].index) == list(range(1, 8))
    with pytest.raises(ValueError, match="head_share"):
        movie_segments(_train(movie_counts=MOVIE_COUNTS), head_share=0.0)


# users 1 cold, 2 light, 3 heavy, 9 not in training (cold); movies 10 head, 20 tail, 99 not in training (tail)
BY_USER = pd.Series({1: "cold", 2: "light", 3: "heavy"})
BY_MOVIE = pd.Series({10: "head", 20: "tail"})
TEST = _ratings([(1, 10, 4.0), (9, 99, 2.0), (2, 10, 5.0), (2, 20, 3.0), (3, 20, 1.0)])
PRED_A = np.array([3.0, 2.0, 4.5, 3.5, 1.0])  # errors 1, 0, .5, .5, 0
PRED_B = np.array([4.0, 4.0, 4.0, 3.0, 2.0])  # errors 0, 2, 1, 0, 1


def test_rmse_per_segment_is_the_rmse_of_that_segments_rows():
    out = rating_by_segment(TEST, PRED_A, PRED_B, BY_USER, BY_MOVIE)
    expected = {
        "user": {"cold": (math.sqrt(1 / 2), math.sqrt(4 / 2), 2),  # rows 0 and 1 (user 9 is not in training)
                 "light": (0.5, math.sqrt(1 / 2), 2),
                 "heavy": (0.0, 1.0, 1)},
        "movie": {"head": (math.sqrt(1.25 / 2), math.sqrt(1 / 2), 2),
                  "tail": (math.sqrt(0.25 / 3), math.sqrt(5 / 3), 3)},  # rows 1, 3, 4 (movie 99 is tail)
    }
    assert {d: list(s) for d, s in out.items()} == {"user": ["cold", "light", "heavy"], "movie": ["head", "tail"]}
    for dimension, segments in expected.items():
        for segment, (a, b, rows) in segments.items():
            assert out[dimension][segment] == {"challenger": pytest.approx(a), "champion": pytest.approx(b),
                                               "rows": rows}
    mask = TEST["movie_id"].isin([20, 99]).to_numpy()
    assert out["movie"]["tail"]["challenger"] == pytest.approx(rmse(TEST["rating"][mask], PRED_A[mask]))


def test_rating_segments_without_rows_have_no_score_and_predictions_are_clipped_and_checked():
    out = rating_by_segment(TEST.iloc[:2], [3.0, 2.0], [9.0, 2.0], BY_USER, BY_MOVIE)  # 9.0 is clipped to 5.0
    assert out["user"]["light"] == {"challenger": None, "champion": None, "rows": 0}
    assert out["user"]["cold"]["champion"] == pytest.approx(math.sqrt(1 / 2))
    with pytest.raises(ValueError, match="predictions_b has shape"):
        rating_by_segment(TEST, PRED_A, PRED_B[:4], BY_USER, BY_MOVIE)
    with pytest.raises(ValueError, match="predictions_a holds 1 non-finite"):
        rating_by_segment(TEST, np.r_[PRED_A[:4], np.nan], PRED_B, BY_USER, BY_MOVIE)


def _rows_by_segment(cold_rows: int):
    """Test rows of every user segment, half on a head movie and half on a tail one (all ratings 3.0).

    Errors: cold challenger .5 / champion .2, light 0 / .5, heavy .1 / .6 (40 rows each for light and heavy).
    """
    users = [1] * cold_rows + [2] * 40 + [3] * 40
    test = _ratings([(u, 10 if i % 2 else 20, 3.0) for i, u in enumerate(users)])
    error = {1: (0.5, 0.2), 2: (0.0, 0.5), 3: (0.1, 0.6)}
    a = np.array([3.0 + error[u][0] for u in users])
    b = np.array([3.0 + error[u][1] for u in users])
    return test, a, b


def test_a_challenger_that_wins_on_average_but_loses_the_cold_users_by_more_than_the_tolerance_is_flagged():
    test, a, b = _rows_by_segment(cold_rows=20)
    assert rmse(test["rating"], a) < rmse(test["rating"], b)  # sqrt(5.4 / 100) against sqrt(25.2 / 100)
    by_segment = rating_by_segment(test, a, b, BY_USER, BY_MOVIE)
    found = regressions(by_segment, tolerance=0.1, lower_is_better=True)
    assert found == [{"dimension": "user", "segment": "cold", "challenger": pytest.approx(0.5),
                      "champion": pytest.approx(0.2), "difference": pytest.approx(0.3), "rows": 20,
                      "verdict": "regression"}]


def test_a_segment_lost_by_less_than_the_tolerance_is_not_a_regression():
    test, a, b = _rows_by_segment(cold_rows=20)
    assert regressions(rating_by_segment(test, a, b, BY_USER, BY_MOVIE), 0.35, lower_is_better=True) == []


def test_a_segment_with_too_few_rows_is_not_judged_rather_than_a_regression():
    test, a, b = _rows_by_segment(cold_rows=3)
    by_segment = rating_by_segment(test, a, b, BY_USER, BY_MOVIE)
    found = regressions(by_segment, tolerance=0.1, lower_is_better=True)
    assert [(f["segment"], f["verdict"], f["rows"]) for f in found] == [("cold", "not judged", 3)]
    assert found[0]["difference"] == pytest.approx(0.3)
    assert regressions(by_segment, 0.1, True, min_count=3)[0]["verdict"] == "regression"


# held-out ratings: user 1 likes 100, user 2 likes 200 and 201, user 3 likes nothing (heavy: no user averaged),
# user 7 (not in training: cold) likes 300
HELD_OUT = _ratings([(1, 100, 4.0), (2, 200, 5.0), (2, 201, 4.5), (2, 202, 2.0), (3, 300, 2.0), (7, 300, 4.0)])
LISTS_A = {1: [100, 5], 2: [5, 200], 3: [300], 7: []}
LISTS_B = {1: [5, 100], 2: [200, 201], 3: [1], 7: [300]}


def test_ndcg_per_user_segment_is_the_projects_ndcg_on_that_segments_users():
    out = ranking_by_segment(LISTS_A, LISTS_B, HELD_OUT, BY_USER)
    cold, light, heavy = out["user"]["cold"], out["user"]["light"], out["user"]["heavy"]
    # cold: users 1 and 7; A finds 100 first for user 1 and nothing for 7, B finds 100 second and 300 first
    assert cold == {"challenger": pytest.approx(0.5), "champion": pytest.approx((1 / LOG2_3 + 1) / 2), "users": 2}
    # light: user 2; A has 200 at rank 2 of an ideal two hits, B both hits first
    assert light == {"challenger": pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3)), "champion": pytest.approx(1.0),
                     "users": 1}
    assert heavy == {"challenger": None, "champion": None, "users": 0}


def test_ranking_regressions_go_the_other_way_and_a_segment_without_users_is_not_judged():
    out = ranking_by_segment(LISTS_A, LISTS_B, HELD_OUT, BY_USER)
    found = regressions(out, tolerance=0.1, lower_is_better=False, min_count=1)
    assert [(f["segment"], f["verdict"], f["users"]) for f in found] == [
        ("cold", "regression", 2), ("light", "regression", 1), ("heavy", "not judged", 0)]
    assert found[0]["difference"] == pytest.approx(0.5 - (1 / LOG2_3 + 1) / 2)
    swapped = regressions(ranking_by_segment(LISTS_B, LISTS_A, HELD_OUT, BY_USER), 0.1, False, min_count=1)
    assert [f["segment"] for f in swapped] == ["heavy"]
    with pytest.raises(ValueError, match="tolerance"):
        regressions(out, tolerance=-0.1, lower_is_better=False)
