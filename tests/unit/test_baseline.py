"""Baselines: global mean, the damped bias baseline (hand-computed and on planted biases), popularity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, DataValidationError
from pipeline.models.baseline import BiasBaseline, GlobalMean, fit_best_damping
from pipeline.models.metrics import rmse
from pipeline.models.popularity import popularity_ranking, top_k_popular


def _ratings(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"])


TRAIN = _ratings([(1, 10, 4.0), (1, 20, 2.0), (2, 10, 5.0), (2, 30, 3.0)])


def test_global_mean_predicts_the_mean_training_rating_for_everyone():
    model = GlobalMean().fit(TRAIN)
    assert model.mu_ == pytest.approx(3.5)  # (4 + 2 + 5 + 3) / 4
    assert model.predict([1, 99], [30, 999]).tolist() == [3.5, 3.5]


def test_bias_baseline_matches_hand_computed_biases():
    model = BiasBaseline(damping_user=1, damping_item=2).fit(TRAIN)
    # mu = 14 / 4 = 3.5
    assert model.mu_ == pytest.approx(3.5)
    # b_i = sum(r - mu) / (n_i + 2): movie 10: (0.5 + 1.5) / 4 = 0.5; 20: -1.5 / 3 = -0.5; 30: -0.5 / 3 = -1/6
    assert model.item_bias_.to_dict() == pytest.approx({10: 0.5, 20: -0.5, 30: -1 / 6})
    # b_u = sum(r - mu - b_i) / (n_u + 1): user 1: ((4-3.5-0.5) + (2-3.5+0.5)) / 3 = -1/3
    #                                      user 2: ((5-3.5-0.5) + (3-3.5+1/6)) / 3 = (2/3) / 3 = 2/9
    assert model.user_bias_.to_dict() == pytest.approx({1: -1 / 3, 2: 2 / 9})
    # (1, 30): 3.5 - 1/3 - 1/6 = 3.0; (2, 20): 3.5 + 2/9 - 0.5
    assert model.predict([1, 2], [30, 20]) == pytest.approx([3.0, 3.5 + 2 / 9 - 0.5])


def test_bias_baseline_gives_unseen_users_and_movies_a_zero_bias():
    model = BiasBaseline(damping_user=1, damping_item=2).fit(TRAIN)
    # (99, 10): mu + b_10; (1, 999): mu + b_u1; (99, 999): mu
    assert model.predict([99, 1, 99], [10, 999, 999]) == pytest.approx([4.0, 3.5 - 1 / 3, 3.5])
    assert model.known_users([1, 99, 2]).tolist() == [True, False, True]
    assert model.known_movies([999, 30]).tolist() == [False, True]


def test_bias_baseline_clips_predictions_to_the_rating_scale():
    train = _ratings([(1, 10, 5.0), (2, 10, 3.0), (2, 20, 1.0), (3, 20, 1.0), (3, 30, 5.0)])
    model = BiasBaseline(damping_user=0, damping_item=0).fit(train)
    # mu = 15/5 = 3; b_10 = (2 + 0)/2 = 1, b_20 = (-2 - 2)/2 = -2, b_30 = 2; b_u1 = 5 - 3 - 1 = 1
    # (1, 30): 3 + 1 + 2 = 6 -> 5.0; (1, 20): 3 + 1 - 2 = 2.0 (inside the default scale)
    assert model.mu_ + model.user_bias_[1] + model.item_bias_[30] == pytest.approx(6.0)
    assert model.predict([1, 1], [30, 20]) == pytest.approx([5.0, 2.0])
    bounded = BiasBaseline(0, 0, min_rating=2.5, max_rating=5.5).fit(train)
    assert bounded.predict([1, 1], [30, 20]) == pytest.approx([5.5, 2.5])


def test_baselines_refuse_bad_dampings_and_empty_training_data():
    with pytest.raises(ConfigError, match="damping_item"):
        BiasBaseline(damping_item=-1)
    with pytest.raises(DataValidationError, match="no rows"):
        BiasBaseline().fit(TRAIN.iloc[:0])
    with pytest.raises(DataValidationError, match="no rows"):
        GlobalMean().fit(TRAIN.iloc[:0])


def _planted(seed=0, n_users=200, n_movies=100, observed=0.2, noise=0.3) -> pd.DataFrame:
    """Ratings = 3.5 + user bias + movie bias + noise on a random 20% of the user x movie grid."""
    rng = np.random.default_rng(seed)
    b_u = rng.normal(0, 0.5, n_users)
    b_i = rng.normal(0, 0.5, n_movies)
    users, movies = np.nonzero(rng.random((n_users, n_movies)) < observed)
    rating = 3.5 + b_u[users] + b_i[movies] + rng.normal(0, noise, len(users))
    frame = pd.DataFrame({"user_id": users + 1, "movie_id": movies + 1000, "rating": np.clip(rating, 0.5, 5.0)})
    frame.attrs["b_u"], frame.attrs["b_i"] = b_u, b_i
    return frame


def _split(frame: pd.DataFrame, seed=1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    part = np.random.default_rng(seed).choice(3, size=len(frame), p=[0.8, 0.1, 0.1])
    return frame[part == 0], frame[part == 1], frame[part == 2]


def test_bias_baseline_beats_global_mean_on_planted_biases():
    ratings = _planted()
    train, _, test = _split(ratings)
    truth = test["rating"]
    global_rmse = rmse(truth, GlobalMean().fit(train).predict(test["user_id"], test["movie_id"]))
    model = BiasBaseline().fit(train)
    bias_rmse = rmse(truth, model.predict(test["user_id"], test["movie_id"]))
    # planted spread: sqrt(0.5^2 + 0.5^2 + 0.3^2) ~ 0.77 around the mean; the biases leave about the noise
    assert global_rmse > 0.65
    assert bias_rmse < 0.45
    # and it recovers the planted biases (up to the shift absorbed by mu)
    assert np.corrcoef(model.item_bias_.to_numpy(), ratings.attrs["b_i"][model.item_bias_.index - 1000])[0, 1] > 0.9
    assert np.corrcoef(model.user_bias_.to_numpy(), ratings.attrs["b_u"][model.user_bias_.index - 1])[0, 1] > 0.9


def test_fit_best_damping_picks_the_lowest_validation_rmse():
    train, validation, _ = _split(_planted(seed=2))
    grid = [(0, 0), (10, 25), (1000, 1000)]
    model, results = fit_best_damping(train, validation, grid)
    assert [(r["damping_user"], r["damping_item"]) for r in results] == [(0, 0), (10, 25), (1000, 1000)]
    best = min(results, key=lambda r: r["validation_rmse"])
    assert (model.damping_user, model.damping_item) == (best["damping_user"], best["damping_item"])
    # each result is the validation RMSE of a model fitted with that damping alone
    refit = BiasBaseline(10, 25).fit(train)
    assert results[1]["validation_rmse"] == pytest.approx(
        rmse(validation["rating"], refit.predict(validation["user_id"], validation["movie_id"])))
    # damping 1000 shrinks every bias to ~0: close to the global mean, clearly worse
    assert results[2]["validation_rmse"] > best["validation_rmse"] + 0.1
    with pytest.raises(ConfigError, match="grid is empty"):
        fit_best_damping(train, validation, [])


# movie 30: 3 ratings; movies 10 and 20: 2 each (tie -> 10 first); movie 40: 1
POPULARITY_TRAIN = _ratings([(1, 30, 4.0), (2, 30, 3.0), (3, 30, 5.0), (1, 20, 2.0), (2, 20, 4.0),
                             (2, 10, 3.0), (3, 10, 1.0), (3, 40, 4.0)])


def test_popularity_ranking_orders_by_rating_count_then_movie_id():
    assert popularity_ranking(POPULARITY_TRAIN).tolist() == [30, 10, 20, 40]
    assert popularity_ranking(POPULARITY_TRAIN, k=2).tolist() == [30, 10]


def test_top_k_popular_leaves_out_each_users_training_movies():
    top = top_k_popular(POPULARITY_TRAIN, [1, 2, 3, 99], k=2)
    # user 1 saw 30, 20 -> [10, 40]; user 2 saw 30, 20, 10 -> [40]; user 3 saw everything but 20;
    # user 99 is unseen in training -> the plain top 2
    assert top == {1: [10, 40], 2: [40], 3: [20], 99: [30, 10]}
    assert top_k_popular(POPULARITY_TRAIN, [1], k=2, exclude_seen=False) == {1: [30, 10]}


def test_top_k_popular_keys_are_plain_user_ids_and_k_must_be_positive():
    top = top_k_popular(POPULARITY_TRAIN, pd.Series([3, 1, 3]), k=1)
    assert list(top) == [3, 1] and all(type(user) is int for user in top)
    with pytest.raises(ConfigError, match="positive"):
        top_k_popular(POPULARITY_TRAIN, [1], k=0)
