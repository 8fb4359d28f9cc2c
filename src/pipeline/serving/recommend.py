"""Recommendations: top-N per known user from the champion, and item-based cold start for everyone else.

- A user the model knows gets the model's k best-scored movies, leaving out every movie they already rated.
- A new user who rated a few movies gets, as in the seed notebook, the neighbours (similar-movie table) of the
  movies they liked, weighted by how much they liked them; popular movies fill the list up to k.
- A user with nothing gets popular movies, optionally within chosen genres.

Formulas (the constants below are the defaults):

    popularity      the number of ratings (``pipeline.models.popularity``: the same order the ranking
                    baseline is evaluated with).
    liked movies    rating > NEUTRAL_RATING and rating >= min(LIKED_RATING, the user's own mean rating)
                    (a harsh rater who gave nothing 3.5 still has favourites, but never below 2.5).
    weight          w(l) = rating(l) - NEUTRAL_RATING
    similarity      cosine / lsh: the table's cosine similarity; euclidean: 1 / (1 + distance)
    item-based      score(c) = sum_l w(l) * sim(l, c) / sum_l w(l)   over the liked movies l
                    (a weighted mean similarity; a neighbour of several liked movies adds up)
                    + POPULARITY_WEIGHT * log(1 + n(c)) / log(1 + n_max)
                    a popularity prior: with five ratings the neighbours alone rank below plain popularity
                    (ml-latest-small, cold_start stage: NDCG@10 0.015-0.09 against 0.109), blended they
                    beat it (0.12 with the EASE champion's table; weight 1 chosen on validation).

No Spark here: plain pandas/numpy, so the query command line can call the same functions.
``recommend_from_ratings_many`` is ``recommend_from_ratings`` for many users in one pass (the cold_start
stage's measurement), tested equal to it user by user.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.models.popularity import popular_movies
from pipeline.models.ranking import concat_ranges, histories
from pipeline.params import check_k
from pipeline.similarity import METRICS

if TYPE_CHECKING:
    from pipeline.models.factor_model import FactorModel

log = logging.getLogger(__name__)

POPULARITY_WEIGHT = 1.0  # the popularity prior's weight in the cold-start score (chosen by the cold_start stage)
LIKED_RATING = 3.5
NEUTRAL_RATING = 2.5
REASON_MODEL = "recommended for you"
REASON_POPULAR = "popular"

RECOMMENDATION_COLUMNS = ["user_id", "rank", "movie_id", "score"]
COLD_COLUMNS = ["rank", "movie_id", "score", "reason"]


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"unknown similarity metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


# --- known users -------------------------------------------------------------------------------------------


def recommend_known_users(model, ratings: pd.DataFrame, k: int) -> pd.DataFrame:
    """Top-k movies for every user the model can rank, excluding every movie the user rated in ``ratings``.

    ``model`` is a ranker (``pipeline.models.ranking``): a FactorModel ranks the users it knows, an item-item
    model every user with history in its catalogue. ``score`` is the model's own (a predicted rating, a
    preference, an item-item score), and ``rank`` follows it; rows are ordered by (user_id, rank).
    """
    k = check_k(k)
    rated = histories(ratings)  # the movies and their ratings (a ranker may weigh a history by them)
    known = getattr(model, "user_ids", None)
    users = np.asarray(sorted(rated) if known is None else known, dtype=np.int64)
    scored = model.top_k_scored(users, k, exclude=rated, history=rated) if hasattr(model, "top_k_scored") else None
    top = {u: movies for u, (movies, _) in scored.items()} if scored is not None else \
        model.top_k(users, k, exclude=rated, history=rated)
    user_col = np.fromiter((u for u in users for _ in top.get(int(u), ())), dtype=np.int64)
    movie_col = np.fromiter((m for u in users for m in top.get(int(u), ())), dtype=np.int64)
    rank_col = np.fromiter((r for u in users for r in range(1, len(top.get(int(u), ())) + 1)), dtype=np.int32)
    if not len(user_col):
        score = np.empty(0)
    elif scored is not None:  # a reranker scores its candidates once, with the lists
        score = np.fromiter((v for u in users for v in scored.get(int(u), ((), ()))[1]), dtype=np.float64)
    elif hasattr(model, "predict"):
        score = model.predict(user_col, movie_col).astype(np.float64)
    else:
        score = model.pair_scores(user_col, movie_col, rated).astype(np.float64)
    out = pd.DataFrame({"user_id": user_col, "rank": rank_col, "movie_id": movie_col, "score": score})
    # top_k ranks by the clipped score predict() shows; its matrix product can round differently from predict's
    # in the last bits, so the rank follows the score written here. Ties (e.g. several at the top of the scale)
    # keep top_k's order (unclipped score, then movie_id).
    out = out.sort_values(["user_id", "score", "rank"], ascending=[True, False, True], kind="stable",
                          ignore_index=True)
    out["rank"] = (out.groupby("user_id", sort=False).cumcount() + 1).astype(np.int32)
    return out[RECOMMENDATION_COLUMNS]


# --- popularity --------------------------------------------------------------------------------------------


def _catalog(movies: pd.DataFrame | None) -> pd.DataFrame:
    """The movies catalog without internal columns (those starting with '_')."""
    if movies is None:
        return pd.DataFrame({"movie_id": pd.Series([], dtype=np.int64), "title": pd.Series([], dtype=object),
                             "genres": pd.Series([], dtype=object)})
    return movies[[c for c in movies.columns if not str(c).startswith("_")]]


# --- genres ------------------------------------------------------------------------------------------------


def parse_genres(genres: str | Iterable[str] | None) -> list[str]:
    """``"Comedy, drama"`` or ``["Comedy", "drama"]`` -> ``["Comedy", "drama"]``; None or empty -> []."""
    if genres is None:
        return []
    items = genres.split(",") if isinstance(genres, str) else list(genres)
    return [g.strip() for g in items if g and g.strip()]


def genre_mask(genres_column: pd.Series, chosen: Iterable[str], known_from: pd.Series | None = None) -> np.ndarray:
    """Rows whose genres include any of ``chosen`` (case-insensitive); unknown genres are a ConfigError."""
    wanted = {g.lower() for g in chosen}
    known = sorted({g for gs in (genres_column if known_from is None else known_from) for g in _genre_list(gs)})
    unknown = sorted(wanted - {g.lower() for g in known})
    if unknown:
        raise ConfigError(f"unknown genre(s) {unknown}; known genres: {', '.join(known)}")
    return np.fromiter((any(g.lower() in wanted for g in _genre_list(gs)) for gs in genres_column),
                       dtype=bool, count=len(genres_column))


def _genre_list(value) -> list[str]:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []


def _popular_reason(genres: list[str]) -> str:
    return REASON_POPULAR if not genres else f"{REASON_POPULAR} in {', '.join(genres)}"


def _frame(movie_ids, scores, reasons) -> pd.DataFrame:
    return pd.DataFrame({"rank": np.arange(1, len(movie_ids) + 1, dtype=np.int32),
                         "movie_id": np.asarray(movie_ids, dtype=np.int64),
                         "score": np.asarray(scores, dtype=np.float64),
                         "reason": pd.Series(list(reasons), dtype=object)})[COLD_COLUMNS]


# --- cold start --------------------------------------------------------------------------------------------


def recommend_cold_user(popular: pd.DataFrame, k: int, genres: str | Iterable[str] | None = None) -> pd.DataFrame:
    """A user with no ratings: the k most popular movies, within any of ``genres`` when given."""
    k = check_k(k)
    chosen = parse_genres(genres)
    pool = popular[genre_mask(popular["genres"], chosen)] if chosen else popular
    pool = pool.head(k)
    return _frame(pool["movie_id"], pool["score"], [_popular_reason(chosen)] * len(pool))


def liked_movies(rated: Mapping[int, float]) -> dict[int, float]:
    """{movie_id: weight} of the movies a new user liked (thresholds and weight in the module docstring)."""
    if not rated:
        return {}
    mean = float(np.mean(list(rated.values())))
    threshold = min(LIKED_RATING, mean)
    return {m: r - NEUTRAL_RATING for m, r in rated.items() if r > NEUTRAL_RATING and r >= threshold}


def similarity_of(similar: pd.DataFrame, metric: str) -> np.ndarray:
    """Higher-is-better similarity of the similar table's rows: its score, or 1/(1+d) for Euclidean distance."""
    score = similar["score"].to_numpy(np.float64)
    return 1.0 / (1.0 + np.maximum(score, 0.0)) if metric == "euclidean" else score


def popularity_prior(popular: pd.DataFrame) -> pd.Series:
    """Each popular movie's prior in [0, 1]: log(1 + its ratings) / log(1 + the most-rated movie's)."""
    if "n_ratings" in popular.columns and len(popular):
        n = popular["n_ratings"].to_numpy(np.float64)
        prior = np.log1p(n) / max(np.log1p(n.max()), 1e-12)
    else:  # a table without counts: its order
        prior = 1.0 - np.arange(len(popular)) / max(len(popular), 1)
    return pd.Series(prior, index=popular["movie_id"].to_numpy(np.int64))


def recommend_from_ratings(rated: Mapping[int, float], similar: pd.DataFrame, popular: pd.DataFrame, k: int,
                           metric: str = "cosine", genres: str | Iterable[str] | None = None,
                           movies: pd.DataFrame | None = None,
                           popularity_weight: float = POPULARITY_WEIGHT) -> pd.DataFrame:
    """Item-based cold start: the neighbours of the movies the user liked, blended with popularity.

    score(m) = sum_l w(l) sim(l, m) / sum_l w(l)  +  popularity_weight * prior(m)   (see the module doc)

    ``rated`` maps movie_id -> rating; already-rated movies are never recommended. ``movies`` (the catalog)
    names the liked movie in each ``reason`` and supplies genres; without it, ``popular``'s columns are used.
    A row's reason is the liked movie that contributed most to it, or "popular" when none did.
    """
    k = check_k(k)
    check_metric(metric)
    rated = {int(m): float(r) for m, r in rated.items()}
    chosen = parse_genres(genres)
    if not rated:
        return recommend_cold_user(popular, k, chosen)
    lookup = _catalog(movies) if movies is not None else popular

    weights = liked_movies(rated)
    votes = pd.Series(dtype=np.float64)
    best = pd.Series(dtype=np.int64)
    if weights:
        rows = similar[similar["movie_id"].isin(list(weights))]  # ints first: a few rows left to compare
        rows = rows[rows["metric"] == metric]
        if len(rows):
            w = rows["movie_id"].map(weights).to_numpy(np.float64)
            contrib = pd.DataFrame({"source": rows["movie_id"].to_numpy(np.int64),
                                    "movie_id": rows["similar_movie_id"].to_numpy(np.int64),
                                    "part": w * similarity_of(rows, metric)})
            votes = contrib.groupby("movie_id", sort=True)["part"].sum() / sum(weights.values())
            votes = votes[votes > 0]
            # The reason names the liked movie that contributed most (ties: the smaller movie id).
            best = (contrib.sort_values(["movie_id", "part", "source"], ascending=[True, False, True],
                                        kind="stable").drop_duplicates("movie_id").set_index("movie_id")["source"])
    # a movie without votes scores its prior alone, so only the k + |rated| most popular of them can place
    # (``popular`` is most popular first); the pool is those and the voted movies
    head = popular if not chosen else popular[genre_mask(popular["genres"], chosen, known_from=lookup["genres"])]
    pool = pd.Index(head["movie_id"].to_numpy(np.int64)[:k + len(rated)]).union(votes.index)
    ranked = pd.DataFrame({"movie_id": pool.to_numpy(np.int64),
                           "vote": votes.reindex(pool, fill_value=0.0).to_numpy(np.float64)})
    ranked["prior"] = popularity_prior(popular).reindex(pool, fill_value=0.0).to_numpy(np.float64)
    ranked["score"] = ranked["vote"] + float(popularity_weight) * ranked["prior"]
    ranked = ranked[~ranked["movie_id"].isin(list(rated))]
    if chosen:
        genre_of = lookup.set_index(lookup["movie_id"].astype(np.int64))["genres"]
        ranked = ranked[genre_mask(ranked["movie_id"].map(genre_of), chosen, known_from=lookup["genres"])]
    ranked = ranked.sort_values(["score", "prior", "movie_id"], ascending=[False, False, True], kind="stable").head(k)
    sources = lookup[lookup["movie_id"].isin([best[m] for m, v in zip(ranked["movie_id"], ranked["vote"]) if v > 0])]
    titles = dict(zip(sources["movie_id"].astype(np.int64).tolist(), sources["title"].tolist()))
    reasons = [f"similar to {titles.get(int(best[m]), f'movie {int(best[m])}')}" if v > 0 else _popular_reason(chosen)
               for m, v in zip(ranked["movie_id"], ranked["vote"])]
    return _frame(ranked["movie_id"].tolist(), ranked["score"].tolist(), reasons)


def pairs_in(users, movies, ref_users, ref_movies) -> np.ndarray:
    """Whether each (users[i], movies[i]) is one of the pairs (ref_users[j], ref_movies[j]): one isin on int keys."""
    users, movies = np.asarray(users, dtype=np.int64), np.asarray(movies, dtype=np.int64)
    n = len(users)
    if not n or not len(ref_users):
        return np.zeros(n, dtype=bool)
    user_codes, _ = pd.factorize(np.concatenate([users, np.asarray(ref_users, dtype=np.int64)]))
    movie_codes, distinct = pd.factorize(np.concatenate([movies, np.asarray(ref_movies, dtype=np.int64)]))
    keys = user_codes.astype(np.int64) * len(distinct) + movie_codes
    return np.isin(keys[:n], keys[n:])


def recommend_from_ratings_many(users: Mapping[int, Mapping[int, float]], similar: pd.DataFrame,
                                popular: pd.DataFrame, k: int | Mapping[int, int], metric: str = "cosine",
                                popularity_weight: float = POPULARITY_WEIGHT) -> pd.DataFrame:
    """``recommend_from_ratings`` for many new users at once (no genres): the same movies, scores and order.

    ``users`` maps user_id -> {movie_id: rating}; ``k`` is one list length or {user_id: its length}. Returns
    the columns user_id, rank, movie_id, score, ordered by ``users``' order and rank. One pass over all users
    (their liked movies joined to the similar table, one groupby of (user, movie)) instead of a pandas query per
    user; the unit tests hold it equal to ``recommend_from_ratings`` user by user, which stays the serving
    function (``recsys recommend --ratings``). Floating point is kept identical: each user's weights and their
    sum come from ``liked_movies`` as there, and a (user, movie)'s parts are summed by the same pandas groupby
    sum in the similar table's row order.
    """
    check_metric(metric)
    ids = np.fromiter((int(u) for u in users), dtype=np.int64, count=len(users))
    depth = np.fromiter((check_k(k[u] if isinstance(k, Mapping) else k)
                         for u in users), dtype=np.int64, count=len(users))
    rated = [{int(m): float(r) for m, r in given.items()} for given in users.values()]
    n_rated = np.fromiter((len(r) for r in rated), dtype=np.int64, count=len(rated))
    popular_ids = popular["movie_id"].to_numpy(np.int64)
    prior_of = popularity_prior(popular)
    prior_index = pd.Index(prior_of.index)
    prior_values = prior_of.to_numpy(np.float64)

    def prior(movies: np.ndarray) -> np.ndarray:
        at = prior_index.get_indexer(movies)
        return np.where(at >= 0, prior_values[np.maximum(at, 0)], 0.0)

    # liked movies, one row per (user, liked movie); the weights' sum per user as recommend_from_ratings takes it
    liked = [liked_movies(r) for r in rated]
    n_liked = np.fromiter((len(w) for w in liked), dtype=np.int64, count=len(liked))
    liked_user = np.repeat(np.arange(len(ids)), n_liked)
    liked_movie = np.fromiter((m for w in liked for m in w), dtype=np.int64, count=int(n_liked.sum()))
    liked_weight = np.fromiter((x for w in liked for x in w.values()), dtype=np.float64, count=int(n_liked.sum()))
    total = np.array([sum(w.values()) if w else 1.0 for w in liked], dtype=np.float64)

    # each liked movie's rows of the similar table (the table's order kept within a movie)
    table = similar[similar["metric"] == metric]
    source = table["movie_id"].to_numpy(np.int64)
    target = table["similar_movie_id"].to_numpy(np.int64)
    sim = similarity_of(table, metric)
    by_source = np.argsort(source, kind="stable")
    lo = np.searchsorted(source[by_source], liked_movie, "left")
    count = np.searchsorted(source[by_source], liked_movie, "right") - lo
    pair = np.repeat(np.arange(len(liked_movie)), count)
    row = by_source[concat_ranges(lo, count)]
    contrib = pd.DataFrame({"user": liked_user[pair], "movie_id": target[row], "row": row,
                            "part": liked_weight[pair] * sim[row]})
    contrib = contrib.sort_values(["user", "movie_id", "row"], kind="stable")
    votes = contrib.groupby(["user", "movie_id"], sort=False)["part"].sum()
    vote_user = votes.index.get_level_values(0).to_numpy(np.int64)
    vote_movie = votes.index.get_level_values(1).to_numpy(np.int64)
    vote = votes.to_numpy(np.float64) / total[vote_user]
    keep = vote > 0
    vote_user, vote_movie, vote = vote_user[keep], vote_movie[keep], vote[keep]

    # the pool: each user's k + |rated| most popular movies and their voted movies, less the movies they rated
    warm = n_rated > 0
    n_head = np.where(warm, np.minimum(depth + n_rated, len(popular_ids)), 0)
    head_user = np.repeat(np.arange(len(ids)), n_head)
    head_movie = popular_ids[concat_ranges(np.zeros(len(n_head)), n_head)]
    user = np.concatenate([vote_user, head_user])
    movie = np.concatenate([vote_movie, head_movie])
    score_vote = np.concatenate([vote, np.zeros(len(head_user))])
    _, first = np.unique(np.stack([user, movie]), axis=1, return_index=True)  # a voted movie keeps its vote
    first = np.sort(first)
    user, movie, score_vote = user[first], movie[first], score_vote[first]
    rated_user = np.repeat(np.arange(len(ids)), n_rated)
    rated_movie = np.fromiter((m for r in rated for m in r), dtype=np.int64, count=int(n_rated.sum()))
    free = ~pairs_in(user, movie, rated_user, rated_movie)
    user, movie, score_vote = user[free], movie[free], score_vote[free]
    movie_prior = prior(movie)
    score = score_vote + float(popularity_weight) * movie_prior
    order = np.lexsort((movie, -movie_prior, -score, user))
    user, movie, score = user[order], movie[order], score[order]
    starts = np.searchsorted(user, np.arange(len(ids)))
    rank = np.arange(len(user)) - starts[user]
    top = rank < depth[user]
    user, movie, score, rank = user[top], movie[top], score[top], rank[top]

    # users with no ratings: the most popular movies (``recommend_cold_user``)
    n_cold = np.where(warm, 0, np.minimum(depth, len(popular_ids)))
    cold_user = np.repeat(np.arange(len(ids)), n_cold)
    cold_rank = concat_ranges(np.zeros(len(n_cold)), n_cold)
    user = np.concatenate([user, cold_user])
    movie = np.concatenate([movie, popular_ids[cold_rank]])
    score = np.concatenate([score, popular["score"].to_numpy(np.float64)[cold_rank]])
    rank = np.concatenate([rank, cold_rank])
    order = np.lexsort((rank, user))
    return pd.DataFrame({"user_id": ids[user[order]], "rank": (rank[order] + 1).astype(np.int32),
                         "movie_id": movie[order], "score": score[order]})[RECOMMENDATION_COLUMNS]


# --- the stage ---------------------------------------------------------------------------------------------


def materialize_recommendations(model: FactorModel, validate_dir: Path, similar_table: Path | pd.DataFrame,
                                out_dir: Path, serving_dir: Path, k: int = 10, settings=None,
                                min_ratings: int = 1, about: dict | None = None) -> dict:
    """Stage ``recommend``: top-k per known user from ``model`` (the champion), popularity for cold users,
    written to ``out_dir`` and published with the similar-movie table under ``serving_dir`` (and S3).

    ``validate_dir`` holds ratings.parquet (every validated rating: all are excluded from a user's list) and
    movies.parquet. Returns the report sections ``recommendations`` and ``serving_fingerprint``.
    """
    from pipeline import storage
    from pipeline.serving import publish as serving

    validate_dir, out_dir = Path(validate_dir), Path(out_dir)
    ratings = pd.read_parquet(validate_dir / "ratings.parquet", columns=["user_id", "movie_id", "rating"])
    movies = _catalog(pd.read_parquet(validate_dir / "movies.parquet"))
    recs = recommend_known_users(model, ratings, k)
    popular = popular_movies(ratings, movies, min_ratings=min_ratings)
    with storage.atomic_dir(out_dir) as tmp:
        tables = {"recommendations": recs, "popular": popular}
        for name, frame in tables.items():
            serving.write_table(frame, tmp / f"{name}.parquet")
        storage.write_manifest(tmp, "recommend", {name: {"rows": len(frame), "columns": list(frame.columns)}
                                                  for name, frame in tables.items()},
                               model=model.name, k=k)
    published = serving.publish(
        serving_dir,
        {"similar_movies": similar_table, "recommendations": out_dir / "recommendations.parquet",
         "movies": movies, "popular": out_dir / "popular.parquet"},
        {"model": model.name, "k": k, **(about or {})},
        settings=settings,
    )
    return {
        "recommendations": {"users": int(recs["user_id"].nunique()), "k": k,
                            "table": str(out_dir / "recommendations.parquet"), "model": model.name,
                            **{key: (about or {}).get(key) for key in ("registered_model", "champion_version")}},
        "serving_fingerprint": published["serving_fingerprint"],
        "serving": published,
    }


def run_recommend(ctx) -> dict:
    """Stage ``recommend``: the ranking champion's top-N per user (the rating champion's until a ranker was
    promoted), popularity for everyone else; publish the served set."""
    from pipeline import registry, storage

    settings = ctx.settings
    name = settings.registered_ranker
    model, version = registry.load_champion(settings, name)
    if model is None:
        name = settings.registered_model
        model, version = registry.load_champion(settings, name)
    if model is None:
        log.warning("recommend: no champion in the registry yet (nothing was promoted): nothing to serve")
        return {}
    log.info("recommend: lists from %s v%s (%s)", name, version, getattr(model, "name", "model"))
    if not (ctx.stage_dir("similarity") / storage.MANIFEST).exists():
        log.warning("recommend: the similarity stage served nothing in this run: the served set stays as it was")
        return {}
    similar = storage.read_manifest(ctx.stage_dir("similarity"), "recommend")
    return materialize_recommendations(
        model, ctx.stage_dir("validate"), similar["tables"]["similar_movies"]["path"], ctx.stage_dir("recommend"),
        settings.serving_dir, k=ctx.params.recommend_k, settings=settings,
        about={"registered_model": name, "champion_version": version, "run_id": ctx.run_id})
