"""Similar movies: exact top-k against brute force, recall arithmetic, the Spark LSH path and the stage's files."""

import json
import os
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import similarity as sim
from pipeline.errors import ConfigError, DataValidationError
from pipeline.models.factor_model import FactorModel
from pipeline.similarity import exact as exact_search
from pipeline.similarity import hashing as lsh_hashing
from pipeline.similarity import stage as similarity_stage
from pipeline.similarity import tuning as lsh_tuning


def brute_force(ids, vectors, k, metric):
    """Every pair in float64, sorted by (score, neighbour id)."""
    order = np.argsort(ids)
    ids, x = np.asarray(ids)[order], np.asarray(vectors, np.float64)[order]
    rows = []
    for i in range(len(ids)):
        if metric == "cosine":
            norms = np.linalg.norm(x, axis=1)
            score = x @ x[i] / np.where(norms > 0, norms, 1) / (norms[i] or 1)
            key = -score
        else:
            score = key = np.linalg.norm(x - x[i], axis=1)
        others = [j for j in np.lexsort((ids, key)) if j != i][:k]
        rows += [(ids[i], ids[j], r + 1, score[j]) for r, j in enumerate(others)]
    return pd.DataFrame(rows, columns=["movie_id", "similar_movie_id", "rank", "score"])


def clustered(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return np.arange(1, n + 1) * 7, vectors.astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_top_k_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    ids = rng.permutation(np.arange(100, 170))  # unsorted ids: the output is sorted by movie_id
    vectors = rng.standard_normal((70, 6)).astype(np.float32)
    got = sim.exact_top_k(ids, vectors, 5, metric)
    want = brute_force(ids, vectors, 5, metric)
    assert got[["movie_id", "similar_movie_id", "rank"]].values.tolist() == \
        want[["movie_id", "similar_movie_id", "rank"]].values.tolist()
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6, atol=1e-6)
    assert (got["movie_id"] != got["similar_movie_id"]).all()
    assert got.groupby("movie_id").size().eq(5).all()


def test_exact_top_k_known_order_in_two_dimensions():
    # 1:(1,0) 2:(2,0) 3:(0,1) 4:(-1,0) 5:(1,1)
    ids, vectors = [1, 2, 3, 4, 5], [[1, 0], [2, 0], [0, 1], [-1, 0], [1, 1]]
    euclid = sim.exact_top_k(ids, vectors, 4, "euclidean")
    first = euclid[euclid.movie_id == 1]
    assert first.similar_movie_id.tolist() == [2, 5, 3, 4]  # 2 and 5 both at distance 1: lower id first
    np.testing.assert_allclose(first.score, [1, 1, np.sqrt(2), 2])
    cosine = sim.exact_top_k(ids, vectors, 4, "cosine")
    first = cosine[cosine.movie_id == 1]
    assert first.similar_movie_id.tolist() == [2, 5, 3, 4]
    np.testing.assert_allclose(first.score, [1, np.sqrt(0.5), 0, -1], atol=1e-7)
    assert cosine[cosine.movie_id == 3].similar_movie_id.tolist()[0] == 5


def test_zero_vector_has_cosine_zero_and_ties_go_to_the_lower_movie_id():
    ids = [50, 10, 40, 20, 30]
    vectors = [[0, 0], [1, 0], [1, 0], [0, 1], [-1, 0]]  # 50 is a zero vector; 10 and 40 are duplicates
    table = sim.exact_top_k(ids, vectors, 3, "cosine")
    zero = table[table.movie_id == 50]
    assert zero.similar_movie_id.tolist() == [10, 20, 30] and (zero.score == 0).all()
    assert table[table.movie_id == 20].similar_movie_id.tolist() == [10, 30, 40]  # all at cosine 0: by id
    assert table[table.movie_id == 10].similar_movie_id.tolist()[0] == 40


def test_fewer_items_than_k_gives_shorter_lists_and_bad_inputs_are_rejected():
    table = sim.exact_top_k([1, 2, 3], [[1, 0], [0, 1], [1, 1]], 10, "euclidean")
    assert table.groupby("movie_id").size().tolist() == [2, 2, 2]
    with pytest.raises(DataValidationError, match="NaN"):
        sim.exact_top_k([1, 2], [[1, 0], [np.nan, 1]], 1)
    with pytest.raises(DataValidationError, match="duplicate"):
        sim.exact_top_k([1, 1], [[1, 0], [0, 1]], 1)
    with pytest.raises(ConfigError):
        sim.exact_top_k([1, 2], [[1, 0], [0, 1]], 0)
    with pytest.raises(ConfigError):
        sim.exact_top_k([1, 2], [[1, 0], [0, 1]], 1, metric="manhattan")


@pytest.mark.parametrize("chunks", [2, 7, 32])
def test_row_top_columns_prefilter_equals_a_full_sort(chunks):
    """The strided group-max prefilter of the exact search against a stable full sort: random and heavily
    tied scores, -inf (the item itself), widths not a multiple of the group count."""
    rng = np.random.default_rng(chunks)
    for trial in range(120):
        rows, width = int(rng.integers(1, 30)), int(rng.integers(2, 500))
        m = int(rng.integers(1, min(width, 30)))
        if trial % 2:
            scores = rng.integers(-3, 4, size=(rows, width)).astype(np.float32)
        else:
            scores = rng.standard_normal((rows, width)).astype(np.float32)
        scores[rng.random((rows, width)) < 0.05] = -np.inf
        got = np.sort(exact_search._top_columns_of_rows(scores, m, chunks=chunks), axis=1)
        columns = np.broadcast_to(np.arange(width), scores.shape)
        want = np.sort(np.lexsort((columns, -scores), axis=1)[:, :m], axis=1)  # by score, ties to lower column
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}: {rows}x{width}, m={m}")


def test_recall_at_k_on_a_hand_example():
    exact = pd.DataFrame({"movie_id": [1, 1, 2, 2, 3], "similar_movie_id": [2, 5, 1, 4, 1],
                          "rank": [1, 2, 1, 2, 1], "score": [0.9, 0.8, 0.9, 0.7, 0.5]})
    approx = pd.DataFrame({"movie_id": [1, 1, 2, 2], "similar_movie_id": [3, 2, 4, 1],
                           "rank": [1, 2, 1, 2], "score": [0.8, 0.9, 0.7, 0.9]})
    # movie 1: {2} of {2,5} -> 1/2; movie 2: both -> 1; movie 3 (one exact neighbour): missing -> 0
    assert sim.neighbour_recall(approx, exact, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    # movie 3 scores 0.8 = movie 1's exact 2nd best: an equally good neighbour counts with ties
    assert sim.neighbour_recall(approx, exact, 2, tie_tolerance=1e-9) == pytest.approx((1 + 1 + 0) / 3)
    assert sim.neighbour_recall(approx, exact, 1) == pytest.approx((0 + 0 + 0) / 3)


@pytest.mark.spark
def test_driver_hashes_equal_spark_model_transform(spark):
    """lsh_codes applies the fitted BucketedRandomProjectionLSHModel's hash functions on the driver: the values
    must be exactly those of model.transform, for SimHash-like and slab-cutting bucket lengths."""
    ids, vectors = clustered(600, 8, 6)
    vectors[3] = 0.0  # no direction: Spark's Normalizer leaves it zero
    vectors[4] *= 1e6
    items = sim.prepare(ids, vectors)
    with sim.embeddings_file(items, None) as path:
        for length in (1.0, 0.5, 0.3, 0.1):
            params = sim.LSHParams(length, 24, 2, 64, seed=7)
            driver = sim.lsh_codes(spark, items, params)
            in_spark = lsh_hashing._spark_transform_codes(spark, path, params, items)
            assert driver.dtype == in_spark.dtype
            np.testing.assert_array_equal(driver, in_spark)
            assert len(np.unique(driver)) > 2 if length < 1 else set(np.unique(driver)) == {-1, 0}


@pytest.mark.spark
def test_spark_lsh_draws_its_random_vectors_in_sequence(spark):
    """choose_lsh_params hashes once with the most tables and slices: this is what makes that valid."""
    lsh_hashing._RANDOM_VECTORS.clear()
    narrow = sim.spark_random_vectors(spark, 8, 5, 11)
    lsh_hashing._RANDOM_VECTORS.clear()
    wide = sim.spark_random_vectors(spark, 8, 12, 11)
    assert wide.shape == (12, 8) and np.array_equal(wide[:5], narrow)
    np.testing.assert_allclose(np.linalg.norm(wide, axis=1), 1.0)
    assert sim.spark_random_vectors(spark, 8, 3, 11) is not None  # sliced from the cache
    assert not np.array_equal(sim.spark_random_vectors(spark, 8, 5, 12), narrow)  # another seed


@pytest.mark.spark
def test_lsh_reaches_recall_095_on_clustered_embeddings(spark):
    ids, vectors = clustered(2000, 16, 50)
    chosen = sim.choose_lsh_params(spark, ids, vectors, 10, target_recall=0.95, sample=400)
    assert chosen["reached"] and chosen["recall"] >= 0.95
    timings = {}
    lsh = sim.lsh_top_k(spark, ids, vectors, 10, chosen["params"], timings=timings)
    exact = sim.exact_top_k(ids, vectors, 10, "cosine")
    assert sim.neighbour_recall(lsh, exact, 10) >= 0.95
    assert lsh.groupby("movie_id").size().eq(10).all() and (lsh.movie_id != lsh.similar_movie_id).all()
    assert {"hash", "rank_blocks", "merge"} <= timings.keys()
    # the same pair has the same score in the lsh and the exact cosine table
    both = lsh.merge(exact, on=["movie_id", "similar_movie_id"], suffixes=("_lsh", "_exact"))
    np.testing.assert_array_equal(both.score_lsh, both.score_exact)
    # ranking the blocks as Spark jobs finds the same neighbours
    in_spark = sim.lsh_top_k(spark, ids, vectors, 10, chosen["params"], rank_on="spark")
    pd.testing.assert_frame_equal(in_spark, lsh)


@pytest.mark.spark
def test_parameter_search_without_a_candidate_on_target_falls_back_to_the_cheapest_near_the_best(spark):
    ids, vectors = clustered(1000, 16, 30)
    cheap, better = sim.LSHParams(1.0, 8, 1, 32), sim.LSHParams(1.0, 32, 8, 128)
    chosen = sim.choose_lsh_params(spark, ids, vectors, 10, target_recall=1.5, sample=200, candidates=[better, cheap])
    assert not chosen["reached"] and [t["params"]["num_orderings"] for t in chosen["tried"]] == [1, 8]  # cheap first
    assert chosen["tried"][0]["recall"] < chosen["tried"][1]["recall"] and chosen["params"] == better


@pytest.mark.spark
def test_lsh_caps_a_bucket_of_duplicates_at_the_block_size(spark):
    ids = np.arange(1, 301)
    vectors = np.tile([[1.0, 2.0, 3.0]], (300, 1))  # one bucket in every hash table
    params = sim.LSHParams(1.0, 8, 2, 32)
    table = sim.lsh_top_k(spark, ids, vectors, 5, params)
    assert table.groupby("movie_id").size().eq(5).all()
    # each item is ranked within a block of ~32 items: 300 x 32, not 300 x 300, pairs
    assert table[table.movie_id == 1].similar_movie_id.tolist() == [2, 3, 4, 5, 6]  # ties: lowest ids
    assert table[table.movie_id == 300].similar_movie_id.tolist() == [271, 272, 273, 274, 275]  # of its block


@pytest.fixture(scope="module")
def stage_outputs(spark, tmp_path_factory):
    ids, vectors = clustered(600, 8, 20, seed=3)
    model = FactorModel("als", user_ids=[1], movie_ids=ids, user_factors=np.zeros((1, 8)), item_factors=vectors)
    params = {"bucket_length": 1.0, "num_hash_tables": 32, "num_orderings": 8, "block_size": 128, "seed": 42}
    runs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name) / "similarity"
        runs.append((out, sim.similar_items(spark, model, 5, out, lsh_params=params)["similarity"]))
    return ids, vectors, runs


@pytest.mark.spark
def test_similar_items_writes_the_three_metrics_with_k_rows_per_movie(stage_outputs):
    ids, vectors, [(out, summary), _] = stage_outputs
    assert summary["k"] == 5 and summary["items"] == 600
    table = pq.read_table(summary["table"])
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("movie_id", "int64"), ("similar_movie_id", "int64"), ("metric", "string"), ("rank", "int32"),
        ("score", "double")]
    frame = table.to_pandas()
    assert sorted(frame.metric.unique()) == ["cosine", "euclidean", "lsh"]
    assert frame.groupby(["metric", "movie_id"]).size().eq(5).all()
    assert frame[["metric", "movie_id", "rank"]].equals(
        frame[["metric", "movie_id", "rank"]].sort_values(["metric", "movie_id", "rank"]).reset_index(drop=True))
    movies = pd.DataFrame({"movie_id": ids, "title": [f"Movie {i}" for i in ids]})
    titled = frame.merge(movies, on="movie_id").merge(
        movies.rename(columns={"movie_id": "similar_movie_id", "title": "similar_title"}), on="similar_movie_id")
    assert len(titled) == len(frame) and titled.similar_title.notna().all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "similarity" and manifest["tables"]["similar_movies"]["rows"] == len(frame)
    assert set(summary["timings_s"]) >= {"exact_cosine", "exact_euclidean", "lsh"}


@pytest.mark.spark
def test_reported_recall_is_recomputed_from_the_written_files(stage_outputs):
    ids, vectors, [(_, summary), _] = stage_outputs
    emb_ids, emb_vectors = sim.read_embeddings(summary["embeddings"])
    assert np.array_equal(emb_ids, ids) and np.array_equal(emb_vectors, vectors)
    assert pq.read_schema(summary["embeddings"]).field("vector").type.value_type == "float"
    table = pd.read_parquet(summary["table"])
    exact = sim.exact_top_k(emb_ids, emb_vectors, 5, "cosine")
    assert summary["lsh_recall_at_k"] == sim.neighbour_recall(table[table.metric == "lsh"], exact, 5)
    assert summary["lsh_recall_at_k"] > 0.9
    cosine = table[table.metric == "cosine"].drop(columns="metric").reset_index(drop=True)
    pd.testing.assert_frame_equal(cosine, exact)


@pytest.mark.spark
def test_identical_input_gives_identical_file_bytes(stage_outputs):
    _, _, [(first, _), (second, _)] = stage_outputs
    for name in (sim.TABLE, sim.EMBEDDINGS):
        assert (first / name).read_bytes() == (second / name).read_bytes()


@pytest.mark.spark
def test_recall_below_target_on_all_items_escalates_to_stronger_parameters(spark, tmp_path, monkeypatch):
    """The chooser's sample only estimates the recall: similar_items measures it on every item and, below the
    target, tries the chooser's stronger steps, keeping the best (and reporting every try)."""
    ids, vectors = clustered(1500, 16, 40, seed=5)
    weak, strong = sim.LSHParams(1.0, 8, 1, 32), sim.LSHParams(1.0, 64, 16, 256)
    monkeypatch.setattr(similarity_stage, "choose_lsh_params", lambda *a, **kw: {
        "params": weak, "recall": 0.99, "reached": True, "sample": 10, "tried": [], "stronger": [strong]})
    summary = sim.similar_items(spark, (ids, vectors), 10, tmp_path / "similarity")["similarity"]
    tries = summary["lsh_attempts"]
    assert [t["params"]["num_orderings"] for t in tries] == [1, 16]
    assert tries[0]["recall_at_k"] < 0.95 <= tries[1]["recall_at_k"]
    assert summary["lsh_params"] == strong.as_dict() and summary["lsh_target_reached"]
    assert summary["lsh_recall_at_k"] == pytest.approx(tries[1]["recall_at_k"], abs=1e-4)
    table = pd.read_parquet(summary["table"])
    exact = sim.exact_top_k(ids, vectors, 10, "cosine")
    assert summary["lsh_recall_at_k"] == sim.neighbour_recall(table[table.metric == "lsh"], exact, 10)


def test_stronger_steps_rank_more_candidates_per_item():
    candidates = sorted(sim.DEFAULT_CANDIDATES, key=lambda c: sim.estimated_cost(10_000, c))
    base = candidates[0]
    steps = lsh_tuning._stronger(base, candidates)
    volumes = [c.num_orderings * c.block_size for c in steps]
    assert len(steps) == 3 and volumes == sorted(volumes)
    assert volumes[0] >= 1.5 * base.num_orderings * base.block_size


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_exact_search_works_in_a_forked_child_after_the_parent_used_its_thread_pool():
    """A worker forked after the parent ran a search (e.g. a forking task runner) gets its own thread pool:
    the parent's pool threads do not exist in the child, and reusing it would wait forever."""
    ids, vectors = clustered(3000, 8, 20)
    parent = sim.exact_top_k(ids, vectors, 5)
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the search completes with the parent's answer
        code = 1
        try:
            code = 0 if sim.exact_top_k(ids, vectors, 5).equals(parent) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's search hung")
