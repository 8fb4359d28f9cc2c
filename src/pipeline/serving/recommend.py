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
                    (a weighted mean similarity; a neighbour of several liked movies adds up).

No Spark here: plain pandas/numpy, so the query command line can call the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import check_k
from pipeline.errors import ConfigError
from pipeline.models.popularity import popular_movies
from pipeline.similarity import METRICS

if TYPE_CHECKING:
    from pipeline.models.factor_model import FactorModel

log = logging.getLogger(__name__)

LIKED_RATING = 3.5
NEUTRAL_RATING = 2.5
REASON_MODEL = "predicted rating"
REASON_POPULAR = "popular"

RECOMMENDATION_COLUMNS = ["user_id", "rank", "movie_id", "score"]
COLD_COLUMNS = ["rank", "movie_id", "score", "reason"]


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"unknown similarity metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


# --- known users -------------------------------------------------------------------------------------------


def _rated_by_user(ratings: pd.DataFrame) -> dict[int, list[int]]:
    """{user_id: the movie ids they rated}, grouped once (no per-row Python)."""
    if len(ratings) == 0:
        return {}
    users = ratings["user_id"].to_numpy(np.int64)
    movies = ratings["movie_id"].to_numpy(np.int64)
    order = np.argsort(users, kind="stable")
    users, movies = users[order], movies[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return dict(zip(users[starts].tolist(), (group.tolist() for group in np.split(movies, starts[1:]))))


def recommend_known_users(model: FactorModel, ratings: pd.DataFrame, k: int) -> pd.DataFrame:
    """Top-k movies for every user the model knows, excluding every movie the user rated in ``ratings``.

    ``score`` is the model's predicted (clipped) rating, and ``rank`` follows it; rows are ordered by
    (user_id, rank).
    """
    k = check_k(k)
    users = np.asarray(model.user_ids, dtype=np.int64)
    top = model.top_k(users, k, exclude=_rated_by_user(ratings))
    user_col = np.fromiter((u for u in users for _ in top.get(int(u), ())), dtype=np.int64)
    movie_col = np.fromiter((m for u in users for m in top.get(int(u), ())), dtype=np.int64)
    rank_col = np.fromiter((r for u in users for r in range(1, len(top.get(int(u), ())) + 1)), dtype=np.int32)
    score = model.predict(user_col, movie_col).astype(np.float64) if len(user_col) else np.empty(0)
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


def recommend_from_ratings(rated: Mapping[int, float], similar: pd.DataFrame, popular: pd.DataFrame, k: int,
                           metric: str = "cosine", genres: str | Iterable[str] | None = None,
                           movies: pd.DataFrame | None = None) -> pd.DataFrame:
    """Item-based cold start: neighbours of the movies the user liked, then popular movies up to k.

    ``rated`` maps movie_id -> rating; already-rated movies are never recommended. ``movies`` (the catalog)
    names the liked movie in each ``reason`` and supplies genres; without it, ``popular``'s columns are used.
    Scores of the item-based rows are weighted mean similarities, those of the popular rows popularity
    scores: compare within one ``reason`` kind only.
    """
    k = check_k(k)
    check_metric(metric)
    rated = {int(m): float(r) for m, r in rated.items()}
    chosen = parse_genres(genres)
    if not rated:
        return recommend_cold_user(popular, k, chosen)
    lookup = _catalog(movies) if movies is not None else popular
    titles = dict(zip(lookup["movie_id"].astype(np.int64).tolist(), lookup["title"].tolist()))

    weights = liked_movies(rated)
    picked_ids: list[int] = []
    picked_scores: list[float] = []
    reasons: list[str] = []
    if weights:
        rows = similar[(similar["metric"] == metric) & similar["movie_id"].isin(list(weights))]
        rows = rows[~rows["similar_movie_id"].isin(list(rated))]
        if len(rows):
            w = rows["movie_id"].map(weights).to_numpy(np.float64)
            contrib = pd.DataFrame({"source": rows["movie_id"].to_numpy(np.int64),
                                    "movie_id": rows["similar_movie_id"].to_numpy(np.int64),
                                    "part": w * similarity_of(rows, metric)})
            scores = contrib.groupby("movie_id", sort=True)["part"].sum() / sum(weights.values())
            # The reason names the liked movie that contributed most (ties: the smaller movie id).
            best = (contrib.sort_values(["movie_id", "part", "source"], ascending=[True, False, True],
                                        kind="stable").drop_duplicates("movie_id").set_index("movie_id")["source"])
            ranked = pd.DataFrame({"movie_id": scores.index.to_numpy(np.int64), "score": scores.to_numpy()})
            ranked = ranked[ranked["score"] > 0]
            if chosen:
                genre_of = lookup.set_index(lookup["movie_id"].astype(np.int64))["genres"]
                candidate_genres = ranked["movie_id"].map(genre_of)
                ranked = ranked[genre_mask(candidate_genres, chosen, known_from=lookup["genres"])]
            ranked = ranked.sort_values(["score", "movie_id"], ascending=[False, True], kind="stable").head(k)
            picked_ids = ranked["movie_id"].tolist()
            picked_scores = ranked["score"].tolist()
            reasons = [f"similar to {titles.get(int(best[m]), f'movie {int(best[m])}')}" for m in picked_ids]

    if len(picked_ids) < k:
        fill = recommend_cold_user(popular, k + len(rated) + len(picked_ids), chosen)
        fill = fill[~fill["movie_id"].isin(list(rated) + picked_ids)].head(k - len(picked_ids))
        picked_ids += fill["movie_id"].tolist()
        picked_scores += fill["score"].tolist()
        reasons += fill["reason"].tolist()
    return _frame(picked_ids, picked_scores, reasons)


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
                            "table": str(out_dir / "recommendations.parquet")},
        "serving_fingerprint": published["serving_fingerprint"],
        "serving": published,
    }


def run_recommend(ctx) -> dict:
    """Stage ``recommend``: top-N per known user from the champion, popularity for the rest; publish."""
    from pipeline import registry, storage

    model, version = registry.load_champion(ctx.settings)
    if model is None:
        log.warning("recommend: no champion in the registry yet (nothing was promoted): nothing to serve")
        return {}
    similar = storage.read_manifest(ctx.stage_dir("similarity"), "recommend")
    return materialize_recommendations(
        model, ctx.stage_dir("validate"), similar["tables"]["similar_movies"]["path"], ctx.stage_dir("recommend"),
        ctx.settings.serving_dir, k=ctx.params.recommend_k, settings=ctx.settings,
        about={"registered_model": ctx.settings.registered_model, "champion_version": version, "run_id": ctx.run_id})
