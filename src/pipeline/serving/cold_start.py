"""Stage ``cold_start``: how good the lists are that a new user gets from their first few ratings.

For every test user with more training ratings than ``cold_start_known_ratings`` (n) and a relevant test
rating (a seeded sample of ``cold_start_max_users`` of them on large data), the user's first n training
ratings (by time) are all the cold-start path knows: their list is what ``recommend.recommend_from_ratings``
(the function ``recsys recommend --ratings`` runs) returns for them, fed with one similar-movie table, and is
scored against their test ratings (>= 4.0) like every other list. The stage computes all users' lists in one
batch, ``recommend.recommend_from_ratings_many`` (one join and groupby instead of a pandas query per user and
source: 2 splits x up to 1000 users x 4 sources), which the unit tests (tests/unit/test_cold_start.py) hold
equal to ``recommend_from_ratings`` user by user: the same movies, scores and order. Their other training and
validation movies are left out of the lists, as in the main protocol (they are neither input nor target).
Popularity, given the same n ratings to leave out, is the bar.

Each source of similar movies that exists is measured, so that the one serving uses is chosen by this
figure (the Param ``similarity_source``): the served table (by default the ranking champion's vectors), the
rating champion's embeddings (centred, cosine), this run's implicit-ALS item factors (cosine), and this run's
EASE weights (a movie's neighbours are the movies its rating raises most). The validation figure is the one
to choose by; test is reported.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline import registry, storage
from pipeline.models.metrics import ranking_metrics
from pipeline.models.popularity import popular_movies
from pipeline.models.protocol import load_model, load_split
from pipeline.serving.recommend import pairs_in, recommend_from_ratings_many

log = logging.getLogger(__name__)

K = 10


def cold_users(train: pd.DataFrame, held_out: pd.DataFrame, known: int, max_users: int | None = None,
               seed: int = 42) -> dict[int, dict[int, float]]:
    """{user_id: {movie_id: rating} of their first ``known`` training ratings} for the users of ``held_out``
    with a relevant rating and more than ``known`` training ratings (a seeded sample of ``max_users`` of them
    when there are more)."""
    relevant = set(held_out.loc[held_out["rating"] >= 4.0, "user_id"].tolist())
    ordered = train[train["user_id"].isin(relevant)].sort_values(["user_id", "ts", "movie_id"], kind="stable")
    counts = ordered.groupby("user_id").size()
    eligible = counts.index[counts.to_numpy() > known]
    if max_users is not None and len(eligible) > max_users:
        eligible = np.sort(np.random.default_rng(seed).choice(eligible.to_numpy(), max_users, replace=False))
    first = ordered[ordered["user_id"].isin(eligible)].groupby("user_id").head(known)
    return {int(u): dict(zip(g["movie_id"].astype(int), g["rating"].astype(float)))
            for u, g in first.groupby("user_id")}


def neighbour_table(movie_ids, vectors, k: int) -> pd.DataFrame:
    """The cosine top-k of embeddings, in the similar-movie table's columns (metric "cosine")."""
    from pipeline.similarity import exact_top_k

    table = exact_top_k(movie_ids, vectors, k, "cosine")
    return table.assign(metric="cosine")


def weight_table(model, k: int) -> pd.DataFrame:
    """Each catalogue movie's k neighbours by EASE weight (score = B[i, j] > 0), metric "cosine" for the lookup."""
    weights = model.weights.astype(np.float32)
    n = len(model.movie_ids)
    kk = min(k, n - 1)
    np.fill_diagonal(weights, -np.inf)
    top = np.argpartition(-weights, kk, axis=1)[:, :kk]
    score = np.take_along_axis(weights, top, 1)
    order = np.argsort(-score, axis=1, kind="stable")
    top, score = np.take_along_axis(top, order, 1), np.take_along_axis(score, order, 1)
    frame = pd.DataFrame({"movie_id": np.repeat(model.movie_ids, kk), "similar_movie_id": model.movie_ids[top.ravel()],
                          "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), n), "score": score.ravel(),
                          "metric": "cosine"})
    return frame[frame["score"] > 0]


def hidden_movies(users: dict, frames) -> dict[int, set[int]]:
    """{user: the movies of ``frames`` (training, validation) they rated that are not among their known ratings}:
    left out of their lists, neither input nor target. Vectorised (one isin of (user, movie) pairs)."""
    ids = np.fromiter(users, dtype=np.int64, count=len(users))
    rows = pd.concat([frame.loc[frame["user_id"].isin(ids), ["user_id", "movie_id"]] for frame in frames])
    user, movie = rows["user_id"].to_numpy(np.int64), rows["movie_id"].to_numpy(np.int64)
    counts = np.fromiter((len(r) for r in users.values()), dtype=np.int64, count=len(users))
    known = pairs_in(user, movie, np.repeat(ids, counts),
                     np.fromiter((int(m) for r in users.values() for m in r), dtype=np.int64, count=int(counts.sum())))
    user, movie = user[~known], movie[~known]
    order = np.argsort(user, kind="stable")
    user, movie = user[order], movie[order]
    bounds = np.searchsorted(user, ids, "left"), np.searchsorted(user, ids, "right")
    return {int(u): set(movie[a:b].tolist()) for u, a, b in zip(ids, *bounds)}


def cold_start_lists(users: dict, similar: pd.DataFrame | None, popular: pd.DataFrame, hidden: dict) -> dict:
    """{user: top-K} from the cold-start path (``similar`` None: popularity alone), leaving out ``hidden``.

    Each user's list is ``recommend_from_ratings``' top K + |hidden| with the hidden movies then left out,
    computed for all users in one batch (``recommend_from_ratings_many``, tested equal user by user)."""
    out = {}
    if similar is None:
        for user, rated in users.items():
            drop = hidden.get(user, set())
            ids = popular["movie_id"].to_numpy()
            ids = ids[~np.isin(ids, list(rated))][:K + len(drop)]
            out[user] = [int(m) for m in ids if m not in drop][:K]
        return out
    if not users:
        return out
    depth = {user: K + len(hidden.get(user, ())) for user in users}
    recs = recommend_from_ratings_many(users, similar, popular, depth, metric="cosine")
    drops = [(user, hidden.get(user, ())) for user in users]
    sizes = np.fromiter((len(d) for _, d in drops), dtype=np.int64, count=len(drops))
    hidden_user = np.repeat(np.fromiter((int(u) for u in users), dtype=np.int64, count=len(users)), sizes)
    hidden_movie = np.fromiter((int(m) for _, d in drops for m in d), dtype=np.int64, count=int(sizes.sum()))
    recs = recs[~pairs_in(recs["user_id"].to_numpy(np.int64), recs["movie_id"].to_numpy(np.int64),
                          hidden_user, hidden_movie)]
    recs = recs[recs.groupby("user_id", sort=False).cumcount().to_numpy() < K]
    user, movie = recs["user_id"].to_numpy(np.int64), recs["movie_id"].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.empty(0, dtype=np.int64)
    lists = dict(zip(user[starts].tolist(), (m.tolist() for m in np.split(movie, starts[1:])))) if len(user) else {}
    return {user: lists.get(int(user), []) for user in users}


def run_cold_start(ctx) -> dict:
    """Stage ``cold_start``: NDCG@10 of the cold-start path per similarity source, next to popularity."""
    split = load_split(ctx, "cold_start")
    known = ctx.params.cold_start_known_ratings
    popular = popular_movies(split.train)
    sources: dict[str, pd.DataFrame] = {}
    served = ctx.stage_dir("similarity") / storage.MANIFEST
    if served.exists():
        table = pd.read_parquet(storage.read_json(served)["tables"]["similar_movies"]["path"])
        sources["served"] = table[table["metric"] == "cosine"]
    rating, _ = registry.load_champion(ctx.settings)
    if rating is not None:
        ids, vectors = rating.item_embeddings()
        sources["rating_champion"] = neighbour_table(ids, vectors - vectors.mean(axis=0, keepdims=True),
                                                     ctx.params.similar_k)
    for stage in ("implicit_als", "ease"):
        if (ctx.stage_dir(stage) / storage.MANIFEST).exists():
            model = load_model(ctx.stage_dir(stage) / "model")
            sources[stage] = weight_table(model, ctx.params.similar_k) if hasattr(model, "weights") else \
                neighbour_table(*model.item_embeddings(), ctx.params.similar_k)
    result: dict = {"known_ratings": known, "by_similarity_source": {}}
    for split_name, held_out, hidden_frames in (("val", split.validation, (split.train,)),
                                                ("test", split.test, (split.train, split.validation))):
        users = cold_users(split.train, held_out, known, ctx.params.cold_start_max_users, ctx.params.seed)
        hidden = hidden_movies(users, hidden_frames)
        rows = held_out[held_out["user_id"].isin(list(users))]
        popularity = ranking_metrics(cold_start_lists(users, None, popular, hidden), rows, k=K)
        result[f"{split_name}_users"] = popularity["users"]
        result[f"popularity_{split_name}_ndcg_at_10"] = popularity["ndcg_at_10"]
        for name, table in sources.items():
            metrics = ranking_metrics(cold_start_lists(users, table, popular, hidden), rows, k=K)
            result["by_similarity_source"].setdefault(name, {})[f"{split_name}_ndcg_at_10"] = metrics["ndcg_at_10"]
    result["users"] = result.pop("test_users")
    if "served" in result["by_similarity_source"]:
        result["ndcg_at_10"] = result["by_similarity_source"]["served"]["test_ndcg_at_10"]
    result["popularity_ndcg_at_10"] = result.pop("popularity_test_ndcg_at_10")
    best = max(result["by_similarity_source"].items(), key=lambda kv: kv[1]["val_ndcg_at_10"] or 0.0, default=None)
    result["best_source_by_validation"] = best[0] if best else None
    log.info("cold start (%d known ratings, %d users): served %s, popularity %.4f, by source %s", known,
             result["users"], result.get("ndcg_at_10"), result["popularity_ndcg_at_10"] or 0.0,
             {k: round(v["test_ndcg_at_10"] or 0.0, 4) for k, v in result["by_similarity_source"].items()})
    return {"cold_start": result}
