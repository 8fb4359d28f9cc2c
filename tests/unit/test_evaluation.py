"""The shared evaluation: metrics against hand-computed values, cold rows and unscorable rows take the baseline."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, DataValidationError
from pipeline.models.baseline import BiasBaseline
from pipeline.models.metrics import (
    clip_ratings,
    mae,
    ndcg_at_k,
    precision_at_k,
    predictions_with_fallback,
    ranking_metrics,
    rating_metrics,
    recall_at_k,
    rmse,
)

LOG2_3 = math.log2(3)


def _ratings(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"])


def test_rmse_and_mae_against_hand_computed_values():
    # errors 0, 0, 2: rmse = sqrt((0 + 0 + 4) / 3), mae = (0 + 0 + 2) / 3
    assert rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))
    assert mae([1, 2, 3], [1, 2, 5]) == pytest.approx(2 / 3)
    # errors -1, +0.5: rmse = sqrt((1 + 0.25) / 2), mae = (1 + 0.5) / 2
    assert rmse([4.0, 3.0], [3.0, 3.5]) == pytest.approx(math.sqrt(1.25 / 2))
    assert mae([4.0, 3.0], [3.0, 3.5]) == pytest.approx(0.75)


def test_error_metrics_refuse_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="shape"):
        rmse([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="zero ratings"):
        mae([], [])


def test_clip_ratings_bounds_predictions_to_the_rating_scale():
    assert clip_ratings([-1.0, 0.5, 3.2, 5.0, 7.5]).tolist() == [0.5, 0.5, 3.2, 5.0, 5.0]
    assert clip_ratings([0.0, 6.0], lo=1.0, hi=5.0).tolist() == [1.0, 5.0]


# Five recommendations; the relevant items 20 and 50 sit at ranks 2 and 5, and 99 was not recommended.
RECOMMENDED = [10, 20, 30, 40, 50]
RELEVANT = {20, 50, 99}


def test_precision_at_k_divides_hits_by_k():
    assert precision_at_k(RECOMMENDED, RELEVANT, 5) == pytest.approx(2 / 5)  # hits 20, 50
    assert precision_at_k(RECOMMENDED, RELEVANT, 3) == pytest.approx(1 / 3)  # hit 20 in [10, 20, 30]
    assert precision_at_k(RECOMMENDED, RELEVANT, 10) == pytest.approx(2 / 10)  # a short list is not rewarded
    assert precision_at_k([], RELEVANT, 10) == 0.0


def test_recall_at_k_divides_hits_by_the_relevant_count():
    assert recall_at_k(RECOMMENDED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert recall_at_k(RECOMMENDED, RELEVANT, 3) == pytest.approx(1 / 3)
    assert recall_at_k(RECOMMENDED, set(), 5) == 0.0


def test_ndcg_at_k_uses_a_log2_discount_and_the_ideal_over_min_k_relevant():
    # DCG@5 = 1/log2(2+1) + 1/log2(5+1); ideal holds min(5, 3) = 3 hits: 1 + 1/log2(3) + 1/log2(4)
    expected = (1 / LOG2_3 + 1 / math.log2(6)) / (1 + 1 / LOG2_3 + 0.5)
    assert ndcg_at_k(RECOMMENDED, RELEVANT, 5) == pytest.approx(expected)
    # with two relevant items the ideal is min(5, 2) = 2 hits: 1 + 1/log2(3)
    assert ndcg_at_k(RECOMMENDED, {20, 50}, 5) == pytest.approx((1 / LOG2_3 + 1 / math.log2(6)) / (1 + 1 / LOG2_3))
    # k = 1: nothing relevant at rank 1 -> 0; a perfect list -> 1
    assert ndcg_at_k(RECOMMENDED, RELEVANT, 1) == 0.0
    assert ndcg_at_k([20, 50, 99], RELEVANT, 3) == pytest.approx(1.0)
    assert ndcg_at_k(RECOMMENDED, set(), 5) == 0.0


@pytest.fixture
def ranked_test():
    # user 1 likes {10, 20}; user 2 likes {40}; user 3 likes nothing (2.0 < 4.0); user 4 likes {60} at exactly 4.0
    test = _ratings([(1, 10, 5.0), (1, 20, 4.0), (1, 30, 3.5), (2, 40, 4.5), (3, 50, 2.0), (4, 60, 4.0)])
    top_k = {1: [10, 30], 2: [70, 40], 3: [50, 80]}  # user 4 gets no list
    return top_k, test


def test_ranking_metrics_average_over_users_with_a_relevant_test_rating(ranked_test):
    top_k, test = ranked_test
    out = ranking_metrics(top_k, test, k=2)
    # users 1, 2, 4 count (user 3 has nothing relevant); user 4 has no list, so scores 0 everywhere
    # precision@2: user 1 = 1/2, user 2 = 1/2, user 4 = 0 -> (1/2 + 1/2 + 0) / 3
    assert out["precision_at_2"] == pytest.approx(1 / 3)
    # recall@2: user 1 = 1/2, user 2 = 1/1, user 4 = 0 -> 1.5 / 3
    assert out["recall_at_2"] == pytest.approx(0.5)
    # ndcg@2: user 1 = 1 / (1 + 1/log2 3) (hit at rank 1, ideal 2 hits); user 2 = (1/log2 3) / 1; user 4 = 0
    assert out["ndcg_at_2"] == pytest.approx((1 / (1 + 1 / LOG2_3) + 1 / LOG2_3) / 3)
    assert out["users"] == 3


def test_ranking_metrics_keys_are_the_report_names_and_threshold_is_inclusive(ranked_test):
    top_k, test = ranked_test
    out = ranking_metrics(top_k, test)
    assert set(out) == {"precision_at_10", "recall_at_10", "ndcg_at_10", "map_at_10", "users"}
    # k = 10: precision is hits / 10 -> user 1: 1/10, user 2: 1/10, user 4: 0
    assert out["precision_at_10"] == pytest.approx(0.2 / 3)
    # a stricter threshold leaves users 1 (movie 10) and 2 (movie 40): user 4's 4.0 no longer counts
    assert ranking_metrics(top_k, test, threshold=4.5)["users"] == 2


def test_ranking_metrics_with_no_relevant_rating_report_none(ranked_test):
    top_k, _ = ranked_test
    out = ranking_metrics(top_k, _ratings([(1, 10, 1.0)]))
    assert out == {"precision_at_10": None, "recall_at_10": None, "ndcg_at_10": None, "map_at_10": None, "users": 0}
    with pytest.raises(ConfigError, match="positive"):
        ranking_metrics(top_k, _ratings([(1, 10, 5.0)]), k=0)


# Train for the hand-computed BiasBaseline(damping_user=1, damping_item=2) (see test_baseline.py):
# mu = 3.5, b_10 = 0.5, b_20 = -0.5, b_30 = -1/6, b_u1 = -1/3, b_u2 = 2/9.
TRAIN = _ratings([(1, 10, 4.0), (1, 20, 2.0), (2, 10, 5.0), (2, 30, 3.0)])
# warm (1, 30); warm (2, 20) that the model cannot score; cold user 99; cold movie 999; both cold
TEST = _ratings([(1, 30, 3.0), (2, 20, 4.0), (99, 10, 5.0), (1, 999, 3.0), (99, 999, 4.0)])


@pytest.fixture
def fallback():
    return BiasBaseline(damping_user=1, damping_item=2).fit(TRAIN)


def _model_scoring_only(scores: dict, calls: list):
    def predict(user_ids, movie_ids):
        pairs = list(zip(np.asarray(user_ids).tolist(), np.asarray(movie_ids).tolist()))
        calls.extend(pairs)
        return np.array([scores.get(pair, np.nan) for pair in pairs])

    return predict


def test_cold_users_and_movies_get_exactly_the_baseline_prediction(fallback):
    calls = []
    predict = _model_scoring_only({(1, 30): 6.0}, calls)  # (2, 20) -> NaN
    pred, cold = predictions_with_fallback(TEST, predict, fallback, TRAIN)
    assert calls == [(1, 30), (2, 20)]  # the model is only asked about warm rows
    assert cold.tolist() == [False, False, True, True, True]
    # (1, 30): the model's 6.0 clipped to 5.0; (2, 20): NaN -> fallback 3.5 + 2/9 - 0.5
    # (99, 10): 3.5 + 0.5; (1, 999): 3.5 - 1/3; (99, 999): 3.5
    assert pred == pytest.approx([5.0, 3.5 + 2 / 9 - 0.5, 4.0, 3.5 - 1 / 3, 3.5])
    assert pred[2:] == pytest.approx(fallback.predict(TEST["user_id"][2:], TEST["movie_id"][2:]))


def test_rating_metrics_cover_every_test_row_and_report_the_cold_ones(fallback):
    out = rating_metrics(TEST, _model_scoring_only({(1, 30): 6.0}, []), fallback, TRAIN)
    # errors: 5 - 3 = 2; (29/9) - 4 = -7/9; 4 - 5 = -1; 19/6 - 3 = 1/6; 3.5 - 4 = -0.5
    squares = [4, 49 / 81, 1, 1 / 36, 0.25]
    assert out == {
        "test_rmse": pytest.approx(math.sqrt(sum(squares) / 5)),
        "test_mae": pytest.approx((2 + 7 / 9 + 1 + 1 / 6 + 0.5) / 5),
        "test_rows": 5,
        "cold_test_rows": 3,
        "cold_test_rmse": pytest.approx(math.sqrt((1 + 1 / 36 + 0.25) / 3)),
    }


def test_rating_metrics_without_cold_rows_report_none_for_their_rmse(fallback):
    warm = TEST.iloc[:2]
    # a model that scores everything 3.0: errors 0 and -1
    out = rating_metrics(warm, lambda u, m: np.full(len(u), 3.0), fallback, TRAIN)
    assert out["cold_test_rows"] == 0 and out["cold_test_rmse"] is None
    assert out["test_rmse"] == pytest.approx(math.sqrt(1 / 2))


def test_rating_metrics_refuse_an_empty_test_split_or_a_misshapen_prediction(fallback):
    with pytest.raises(DataValidationError, match="no rows"):
        rating_metrics(TEST.iloc[:0], lambda u, m: np.zeros(len(u)), fallback, TRAIN)
    with pytest.raises(ValueError, match="shape"):
        rating_metrics(TEST, lambda u, m: np.zeros(1), fallback, TRAIN)


def test_the_baseline_scored_through_the_evaluation_matches_its_own_predictions(fallback):
    # the bias baseline as "the model": cold rows and warm rows alike give fallback.predict
    out = rating_metrics(TEST, fallback.predict, fallback, TRAIN)
    direct = fallback.predict(TEST["user_id"], TEST["movie_id"])
    assert out["test_rmse"] == pytest.approx(rmse(TEST["rating"], direct))


def test_average_precision_at_k_by_hand():
    from pipeline.models.metrics import average_precision_at_k

    # hits at ranks 1 and 3 of [a, b, c]; relevant {a, c, z}: (1/1 + 2/3) / min(3, 3)
    assert average_precision_at_k(["a", "b", "c"], {"a", "c", "z"}, 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k(["b", "a"], {"a"}, 2) == pytest.approx(0.5)
    assert average_precision_at_k(["b"], set(), 2) == 0.0
