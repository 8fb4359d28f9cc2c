"""Hostile data for the models: too few users or movies, a split without test or validation ratings.

Each case cuts the real ml-latest-small down (the first users by id, or the most rated movies) and runs the
whole pipeline on it in this process. Tiny data either runs, with the models that cannot fit on it skipped and
their reason recorded, or stops with exit 5 at the baseline stage, before any model trains, naming what is
too small, its count and the minimum (docs/adr/0065-minimum-data-for-the-models.md). No traceback either way.
The gate's retries and the MLflow runs of a killed stage are pinned in tests/unit/test_gate.py and
tests/unit/test_run_locks.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hostile.conftest import Untouched, recsys

pytestmark = pytest.mark.spark

# small grids, AutoRec and kNN off: the cases are about the data's size, not the models' quality
CHEAP = ["--param", "autorec_enabled=false", "--param", "knn_enabled=false", "--param", "als_ranks=[2]",
         "--param", "als_reg_params=[0.1]", "--param", "als_max_iters=[2]", "--param", "ials_ranks=[2]",
         "--param", "ials_reg_params=[0.1]", "--param", "ials_max_iters=[2]", "--param", "ease_lambdas=[100.0]"]
MODEL_STAGES = ("baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease")


def tiny_source(real: Path, dest: Path, users: int | None = None, movies: int | None = None) -> Path:
    """The real dataset with only its first ``users`` users (by id) or its ``movies`` most rated movies."""
    dest.mkdir(parents=True)
    ratings = pd.read_csv(real / "ratings.csv")
    if users:
        ratings = ratings[ratings["userId"].isin(sorted(ratings["userId"].unique())[:users])]
    if movies:
        ratings = ratings[ratings["movieId"].isin(ratings["movieId"].value_counts().index[:movies])]
    ratings.to_csv(dest / "ratings.csv", index=False)
    for name in ("movies.csv", "tags.csv", "links.csv"):
        shutil.copy(real / name, dest / name)
    return dest


TOO_SMALL = [
    pytest.param({"users": 1}, [], ["1 user,", "0 validation ratings whose user and movie are in the training",
                                    "at least 1"], id="one-user"),
    pytest.param({"movies": 1}, [], ["1 movie,", "0 validation ratings", "0 test ratings", "at least 1"],
                 id="one-movie"),
    pytest.param({"movies": 2}, [], ["2 movies,", "0 validation ratings", "at least 1"], id="two-movies"),
    pytest.param({"users": 20}, ["--param", "test_fraction=0"], ["20 users,", "0 test ratings", "at least 1",
                                                                  "test_fraction=0"], id="empty-test-split"),
]


@pytest.mark.parametrize("cut, args, named", TOO_SMALL)
def test_data_too_small_for_the_models_stops_before_they_train(real_movielens, tmp_path, cut, args, named):
    source = tiny_source(real_movielens, tmp_path / "tiny", **cut)
    work = tmp_path / "run"
    outcome = recsys("run", "--source", source, "--work-dir", work, *CHEAP, *args,
                     env={"RECSYS_HOME": tmp_path / "home"})
    outcome.refused(5, "too little data for the models", str(work / "etl"), *named)
    assert (work / "etl" / "manifest.json").exists()
    assert not [stage for stage in MODEL_STAGES if (work / stage).exists()]


SMALL_BUT_ENOUGH = [
    # 2 users: one validation rating of a user and movie seen in training (the blend's K-fold needs 10) and no
    # movie with 3 training ratings (EASE's catalogue): both skipped with the reason, the other models run
    pytest.param({"users": 2}, {"blend": ["blend", "1 validation rating", "at least 10", "blend_folds=5"],
                                "ease": ["no movie has 3 or more training ratings", "ease_min_ratings=3"]},
                 id="two-users"),
]


@pytest.mark.parametrize("cut, skipped", SMALL_BUT_ENOUGH)
def test_small_data_runs_with_the_models_it_cannot_fit_skipped(real_movielens, tmp_path, cut, skipped):
    source = tiny_source(real_movielens, tmp_path / "tiny", **cut)
    work = tmp_path / "run"
    outcome = recsys("run", "--source", source, "--work-dir", work, *CHEAP, env={"RECSYS_HOME": tmp_path / "home"})
    outcome.succeeded()
    report = json.loads((work / "report.json").read_text())
    for stage, named in skipped.items():
        reason = report["models"][stage]["skipped"]
        for name in named:
            assert name in reason, f"{name!r} not in {stage}'s reason: {reason}"
    assert "test_rmse" in report["models"]["als"] and "test_ndcg_at_10" in report["models"]["implicit_als"]["ranking"]
    assert {report[gate]["decision"] for gate in ("gate", "ranking_gate")} <= {"promote", "keep"}
    assert set(skipped).isdisjoint(report["ranking"]["candidates"])


def test_a_sabotaged_reranker_is_kept_out_and_the_served_set_does_not_change(real_movielens, tmp_path, monkeypatch):
    """A reranker trained to put the irrelevant candidates first, and claiming a perfect validation NDCG@10 so
    that it is the ranking gate's challenger, loses on the test lists: the champion and the served lists stay."""
    from pipeline.config import load_settings
    from pipeline.models import ltr

    source = tiny_source(real_movielens, tmp_path / "tiny", users=80)
    home = tmp_path / "home"
    cheap = [*CHEAP, "--param", "ltr_num_leaves=[7]", "--param", "ltr_max_rounds=20"]
    recsys("run", "--source", source, "--work-dir", tmp_path / "first", *cheap,
           env={"RECSYS_HOME": home}).succeeded()
    settings = load_settings({"RECSYS_HOME": str(home)})
    served = pd.read_parquet(settings.serving_dir / "current" / "recommendations.parquet")
    untouched = Untouched(settings)

    honest_labels, honest_fit = ltr.labelled, ltr.fit_reranker

    def inverted(*args):
        return 1.0 - honest_labels(*args)

    def boasting(*args):
        model, out = honest_fit(*args)
        out["validation"]["val_ndcg_at_10"] = 1.0
        return model, out

    monkeypatch.setattr(ltr, "labelled", inverted)
    monkeypatch.setattr(ltr, "fit_reranker", boasting)
    recsys("run", "--source", source, "--work-dir", tmp_path / "second", *cheap,
           env={"RECSYS_HOME": home}).succeeded()
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["ranking"]["best_by_validation_ndcg"] == "ltr"
    gate = report["ranking_gate"]
    assert gate["challenger"] == "ltr" and gate["decision"] == "keep", gate["reason"]
    assert gate["challenger_test_ndcg_at_10"] < gate["champion_test_ndcg_at_10_before"]
    untouched.check("aliases")
    after = pd.read_parquet(settings.serving_dir / "current" / "recommendations.parquet")
    pd.testing.assert_frame_equal(after, served)
