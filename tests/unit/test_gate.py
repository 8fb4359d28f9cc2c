"""The promotion gate: first promotion, a worse challenger kept out, the margin, the race guard."""

import mlflow
import numpy as np
import pytest

from pipeline import registry, stages, storage, tracking
from pipeline.config import load_settings
from pipeline.gate import apply_decision, decide, evaluate_challenger, promote
from pipeline.models.baseline import BiasBaseline
from pipeline.models.factor_model import FactorModel
from pipeline.models.protocol import evaluate, load_split
from pipeline.models.reference import run_baseline
from pipeline.registry import CHALLENGER, CHAMPION
from stage_inputs import planted_ratings, write_split


def run_gate(ctx) -> dict:
    """The command line's order: stage gate, then stage promotion."""
    evaluate_challenger(ctx)
    return apply_decision(ctx)


@pytest.fixture
def world(tmp_path):
    """One MLflow store and a split with a planted rank-3 structure."""
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    ratings = planted_ratings(n_users=60, n_movies=40, observed=0.5, seed=3)
    return settings, ratings, tmp_path


def _run(world, name, quality, params=None):
    """A run folder holding the baseline and one candidate whose factors are the truth plus noise."""
    settings, ratings, tmp_path = world
    run_dir = tmp_path / name
    write_split(run_dir / "etl", ratings)
    ctx = stages.make_context(run_id=name, work_dir=run_dir, settings=settings, params=params or {})
    run_baseline(ctx)
    split = load_split(ctx, "test")
    base = BiasBaseline().fit(split.train)
    # the best rank-3 fit of the residuals (an SVD of the dense residual matrix: fine at this size)
    train = split.train
    users, movies = np.sort(train.user_id.unique()), np.sort(train.movie_id.unique())
    R = np.zeros((len(users), len(movies)))
    R[np.searchsorted(users, train.user_id), np.searchsorted(movies, train.movie_id)] = (
        train.rating - base.predict(train.user_id, train.movie_id))
    u, s, vt = np.linalg.svd(R / 0.5, full_matrices=False)  # observed share ~0.5
    U, V = u[:, :3] * np.sqrt(s[:3]), vt[:3].T * np.sqrt(s[:3])
    rng = np.random.default_rng(len(name))
    V = V * quality + rng.normal(0, 1.0 - quality, V.shape)
    model = FactorModel("als", users, movies, U, V, baseline=base, fallback=base)
    scores = evaluate(model, split, base)
    with tracking.start_run(ctx, name) as run:
        info = tracking.log_factor_model(model)
    model_dir = run_dir / "als"
    model.save(model_dir / "model")
    storage.write_manifest(model_dir, "als", {}, candidate={
        "name": "als", "eligible": True, "val_rmse": scores["test_rmse"], "test_rmse": scores["test_rmse"],
        "model_path": str(model_dir / "model"), "model_uri": info.model_uri, "mlflow_run_id": run.info.run_id})
    return ctx, scores["test_rmse"]


def test_first_run_promotes_a_challenger_that_beats_the_baseline(world):
    ctx, _ = _run(world, "run1", quality=1.0)
    promotion = run_gate(ctx)["promotion"]
    assert promotion["decision"] == "promoted" and promotion["champion_version_before"] is None
    assert promotion["challenger_test_rmse"] < promotion["baseline_test_rmse"]
    client = mlflow.MlflowClient()
    name = ctx.settings.registered_model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == promotion["champion_version"]
    tags = client.get_model_version(name, promotion["challenger_version"]).tags
    assert tags["recsys.decision"] == "promoted"
    assert tags["recsys.test_fingerprint"] == "tiny" and "recsys.challenger_test_rmse" in tags


def test_a_worse_challenger_is_kept_out_and_the_champion_stays(world):
    good, _ = _run(world, "good", quality=1.0)
    first = run_gate(good)["promotion"]
    bad, _ = _run(world, "bad", quality=0.2)
    second = run_gate(bad)["promotion"]
    assert second["decision"] == "kept"
    assert second["champion_version"] == first["champion_version"] == second["champion_version_before"]
    assert second["challenger_test_rmse"] > second["champion_test_rmse_before"]
    client = mlflow.MlflowClient()
    name = good.settings.registered_model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first["champion_version"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == second["challenger_version"]
    assert client.get_model_version(name, second["challenger_version"]).tags["recsys.decision"] == "kept"


def test_the_champion_is_rescored_on_this_runs_test_rows(world):
    good, _ = _run(world, "good", quality=1.0)
    run_gate(good)
    again, rmse = _run(world, "again", quality=1.0)
    gate = evaluate_challenger(again)["gate"]
    # same data, same model: the champion loaded back from the registry scores exactly the same
    assert gate["champion_test_rmse_before"] == pytest.approx(gate["challenger_test_rmse"], abs=1e-9)
    assert gate["decision"] == "keep"  # equal is not better: promotion must be strict


def test_margin_keeps_a_challenger_that_is_better_by_less(world):
    ok, _ = _run(world, "ok", quality=0.7)
    run_gate(ok)
    better, _ = _run(world, "better", quality=1.0, params={"promotion_margin": 5.0})
    gate = evaluate_challenger(better)["gate"]
    assert gate["challenger_test_rmse"] < gate["champion_test_rmse_before"]
    assert gate["decision"] == "keep" and "margin" in gate["reason"]


def test_two_racing_runs_cannot_both_win(world):
    first, _ = _run(world, "first", quality=0.6)
    run_gate(first)
    a, _ = _run(world, "a", quality=1.0)
    b, _ = _run(world, "b", quality=0.9)
    gate_a = evaluate_challenger(a)["gate"]
    gate_b = evaluate_challenger(b)["gate"]  # both compared against the same champion
    assert gate_a["decision"] == gate_b["decision"] == "promote"
    assert promote(a)["promotion"]["decision"] == "promoted"
    late = promote(b)["promotion"]
    assert late["decision"] == "kept" and "champion moved" in late["reason"]
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(a.settings.registered_model, CHAMPION).version) == \
        gate_a["challenger_version"]


def test_a_challenger_worse_than_the_baseline_is_never_promoted(world):
    ctx, rmse = _run(world, "noise", quality=0.0)
    promotion = run_gate(ctx)["promotion"]
    assert rmse > promotion["baseline_test_rmse"]
    assert promotion["decision"] == "kept" and promotion["champion_version"] is None


def test_decide_rule_for_both_directions():
    assert decide(0.8, None, 0.9, 0.0) == (True, decide(0.8, None, 0.9, 0.0)[1])
    assert not decide(0.95, None, 0.9, 0.0)[0]  # worse than the baseline
    assert not decide(0.85, 0.85, 0.9, 0.0)[0]  # equal is not better
    assert not decide(0.84, 0.85, 0.9, 0.02)[0] and decide(0.82, 0.85, 0.9, 0.02)[0]
    # higher is better (a ranking metric): the same rule mirrored
    assert decide(0.20, 0.15, 0.10, 0.01, lower_is_better=False)[0]
    assert not decide(0.09, None, 0.10, 0.0, lower_is_better=False)[0]


def test_a_champion_that_cannot_be_loaded_does_not_block_the_gate(world):
    """Its artifacts deleted, the champion is recorded as broken; a challenger that beats the baseline is
    registered and promoted, so the registry heals itself."""
    import shutil
    from urllib.parse import urlparse

    first, _ = _run(world, "first", quality=0.8)
    v1 = run_gate(first)["promotion"]["champion_version"]
    client = mlflow.MlflowClient()
    version = client.get_model_version(first.settings.registered_model, v1)
    location = client.get_logged_model(version.source.rsplit("/", 1)[-1]).artifact_location  # models:/m-...
    shutil.rmtree(urlparse(location).path)
    second, _ = _run(world, "second", quality=1.0)
    gate = evaluate_challenger(second)["gate"]
    assert gate["champion_version_before"] == v1 and gate["champion_test_rmse_before"] is None
    assert f"champion v{v1} cannot be loaded" in gate["reason"] and gate["decision"] == "promote"
    assert apply_decision(second)["promotion"]["champion_version"] == gate["challenger_version"]


def test_a_retried_gate_reuses_the_version_its_first_attempt_registered(world):
    """Airflow retries the gate task (retries=2): the retry finds this run's version instead of adding one."""
    ctx, _ = _run(world, "retried", quality=1.0)
    first = evaluate_challenger(ctx)["gate"]
    retry = evaluate_challenger(ctx)["gate"]
    assert retry["challenger_version"] == first["challenger_version"]
    client = mlflow.MlflowClient()
    name = ctx.settings.registered_model
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [first["challenger_version"]]
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == first["challenger_version"]
    assert apply_decision(ctx)["promotion"]["champion_version"] == first["challenger_version"]


@pytest.mark.parametrize("model", ["rating", "ranker"])
def test_registering_twice_for_one_run_keeps_one_version_per_challenger(world, model):
    """The registering function itself (both gates use it): same run and model once; another run or another
    model of the same run registers anew."""
    settings, _, tmp_path = world
    name = settings.registered_model if model == "rating" else settings.registered_ranker
    ctx, _ = _run(world, f"register-{model}", quality=1.0)
    uri = protocol_candidate(ctx)["model_uri"]
    first = registry.register_challenger(settings, name, uri, "d", run_id="run-1")
    assert registry.register_challenger(settings, name, uri, "d", run_id="run-1") == first
    assert registry.register_challenger(settings, name, uri, "d", run_id="run-2") != first
    other, _ = _run(world, f"other-{model}", quality=0.5)
    assert registry.register_challenger(settings, name, protocol_candidate(other)["model_uri"], "d",
                                        run_id="run-1") != first
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 3


def protocol_candidate(ctx) -> dict:
    return storage.read_json(ctx.run_dir / "als" / storage.MANIFEST)["candidate"]
