"""``recsys synth``: a deterministic MovieLens-CSV folder that the pipeline accepts and whose planted structure
its models can learn (biases, low-rank taste, genre-driven picks)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as recsys
from pipeline.data.synth import MIN_USER_RATINGS, write_synthetic
from pipeline.errors import ConfigError
from pipeline.models.baseline import BiasBaseline, GlobalMean
from pipeline.models.metrics import ndcg_at_k, rating_metrics
from stage_inputs import write_split

FILES = ("ratings.csv", "movies.csv", "tags.csv", "links.csv")


def _digest(folder) -> dict:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "s"
    write_synthetic(folder, 50_000, 500, 1000, seed=7)
    return folder


@pytest.fixture(scope="module")
def split(synth, tmp_path_factory):
    r = pd.read_csv(synth / "ratings.csv").rename(columns={"userId": "user_id", "movieId": "movie_id",
                                                           "timestamp": "ts"})
    r["user_idx"] = pd.factorize(r["user_id"])[0].astype(np.int32)
    r["movie_idx"] = pd.factorize(r["movie_id"])[0].astype(np.int32)
    return write_split(tmp_path_factory.mktemp("split") / "etl", r)[1]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth):
    write_synthetic(tmp_path / "again", 50_000, 500, 1000, seed=7)
    assert _digest(tmp_path / "again") == _digest(synth)
    write_synthetic(tmp_path / "other", 50_000, 500, 1000, seed=8)
    assert _digest(tmp_path / "other")["ratings.csv"] != _digest(synth)["ratings.csv"]


def test_shape_is_movielens_like(synth):
    r = pd.read_csv(synth / "ratings.csv")
    assert 0.99 * 50_000 <= len(r) <= 50_000
    assert not r.duplicated(["userId", "movieId"]).any()
    assert set(r["rating"].unique()) <= set(np.arange(1, 11) / 2)
    assert 3.2 < r["rating"].mean() < 3.9 and 0.8 < r["rating"].std() < 1.2
    per_user = r.groupby("userId").size()
    assert per_user.min() >= MIN_USER_RATINGS and per_user.max() > 4 * per_user.median()  # a heavy tail
    per_movie = r.groupby("movieId").size().sort_values(ascending=False)
    assert per_movie.iloc[:50].sum() > 0.15 * len(r)  # the top 5 % of movies draw a large share
    assert r["timestamp"].between(820_454_400, 1_696_118_400).all()
    movies = pd.read_csv(synth / "movies.csv")
    assert movies["title"].str.match(r".+ \((19|20)\d\d\)$").all() and movies["genres"].str.len().gt(0).all()
    assert len(pd.read_csv(synth / "tags.csv")) > 0 and len(pd.read_csv(synth / "links.csv")) == 1000


def test_folder_passes_ingest_and_validation(tmp_path, synth):
    from pipeline.config import load_settings
    from pipeline.data.ingest import ingest_movielens
    from pipeline.data.validate import validate_tables

    ingest_movielens(str(synth), tmp_path / "ingest", load_settings({"RECSYS_HOME": str(tmp_path / "home")}))
    result = validate_tables(tmp_path / "ingest", tmp_path / "validate", 0.0)["validation"]
    assert len(pd.read_parquet(tmp_path / "validate" / "ratings.parquet")) == len(pd.read_csv(synth / "ratings.csv"))
    assert result  # every table passed at a zero quarantine threshold


def test_bias_baseline_beats_the_global_mean(split):
    base = BiasBaseline().fit(split["train"])
    scores = {m.__class__.__name__: rating_metrics(split["test"], m.predict, base, split["train"])["test_rmse"]
              for m in (GlobalMean().fit(split["train"]), base)}
    assert scores["BiasBaseline"] < 0.93 * scores["GlobalMean"], scores


def test_ease_ranks_better_than_popularity(split):
    from pipeline.models.ease import catalogue, ease_weights, gram_matrix

    train, test = split["train"], split["test"]
    ids = catalogue(train, 1)
    weights = ease_weights(gram_matrix(train, ids), 500.0)
    col = pd.Index(ids)
    popular = col[np.argsort(-train.groupby("movie_id").size().reindex(ids).to_numpy(), kind="stable")]
    relevant = test[test["rating"] >= 4].groupby("user_id")["movie_id"].agg(set)
    seen = train.groupby("user_id")["movie_id"].agg(set)
    ease, pop = [], []
    for user, rel in relevant.items():
        history = col.get_indexer(list(seen[user]))
        scores = weights[history].astype(np.float32).sum(axis=0)
        scores[history] = -np.inf
        ease.append(ndcg_at_k(list(col[np.argsort(-scores)[:10]]), rel, 10))
        pop.append(ndcg_at_k([m for m in popular if m not in seen[user]][:10], rel, 10))
    assert np.mean(ease) > 1.15 * np.mean(pop), (np.mean(ease), np.mean(pop))


@pytest.mark.spark
def test_als_learns_the_planted_taste_beyond_the_baseline(spark, split):
    from pipeline.models.als import grid_points, search_grid

    base = BiasBaseline().fit(split["train"])
    _, model = search_grid(spark, split["train"], split["validation"], base, grid_points([8], [0.1], [10]))
    als = rating_metrics(split["test"], model.predict, base, split["train"])["test_rmse"]
    baseline = rating_metrics(split["test"], base.predict, base, split["train"])["test_rmse"]
    assert als < baseline - 0.03, (als, baseline)


def test_cli_writes_the_folder_and_refuses_a_foreign_one(tmp_path, capsys):
    assert recsys(["synth", "--ratings", "1500", "--users", "60", "--movies", "100", "--out",
                   str(tmp_path / "s"), "--seed", "1"]) == 0
    assert '"ratings": ' in capsys.readouterr().out and (tmp_path / "s" / "ratings.csv").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert recsys(["synth", "--ratings", "1500", "--users", "60", "--movies", "100", "--out",
                   str(tmp_path / "mine")]) == ConfigError.exit_code
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _small(out, seed: int = 1) -> dict:
    return write_synthetic(out, 1500, 60, 100, seed=seed)


def test_only_a_folder_synth_wrote_is_written_again(tmp_path):
    _small(tmp_path / "s")
    assert _small(tmp_path / "s", seed=2)["seed"] == 2  # synth's own folder: replaced

    csvs_only = tmp_path / "dataset"  # the same CSV names, but no synth.json: someone's dataset
    csvs_only.mkdir()
    for name in FILES:
        (csvs_only / name).write_bytes((tmp_path / "s" / name).read_bytes())
    foreign_marker = tmp_path / "foreign"
    foreign_marker.mkdir()
    (foreign_marker / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    (foreign_marker / "synth.json").write_text('{"made by": "a person"}')
    for folder, why in ((csvs_only, "no synth.json"), (foreign_marker, "a synth.json that synth did not write")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(ConfigError, match=f"synth --out {folder}: is not a folder synth wrote .*{why}"):
            _small(folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("out, message", [
    ("{file}", "is a file, not a folder"),
    ("{file}/s", "a part of the path is a file"),
    ("/proc/recsys-synth", r"cannot be written here \(No such file or directory\)"),
], ids=["a-file", "under-a-file", "in-proc"])
def test_an_unusable_out_is_a_config_error_naming_it(tmp_path, out, message):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = out.replace("{file}", str(afile))
    with pytest.raises(ConfigError, match=f"synth --out {out}: {message}"):
        _small(out)
    assert afile.read_text() == "keep me"


def test_a_failed_synth_leaves_the_earlier_folder_as_it_was(tmp_path, monkeypatch):
    from pipeline.data import synth

    _small(tmp_path / "s")
    before = _digest(tmp_path / "s")

    def fail(self, rng, first, last):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth._World, "block", fail)
    with pytest.raises(OSError, match="No space left"):
        _small(tmp_path / "s", seed=2)
    assert _digest(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no half-written temporary folder left
