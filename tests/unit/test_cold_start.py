"""The cold_start stage's batch path: ``recommend_from_ratings_many`` gives every user exactly what the serving
function ``recommend_from_ratings`` gives them (same movies, scores and order), so the stage measures the lists
``recsys recommend --ratings`` serves; ``cold_start_lists`` and ``hidden_movies`` match their per-user
definitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.models.popularity import popular_movies
from pipeline.serving.cold_start import K, cold_start_lists, hidden_movies
from pipeline.serving.recommend import pairs_in, recommend_from_ratings, recommend_from_ratings_many


def generated(seed: int):
    """A popularity table with ties (counts from few ratings), a similar table whose scores tie (one decimal),
    some negative, with rows of another metric and neighbours outside the popular table, and users of every
    kind: no ratings, nothing liked, one rating, a harsh rater, many ratings, movies absent from both tables."""
    rng = np.random.default_rng(seed)
    movies = np.arange(1, 61)
    ratings = pd.DataFrame({"user_id": rng.integers(1, 40, 400), "movie_id": rng.choice(movies[:45], 400),
                            "rating": rng.choice(np.arange(1, 11) / 2, 400)})
    popular = popular_movies(ratings)
    rows = []
    for m in movies[:50]:  # movies 51-60: no neighbours; neighbours up to 70 (61-70 never rated: no prior)
        for rank, n in enumerate(rng.choice(np.r_[movies, np.arange(61, 71)], 6, replace=False), 1):
            rows.append((m, n, rank, round(float(rng.uniform(-0.2, 1.0)), 1), "cosine"))
            rows.append((m, n, rank, round(float(rng.uniform(0.0, 3.0)), 1), "euclidean"))
    similar = pd.DataFrame(rows, columns=["movie_id", "similar_movie_id", "rank", "score", "metric"])
    similar = similar.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # rows in no particular order
    users = {
        101: {},
        102: {3: 2.0, 7: 1.0, 9: 2.5},  # nothing liked
        103: {5: 4.0},
        104: {5: 3.0, 6: 2.0, 8: 3.0},  # harsh: liked at its own mean (3.0 >= min(3.5, 2.67))
        105: {55: 5.0, 58: 4.5, 99: 5.0},  # no neighbours, 99 in neither table
        106: {5: 4.5, 6: 4.5},
    }
    for u in range(107, 140):
        n = int(rng.integers(1, 25))
        users[u] = dict(zip(rng.choice(np.r_[movies, [99, 100]], n, replace=False).tolist(),
                            rng.choice(np.arange(1, 11) / 2, n).tolist()))
    return users, similar, popular


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_batch_equals_the_serving_function_user_by_user(seed, metric):
    users, similar, popular = generated(seed)
    rng = np.random.default_rng(seed)
    depth = {u: int(rng.integers(1, 30)) for u in users}
    for k in (depth, 10, 200):  # 200: longer than the pool
        batch = recommend_from_ratings_many(users, similar, popular, k, metric=metric)
        assert list(batch.columns) == ["user_id", "rank", "movie_id", "score"]
        assert batch["user_id"].unique().tolist() == [u for u in users if len(batch[batch["user_id"] == u])]
        for user, rated in users.items():
            one = recommend_from_ratings(rated, similar, popular, k[user] if isinstance(k, dict) else k, metric=metric)
            mine = batch[batch["user_id"] == user]
            assert mine["movie_id"].tolist() == one["movie_id"].tolist(), (seed, user)
            assert mine["score"].tolist() == one["score"].tolist(), (seed, user)  # exactly, not approximately
            assert mine["rank"].tolist() == list(range(1, len(one) + 1))


def test_batch_scores_ties_and_the_popularity_prior_like_the_serving_function():
    similar = pd.DataFrame({"movie_id": [1, 1, 2, 2], "similar_movie_id": [30, 20, 20, 30], "rank": [1, 2, 1, 2],
                            "score": [0.5, 0.5, 0.5, 0.5], "metric": "cosine"})
    popular = pd.DataFrame({"movie_id": [40, 20, 30, 50], "title": list("abcd"), "genres": [[]] * 4,
                            "n_ratings": [5, 3, 3, 3], "mean_rating": 4.0, "score": [5.0, 3.0, 3.0, 3.0]})
    users = {7: {1: 4.0, 2: 4.0}, 8: {1: 5.0}, 9: {}}
    batch = recommend_from_ratings_many(users, similar, popular, 3)
    for user, rated in users.items():
        one = recommend_from_ratings(rated, similar, popular, 3)
        assert batch.loc[batch["user_id"] == user, "movie_id"].tolist() == one["movie_id"].tolist()
    assert batch.loc[batch["user_id"] == 7, "movie_id"].tolist() == [20, 30, 40]  # tie on score and prior: id


def _cold_start_lists_one_by_one(users, similar, popular, hidden):
    """The stage's former loop: one ``recommend_from_ratings`` call per user."""
    out = {}
    for user, rated in users.items():
        drop = hidden.get(user, set())
        ids = recommend_from_ratings(rated, similar, popular, K + len(drop), metric="cosine")["movie_id"].to_numpy()
        out[user] = [int(m) for m in ids if m not in drop][:K]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cold_start_lists_are_the_serving_function_lists_less_hidden_movies(seed):
    users, similar, popular = generated(seed)
    users = {u: r for u, r in users.items() if r}  # the stage's users have ratings
    rng = np.random.default_rng(seed)
    hidden = {u: set(rng.choice(np.arange(1, 71), int(rng.integers(0, 12)), replace=False).tolist()) - set(r)
              for u, r in users.items()}
    hidden[103] = set(popular["movie_id"].head(15).tolist())  # more hidden than K at the top
    del hidden[104]  # a user without an entry
    assert cold_start_lists(users, similar, popular, hidden) == _cold_start_lists_one_by_one(users, similar,
                                                                                              popular, hidden)
    assert cold_start_lists({}, similar, popular, {}) == {}


def test_hidden_movies_are_the_users_other_rated_movies():
    users = {1: {10: 4.0, 11: 3.0}, 2: {10: 5.0}, 3: {12: 1.0}}
    train = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 4, 1], "movie_id": [10, 11, 13, 10, 14, 15, 13]})
    validation = pd.DataFrame({"user_id": [2, 3, 4], "movie_id": [16, 12, 17]})
    assert hidden_movies(users, (train,)) == {1: {13}, 2: {14}, 3: set()}
    assert hidden_movies(users, (train, validation)) == {1: {13}, 2: {14, 16}, 3: set()}


def test_pairs_in_matches_pairs_not_their_parts():
    mask = pairs_in([1, 1, 2, 3], [10, 20, 10, 30], [1, 2, 9], [20, 10, 30])
    assert mask.tolist() == [False, True, True, False]
    assert pairs_in([1], [10], [], []).tolist() == [False]
