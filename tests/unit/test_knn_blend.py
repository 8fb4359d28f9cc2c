"""The item-neighbourhood model and the blend: accuracy on planted data, honest validation figures, the
Spark-free pyfuncs, and the blend through the gate."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import stages, tracking
from pipeline.models.baseline import fit_best_damping
from pipeline.models.blend import Blend, fit_blend, out_of_fold
from pipeline.models.metrics import rating_metrics
from pipeline.models.neighbourhood import ItemKNN, cap_user_ratings, fit_knn_grid, neighbour_tables, residual_matrix
from pipeline.models.protocol import load_baseline
from pipeline.models.ranking import top_k_by_score
from pipeline.models.saved import load_model
from pipeline.registry import CHAMPION, load_registered
from stage_inputs import planted_ratings, write_split

SMALL = {"knn_neighbours": [10, 30], "knn_shrinkages": [10.0], "knn_dampings": [0.5], "blend_folds": 3}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A split of planted low-rank ratings, its fitted baseline and a fitted kNN."""
    folder = tmp_path_factory.mktemp("planted")
    _, frames = write_split(folder / "etl", planted_ratings(n_users=90, n_movies=60, observed=0.5, seed=5))
    base, _ = fit_best_damping(frames["train"], frames["validation"])
    (point, knn), = fit_knn_grid(frames["train"], base, [30], [10.0], [0.5])
    return frames, base, knn


def test_knn_beats_the_baseline_on_planted_data(planted):
    frames, base, knn = planted
    knn_rmse = rating_metrics(frames["test"], knn.predict, base, frames["train"])["test_rmse"]
    base_rmse = rating_metrics(frames["test"], base.predict, base, frames["train"])["test_rmse"]
    assert knn_rmse < base_rmse - 0.03, (knn_rmse, base_rmse)


def test_knn_keeps_at_most_k_positive_neighbours_and_predicts_by_its_formula(planted):
    frames, base, knn = planted
    assert knn.neighbours.shape == (60, 30) and (knn.sims >= 0).all()
    assert ((knn.neighbours >= 0) == (knn.sims > 0)).all()
    assert all(i not in row for i, row in enumerate(knn.neighbours))  # never its own neighbour
    user, movie = int(frames["test"].user_id.iloc[0]), int(frames["test"].movie_id.iloc[0])
    mine = frames["train"][frames["train"].user_id == user]
    rated = dict(zip(mine.movie_id, mine.rating - base.predict(mine.user_id, mine.movie_id)))
    i = int(np.searchsorted(knn.movie_ids, movie))
    num = den = 0.0
    for j, s in zip(knn.neighbours[i], knn.sims[i]):
        if j >= 0 and int(knn.movie_ids[j]) in rated:
            num += s * rated[int(knn.movie_ids[j])]
            den += s
    expected = base.predict([user], [movie])[0] + (num / (den + knn.damping) if den > 0 else 0.0)
    assert knn.predict([user], [movie])[0] == pytest.approx(np.clip(expected, 0.5, 5.0), abs=1e-5)
    # the dense scores top_k ranks by are the same predictions
    row = knn.user_scores([user])[0]
    np.testing.assert_allclose(row[[i]], knn.predict([user], [movie]), atol=1e-5)


def test_knn_memory_is_bounded_by_the_block_size_not_the_catalogue(planted, caplog):
    frames, base, knn = planted
    with caplog.at_level("INFO", logger="pipeline.models.neighbourhood"):
        (_, blocked), = fit_knn_grid(frames["train"], base, [30], [10.0], [0.5], block_entries=61)  # 1 movie a block
    np.testing.assert_array_equal(blocked.neighbours, knn.neighbours)
    np.testing.assert_allclose(blocked.sims, knn.sims, rtol=1e-6)
    # a long table build logs its progress, about every tenth of the catalogue
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("knn neighbour tables:")]
    assert len(progress) == 9 and progress[0].startswith("knn neighbour tables: 6 of 60 movies (10 %"), progress


def test_the_scoring_threads_change_nothing(planted):
    """The neighbour tables (one thread per block of movies) and the top-N lists (one per batch of users) are
    the same with one thread as with several."""
    frames, base, knn = planted
    z = residual_matrix(frames["train"], base, knn.user_ids, knn.movie_ids)
    one = neighbour_tables(z, [0.0, 10.0], 30, block_entries=300, workers=1)  # 5 movies a block
    three = neighbour_tables(z, [0.0, 10.0], 30, block_entries=300, workers=3)
    for shrink in (0.0, 10.0):
        np.testing.assert_array_equal(one[shrink][0], three[shrink][0])
        np.testing.assert_array_equal(one[shrink][1], three[shrink][1])
    np.testing.assert_array_equal(three[10.0][0], knn.neighbours)
    users = list(knn.user_ids)
    lists = {w: top_k_by_score(knn.user_scores, users, knn.movie_ids, 10, batch=7, workers=w) for w in (1, 3)}
    assert list(lists[1]) == list(lists[3]) == users and lists[1] == lists[3]
    assert lists[1] == knn.top_k(users, 10)


def test_heavy_users_are_sampled_down_for_the_similarities_only(planted):
    """cap_user_ratings keeps a seeded random subset of each heavy user's ratings (the rest of the matrix
    untouched); the kNN built on capped similarities still predicts from every training rating."""
    frames, base, knn = planted
    z = residual_matrix(frames["train"], base, knn.user_ids, knn.movie_ids)
    lengths = np.diff(z.indptr)
    cap = int(np.median(lengths))
    capped = cap_user_ratings(z, cap, seed=3)
    assert (np.diff(capped.indptr) == np.minimum(lengths, cap)).all()
    for row in range(z.shape[0]):  # each kept rating is the user's own, with its own residual
        full = dict(zip(z.indices[z.indptr[row]:z.indptr[row + 1]], z.data[z.indptr[row]:z.indptr[row + 1]]))
        kept = dict(zip(capped.indices[capped.indptr[row]:capped.indptr[row + 1]],
                        capped.data[capped.indptr[row]:capped.indptr[row + 1]]))
        assert kept.items() <= full.items()
        if lengths[row] <= cap:
            assert kept == full
    again, other = cap_user_ratings(z, cap, seed=3), cap_user_ratings(z, cap, seed=4)
    assert (again != capped).nnz == 0 and (other != capped).nnz > 0  # deterministic by seed
    assert cap_user_ratings(z, None) is not None and (cap_user_ratings(z, None) != z).nnz == 0
    assert (cap_user_ratings(z, int(lengths.max())) != z).nnz == 0
    (_, light), = fit_knn_grid(frames["train"], base, [30], [10.0], [0.5], max_user_ratings=cap)
    assert not np.array_equal(light.sims, knn.sims)  # the similarities saw fewer ratings...
    assert light.residuals.nnz == z.nnz  # ...the predictions every one
    knn_rmse = rating_metrics(frames["test"], light.predict, base, frames["train"])["test_rmse"]
    base_rmse = rating_metrics(frames["test"], base.predict, base, frames["train"])["test_rmse"]
    assert knn_rmse < base_rmse - 0.02, (knn_rmse, base_rmse)


def test_an_out_of_fold_prediction_never_saw_its_own_row():
    rng = np.random.default_rng(0)
    x = rng.normal(3.5, 0.5, (200, 3))
    y = x @ [0.5, 0.3, 0.2] + rng.normal(0, 0.3, 200)
    before = out_of_fold(x, y, (0.0, 0.01), 5, 7)
    changed = y.copy()
    changed[17] += 100.0  # if row 17's weights had seen it, its prediction would move
    after = out_of_fold(x, changed, (0.0, 0.01), 5, 7)
    assert after[17] == pytest.approx(before[17])
    assert not np.allclose(after, before)  # the other folds did see it


def test_blend_weights_come_from_validation_only_and_round_trip(planted, tmp_path):
    frames, base, knn = planted
    members = {"baseline": load_model_of_baseline(base, tmp_path), "knn": knn}
    blend, measured = fit_blend(members, frames["train"], frames["validation"], base, folds=3)
    again, _ = fit_blend(members, frames["train"], frames["validation"], base, folds=3)
    assert blend.weights == again.weights
    shares = measured["shapley"]
    assert shares["gain"] == pytest.approx(sum(shares["shares"].values()) + shares["recalibration"])
    assert set(blend.weights) == {"baseline", "knn", "baseline*support", "knn*support", "support"}
    loaded = load_model(blend.save(tmp_path / "blend"))
    assert isinstance(loaded, Blend) and isinstance(loaded.members["knn"], ItemKNN)
    test = frames["test"]
    np.testing.assert_allclose(loaded.predict_all(test.user_id, test.movie_id),
                               blend.predict_all(test.user_id, test.movie_id))
    user = int(test.user_id.iloc[0])
    top = loaded.top_k([user], 5, exclude={user: set(frames["train"].movie_id[frames["train"].user_id == user])})[user]
    scores = loaded.predict([user] * len(loaded.movie_ids), loaded.movie_ids)
    assert scores[np.searchsorted(loaded.movie_ids, top[0])] == pytest.approx(
        np.nanmax(np.where(np.isin(loaded.movie_ids, top), scores, -np.inf)), abs=1e-6)


def load_model_of_baseline(base, tmp_path):
    from pipeline.models.reference import bias_model

    return load_model(bias_model(base).save(tmp_path / "baseline"))


def test_the_blend_is_chosen_on_validation_promoted_and_served_without_spark(tmp_path, settings):
    run_dir = tmp_path / "run"
    write_split(run_dir / "etl", planted_ratings(n_users=90, n_movies=60, observed=0.5, seed=5))
    ctx = stages.make_context(run_id="tiny", work_dir=run_dir, settings=settings, params=SMALL)
    for name in ("baseline", "knn", "blend", "compare_models", "gate", "promotion"):
        stages.run_stage(name, ctx)
    report = json.loads((run_dir / "report.json").read_text())
    blend = report["models"]["blend"]
    assert blend["members"] == ["baseline", "knn"] and blend["validation"].startswith("out of fold")
    # the test rows are not what the weights saw: scrambling their ratings and refitting changes nothing
    test = pd.read_parquet(run_dir / "etl" / "test.parquet")
    test.assign(rating=test.rating.sample(frac=1.0, random_state=0).to_numpy()).to_parquet(
        run_dir / "etl" / "test.parquet", index=False)
    again = stages.run_stage("blend", ctx)["models"]["blend"]
    assert again["weights"] == blend["weights"] and again["val_rmse"] == blend["val_rmse"]
    assert report["model_comparison"]["best_by_validation_rmse"] == "blend"
    assert report["gate"]["challenger"] == "blend" and report["promotion"]["decision"] == "promoted"
    assert blend["val_rmse"] < report["models"]["knn"]["val_rmse"] < report["models"]["baseline"]["val_rmse"]
    knn = report["models"]["knn"]  # its validation figures come from the grid: what the protocol would score
    validation = pd.read_parquet(run_dir / "etl" / "validation.parquet")
    train = pd.read_parquet(run_dir / "etl" / "train.parquet")
    rescored = rating_metrics(validation, load_model(knn["model_path"]).predict, load_baseline(ctx, "test"), train,
                              split="val")
    assert (knn["val_rmse"], knn["val_mae"]) == pytest.approx((rescored["val_rmse"], rescored["val_mae"]), abs=1e-12)
    table = (run_dir / "models.md").read_text()
    assert "## Blend" in table and "share of the gain" in table
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    version = client.get_model_version_by_alias(settings.registered_model, CHAMPION).version
    assert isinstance(load_registered(settings.registered_model, version), Blend)
    # both pyfuncs (the blend champion, the kNN candidate) load and predict in a process without Spark or TF
    knn_uri = json.loads((run_dir / "knn" / "manifest.json").read_text())["candidate"]["model_uri"]
    code = (
        "import sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({settings.mlflow_tracking_uri!r})\n"
        f"frame = pd.DataFrame({{'user_id': [1, 2, 9999], 'movie_id': [101, 102, 101]}})\n"
        f"for uri in ('models:/{settings.registered_model}@champion', {knn_uri!r}):\n"
        "    out = mlflow.pyfunc.load_model(uri).predict(frame)\n"
        "    assert len(out) == 3 and all(0.5 <= v <= 5.0 for v in out), out\n"
        # mlflow.pyfunc imports pyspark's Python package when installed; no JVM (SparkContext) is started
        "spark = sys.modules.get('pyspark')\n"
        "assert spark is None or spark.SparkContext._active_spark_context is None\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    tracking.configure(settings)
