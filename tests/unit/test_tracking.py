"""MLflow logging of the rating pyfunc on models of any size."""

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import tracking
from pipeline.models.factor_model import FactorModel


def _model(n_users: int, n_movies: int) -> FactorModel:
    rng = np.random.default_rng(0)
    return FactorModel("als", np.arange(1, n_users + 1), np.arange(101, 101 + n_movies),
                       rng.normal(size=(n_users, 2)), rng.normal(size=(n_movies, 2)), offset=3.5)


@pytest.mark.parametrize("n_users,n_movies", [(1, 5), (2, 5), (5, 1), (5, 2), (1, 1), (3, 3)],
                         ids=["1-user", "2-users", "1-movie", "2-movies", "1-user-1-movie", "3x3"])
def test_a_rating_model_of_any_size_is_logged_with_an_input_example_of_its_own_pairs(settings, n_users, n_movies):
    model = _model(n_users, n_movies)
    tracking.configure(settings)
    with mlflow.start_run():
        info = tracking.log_rating_model(model)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    example = pd.DataFrame({"user_id": model.user_ids[:1], "movie_id": model.movie_ids[:1]})
    assert np.allclose(loaded.predict(example), model.predict(example.user_id, example.movie_id))
    saved = mlflow.models.Model.load(info.model_uri).load_input_example(mlflow.artifacts.download_artifacts(
        info.model_uri))
    assert len(saved) == min(3, max(n_users, n_movies))
    assert set(saved.user_id) <= set(model.user_ids) and set(saved.movie_id) <= set(model.movie_ids)
