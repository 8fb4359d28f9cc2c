"""The ranking track: the protocol's exclusions, the item-item model (EASE), implicit ALS, the ranking gate's
stages, and the cold-start measurement, on tiny generated data whose *choice* of movies carries the taste
(so that ranking models have something to learn that popularity does not)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.models.ease import _upper_to_symmetric, catalogue, ease_weights, fit_ease, gram_matrix
from pipeline.models.item_item import ItemItemModel
from pipeline.models.metrics import ranking_metrics
from pipeline.models.popularity import PopularityRanker
from pipeline.models.protocol import Split
from pipeline.models.ranking import evaluate_ranking, histories, lists_frame, map_threads, ranked_lists
from pipeline.serving.cold_start import cold_start_lists, cold_users
from stage_inputs import write_split


def clustered_choices(n_users: int = 120, n_movies: int = 60, clusters: int = 4, per_user: int = 18,
                      seed: int = 0) -> pd.DataFrame:
    """Users of a cluster watch mostly that cluster's movies (and rate them well); a few popular movies are
    watched by everyone. Ids from 1 (users) and 101 (movies); dense idx from 0."""
    rng = np.random.default_rng(seed)
    rows = []
    size = n_movies // clusters
    for u in range(n_users):
        c = u % clusters
        own = rng.choice(np.arange(c * size, (c + 1) * size), size=per_user - 3, replace=False)
        common = rng.choice(np.arange(0, 3), size=3, replace=False)  # everyone's blockbusters
        for t, m in enumerate(np.concatenate([own, common])):
            rating = 4.5 if m in own else 3.0
            rows.append((u + 1, int(m) + 101, rating, 1_000_000 + 1000 * u + t, u, int(m)))
    df = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "ts", "user_idx", "movie_idx"])
    return df.drop_duplicates(["user_id", "movie_id"]).astype({"user_idx": "int32", "movie_idx": "int32"})


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder, frames = write_split(tmp_path_factory.mktemp("rank") / "etl", clustered_choices())
    return Split(frames["train"], frames["validation"], frames["test"], {"test_fingerprint": "tiny"})


def test_test_lists_leave_out_train_and_validation_movies_and_validation_lists_only_train(split):
    class Everything:  # ranks every movie by id: whatever is not excluded comes first
        def top_k(self, user_ids, k, exclude=None, history=None):
            movies = sorted(set(split.train.movie_id) | set(split.validation.movie_id) | set(split.test.movie_id))
            return {u: [m for m in movies if m not in exclude.get(u, ())][:k] for u in user_ids}

    seen_train, seen_known = histories(split.train), histories(split.train, split.validation)
    test_users = pd.unique(split.test.user_id)
    test_lists = ranked_lists(Everything(), test_users, 10, seen_known, seen_train, split.train)
    assert all(not set(test_lists[u]) & set(seen_known.get(u, ())) for u in test_users)
    val_users = pd.unique(split.validation.user_id)
    val_lists = ranked_lists(Everything(), val_users, 10, seen_train, seen_train, split.train)
    assert any(set(val_lists[u]) & set(split.validation[split.validation.user_id == u].movie_id) for u in val_users)


def test_users_a_model_cannot_rank_get_the_popularity_list(split):
    class Nobody:
        def top_k(self, user_ids, k, exclude=None, history=None):
            return {}

    out = evaluate_ranking(Nobody(), split)
    pop = evaluate_ranking(PopularityRanker(split.train), split)
    assert out["test_ndcg_at_10"] == pytest.approx(pop["test_ndcg_at_10"])
    assert out["users"] == pop["users"] == split.test.loc[split.test.rating >= 4, "user_id"].nunique()


def test_the_exact_test_lists_are_written_and_reproduce_the_metrics(split, tmp_path):
    model = fit_ease(split.train, 10.0, min_ratings=1)
    out = evaluate_ranking(model, split, tmp_path / "lists.parquet")
    lists = pd.read_parquet(out["test_lists"])
    assert list(lists.columns) == ["user_id", "rank", "movie_id"]
    top = {u: g.sort_values("rank").movie_id.tolist() for u, g in lists.groupby("user_id")}
    assert ranking_metrics(top, split.test)["ndcg_at_10"] == pytest.approx(out["test_ndcg_at_10"])
    assert set(out) >= {"val_ndcg_at_10", "test_ndcg_at_10", "test_precision_at_10", "test_recall_at_10",
                        "test_map_at_10", "users", "test_lists"}


def test_ease_learns_what_users_choose_and_beats_popularity(split):
    ease = evaluate_ranking(fit_ease(split.train, 10.0, min_ratings=1), split)
    pop = evaluate_ranking(PopularityRanker(split.train), split)
    assert ease["test_ndcg_at_10"] > 2 * pop["test_ndcg_at_10"], (ease, pop)


def test_ease_closed_form_has_a_zero_diagonal_and_solves_its_objective():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"user_id": rng.integers(0, 30, 200), "movie_id": rng.integers(0, 12, 200)})
    frame = frame.drop_duplicates().assign(rating=4.0)
    movies = catalogue(frame, 1)
    lam = 5.0
    b = fit_ease(frame, lam, 1).weights.astype(np.float64)
    assert np.allclose(np.diag(b), 0.0)
    g = gram_matrix(frame, movies).astype(np.float64)
    # stationarity: (G + lam I) B - G is zero off the diagonal (the diagonal carries the constraint's multipliers)
    residual = (g + lam * np.eye(len(g))) @ b - g
    off = residual - np.diag(np.diag(residual))
    assert np.abs(off).max() < 1e-3 * np.abs(g).max()


def test_ease_weights_equal_the_textbook_inverse_and_reject_an_indefinite_gram():
    rng = np.random.default_rng(5)
    x = (rng.random((400, 37)) < 0.2).astype(np.float32)
    gram = x.T @ x
    p = np.linalg.inv(gram.astype(np.float64) + 20.0 * np.eye(37))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    before = gram.copy()
    b = ease_weights(gram, 20.0)
    assert b.dtype == np.float32 and b.flags["C_CONTIGUOUS"]
    assert np.abs(b - expected).max() < 1e-5 and np.array_equal(gram, before)  # the Gram matrix is untouched
    m = rng.random((10, 10))
    _upper_to_symmetric(m, block=3)  # blocks that do not divide the size
    assert np.array_equal(m, m.T)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        ease_weights(-np.eye(4, dtype=np.float32), 0.5)


def test_item_item_model_ranks_from_a_history_skips_exclusions_and_round_trips(tmp_path):
    weights = np.array([[0, 2.0, 1.0, 0], [2.0, 0, 0, 0.5], [1.0, 0, 0, 1.0], [0, 0.5, 1.0, 0]], np.float32)
    model = ItemItemModel("ease", [10, 20, 30, 40], weights)
    top = model.top_k([1, 2, 3], 2, exclude={1: {10}, 2: {10, 20}}, history={1: {10}, 2: {10, 20}, 3: {99}})
    assert top[1] == [20, 30]  # scores from movie 10's row: 20 (2.0), 30 (1.0)
    assert top[2] == [30, 40]  # 30: 1.0, 40: 0.5
    assert 3 not in top  # nothing of its history in the catalogue: left to popularity
    np.testing.assert_allclose(model.pair_scores([1, 1], [20, 40], {1: {10}}), [2.0, 0.0])
    loaded = ItemItemModel.load(model.save(tmp_path / "m"))
    assert loaded.top_k([1], 2, exclude={1: {10}}) == {1: [20, 30]}
    assert loaded.weights.dtype == np.float16


def test_the_gram_matrix_by_blocks_on_threads_is_the_exact_product(monkeypatch):
    from pipeline.models import ease

    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"user_id": rng.integers(0, 50, 600), "movie_id": rng.integers(0, 23, 600)})
    frame = pd.concat([frame, frame.iloc[:5]]).assign(rating=4.0)  # a repeated rating counts once
    movies = catalogue(frame, 1)
    x = pd.crosstab(frame.user_id, frame.movie_id).reindex(columns=movies).to_numpy() > 0
    expected = x.T.astype(np.float32) @ x.astype(np.float32)
    monkeypatch.setattr(ease, "GRAM_BLOCK_ENTRIES", 23 * 4)  # blocks of 4 columns: 6 blocks, the last short
    for workers in (1, 3):
        assert np.array_equal(gram_matrix(frame, movies, workers=workers), expected)


def test_item_item_scores_are_the_0_1_history_rows_times_the_weights():
    rng = np.random.default_rng(8)
    ids = np.arange(100, 140)
    model = ItemItemModel("ease", ids, rng.normal(size=(40, 40)).astype(np.float16))
    hist = [[100, 105, 105, 139], [], [999, 120]]  # a repeat counts once; a movie outside the catalogue none
    dense = np.zeros((3, 40), np.float32)
    for r, h in enumerate(hist):
        for m in h:
            if m in set(ids):
                dense[r, m - 100] = 1.0
    np.testing.assert_allclose(model.scores(hist), dense @ model.weights.astype(np.float32), rtol=1e-5, atol=1e-5)
    users = list(range(700))
    history = {u: rng.choice(ids, 5, replace=False).tolist() for u in users}
    by_batch = model.top_k(users, 5, exclude=history, batch=64)  # 11 batches on threads
    assert list(by_batch) == users and by_batch == model.top_k(users, 5, exclude=history, batch=1000)


def test_map_threads_runs_the_first_item_here_keeps_the_order_and_waits_to_be_iterated():
    import threading

    here, calls = threading.get_ident(), []

    def fn(x):
        calls.append((x, threading.get_ident() == here))
        return x * x

    results = map_threads(fn, range(6), workers=2)
    assert calls == []  # lazy
    assert list(results) == [0, 1, 4, 9, 16, 25]
    assert calls[0] == (0, True) and len(calls) == 6
    assert list(map_threads(fn, [], workers=2)) == []


def test_lists_frame_has_one_row_per_rank():
    frame = lists_frame({1: [5, 6], 2: [7]})
    assert frame.values.tolist() == [[1, 1, 5], [1, 2, 6], [2, 1, 7]]


def test_cold_start_users_are_given_their_first_ratings_by_time():
    train = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "movie_id": [10, 11, 12, 10, 11],
                          "rating": [4.0, 5.0, 3.0, 4.0, 4.0], "ts": [30, 10, 20, 1, 2]})
    held_out = pd.DataFrame({"user_id": [1, 2], "movie_id": [13, 13], "rating": [4.5, 2.0]})
    assert cold_users(train, held_out, known=2) == {1: {11: 5.0, 12: 3.0}}  # user 2: nothing relevant


def test_cold_start_measures_a_seeded_sample_of_users_on_large_data():
    users = np.repeat(np.arange(1, 101), 3)
    train = pd.DataFrame({"user_id": users, "movie_id": np.tile([10, 11, 12], 100), "rating": 4.0,
                          "ts": np.arange(300)})
    held_out = pd.DataFrame({"user_id": np.arange(1, 101), "movie_id": 13, "rating": 5.0})
    sample = cold_users(train, held_out, known=2, max_users=30, seed=1)
    assert len(sample) == 30 and sample == cold_users(train, held_out, known=2, max_users=30, seed=1)
    assert set(sample) != set(cold_users(train, held_out, known=2, max_users=30, seed=2))
    assert len(cold_users(train, held_out, known=2, max_users=1000)) == 100


def test_cold_start_lists_come_from_the_query_path_and_leave_out_hidden_movies():
    similar = pd.DataFrame({"movie_id": [10, 10, 10], "similar_movie_id": [20, 30, 40], "rank": [1, 2, 3],
                            "score": [0.9, 0.8, 0.7], "metric": "cosine"})
    popular = pd.DataFrame({"movie_id": [50, 20, 60], "title": ["a", "b", "c"], "genres": [[], [], []],
                            "n_ratings": [9, 8, 7], "mean_rating": [4.0, 4.0, 4.0], "score": [9.0, 8.0, 7.0]})
    lists = cold_start_lists({1: {10: 5.0}}, similar, popular, {1: {30}})
    # 20: neighbour and popular; then the popular 50 and 60 above the weaker neighbour 40; 30 hidden
    assert lists[1] == [20, 50, 60, 40]
    assert cold_start_lists({1: {10: 5.0}}, None, popular, {1: set()})[1] == [50, 20, 60]


@pytest.mark.spark
def test_implicit_als_ranks_the_planted_choices_above_popularity(spark, split):
    from pipeline.models.implicit_als import spark_fit

    frame = spark.createDataFrame(split.train[["user_idx", "movie_idx", "rating"]]).cache()
    model = spark_fit(frame, split.train, {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 10}, seed=1,
                      num_blocks=2)
    ials = evaluate_ranking(model, split)
    pop = evaluate_ranking(PopularityRanker(split.train), split)
    assert ials["test_ndcg_at_10"] > 1.5 * pop["test_ndcg_at_10"], (ials, pop)
    assert np.isfinite(model.predict([split.train.user_id.iloc[0]], [split.train.movie_id.iloc[0]])).all()


def test_item_item_embeddings_are_a_deterministic_low_rank_view_of_the_weights(split):
    model = fit_ease(split.train, 10.0, min_ratings=1)
    ids, vectors = model.item_embeddings(rank=8)
    again = model.item_embeddings(rank=8)[1]
    assert vectors.shape == (len(model.movie_ids), 8) and np.array_equal(vectors, again)
    assert np.array_equal(ids, model.movie_ids)
    # movies of one planted cluster are each other's nearest neighbours
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    cluster = (ids - 101) // 15
    nearest = np.argmax(sims, axis=1)
    assert np.mean(cluster[nearest] == cluster) > 0.8


def test_best_k_equals_a_full_sort_by_score_raw_and_id_with_ties_exclusions_and_few_finite_scores():
    from pipeline.models.ranking import Seen, best_k, exclusion_pairs

    rng = np.random.default_rng(3)
    movie_ids = rng.permutation(np.arange(1000, 1040))
    shown = rng.integers(0, 6, size=(50, 40)).astype(np.float64)  # many ties at every cut
    raw = shown + rng.integers(0, 3, size=shown.shape) * 0.1
    shown[3, 5:] = -np.inf  # fewer than k finite scores
    shown[4, :] = np.nan
    seen = pd.DataFrame({"user_id": rng.integers(0, 50, 300), "movie_id": rng.choice(movie_ids, 300)})
    seen = seen.drop_duplicates()
    as_dict = {u: set(g.movie_id) for u, g in seen.groupby("user_id")}
    users = list(range(50))
    pairs = exclusion_pairs(Seen(seen), users)
    assert sorted(zip(*pairs)) == sorted(zip(*exclusion_pairs(as_dict, users)))
    got = best_k(shown.copy(), movie_ids, 10, pairs, raw=raw)
    for u in users:
        col = {m: j for j, m in enumerate(movie_ids)}
        allowed = [m for m in movie_ids if np.isfinite(shown[u, col[m]]) and m not in as_dict.get(u, ())]
        expected = sorted(allowed, key=lambda m: (-shown[u, col[m]], -raw[u, col[m]], m))
        assert got[u] == expected[:10]
    assert got[4] == [] and len(got[3]) <= 5


def test_the_ranking_sample_is_seeded_relevant_users_only_and_the_same_for_every_model(split):
    from dataclasses import replace

    from pipeline.models.ranking import measured_users

    relevant = split.test.loc[split.test.rating >= 4, "user_id"].nunique()
    users, rows = measured_users(split.test, relevant, seed=1)  # room for all: every user, every row
    assert len(users) == split.test.user_id.nunique() and len(rows) == len(split.test)
    users, rows = measured_users(split.test, 20, seed=1)
    again, _ = measured_users(split.test, 20, seed=1)
    assert len(users) == 20 and list(users) == list(again) and set(rows.user_id) == set(users)
    assert rows.groupby("user_id").rating.max().min() >= 4.0  # each sampled user counts in the means
    sampled = replace(split, ranking_sample=(20, 1))
    out = evaluate_ranking(PopularityRanker(split.train), sampled)
    assert out["users"] == 20 and out["val_users"] == 20


def test_a_validation_only_measurement_gives_the_same_validation_figures_and_no_test_lists(split):
    ranker = PopularityRanker(split.train)
    both = evaluate_ranking(ranker, split)
    val_only = evaluate_ranking(ranker, split, splits=("val",))
    assert val_only == {k: v for k, v in both.items() if k.startswith("val_")}
    assert evaluate_ranking(ranker, split, splits=("test",))["test_ndcg_at_10"] == both["test_ndcg_at_10"]


def test_one_ranking_per_user_gives_both_splits_exactly_the_lists_of_two_rankings():
    """ranked_lists_both against ranked_lists run once per split: ties at every cut, a heavy user ranked deeper,
    a test user with no validation movies, one who has rated nearly the whole catalogue, and one the model
    cannot rank (popularity)."""
    from pipeline.models.ranking import best_k, exclusion_pairs, ranked_lists_both

    rng = np.random.default_rng(7)
    movies = np.arange(101, 161)
    rows = {"train": [], "validation": [], "test": []}
    for user in range(1, 41):
        sizes = {1: (15, 30, 3), 2: (12, 0, 2), 4: (48, 8, 2)}.get(user, (int(rng.integers(8, 20)), 2, 2))
        picked = rng.permutation(movies)[:sum(sizes)]
        for name, part in zip(rows, np.split(picked, np.cumsum(sizes)[:-1])):
            rows[name] += [(user, int(m), float(rng.choice([2.0, 4.0, 5.0]))) for m in part]
    frames = {n: pd.DataFrame(r, columns=["user_id", "movie_id", "rating"]) for n, r in rows.items()}
    scores = rng.integers(0, 4, size=(41, len(movies))).astype(np.float64)  # many ties: broken by movie id

    class Ties:
        def top_k(self, user_ids, k, exclude=None, history=None):
            users = [u for u in user_ids if u != 3]  # user 3 is unknown to it
            lists = best_k(scores[users].copy(), movies, k, exclusion_pairs(exclude, users))
            return dict(zip(users, lists))

    seen_train = histories(frames["train"])
    seen_known = histories(frames["train"], frames["validation"])
    val_users, test_users = pd.unique(frames["validation"].user_id), pd.unique(frames["test"].user_id)
    assert 2 in test_users and 2 not in val_users
    for model in (Ties(), PopularityRanker(frames["train"])):
        val, test = ranked_lists_both(model, val_users, test_users, 10, seen_train, seen_known, frames["train"])
        assert val == ranked_lists(model, val_users, 10, seen_train, seen_train, frames["train"])
        assert test == ranked_lists(model, test_users, 10, seen_known, seen_train, frames["train"])
    assert len(test[4]) == 4 and not set(test[1]) & set(seen_known[1])  # 60 movies, 56 known to user 4
