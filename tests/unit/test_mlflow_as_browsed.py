"""MLflow as a person browses it: the experiment opens in the model-training view, and a grid's child runs last
as long as their own fits (docs/adr/0073-mlflow-and-data-docs-as-browsed.md)."""

from __future__ import annotations

import time

import mlflow
import pytest

from pipeline import stages, tracking
from pipeline.config import load_settings
from pipeline.models.als import grid_points
from pipeline.models.grid_search import RMSE, halving_rungs, run_search

SLEEP_S = {1: 0.3, 2: 1.1, 3: 1.9}  # a fake fit's seconds by rank: the children must not all end together
SLACK_S = 0.6  # a child run's own MLflow calls (create, params, metrics, end) on SQLite, on a busy machine


def _children(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.parametrize("workers", [1, 3], ids=["one-at-a-time", "side-by-side"])
def test_each_grid_child_run_lasts_its_own_fit_and_ends_with_it(tmp_path, workers):
    """Through the real search and ``tracking.child_run`` on a SQLite store: each child run starts when its fit
    starts and ends once it is scored, well before its parent ends (once they all ended when the search did:
    durations 12.5 s to 47.4 s in start order on ml-latest-small)."""
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    ctx = stages.make_context(run_id="timing", work_dir=tmp_path / "run", settings=settings)

    def fit(point, iters):
        time.sleep(SLEEP_S[point["rank"]])
        return point

    def score(model):
        return {"val_rmse": 1.0 - 0.1 * model["rank"], "val_mae": 0.5}

    with tracking.start_run(ctx, "als") as parent:
        def track(point):
            return tracking.child_run(parent, ctx, f"als rank={point['rank']} iters={point['max_iter']}")

        run_search(grid_points([1, 2, 3], [0.1], [5]), fit, score, RMSE, [{"fraction": 1.0, "points": 3, "keep": 1}],
                   workers=workers, track=track)
        time.sleep(1.0)  # the parent's own work after the grid (scoring the choice, logging the model)
    client = tracking.client(settings)
    parent = client.get_run(parent.info.run_id)
    children = _children(client, parent.info.run_id)
    assert len(children) == 3
    for child in children:
        own = SLEEP_S[int(child.data.params["rank"])]
        seconds = (child.info.end_time - child.info.start_time) / 1000
        assert own <= seconds <= own + SLACK_S, (child.info.run_name, seconds, own)
        assert child.data.metrics["fit_s"] == pytest.approx(own, abs=0.2)
        assert parent.info.start_time <= child.info.start_time
        assert child.info.end_time <= parent.info.end_time - 900  # not closed with the parent
        assert child.info.status == "FINISHED"
    assert len({child.info.end_time for child in children}) == 3


def test_a_point_refitted_in_a_later_rung_has_a_child_run_per_fit_each_as_long_as_it(tmp_path):
    """Successive halving refits the finalists with all their iterations: each fit is a child run named and
    parametrised by the iterations it ran, lasting that fit only (not the wait between the rungs)."""
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    ctx = stages.make_context(run_id="halving", work_dir=tmp_path / "run", settings=settings)

    def fit(point, iters):
        time.sleep(0.1 * iters)
        return {**point, "max_iter": iters}

    def score(model):
        return {"val_rmse": 1.0 - 0.1 * model["rank"] + 0.01 * model["max_iter"], "val_mae": 0.5}

    with tracking.start_run(ctx, "als") as parent:
        def track(point):
            return tracking.child_run(parent, ctx, f"als rank={point['rank']} iters={point['max_iter']}")

        searched = run_search(grid_points([1, 2, 3], [0.1], [9]), fit, score, RMSE, halving_rungs(3, 9, 3),
                              track=track)
    client = tracking.client(settings)
    children = _children(client, parent.info.run_id)
    fits = sum(len(r["points"]) for r in searched.search["rungs"])
    assert fits > 3 and len(children) == fits
    for child in children:
        iters = int(child.data.params["max_iter"])
        assert child.info.run_name.endswith(f"iters={iters}")
        seconds = (child.info.end_time - child.info.start_time) / 1000
        assert 0.1 * iters <= seconds <= 0.1 * iters + SLACK_S, (child.info.run_name, seconds)
        assert ("val_rmse" in child.data.metrics) == (iters == 9)


def test_a_new_experiment_is_a_model_training_experiment(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    experiment_id = tracking.configure(settings)
    tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_an_experiment_made_without_a_kind_gets_it_and_a_chosen_kind_stays(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MLFLOW_EXPERIMENT": "older"})
    tracking.configure(settings)  # the store's tables
    bare = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    bare.delete_experiment_tag(bare.get_experiment_by_name("older").experiment_id, tracking.EXPERIMENT_KIND_TAG)
    chosen = bare.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking._CONFIGURED = None  # as a new process would find the store
    older = tracking.configure(settings)
    assert bare.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracking.configure(load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MLFLOW_EXPERIMENT": "chosen"}))
    assert bare.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
