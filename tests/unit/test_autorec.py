"""Item-based AutoRec: masked gradients, sparse-only weights, a planted low-rank structure, the exported model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")

from pipeline.errors import ConfigError, DataValidationError  # noqa: E402
from pipeline.models.autorec import (  # noqa: E402
    ItemAutoRec,
    ItemRows,
    configure_threads,
    fit_autorec,
    pad_batch,
    padded_size,
    train_autorec,
)
from pipeline.models.baseline import BiasBaseline  # noqa: E402
from pipeline.models.metrics import rating_metrics, rmse  # noqa: E402

configure_threads(2, 1)

N_USERS, N_MOVIES, RANK = 150, 80, 3
FAST = {"hidden_units": 20, "l2": 1.0, "dropout": 0.0, "learning_rate": 0.01, "epochs": 60, "batch_size": 16,
        "patience": 8, "seed": 3}


def _planted(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, validation, test): 30% of a rank-3 150 x 80 rating matrix plus small noise, split 70/15/15."""
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(N_USERS, RANK))
    movies = rng.normal(size=(N_MOVIES, RANK))
    dense = np.clip(3.0 + 1.2 * users @ movies.T / np.sqrt(RANK), 0.5, 5.0)
    u, m = np.nonzero(rng.random((N_USERS, N_MOVIES)) < 0.3)
    ratings = np.clip(dense[u, m] + rng.normal(scale=0.1, size=len(u)), 0.5, 5.0)
    frame = pd.DataFrame({"user_id": u + 1000, "movie_id": m * 7 + 1, "rating": ratings})
    part = rng.random(len(frame))
    return frame[part < 0.7], frame[(part >= 0.7) & (part < 0.85)], frame[part >= 0.85]


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def fitted(planted):
    train, validation, _ = planted
    return fit_autorec(train, validation, **FAST)


def test_reconstruction_gradient_is_zero_for_users_unobserved_in_the_batch():
    network = ItemAutoRec(n_users=6, hidden_units=3, seed=1)
    # Two movies in the batch, rated by users 0, 2 and 3 only.
    rows = tf.constant([0, 0, 1, 1], tf.int64)
    cols = tf.constant([0, 2, 2, 3], tf.int64)
    values = tf.constant([1.0, -0.5, 0.8, -1.2])
    with tf.GradientTape() as tape:
        loss = network.squared_error(rows, cols, values, tf.constant(2, tf.int64))
    grads = tape.gradient(loss, [network.w_enc, network.w_dec, network.b_dec])
    w_enc, w_dec, b_dec = (tf.convert_to_tensor(g).numpy() for g in grads)
    observed, unobserved = [0, 2, 3], [1, 4, 5]
    assert np.all(w_enc[unobserved] == 0) and np.all(w_dec[unobserved] == 0) and np.all(b_dec[unobserved] == 0)
    assert np.all(np.abs(w_enc[observed]).sum(axis=1) > 0)
    assert np.all(np.abs(w_dec[observed]).sum(axis=1) > 0)
    assert np.all(b_dec[observed] != 0)


def test_item_rows_batch_gathers_each_movies_ratings():
    items = np.array([2, 0, 2, 1, 0])
    users = np.array([5, 1, 0, 3, 4])
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    rows = ItemRows.from_codes(items, users, values, n_items=4)
    assert rows.indptr.tolist() == [0, 2, 3, 5, 5]
    batch_rows, batch_users, batch_values = rows.batch(np.array([2, 3, 0]))
    assert batch_rows.tolist() == [0, 0, 2, 2]  # movie 3 has no ratings
    assert batch_users.tolist() == [0, 5, 1, 4]
    assert batch_values == pytest.approx([0.3, 0.1, 0.2, 0.5])


def test_padding_a_batch_for_xla_changes_neither_the_loss_nor_a_gradient():
    sizes = [padded_size(n) for n in (1, 1024, 1025, 5000, 400_000)]
    assert sizes[0] == sizes[1] == 1024 and 1025 <= sizes[2] <= 1.2 * 1025
    assert 5000 <= sizes[3] <= 1.2 * 5000 and 400_000 <= sizes[4] <= 1.2 * 400_000
    assert len({padded_size(n) for n in range(300_000, 600_001, 1000)}) <= 5  # a handful of shapes to compile
    network = ItemAutoRec(n_users=6, hidden_units=3, seed=1)
    rows, cols = np.array([0, 0, 1, 1, 2], np.int64), np.array([0, 2, 2, 3, 5], np.int64)
    values = np.array([1.0, -0.5, 0.8, -1.2, 0.3], np.float32)
    variables = [network.w_enc, network.b_enc, network.w_dec, network.b_dec]

    def loss_and_grads(*batch, n_rows, **kwargs):
        with tf.GradientTape() as tape:
            loss = network.squared_error(*batch, n_rows, **kwargs)
        return float(loss), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]

    plain = loss_and_grads(rows, cols, values, n_rows=3)
    p_rows, p_cols, p_values, weights = pad_batch(rows, cols, values, dummy_row=3)
    assert len(p_values) == 1024 and weights.sum() == 5 and (p_rows[5:] == 3).all() and (p_values[5:] == 0).all()
    padded = loss_and_grads(p_rows, p_cols, p_values, n_rows=4, weights=weights)
    assert padded[0] == pytest.approx(plain[0], rel=1e-6)
    for mine, theirs in zip(padded[1], plain[1]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_autorec_learns_a_planted_low_rank_structure_far_better_than_the_bias_baseline(planted, fitted):
    train, _, test = planted
    baseline = BiasBaseline().fit(train)
    autorec = rating_metrics(test, fitted.model.predict, baseline, train)["test_rmse"]
    bias_only = rating_metrics(test, baseline.predict, baseline, train)["test_rmse"]
    assert autorec < 0.75 * bias_only, (autorec, bias_only)


def test_factor_model_reproduces_the_network_predictions(planted, fitted):
    train, _, _ = planted
    model, network = fitted.model, fitted.network
    users = model._users.get_indexer(train["user_id"].to_numpy())
    movies = model._movies.get_indexer(train["movie_id"].to_numpy())
    base = model.baseline.predict(train["user_id"], train["movie_id"])
    inputs = (train["rating"].to_numpy() - model.offset - base).astype(np.float32)
    codes = network.encode(movies, users, inputs, len(model.movie_ids))
    network_pred = np.clip(network.decode_at(codes, movies, users).numpy() + model.offset + base, 0.5, 5.0)
    assert np.max(np.abs(model.predict(train["user_id"], train["movie_id"]) - network_pred)) < 1e-4
    movie_ids, vectors = model.item_embeddings()
    assert vectors.shape == (train["movie_id"].nunique(), FAST["hidden_units"])
    assert movie_ids.tolist() == sorted(train["movie_id"].unique())
    assert model.name == "autorec" and model.user_factors.shape == (train["user_id"].nunique(), FAST["hidden_units"])


def test_early_stopping_keeps_the_best_validation_epoch(planted):
    train, validation, _ = planted
    overfit = {**FAST, "hidden_units": 40, "l2": 0.0, "learning_rate": 0.03, "epochs": 40, "patience": 3}
    seen = []
    model, history = train_autorec(train, validation, on_epoch=seen.append, **overfit)
    assert seen == history and set(history[0]) == {"epoch", "train_rmse", "val_rmse"}
    val_rmses = [row["val_rmse"] for row in history]
    best = int(np.argmin(val_rmses)) + 1
    assert len(history) == best + overfit["patience"] < overfit["epochs"]  # it stopped early
    assert model.meta["best_epoch"] == best
    warm = validation["user_id"].isin(train["user_id"]) & validation["movie_id"].isin(train["movie_id"])
    recomputed = rmse(validation.loc[warm, "rating"], model.predict(validation.loc[warm, "user_id"],
                                                                   validation.loc[warm, "movie_id"]))
    assert recomputed == pytest.approx(min(val_rmses), abs=1e-9)


def test_no_trainable_weight_is_users_by_movies(planted, fitted):
    train, _, _ = planted
    n_users, n_movies, hidden = train["user_id"].nunique(), train["movie_id"].nunique(), FAST["hidden_units"]
    shapes = sorted(tuple(v.shape) for v in fitted.network.trainable_variables)
    assert shapes == sorted([(n_users, hidden), (hidden,), (n_users, hidden), (n_users,)])
    assert all(n_movies not in shape and np.prod(shape) < n_users * n_movies for shape in shapes)


def test_mean_normalisation_uses_the_training_mean_as_offset(planted):
    train, validation, _ = planted
    model, _ = train_autorec(train, validation, normalization="mean", **{**FAST, "epochs": 2})
    assert model.baseline is None and model.offset == pytest.approx(train["rating"].mean())


def test_configure_threads_after_initialisation_does_not_raise(fitted):
    assert configure_threads(1, 1) is False


@pytest.mark.parametrize("bad", [{"hidden_units": 0}, {"dropout": 1.0}, {"l2": -1}, {"normalization": "z"},
                                 {"patience": 0}, {"lr_decay": 0.0}, {"lr_decay": 1.5}])
def test_bad_hyper_parameters_are_config_errors(planted, bad):
    train, validation, _ = planted
    with pytest.raises(ConfigError):
        train_autorec(train, validation, **{**FAST, **bad})


def test_a_validation_split_without_warm_rows_is_rejected(planted):
    train, _, _ = planted
    cold = pd.DataFrame({"user_id": [1], "movie_id": [1], "rating": [3.0]})
    with pytest.raises(DataValidationError, match="validation"):
        train_autorec(train, cold, **FAST)


def test_same_seed_gives_the_same_model(planted):
    train, validation, _ = planted
    params = {**FAST, "dropout": 0.3, "epochs": 5}
    first, first_history = train_autorec(train, validation, **params)
    second, second_history = train_autorec(train, validation, **params)
    assert [r["val_rmse"] for r in first_history] == pytest.approx([r["val_rmse"] for r in second_history], abs=1e-6)
    np.testing.assert_allclose(first.item_factors, second.item_factors, atol=1e-5)


def test_the_learning_rate_schedule_shrinks_later_steps_only(planted):
    train, validation, _ = planted
    one = {**FAST, "epochs": 1, "patience": 1}
    first_constant, _ = train_autorec(train, validation, **one)
    first_decayed, _ = train_autorec(train, validation, **one, lr_decay=0.5)
    np.testing.assert_allclose(first_decayed.item_factors, first_constant.item_factors, atol=1e-5)  # epoch 1: lr
    three = {**FAST, "epochs": 3, "patience": 3}
    constant, _ = train_autorec(train, validation, **three)
    decayed, _ = train_autorec(train, validation, **three, lr_decay=0.5)
    assert decayed.meta["lr_decay"] == 0.5 and not np.allclose(constant.item_factors, decayed.item_factors)


def test_the_training_curve_uses_a_sample_on_large_data_and_leaves_the_model_unchanged(planted, monkeypatch):
    from pipeline.models import autorec

    train, validation, _ = planted
    settings = {**FAST, "epochs": 2}
    full_model, full = train_autorec(train, validation, **settings)
    monkeypatch.setattr(autorec, "TRAIN_RMSE_SAMPLE", len(train) // 4)
    sampled_model, sampled = train_autorec(train, validation, **settings)
    assert [r["val_rmse"] for r in sampled] == [r["val_rmse"] for r in full]  # training and selection as before
    np.testing.assert_array_equal(sampled_model.item_factors, full_model.item_factors)
    assert all(abs(s["train_rmse"] - f["train_rmse"]) < 0.05 and s["train_rmse"] != f["train_rmse"]
               for s, f in zip(sampled, full))  # an estimate of the same figure
