"""The one model interface: predictions, cold pairs, top-k, persistence, and the MLflow pyfunc round trip."""

import numpy as np
import pandas as pd
import pytest

from pipeline.models.baseline import BiasBaseline
from pipeline.models.factor_model import FactorModel


@pytest.fixture
def model():
    train = pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "movie_id": [10, 20, 10, 30, 30],
                          "rating": [4.0, 3.0, 5.0, 2.0, 1.0]})
    base = BiasBaseline(0, 0).fit(train)
    return FactorModel("tiny", user_ids=[1, 2, 3], movie_ids=[10, 20, 30],
                       user_factors=[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
                       item_factors=[[0.2, 0.0], [0.0, 0.4], [-0.2, 0.2]],
                       baseline=base, fallback=base), base


def test_prediction_is_baseline_plus_dot_product_clipped(model):
    fm, base = model
    pred = fm.predict([1, 2, 3], [10, 20, 30])
    expected = base.predict([1, 2, 3], [10, 20, 30]) + np.array([0.2, 0.4, 0.0])
    np.testing.assert_allclose(pred, np.clip(expected, 0.5, 5.0), rtol=1e-6)


def test_unknown_pairs_are_nan_and_predict_all_fills_them_with_the_fallback(model):
    fm, base = model
    pred = fm.predict([1, 99, 2], [99, 10, 10])
    assert np.isnan(pred[0]) and np.isnan(pred[1]) and np.isfinite(pred[2])
    filled = fm.predict_all([1, 99], [99, 10])
    np.testing.assert_allclose(filled, base.predict([1, 99], [99, 10]))


def test_top_k_excludes_seen_movies_and_orders_by_score(model):
    fm, base = model
    top = fm.top_k([1, 2, 77], k=2, exclude={1: {10}})
    assert 77 not in top  # unknown users are left to the caller (popularity)
    assert 10 not in top[1] and len(top[1]) == 2
    scores = fm.predict([2, 2, 2], [10, 20, 30])
    assert top[2] == [int(x) for x in np.array([10, 20, 30])[np.argsort(-scores, kind="stable")][:2]]


def test_top_k_ranks_by_the_shown_clipped_score():
    """The baseline part is clipped before the factors add to it, and the sum is clipped again: top_k must pick
    the best of what predict() shows, and order movies tied at the top of the scale by the unclipped score."""
    train = pd.DataFrame({"user_id": [1, 1], "movie_id": [10, 20], "rating": [4.0, 4.0]})
    base = BiasBaseline(0, 0).fit(train)
    base.mu_ = 4.0
    base.user_bias_ = pd.Series([0.0], index=pd.Index([1], dtype=np.int64))
    # baseline parts: A(10) 5.6 -> clipped 5.0; B(20) 4.8; C(30) 4.0; D(40) 4.0
    base.item_bias_ = pd.Series([1.6, 0.8, 0.0, 0.0], index=pd.Index([10, 20, 30, 40], dtype=np.int64))
    fm = FactorModel("clip", user_ids=[1], movie_ids=[10, 20, 30, 40], user_factors=[[1.0]],
                     item_factors=[[-0.3], [0.0], [1.5], [1.2]], baseline=base, fallback=base)
    shown = fm.predict([1] * 4, [10, 20, 30, 40])
    np.testing.assert_allclose(shown, [4.7, 4.8, 5.0, 5.0])  # unclipped 5.3 (A) would rank A above B
    assert fm.top_k([1], k=4)[1] == [30, 40, 20, 10]  # C and D tie at 5.0: C's 5.5 before D's 5.2
    assert fm.top_k([1], k=3, exclude={1: {30}})[1] == [40, 20, 10]
    assert fm.top_k([1], k=10, exclude={1: {10, 20, 30, 40}})[1] == []


def test_save_and_load_round_trip(model, tmp_path):
    fm, _ = model
    loaded = FactorModel.load(fm.save(tmp_path / "m"))
    users, movies = [1, 2, 3, 99], [30, 20, 10, 10]
    np.testing.assert_allclose(loaded.predict_all(users, movies), fm.predict_all(users, movies))
    assert loaded.name == "tiny" and loaded.rank == 2


def test_mlflow_pyfunc_scores_any_pairs_like_the_model(model, tmp_path):
    import mlflow

    from pipeline import tracking
    from pipeline.config import load_settings

    fm, _ = model
    tracking.configure(load_settings({"RECSYS_HOME": str(tmp_path)}))
    with mlflow.start_run():
        info = tracking.log_factor_model(fm)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    pairs = pd.DataFrame({"user_id": [1, 2, 3, 1234], "movie_id": [10, 30, 5555, 20]})
    np.testing.assert_allclose(np.asarray(loaded.predict(pairs)), fm.predict_all(pairs.user_id, pairs.movie_id))
