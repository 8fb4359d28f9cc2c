"""What a candidate's test lists hold besides hits (``pipeline.models.list_metrics``): coverage, long-tail share,
novelty, genre diversity and NDCG@10 per user segment, on tiny data whose figures are worked out by hand; and
the figures reaching report.json, models.md and MLflow through a run's baseline and EASE stages."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from test_ranking import clustered_choices

from pipeline import stages
from pipeline.config import load_settings
from pipeline.models.list_metrics import (
    genre_diversity,
    head_movies,
    list_quality,
    list_quality_lines,
    mlflow_metrics,
    segment_ndcg,
    user_segments,
)
from pipeline.models.metrics import ranking_metrics
from stage_inputs import write_split, write_validated


def frame(rows, columns) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).astype({c: "int64" for c in columns if c != "rating"})


def lists_of(by_user: dict) -> pd.DataFrame:
    return frame([(u, r, m) for u, movies in by_user.items() for r, m in enumerate(movies, start=1)],
                 ["user_id", "rank", "movie_id"])


def ratings(pairs, rating: float = 4.0) -> pd.DataFrame:
    return pd.DataFrame({"user_id": np.array([u for u, _ in pairs], dtype=np.int64),
                         "movie_id": np.array([m for _, m in pairs], dtype=np.int64),
                         "rating": np.full(len(pairs), rating)})


# Training ratings: movie 1 by all 4 users, 2 by three, 3, 4, 5, 6 by one each (11 ratings).
TRAIN = ratings([(u, 1) for u in (1, 2, 3, 4)] + [(u, 2) for u in (1, 2, 3)] + [(1, 3), (2, 4), (3, 5), (4, 6)])
GENRES = pd.Series({1: ["A"], 2: ["A", "B"], 3: ["B"], 4: [], 5: ["A", "B", "C"], 6: ["C"]})
LISTS = lists_of({1: [4, 5], 3: [1], 4: [2, 3, 4]})


def test_the_head_is_the_fewest_most_rated_movies_reaching_the_share_of_ratings():
    # cumulative ratings 4, 7, 8, 9, 10, 11 of 11: half is 5.5, reached at the 2nd movie
    assert head_movies(TRAIN).tolist() == [1, 2]
    assert head_movies(TRAIN, 0.8).tolist() == [1, 2, 3, 4]  # 8.8: the 4th (ties: the smaller id first)
    assert head_movies(TRAIN, 8 / 11).tolist() == [1, 2, 3]  # reached exactly: no further movie
    assert head_movies(TRAIN, 1.0).tolist() == [1, 2, 3, 4, 5, 6]


def test_coverage_long_tail_novelty_and_diversity_by_hand():
    q = list_quality(LISTS, TRAIN, TRAIN.iloc[:0], GENRES)
    assert q["coverage"] == pytest.approx(5 / 6)  # movies 1-5 listed, 6 not
    assert q["long_tail_share"] == pytest.approx(4 / 6)  # 6 slots, 4 hold the tail (movies 3-6): 4, 5, 3, 4
    # self-information: movies 3, 4, 5 rated by 1 of 4 users (2 bits), 2 by 3 of 4, 1 by all (0 bits)
    assert q["novelty"] == pytest.approx((2 + 2 + 0 + math.log2(4 / 3) + 2 + 2) / 6)
    # user 1: {} vs {A,B,C}: 1; user 4: {A,B}-{B} 1/2, {A,B}-{} 1, {B}-{} 1: 5/6; user 3's one movie: no pair
    assert q["diversity"] == pytest.approx((1 + 5 / 6) / 2)
    assert list_quality(LISTS, TRAIN, TRAIN.iloc[:0], None)["diversity"] is None


def test_diversity_counts_two_movies_without_genres_as_alike_and_a_list_of_one_not_at_all():
    assert genre_diversity(lists_of({1: [4, 7]}), GENRES) == 0.0  # 4 has no genres, 7 is not in the table
    assert genre_diversity(lists_of({1: [1, 2, 3], 2: [6]}), GENRES) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert genre_diversity(lists_of({2: [6]}), GENRES) is None


def test_a_listed_movie_outside_training_is_tail_and_as_rare_as_one_rating():
    q = list_quality(lists_of({1: [99]}), TRAIN, TRAIN.iloc[:0], GENRES)
    assert (q["coverage"], q["long_tail_share"], q["novelty"]) == (0.0, 1.0, pytest.approx(2.0))


def test_no_lists_give_no_figures():
    q = list_quality(lists_of({}), TRAIN, TRAIN.iloc[:0], GENRES)
    assert (q["coverage"], q["long_tail_share"], q["novelty"], q["diversity"]) == (0.0, None, None, None)
    assert all(s == {"users": 0, "test_ndcg_at_10": None} for s in q["segments"].values())


def test_segments_cut_at_5_and_50_training_ratings():
    assert user_segments([0, 5, 6, 50, 51]).tolist() == ["cold", "cold", "light", "light", "heavy"]


def test_ndcg_per_segment_by_hand_and_its_user_weighted_mean_is_the_overall_ndcg():
    # training ratings: users 1 and 3 cold (3 and 5), 2 and 5 light (6 and 50), 4 heavy (51), 6 none (cold)
    train = ratings([(u, m) for u, n in {1: 3, 2: 6, 3: 5, 4: 51, 5: 50}.items() for m in range(1, n + 1)])
    test = pd.concat([ratings([(1, 100), (3, 100), (3, 101), (2, 100), (4, 100), (6, 100)]),
                      ratings([(2, 101), (5, 100)], rating=3.5)])  # 4.0 is relevant, 3.5 is not
    top = {1: [100, 101], 3: [102, 100], 2: [101, 102, 100], 5: [100], 6: [100]}  # user 4: no list
    segments = segment_ndcg(lists_of(top), train, test)
    one = 1 / (1 + math.log2(3))  # user 3: a hit at rank 2 of 2 relevant
    assert segments["cold"] == {"users": 3, "test_ndcg_at_10": pytest.approx((1 + one + 1) / 3)}
    assert segments["light"] == {"users": 1, "test_ndcg_at_10": pytest.approx(0.5)}  # user 5 has nothing relevant
    assert segments["heavy"] == {"users": 1, "test_ndcg_at_10": 0.0}
    overall = ranking_metrics(top, test)
    weighted = sum(s["users"] * s["test_ndcg_at_10"] for s in segments.values()) / overall["users"]
    assert weighted == pytest.approx(overall["ndcg_at_10"], abs=1e-12)


def test_segment_ndcg_equals_the_protocols_ndcg_on_random_lists():
    rng = np.random.default_rng(4)
    train = ratings([(u, m) for u in range(1, 41) for m in rng.choice(200, rng.integers(1, 90), replace=False)])
    test = pd.DataFrame({"user_id": rng.integers(1, 46, 300), "movie_id": rng.integers(0, 60, 300),
                         "rating": rng.choice([2.0, 4.0, 5.0], 300)}).drop_duplicates(["user_id", "movie_id"])
    top = {u: rng.choice(60, 10, replace=False).tolist() for u in range(1, 44)}
    segments = segment_ndcg(lists_of(top), train, test)
    overall = ranking_metrics(top, test)
    assert sum(s["users"] for s in segments.values()) == overall["users"]
    weighted = sum(s["users"] * (s["test_ndcg_at_10"] or 0.0) for s in segments.values()) / overall["users"]
    assert weighted == pytest.approx(overall["ndcg_at_10"], abs=1e-12)


def test_mlflow_metrics_are_flat_prefixed_and_leave_out_none():
    q = {"coverage": 0.5, "long_tail_share": 0.25, "novelty": 3.0, "diversity": None,
         "segments": {"cold": {"users": 0, "test_ndcg_at_10": None}, "light": {"users": 7, "test_ndcg_at_10": 0.2}}}
    assert mlflow_metrics(q, "popularity_test_") == {
        "popularity_test_coverage": 0.5, "popularity_test_long_tail_share": 0.25, "popularity_test_novelty": 3.0,
        "popularity_test_segment_cold_users": 0, "popularity_test_segment_light_ndcg_at_10": 0.2,
        "popularity_test_segment_light_users": 7}


def test_the_models_md_table_has_a_row_per_list_with_every_figure():
    q = list_quality(LISTS, TRAIN, ratings([(4, 2)]), GENRES)
    header, rule, row = list_quality_lines([("ease", q)])[-3:]
    assert header.count("|") == rule.count("|") == row.count("|") == 12
    assert row == f"| ease | 0.8333 | 0.6667 | {q['novelty']:.4f} | 0.9167 | 1.0000 | 1 |  | 0 |  | 0 |"


def test_a_run_reports_the_figures_in_report_json_models_md_and_mlflow(tmp_path):
    choices = clustered_choices(n_users=40, per_user=12)
    run_dir = tmp_path / "run"
    write_split(run_dir / "etl", choices)
    movies = pd.DataFrame({"movie_id": np.arange(101, 161, dtype=np.int64), "title": "m",
                           "genres": [[f"G{m % 4}", f"H{m % 3}"] for m in range(60)]})
    write_validated(run_dir / "validate", choices[["user_id", "movie_id", "rating", "ts"]], movies)
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    ctx = stages.make_context(run_id="lists", work_dir=run_dir, settings=settings,
                              params={"ease_lambdas": [5.0], "ease_min_ratings": 1})
    for stage in ("baseline", "ease", "compare_models"):
        stages.run_stage(stage, ctx)
    ranking = stages.report.write_report(ctx, stages.ORDER)["ranking"]
    for figures in [ranking["popularity"], *ranking["candidates"].values()]:
        assert 0 < figures["coverage"] <= 1 and 0 <= figures["long_tail_share"] <= 1
        assert figures["novelty"] > 0 and 0 < figures["diversity"] <= 1
        assert sum(s["users"] for s in figures["segments"].values()) == figures["users"]
    assert ranking["candidates"]["ease"]["coverage"] > ranking["popularity"]["coverage"]
    assert "| ease | " in (run_dir / "models.md").read_text().split("## Beyond hits")[1]
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    ease = client.get_run(stages.report.write_report(ctx, stages.ORDER)["models"]["ease"]["mlflow_run_id"])
    assert ease.data.metrics["test_coverage"] == pytest.approx(ranking["candidates"]["ease"]["coverage"])
    assert "test_segment_light_ndcg_at_10" in ease.data.metrics
    baseline = client.get_run(stages.report.write_report(ctx, stages.ORDER)["models"]["baseline"]["mlflow_run_id"])
    assert baseline.data.metrics["popularity_test_novelty"] == pytest.approx(ranking["popularity"]["novelty"])
