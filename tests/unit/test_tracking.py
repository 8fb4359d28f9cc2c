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


def test_the_pipeline_run_becomes_the_parent_of_its_stage_runs_once(settings, tmp_path):
    from pipeline.config import make_context

    ctx = make_context(run_id="cli_nest", work_dir=tmp_path / "run", settings=settings)
    other = make_context(run_id="cli_other", work_dir=tmp_path / "other", settings=settings)
    with tracking.start_run(ctx, "baseline"):
        pass
    with tracking.start_run(ctx, "als") as als, tracking.child_run(als, ctx, "rank=8") as log:
        log({"rank": 8}, {"val_rmse": 0.9})
    with tracking.start_run(other, "baseline") as foreign:
        pass
    parent = tracking.pipeline_run(ctx)
    client = tracking.client(settings)
    runs = {r.info.run_name: r for r in tracking.runs_of(ctx)}
    assert set(runs) == {"cli_nest", "baseline", "als", "rank=8"}
    assert runs["cli_nest"].info.run_id == parent and runs["cli_nest"].info.status == "FINISHED"
    assert runs["baseline"].data.tags["mlflow.parentRunId"] == runs["als"].data.tags["mlflow.parentRunId"] == parent
    assert runs["rank=8"].data.tags["mlflow.parentRunId"] == als.info.run_id  # a grid point stays under its stage
    assert runs["cli_nest"].info.start_time == runs["baseline"].info.start_time
    assert "mlflow.parentRunId" not in client.get_run(foreign.info.run_id).data.tags  # another pipeline run's
    assert tracking.pipeline_run(ctx) == parent and len(tracking.runs_of(ctx)) == 4  # again: the same run
