"""Recommendations: known users from the model, item-based cold start, popularity and genres."""

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.models.factor_model import FactorModel, baseline_from_arrays
from pipeline.serving import recommend

MOVIES = pd.DataFrame({
    "movie_id": [1, 2, 3, 4, 5, 6],
    "title": ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Toy Story 2 (1999)", "Sabrina (1995)",
              "GoldenEye (1995)"],
    "year": [1995, 1995, 1995, 1999, 1995, 1995],
    "genres": [["Animation", "Comedy"], ["Adventure", "Fantasy"], ["Action", "Crime"], ["Animation", "Comedy"],
               ["Comedy", "Romance"], ["Action", "Adventure"]],
    "_line": [2, 3, 4, 5, 6, 7],
})


def _ratings(rows):
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"])


def _similar(rows):
    frame = pd.DataFrame(rows, columns=["movie_id", "similar_movie_id", "metric", "rank", "score"])
    return frame.astype({"movie_id": "int64", "similar_movie_id": "int64", "rank": "int32", "score": "float64"})


def test_known_users_get_the_model_top_k_without_movies_they_rated():
    model = FactorModel("tiny", user_ids=[1, 2], movie_ids=[10, 20, 30, 40],
                        user_factors=[[1.0, 0.0], [0.0, 1.0]],
                        item_factors=[[0.9, 0.0], [0.5, 0.2], [0.1, 0.8], [0.7, 0.1]], offset=3.0)
    ratings = _ratings([(1, 10, 5.0), (2, 30, 4.0), (2, 20, 3.0), (9, 10, 1.0)])  # user 9: unknown to the model

    recs = recommend.recommend_known_users(model, ratings, k=2)

    assert list(recs.columns) == ["user_id", "rank", "movie_id", "score"]
    assert recs.dtypes.astype(str).tolist() == ["int64", "int32", "int64", "float64"]
    assert recs[["user_id", "rank", "movie_id"]].values.tolist() == [[1, 1, 40], [1, 2, 20], [2, 1, 40], [2, 2, 10]]
    np.testing.assert_allclose(recs["score"], [3.7, 3.5, 3.1, 3.0], rtol=1e-6)


def test_known_user_scores_are_clipped_predicted_ratings():
    model = FactorModel("tiny", user_ids=[1], movie_ids=[10, 20], user_factors=[[1.0]],
                        item_factors=[[3.0], [1.0]], offset=3.0)
    recs = recommend.recommend_known_users(model, _ratings([]), k=5)
    assert recs["movie_id"].tolist() == [10, 20]
    assert recs["score"].tolist() == [5.0, 4.0]


def test_known_user_ranks_follow_the_shown_score_when_the_baseline_is_clipped():
    # The baseline part of predict is clipped at 5 for movie 10 (4.8 + 0.5): its raw score 5.1 would put it
    # first, its shown score 4.8 puts it after movie 20 (4.9), in top_k as in the served table.
    base = baseline_from_arrays({"mu": 4.8, "damping_user": 0, "damping_item": 0}, [1], [0.0], [10, 20], [0.5, 0.0])
    model = FactorModel("tiny", user_ids=[1], movie_ids=[10, 20], user_factors=[[1.0]],
                        item_factors=[[-0.2], [0.1]], baseline=base)
    assert model.top_k([1], 2)[1] == [20, 10] and model.top_k([1], 1)[1] == [20]
    recs = recommend.recommend_known_users(model, _ratings([]), k=2)
    assert recs["movie_id"].tolist() == [20, 10] and recs["rank"].tolist() == [1, 2]
    np.testing.assert_allclose(recs["score"], [4.9, 4.8], rtol=1e-6)


def test_served_popularity_is_the_evaluated_ranking_most_rated_first():
    from pipeline.models.popularity import popular_movies, popularity_ranking

    ratings = _ratings([(1, 1, 5.0), (2, 1, 4.0), (3, 1, 4.5), (1, 2, 5.0), (1, 3, 1.0), (2, 3, 2.0)])
    popular = popular_movies(ratings, MOVIES)
    assert popular["movie_id"].tolist() == [1, 3, 2] == popularity_ranking(ratings).tolist()
    assert popular["score"].tolist() == [3.0, 2.0, 1.0] and popular["n_ratings"].tolist() == [3, 2, 1]
    assert popular.loc[0, "title"] == "Toy Story (1995)" and list(popular.loc[0, "genres"]) == ["Animation", "Comedy"]
    assert popular.loc[0, "mean_rating"] == 4.5
    assert popular_movies(ratings, MOVIES, min_ratings=2)["movie_id"].tolist() == [1, 3]


POPULAR = pd.DataFrame({
    "movie_id": [3, 6, 5, 1, 2, 4],
    "title": ["Heat (1995)", "GoldenEye (1995)", "Sabrina (1995)", "Toy Story (1995)", "Jumanji (1995)",
              "Toy Story 2 (1999)"],
    "genres": [["Action", "Crime"], ["Action", "Adventure"], ["Comedy", "Romance"], ["Animation", "Comedy"],
               ["Adventure", "Fantasy"], ["Animation", "Comedy"]],
    "n_ratings": [9, 8, 7, 6, 5, 4], "mean_rating": [4.5, 4.4, 4.3, 4.2, 4.1, 4.0],
    "score": [4.4, 4.3, 4.2, 4.1, 4.0, 3.9],
})

SIMILAR = _similar([
    (1, 4, "cosine", 1, 0.9), (1, 2, "cosine", 2, 0.5), (1, 3, "cosine", 3, 0.1),
    (2, 6, "cosine", 1, 0.8), (2, 4, "cosine", 2, 0.6), (2, 1, "cosine", 3, 0.5),
    (3, 6, "cosine", 1, 0.7), (3, 5, "cosine", 2, 0.2), (3, 1, "cosine", 3, 0.1),
    (1, 2, "euclidean", 1, 0.5), (1, 4, "euclidean", 2, 2.0),
])


def test_the_popularity_prior_lets_a_popular_movie_outrank_a_weak_neighbour():
    # movie 1 liked: neighbours 4 (0.9), 2 (0.5), 3 (0.1); 3 is the most rated movie (prior 1.0)
    recs = recommend.recommend_from_ratings({1: 5.0}, SIMILAR, POPULAR, k=3, movies=MOVIES)
    prior = recommend.popularity_prior(POPULAR)
    expected = {m: vote + prior[m] for m, vote in ((4, 0.9), (2, 0.5), (3, 0.1), (6, 0.0), (5, 0.0))}
    best = sorted(expected, key=lambda m: -expected[m])[:3]
    assert recs["movie_id"].tolist() == best
    np.testing.assert_allclose(recs["score"], [expected[m] for m in best])
    assert recs.set_index("movie_id").loc[3, "reason"] == "similar to Toy Story (1995)"  # it got a vote


def test_new_user_gets_neighbours_of_liked_movies_then_popular_fill():
    recs = recommend.recommend_from_ratings({1: 5.0, 3: 1.0}, SIMILAR, POPULAR, k=4,
                                           movies=MOVIES, popularity_weight=0.0)

    assert list(recs.columns) == ["rank", "movie_id", "score", "reason"]
    # Liked: movie 1 only (3 is disliked, so its neighbours are ignored); rated 1 and 3 are never returned.
    assert recs["movie_id"].tolist() == [4, 2, 6, 5]
    assert recs["rank"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(recs["score"][:2], [0.9, 0.5])  # weighted mean similarity of one liked movie
    # (the popularity prior switched off, popular movies fill in their popularity order)
    assert recs["reason"].tolist() == ["similar to Toy Story (1995)"] * 2 + ["popular"] * 2


def test_neighbours_of_several_liked_movies_add_up_weighted_by_rating():
    recs = recommend.recommend_from_ratings({1: 5.0, 2: 3.5}, SIMILAR, POPULAR, k=2,
                                           movies=MOVIES, popularity_weight=0.0)
    # w(1) = 2.5, w(2) = 1.0: movie 4 = (2.5*0.9 + 1*0.6)/3.5, movie 6 = 1*0.8/3.5, movie 3 = 2.5*0.1/3.5
    assert recs["movie_id"].tolist() == [4, 6]
    np.testing.assert_allclose(recs["score"], [(2.5 * 0.9 + 0.6) / 3.5, 0.8 / 3.5])
    assert recs["reason"].tolist() == ["similar to Toy Story (1995)", "similar to Jumanji (1995)"]


def test_euclidean_distances_rank_closer_movies_first():
    recs = recommend.recommend_from_ratings({1: 4.0}, SIMILAR, POPULAR, k=2, metric="euclidean",
                                           movies=MOVIES, popularity_weight=0.0)
    assert recs["movie_id"].tolist() == [2, 4]
    np.testing.assert_allclose(recs["score"], [1 / 1.5, 1 / 3.0])


def test_a_harsh_rater_still_likes_their_best_movies_but_a_user_who_liked_nothing_gets_popular():
    harsh = recommend.liked_movies({1: 3.0, 2: 2.0, 3: 2.5})
    assert harsh == {1: 0.5}  # 3.0 >= own mean 2.5 and above neutral; 2.5 is neutral, not liked
    recs = recommend.recommend_from_ratings({1: 1.0, 3: 2.0}, SIMILAR, POPULAR, k=2, popularity_weight=0.0)
    assert recs["movie_id"].tolist() == [6, 5] and set(recs["reason"]) == {"popular"}


def test_cold_user_gets_popular_movies_within_any_chosen_genre_case_insensitive():
    recs = recommend.recommend_cold_user(POPULAR, k=3, genres="comedy, ADVENTURE")
    assert recs["movie_id"].tolist() == [6, 5, 1]
    assert recs["reason"].tolist() == ["popular in comedy, ADVENTURE"] * 3
    assert recommend.recommend_cold_user(POPULAR, k=2)["movie_id"].tolist() == [3, 6]


def test_genres_also_filter_item_based_recommendations():
    recs = recommend.recommend_from_ratings({1: 5.0}, SIMILAR, POPULAR, k=2, genres=["Fantasy"],
                                           movies=MOVIES, popularity_weight=0.0)
    assert recs["movie_id"].tolist() == [2]  # only Jumanji is Fantasy; nothing else to fill with
    assert recs["reason"].tolist() == ["similar to Toy Story (1995)"]


def test_unknown_genre_is_an_error_listing_the_known_genres():
    with pytest.raises(ConfigError, match=r"unknown genre\(s\) \['westernn'\]; known genres: Action, Adventure"):
        recommend.recommend_cold_user(POPULAR, k=3, genres="Westernn")


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_must_be_a_positive_integer(k):
    with pytest.raises(ConfigError, match="k must be a positive number"):
        recommend.recommend_cold_user(POPULAR, k=k)
