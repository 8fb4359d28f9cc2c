"""The learning-to-rank model: a second stage over the run's other models (a two-stage recommender).

1. Candidates: the union of each candidate generator's (the ranking models: EASE, implicit ALS) top ``depth``
   movies per user, with the caller's exclusions (the protocol's: training movies, and validation movies at
   test time).
2. Features of each (user, movie) candidate (``FEATURES`` describes them): every generator's score and rank,
   every rating model's predicted rating (cold pairs from its baseline), the movie's popularity, its recent
   popularity and year, how its genres match the user's history, and the user's activity and mean rating.
3. LightGBM ranking models (LambdaRank or XE-NDCG, one per cross-validation fold) score the candidates; the mean
   of their scores orders them, ties by movie id.

It ranks from a user's history (movie ids, and ratings when given) with numpy and LightGBM only: no Spark, so
the registered pyfunc scores on its own. ``docs/adr/0070-learning-to-rank-over-every-model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.models.factor_model import FactorModel
from pipeline.models.item_item import ItemItemModel
from pipeline.models.ranking import best_k, exclusion_pairs, history_pairs

RECENT_DAYS = 365  # a movie's recent popularity: its training ratings in the last year of the training data


@dataclass
class MovieStats:
    """What the features know of each movie, from the training split and the movies table."""

    movie_ids: np.ndarray
    popularity: np.ndarray  # log(1 + training ratings)
    recent: np.ndarray  # log(1 + training ratings in the last RECENT_DAYS of the training data)
    year: np.ndarray  # release year (NaN unknown)
    genres: np.ndarray  # movies x genres, 0/1 float32
    genre_names: list = field(default_factory=list)

    def __post_init__(self):
        self._index = pd.Index(np.asarray(self.movie_ids, dtype=np.int64))

    @classmethod
    def build(cls, train: pd.DataFrame, movies: pd.DataFrame | None) -> MovieStats:
        ids = np.sort(pd.unique(np.concatenate([train["movie_id"].to_numpy(np.int64),
                                                movies["movie_id"].to_numpy(np.int64) if movies is not None
                                                else np.zeros(0, np.int64)])))
        index = pd.Index(ids)
        counts = np.bincount(index.get_indexer(train["movie_id"].to_numpy(np.int64)), minlength=len(ids))
        recent = np.zeros(len(ids))
        if "ts" in train.columns and len(train):
            ts = train["ts"].to_numpy(np.int64)
            late = train["movie_id"].to_numpy(np.int64)[ts >= ts.max() - RECENT_DAYS * 86400]
            recent = np.bincount(index.get_indexer(late), minlength=len(ids))
        year = np.full(len(ids), np.nan)
        names: list[str] = []
        genres = np.zeros((len(ids), 0), np.float32)
        if movies is not None and len(movies):
            at = index.get_indexer(movies["movie_id"].to_numpy(np.int64))
            if "year" in movies.columns:
                year[at] = pd.to_numeric(movies["year"], errors="coerce").to_numpy(np.float64)
            if "genres" in movies.columns:
                lists = [list(g) if isinstance(g, (list, tuple, np.ndarray)) else [] for g in movies["genres"]]
                names = sorted({g for gs in lists for g in gs if g and g != "(no genres listed)"})
                col = {g: i for i, g in enumerate(names)}
                genres = np.zeros((len(ids), len(names)), np.float32)
                for row, gs in zip(at, lists):
                    for g in gs:
                        if g in col:
                            genres[row, col[g]] = 1.0
        return cls(ids, np.log1p(counts).astype(np.float32), np.log1p(recent).astype(np.float32), year, genres,
                   names)

    def rows(self, movie_ids: np.ndarray) -> np.ndarray:
        return self._index.get_indexer(np.asarray(movie_ids, dtype=np.int64))

    def arrays(self) -> dict:
        return {"movie_ids": self.movie_ids, "popularity": self.popularity, "recent": self.recent, "year": self.year,
                "genres": self.genres}


def _dense_scores(model, users: list, history) -> tuple[np.ndarray, np.ndarray]:
    """(users x model.movie_ids scores, whether each user is known to the model) of a candidate generator."""
    if isinstance(model, ItemItemModel):
        rows, movies, ratings = history_pairs(history, users)
        known = np.bincount(rows[model._movies.get_indexer(movies) >= 0], minlength=len(users)) > 0
        return model._history_scores((rows, movies), len(users), ratings).astype(np.float64), known
    if isinstance(model, FactorModel):
        at = model._users.get_indexer(np.asarray(users, dtype=np.int64))
        known = at >= 0
        out = np.full((len(users), len(model.movie_ids)), -np.inf)
        if known.any():
            out[known] = model._scores(at[known])[1]
        return out, known
    raise TypeError(f"{type(model).__name__} cannot generate candidates")


@dataclass
class Reranker:
    """LambdaRank over candidates from ``generators`` with features from every model (module docstring)."""

    generators: dict  # name -> ranking model (ItemItemModel or FactorModel)
    raters: dict  # name -> rating model with predict_all
    movies: MovieStats
    boosters: list = field(default_factory=list)  # lightgbm.Booster, one per fold: the score is their mean
    depth: int = 100
    name: str = "ltr"
    meta: dict = field(default_factory=dict)
    # its top k is not the start of its top k + n with more movies left out (the candidates and their ranks
    # change): the protocol ranks each split with that split's exclusions
    prefix_consistent = False

    @property
    def features(self) -> list[str]:
        names = []
        for g in self.generators:
            names += [f"{g}_score", f"{g}_rank", f"{g}_score_gap"]
        names += [f"{r}_rating" for r in self.raters]
        return names + ["popularity", "recent_popularity", "year", "genre_match", "user_genre_share",
                        "user_activity", "user_mean_rating"]

    # --- candidates and features ------------------------------------------------------------------------

    def candidates(self, user_ids: list, exclude, history, depth: int | None = None) -> pd.DataFrame:
        """One row per (user, candidate movie) with every feature; ``row``: the user's position in
        ``user_ids``. Users no generator can rank have no rows."""
        depth = max(self.depth, depth or 0)
        excluded = exclusion_pairs(exclude, user_ids)
        scored, pool = {}, []
        for name, model in self.generators.items():
            matrix, known = _dense_scores(model, user_ids, history)
            lists = best_k(matrix.copy(), model.movie_ids, depth, excluded, index=getattr(model, "_movies", None))
            scored[name] = (model, matrix, known)
            for r, (movies, ok) in enumerate(zip(lists, known)):
                if ok and movies:
                    pool.append(pd.DataFrame({"row": r, "movie_id": np.asarray(movies, np.int64),
                                              f"{name}_rank": np.arange(1, len(movies) + 1, dtype=np.float32)}))
        if not pool:
            return pd.DataFrame(columns=["row", "movie_id", *self.features])
        frame = pd.concat(pool, ignore_index=True)
        frame = frame.groupby(["row", "movie_id"], sort=True, as_index=False).min()  # one row per pair
        rows, movies = frame["row"].to_numpy(np.int64), frame["movie_id"].to_numpy(np.int64)
        for name, (model, matrix, known) in scored.items():
            cols = model._movies.get_indexer(movies)
            score = np.where(cols >= 0, matrix[rows, np.maximum(cols, 0)], np.nan)
            score[~np.isfinite(score)] = np.nan
            score[~known[rows]] = np.nan
            frame[f"{name}_score"] = score
            best = pd.Series(score).groupby(rows).transform("max").to_numpy()
            frame[f"{name}_score_gap"] = best - score
            rank = frame[f"{name}_rank"] if f"{name}_rank" in frame else pd.Series(np.nan, index=frame.index)
            frame[f"{name}_rank"] = rank.fillna(depth + 1).clip(upper=self.depth + 1).astype(np.float32)
        users = np.asarray(user_ids, dtype=np.int64)[rows]
        for name, model in self.raters.items():
            frame[f"{name}_rating"] = model.predict_all(users, movies).astype(np.float32)
        at = self.movies.rows(movies)
        valid = at >= 0
        for column, values in (("popularity", self.movies.popularity), ("recent_popularity", self.movies.recent),
                               ("year", self.movies.year)):
            frame[column] = np.where(valid, values[np.maximum(at, 0)], np.nan)
        frame = frame.join(self._user_features(user_ids, history, frame, at, valid))
        return frame[["row", "movie_id", *self.features]]

    def _user_features(self, user_ids: list, history, frame: pd.DataFrame, at: np.ndarray,
                       valid: np.ndarray) -> pd.DataFrame:
        """genre_match (cosine of the movie's genres with the user's history's), user_genre_share (the share of
        the user's history in the movie's genres), user_activity (log(1 + history)), user_mean_rating."""
        h_rows, h_movies, h_ratings = history_pairs(history, user_ids)
        n = len(user_ids)
        count = np.bincount(h_rows, minlength=n).astype(np.float64)
        mean = np.full(n, np.nan)
        if h_ratings is not None and len(h_ratings):
            mean = np.bincount(h_rows, weights=h_ratings, minlength=n) / np.maximum(count, 1)
            mean[count == 0] = np.nan
        g = self.movies.genres
        profile = np.zeros((n, g.shape[1]), np.float64)
        h_at = self.movies.rows(h_movies)
        ok = h_at >= 0
        np.add.at(profile, h_rows[ok], g[h_at[ok]])
        rows = frame["row"].to_numpy(np.int64)
        movie_g = np.where(valid[:, None], g[np.maximum(at, 0)], 0.0)
        user_g = profile[rows]
        dot = (movie_g * user_g).sum(axis=1)
        norms = np.linalg.norm(movie_g, axis=1) * np.linalg.norm(user_g, axis=1)
        return pd.DataFrame({
            "genre_match": np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0),
            "user_genre_share": np.where(count[rows] > 0, dot / np.maximum(count[rows], 1), 0.0),
            "user_activity": np.log1p(count[rows]), "user_mean_rating": mean[rows]}, index=frame.index)

    # --- the ranker interface ---------------------------------------------------------------------------

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        if not len(frame):
            return np.zeros(0)
        x = frame[self.features].to_numpy(np.float64)
        return np.mean([np.asarray(b.predict(x), dtype=np.float64) for b in self.boosters], axis=0)

    def top_k(self, user_ids, k: int, exclude=None, history=None, batch: int = 256) -> dict:
        """Each user's k best candidates by the model's score (ties by movie id); ``history`` (default:
        ``exclude``) is what the user rated. Users with no candidate are left out (the caller gives them
        popularity)."""
        return {user: movies for user, (movies, _) in self.top_k_scored(user_ids, k, exclude, history, batch).items()}

    def top_k_scored(self, user_ids, k: int, exclude=None, history=None, batch: int = 256) -> dict:
        """``top_k`` with the model's scores: {user_id: (movie ids, their scores)}."""
        history = exclude if history is None else history
        user_ids = [int(u) for u in user_ids]
        out: dict = {}
        for start in range(0, len(user_ids), batch):
            chunk = user_ids[start:start + batch]
            frame = self.candidates(chunk, exclude, history, depth=k)
            out.update(ranked(frame, self.score(frame), chunk, k, with_scores=True))
        return out

    def pair_scores(self, user_ids, movie_ids, history, batch: int = 256) -> np.ndarray:
        """The model's score of each (user, movie) pair among the user's candidates (NaN for other pairs)."""
        user_ids, movie_ids = np.asarray(user_ids, dtype=np.int64), np.asarray(movie_ids, dtype=np.int64)
        out = pd.Series(np.nan, index=pd.MultiIndex.from_arrays([user_ids, movie_ids]))
        users = list(dict.fromkeys(user_ids.tolist()))
        found = []
        for start in range(0, len(users), batch):
            chunk = users[start:start + batch]
            frame = self.candidates(chunk, history, history)
            found.append(pd.Series(self.score(frame), index=pd.MultiIndex.from_arrays(
                [np.asarray(chunk, np.int64)[frame["row"].to_numpy(np.int64)], frame["movie_id"].to_numpy(np.int64)])))
        if found:
            scores = pd.concat(found)
            scores = scores[~scores.index.duplicated()]
            out = scores.reindex(out.index)
        return out.to_numpy(np.float64)

    def feature_importance(self) -> dict:
        gains = np.sum([b.feature_importance(importance_type="gain") for b in self.boosters], axis=0)
        total = float(gains.sum()) or 1.0
        return {name: round(float(v) / total, 4) for name, v in zip(self.features, gains)}

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The first generator's item vectors (the similar-movie tables need vectors, not a ranking)."""
        return next(iter(self.generators.values())).item_embeddings()

    # --- persistence ------------------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        from pipeline.models.factor_model import write_model_files

        folder = Path(folder)
        for group, members in (("generators", self.generators), ("raters", self.raters)):
            for name, model in members.items():
                model.save(folder / group / name)
        folder.mkdir(parents=True, exist_ok=True)
        for i, booster in enumerate(self.boosters):
            (folder / f"booster_{i}.txt").write_text(booster.model_to_string())
        meta = {"kind": "reranker", "name": self.name, "depth": self.depth, "generators": list(self.generators),
                "raters": list(self.raters), "boosters": len(self.boosters), "features": self.features,
                "genre_names": self.movies.genre_names,
                "meta": self.meta}
        return write_model_files(folder, "movies.npz", self.movies.arrays(), meta)

    @classmethod
    def load(cls, folder: Path, load_member) -> Reranker:
        import lightgbm

        from pipeline.models.factor_model import read_model_files

        folder = Path(folder)
        meta, z = read_model_files(folder, "movies.npz")
        movies = MovieStats(z["movie_ids"], z["popularity"], z["recent"], z["year"], z["genres"],
                            list(meta.get("genre_names", [])))
        model = cls({n: load_member(folder / "generators" / n) for n in meta["generators"]},
                    {n: load_member(folder / "raters" / n) for n in meta["raters"]}, movies,
                    [lightgbm.Booster(model_str=(folder / f"booster_{i}.txt").read_text())
                     for i in range(int(meta["boosters"]))], int(meta["depth"]),
                    meta["name"], meta.get("meta", {}))
        if model.features != meta["features"]:
            raise ValueError(f"{folder}: saved features {meta['features']} differ from the model's {model.features}")
        return model


def ranked(frame: pd.DataFrame, scores: np.ndarray, user_ids: list, k: int, with_scores: bool = False) -> dict:
    """{user_id: the k candidates of ``frame`` with the highest ``scores``}, ties by movie id; ``frame.row``
    indexes ``user_ids``. ``with_scores``: {user_id: (movie ids, their scores)}."""
    if not len(frame):
        return {}
    order = np.lexsort((frame["movie_id"].to_numpy(), -scores, frame["row"].to_numpy()))
    rows = frame["row"].to_numpy()[order]
    place = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep = order[place < k]
    rows = frame["row"].to_numpy()[keep]
    movies = frame["movie_id"].to_numpy(np.int64)[keep]
    values = np.asarray(scores, dtype=np.float64)[keep]
    cuts = np.flatnonzero(np.diff(rows)) + 1
    users = [user_ids[r] for r in rows[np.r_[0, cuts]].tolist()]
    lists = [part.tolist() for part in np.split(movies, cuts)]
    if not with_scores:
        return dict(zip(users, lists))
    return dict(zip(users, zip(lists, (part.tolist() for part in np.split(values, cuts)))))


FEATURES = {
    "<generator>_score": "the candidate generator's score (EASE's item-item sum, implicit ALS's preference)",
    "<generator>_rank": "its rank in the generator's list (depth + 1 when outside it)",
    "<generator>_score_gap": "the user's best score of that generator minus this one",
    "<model>_rating": "each rating model's predicted rating (cold pairs from its baseline)",
    "popularity": "log(1 + the movie's training ratings)",
    "recent_popularity": f"log(1 + its training ratings in the last {RECENT_DAYS} days of the training data)",
    "year": "the movie's release year",
    "genre_match": "cosine of the movie's genres with the genres of the user's history",
    "user_genre_share": "share of the user's history in the movie's genres",
    "user_activity": "log(1 + the user's history)",
    "user_mean_rating": "the mean of the user's ratings (when the history has them)",
}
