"""The learning-to-rank stage on tiny data: candidates from the ranking models, features from every model, a
LambdaRank model chosen by cross-validation over validation users, out-of-fold validation figures, and a
saved model that ranks from a history without Spark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ranking import clustered_choices

from pipeline.models.baseline import BiasBaseline
from pipeline.models.ease import fit_ease
from pipeline.models.factor_model import FactorModel
from pipeline.models.ltr import fit_reranker, labelled
from pipeline.models.popularity import PopularityRanker
from pipeline.models.protocol import Split
from pipeline.models.ranking import evaluate_ranking, histories
from pipeline.models.reference import bias_model
from pipeline.models.reranker import Reranker, ranked
from pipeline.models.saved import load_model
from pipeline.params import resolve_params
from stage_inputs import write_split

TINY = {"ltr_objectives": ["lambdarank"], "ltr_num_leaves": [7], "ltr_max_rounds": 40, "ltr_min_child_samples": 5,
        "ltr_candidates": 20,
        "ltr_folds": 3}


def _svd_ranker(train: pd.DataFrame, rank: int = 4) -> FactorModel:
    """A Spark-free preference model (truncated SVD of the 0/1 matrix) standing in for implicit ALS."""
    users, movies = np.sort(train.user_id.unique()), np.sort(train.movie_id.unique())
    x = pd.crosstab(train.user_id, train.movie_id).reindex(index=users, columns=movies).to_numpy(np.float64)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return FactorModel("implicit_als", user_ids=users, movie_ids=movies, user_factors=u[:, :rank] * s[:rank],
                       item_factors=vt[:rank].T, min_rating=-1e30, max_rating=1e30)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    _, frames = write_split(tmp_path_factory.mktemp("ltr") / "etl", clustered_choices(n_users=160))
    split = Split(frames["train"], frames["validation"], frames["test"], {"test_fingerprint": "tiny"})
    movies = pd.DataFrame({"movie_id": np.arange(101, 161),
                           "genres": [np.array([f"G{(m - 101) // 15}", "Drama"]) for m in range(101, 161)],
                           "year": 1990.0})
    generators = {"ease": fit_ease(split.train, 5.0, 1, input="rating"), "implicit_als": _svd_ranker(split.train)}
    raters = {"baseline": bias_model(BiasBaseline().fit(split.train))}
    model, out = fit_reranker(split, generators, raters, movies, resolve_params(TINY))
    return split, model, out


def test_the_features_come_from_every_model_and_the_importances_name_them(fitted):
    _, model, out = fitted
    section = out["section"]
    assert section["features"] == model.features
    assert {"ease_score", "ease_rank", "implicit_als_score", "implicit_als_rank", "baseline_rating", "popularity",
            "recent_popularity", "genre_match", "user_activity", "user_mean_rating"} <= set(model.features)
    assert set(section["feature_importance"]) == set(model.features)
    assert sum(section["feature_importance"].values()) == pytest.approx(1.0, abs=1e-3)
    assert section["chosen"]["rounds"] >= 1 and len(section["grid"]) == 1
    assert section["generators"] == ["ease", "implicit_als"] and section["raters"] == ["baseline"]


def test_the_validation_figures_are_out_of_fold_and_the_test_lists_follow_the_protocol(fitted):
    split, model, out = fitted
    val = out["validation"]
    assert 0 < val["val_ndcg_at_10"] <= 1 and val["val_users"] > 0
    scores = evaluate_ranking(model, split)
    popularity = evaluate_ranking(PopularityRanker(split.train), split)
    assert scores["test_ndcg_at_10"] > popularity["test_ndcg_at_10"]
    seen_known = split.seen[1]
    lists = model.top_k([1, 2, 3], 10, exclude=seen_known, history=split.seen[0])
    for user, movies in lists.items():
        assert len(movies) == 10 and not set(movies) & set(seen_known[user].tolist())


def test_candidates_are_the_union_of_the_generators_lists_one_row_per_pair(fitted):
    split, model, _ = fitted
    seen = split.seen[0]
    frame = model.candidates([1, 2], seen, seen)
    assert not frame.duplicated(["row", "movie_id"]).any()
    for row, user in enumerate([1, 2]):
        mine = frame[frame["row"] == row]
        assert not set(mine["movie_id"]) & set(seen[user].tolist())
        assert 20 <= len(mine) <= 40  # two lists of 20, overlapping
        top_ease = model.generators["ease"].top_k([user], 20, exclude=seen, history=seen)[user]
        assert set(top_ease) <= set(mine["movie_id"])
        assert (mine.loc[mine["movie_id"].isin(top_ease), "ease_rank"] <= 20).all()
        assert (mine.loc[~mine["movie_id"].isin(top_ease), "ease_rank"] == 21).all()


def test_the_saved_reranker_loads_by_kind_and_ranks_the_same_from_a_history(fitted, tmp_path):
    split, model, _ = fitted
    loaded = load_model(model.save(tmp_path / "ltr"))
    assert isinstance(loaded, Reranker) and loaded.features == model.features
    seen = split.seen[0]
    users = [1, 5, 9]
    assert loaded.top_k(users, 10, exclude=seen, history=seen) == model.top_k(users, 10, exclude=seen, history=seen)
    # a plain mapping history with ratings (the pyfunc's input) ranks like the Seen of the same rows
    as_dict = {u: dict(zip(seen[u].tolist(), split.train.set_index(["user_id", "movie_id"]).loc[u].loc[
        seen[u].tolist(), "rating"].tolist())) for u in users}
    assert loaded.top_k(users, 10, exclude=as_dict) == model.top_k(users, 10, exclude=seen, history=seen)
    top = model.top_k([1], 3, exclude=seen, history=seen)[1]
    scores = model.pair_scores([1, 1, 1], top, seen)
    assert np.all(np.diff(scores) <= 0)


def test_labels_are_the_relevant_held_out_pairs_and_ties_rank_by_movie_id():
    frame = pd.DataFrame({"row": [0, 0, 1, 1], "movie_id": [10, 20, 10, 30]})
    held = pd.DataFrame({"user_id": [7, 7, 8], "movie_id": [10, 20, 30], "rating": [4.0, 3.5, 5.0]})
    assert labelled(frame, np.array([7, 8]), held).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert ranked(frame, np.array([1.0, 1.0, 0.0, 2.0]), [7, 8], 1) == {7: [10], 8: [30]}


def test_a_user_no_generator_knows_gets_no_candidates(fitted):
    _, model, _ = fitted
    empty = histories(pd.DataFrame({"user_id": [999], "movie_id": [99999], "rating": [4.0]}))
    assert model.top_k([999], 10, exclude=empty, history=empty) == {}


def test_serving_lists_the_rerankers_top_candidates_with_their_scores(fitted):
    from pipeline.serving.recommend import recommend_known_users

    split, model, _ = fitted
    out = recommend_known_users(model, split.train, 5)
    assert set(out["user_id"]) == set(split.train["user_id"])
    first = out[out["user_id"] == 1]
    assert first["rank"].tolist() == [1, 2, 3, 4, 5] and first["score"].is_monotonic_decreasing
    seen = split.seen[0]
    assert first["movie_id"].tolist() == model.top_k([1], 5, exclude=seen, history=seen)[1]
    np.testing.assert_allclose(first["score"], model.pair_scores([1] * 5, first["movie_id"], seen))


def test_the_reported_test_figure_is_the_one_the_gate_recomputes(fitted):
    """A reranker's list depends on what it leaves out, so each split is ranked with its own exclusions: the
    test lists come from a ranking that leaves out training and validation movies, as the gate's do."""
    split, model, _ = fitted
    calls = []

    class Recording:
        prefix_consistent = False

        def top_k(self, user_ids, k, exclude=None, history=None):
            calls.append((k, exclude))
            return model.top_k(user_ids, k, exclude=exclude, history=history)

    both = evaluate_ranking(Recording(), split)
    seen_train, seen_known = split.seen
    assert [(k, ex is seen_train) for k, ex in calls] == [(10, True), (10, False)]
    assert calls[1][1] is seen_known
    assert both["test_ndcg_at_10"] == evaluate_ranking(model, split, splits=("test",))["test_ndcg_at_10"]
