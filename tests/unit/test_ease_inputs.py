"""EASE's input from the rating: the matrix it learns from, the history it scores, and the grid that chooses
the input with lambda on validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.models.ease import catalogue, fit_ease, gram_matrix
from pipeline.models.item_item import ItemItemModel, input_weights
from pipeline.models.ranking import histories
from pipeline.params import resolve_params


def _ratings(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"user_id": rng.integers(0, 40, 500), "movie_id": rng.integers(0, 17, 500),
                          "rating": rng.choice([0.5, 1.0, 2.5, 3.5, 4.0, 5.0], 500)})
    return frame.drop_duplicates(["user_id", "movie_id"], ignore_index=True)


@pytest.mark.parametrize("name", ["binary", "rating", "liked"])
def test_the_gram_matrix_is_x_transpose_x_of_the_input_weights(name):
    frame = _ratings()
    movies = catalogue(frame, 1)
    weight = {"binary": np.ones(len(frame)), "rating": frame["rating"] / 5,
              "liked": (frame["rating"] >= 3.5).astype(float)}[name]
    x = pd.crosstab(frame.user_id, frame.movie_id, values=weight, aggfunc="sum").fillna(0.0)
    x = x.reindex(columns=movies).to_numpy()
    np.testing.assert_allclose(gram_matrix(frame, movies, input=name), x.T @ x, rtol=1e-5, atol=1e-5)


def test_a_weighted_model_scores_a_history_by_its_ratings_and_by_ones_without_them(tmp_path):
    weights = np.array([[0, 2.0, 1.0], [1.0, 0, 3.0], [0.5, 0.5, 0]], np.float32)
    model = ItemItemModel("ease", [10, 20, 30], weights, meta={"input": "rating"})
    # user 1 rated 10 with a 5 and 20 with a 1: 30's score 1.0 * 1.0 + 0.2 * 3.0; 20's 1.0 * 2.0
    np.testing.assert_allclose(model.scores([{10: 5.0, 20: 1.0}]), [[0.2, 2.0, 1.6]], rtol=1e-6)
    np.testing.assert_allclose(model.scores([[10, 20]]), [[1.0, 2.0, 4.0]], rtol=1e-6)  # no ratings: all 1
    ratings = pd.DataFrame({"user_id": [1, 1, 2, 2], "movie_id": [10, 20, 10, 20], "rating": [5.0, 1.0, 1.0, 5.0]})
    seen = histories(ratings)
    top = model.top_k([1, 2], 1, exclude=seen, history=seen)
    assert top == {1: [30], 2: [30]}
    np.testing.assert_allclose(model.pair_scores([1, 2], [30, 30], seen), [1.6, 3.2], rtol=1e-3)
    loaded = ItemItemModel.load(model.save(tmp_path / "m"))
    assert loaded.input == "rating" and np.allclose(loaded.scores([{10: 5.0}]), [[0, 2.0, 1.0]])


def test_the_rating_input_ranks_what_a_user_liked_above_what_they_disliked():
    # two tastes: movies 1-3 go together, 4-6 go together; a user who loved 1 and hated 4 should get 2 or 3
    rows = []
    for u in range(60):
        taste = (1, 2, 3) if u % 2 else (4, 5, 6)
        other = (4, 5, 6) if u % 2 else (1, 2, 3)
        rows += [(u, m, 5.0) for m in taste] + [(u, other[u % 3], 1.0)]
    train = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating"])
    probe = {1: 5.0, 4: 0.5}
    binary = fit_ease(train, 1.0, 1, input="binary")
    rating = fit_ease(train, 1.0, 1, input="rating")
    ids = list(rating.movie_ids)
    by_rating = rating.scores([probe])[0]
    assert by_rating[ids.index(2)] > by_rating[ids.index(5)]
    assert rating.meta["input"] == "rating" and binary.meta["input"] == "binary"


def test_the_inputs_are_a_param_grid_of_known_names():
    assert resolve_params({}).ease_inputs == ("binary", "rating")
    assert resolve_params({"ease_inputs": ["liked"]}).ease_inputs == ("liked",)
    with pytest.raises(ConfigError, match="ease_inputs.*'squared' is not one of"):
        resolve_params({"ease_inputs": ["binary", "squared"]})
    with pytest.raises(ValueError, match="unknown EASE input 'squared'"):
        input_weights("squared", np.ones(2, np.float32), 2)


def test_histories_of_no_ratings_give_no_pairs():
    seen = histories(pd.DataFrame({"user_id": [], "movie_id": [], "rating": []}))
    rows, movies, ratings = seen.rated_pairs([1, 2])
    assert len(rows) == len(movies) == len(ratings) == 0 and len(seen.pairs([1])[0]) == 0
