"""The blend: a linear combination of the run's rating models' predictions, weighted on validation.

    r^(u, i) = intercept + sum_m (w_m + v_m * s_i) * p_m(u, i) + c * s_i     (clipped to the scale)

where p_m is member m's prediction and s_i the movie's standardised log number of training ratings (the
``support`` feature; ``v``, ``c`` absent with ``support=False``): members are trusted differently for rarely and
often rated movies (feature-weighted linear stacking, Sill et al. 2009, with one meta-feature).

The members (the bias baseline, ALS, AutoRec, the item kNN: whatever rating models the run trained) are fitted
on the training split only; their validation predictions are therefore out of sample for the weights. The
weights are a ridge regression on the validation rows whose user and movie are in training (the others are
cold rows, which every member and the protocol give to the baseline), the intercept unpenalised:

- the ridge strength is chosen by K-fold cross-validation over those rows (``cross_validated_ridge``), and the
  final weights are refitted on all of them with it;
- the blend's validation figure, by which the gate compares it with the other candidates, is **out of fold**:
  each fold is predicted by weights fitted (ridge chosen by an inner K-fold) on the other folds
  (``out_of_fold``). The blend is never scored on rows its weights were fitted on.

Each member's share of the gain over the baseline is its Shapley value: the average, over the orders in
which members join a blend of the baseline, of how much the out-of-fold validation RMSE (at the blend's
ridge) falls when it joins (exact: 2^(members-1) blends of a few columns). Members are stored inside the
blend, so the registered pyfunc scores without Spark or TensorFlow.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.models.baseline import BiasBaseline, fill_cold
from pipeline.models.metrics import RATING_MAX, RATING_MIN, rmse
from pipeline.models.ranking import top_k_by_score

DEFAULT_RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def folds_of(n: int, folds: int, seed: int) -> np.ndarray:
    """A fold number in [0, folds) for each of n rows (seeded shuffle, sizes within one of each other)."""
    return np.random.default_rng(seed).permutation(np.arange(n) % max(2, folds))


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """(weights, intercept) minimising mean squared error + ridge * ||weights||^2 (intercept unpenalised)."""
    mx, my = x.mean(axis=0), y.mean()
    xc, yc = x - mx, y - my
    gram = xc.T @ xc / len(y) + ridge * np.eye(x.shape[1])
    w = np.linalg.lstsq(gram, xc.T @ yc / len(y), rcond=None)[0]
    return w, float(my - mx @ w)


def _clip(pred):
    return np.clip(pred, RATING_MIN, RATING_MAX)


def cross_validated_ridge(x, y, ridges, folds: int, seed: int) -> tuple[float, dict]:
    """(the ridge with the lowest K-fold RMSE, {ridge: K-fold RMSE}); ties: the stronger ridge."""
    fold = folds_of(len(y), folds, seed)
    scores = {}
    for ridge in ridges:
        pred = np.empty(len(y))
        for f in np.unique(fold):
            held = fold == f
            w, b = ridge_fit(x[~held], y[~held], ridge)
            pred[held] = x[held] @ w + b
        scores[float(ridge)] = rmse(y, _clip(pred))
    best = min(scores, key=lambda r: (round(scores[r], 12), -r))
    return best, scores


def out_of_fold(x, y, ridges, folds: int, seed: int, nested: bool = True) -> np.ndarray:
    """Each row predicted by weights fitted on the other folds, the ridge chosen by an inner K-fold on them
    (``nested``), or ``ridges[0]`` throughout."""
    fold = folds_of(len(y), folds, seed)
    pred = np.empty(len(y))
    for f in np.unique(fold):
        held = fold == f
        ridge = cross_validated_ridge(x[~held], y[~held], ridges, folds, seed + 1)[0] if nested else ridges[0]
        w, b = ridge_fit(x[~held], y[~held], ridge)
        pred[held] = x[held] @ w + b
    return _clip(pred)


@dataclass
class BlendFit:
    weights: np.ndarray
    intercept: float
    ridge: float
    ridge_cv_rmse: dict
    out_of_fold: np.ndarray  # clipped predictions of the rows, each by weights that never saw it


def fit_blend_weights(x, y, ridges=DEFAULT_RIDGES, folds: int = 5, seed: int = 42) -> BlendFit:
    """Weights on all rows (ridge chosen by K-fold) and the out-of-fold predictions that score them."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ridge, scores = cross_validated_ridge(x, y, ridges, folds, seed)
    w, b = ridge_fit(x, y, ridge)
    return BlendFit(w, b, ridge, scores, out_of_fold(x, y, ridges, folds, seed))


def support_feature(train_counts: pd.Series) -> pd.Series:
    """movie_id -> standardised log(1 + training ratings): the blend's meta-feature."""
    logs = np.log1p(train_counts.astype(np.float64))
    return (logs - logs.mean()) / (logs.std() or 1.0)


def blend_features(x: np.ndarray, names: list[str], support: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """(columns, their names): the members' predictions, and with ``support`` their products with it and it."""
    if support is None:
        return x, list(names)
    s = np.asarray(support, np.float64)[:, None]
    return np.column_stack([x, x * s, s]), [*names, *(f"{n}*support" for n in names), "support"]


def _member_columns(columns: list[str], member: str) -> list[int]:
    return [i for i, c in enumerate(columns) if c == member or c == f"{member}*support"]


def shapley_shares(x, y, names: list[str], reference: str, support: np.ndarray | None = None,
                   ridge: float = 0.0, folds: int = 5, seed: int = 42) -> dict:
    """Each member's Shapley share of the blend's out-of-fold RMSE gain over ``reference`` (always in the blend,
    with the support feature when there is one), every subset's blend at the given ``ridge`` (a report figure,
    not a decision: 2^(members-1) K-fold fits, seconds at a million validation rows).

    {"reference_rmse", "blend_rmse", "gain", "recalibration" (the reference blended alone), "shares":
    {member: RMSE points}}; shares + recalibration = gain."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    features, columns = blend_features(x, names, support)
    ref = names.index(reference)
    players = [i for i in range(len(names)) if i != ref]
    always = _member_columns(columns, reference) + [i for i, c in enumerate(columns) if c == "support"]
    value = {}
    for size in range(len(players) + 1):
        for subset in itertools.combinations(players, size):
            cols = always + [c for p in subset for c in _member_columns(columns, names[p])]
            value[frozenset(subset)] = rmse(y, out_of_fold(features[:, cols], y, (ridge,), folds, seed, nested=False))
    n = len(players)
    shares = {}
    for p in players:
        total = 0.0
        others = [q for q in players if q != p]
        for size in range(n):
            for subset in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                total += weight * (value[frozenset(subset)] - value[frozenset(subset) | {p}])
        shares[names[p]] = total
    reference_rmse = rmse(y, _clip(x[:, ref]))
    return {"reference_rmse": reference_rmse, "blend_rmse": value[frozenset(players)],
            "gain": reference_rmse - value[frozenset(players)], "recalibration": reference_rmse - value[frozenset()],
            "shares": shares}


@dataclass
class Blend:
    """A fitted blend: its members (saved models) and their weights; the rating-model interface."""

    name: str
    members: dict  # name -> model with predict / predict_all (FactorModel, ItemKNN, ...)
    weights: dict  # feature column (blend_features' names) -> weight
    intercept: float
    support: pd.Series | None = None  # movie_id -> the support feature (None: no support columns)
    fallback: BiasBaseline | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        first = next(iter(self.members.values()))
        self.movie_ids = np.asarray(first.movie_ids, dtype=np.int64)
        self.user_ids = np.asarray(first.user_ids, dtype=np.int64)

    def member_predictions(self, user_ids, movie_ids) -> np.ndarray:
        """pairs x members: each member's prediction (its cold pairs from the fallback; NaN without one)."""
        cols = []
        for model in self.members.values():
            p = model.predict(user_ids, movie_ids)
            if self.fallback is not None:
                missing = ~np.isfinite(p)
                p[missing] = self.fallback.predict(np.asarray(user_ids)[missing], np.asarray(movie_ids)[missing])
            cols.append(p)
        return np.column_stack(cols)

    def predict(self, user_ids, movie_ids) -> np.ndarray:
        """Blended ratings, clipped; NaN where no member knows the pair."""
        known = np.zeros(len(np.asarray(user_ids)), dtype=bool)
        for model in self.members.values():
            known |= np.isfinite(model.predict(user_ids, movie_ids))
        out = np.full(len(known), np.nan)
        if known.any():
            movies = np.asarray(movie_ids)[known]
            x = self.member_predictions(np.asarray(user_ids)[known], movies)
            out[known] = self._combine(x, self._support_of(movies))
        return out

    def _support_of(self, movie_ids) -> np.ndarray | None:
        if self.support is None:
            return None
        return self.support.reindex(np.asarray(movie_ids, dtype=np.int64)).fillna(0.0).to_numpy()

    def _combine(self, x: np.ndarray, support) -> np.ndarray:
        features, columns = blend_features(x, list(self.members), support)
        return _clip(features @ np.array([self.weights[c] for c in columns]) + self.intercept)

    def predict_all(self, user_ids, movie_ids) -> np.ndarray:
        return fill_cold(self.predict(user_ids, movie_ids), self.fallback, user_ids, movie_ids, self.name)

    def user_scores(self, user_ids) -> np.ndarray:
        """Blended ratings of the users for every movie of ``movie_ids`` (users known to every member)."""
        support = self._support_of(self.movie_ids)
        s = np.zeros(len(self.movie_ids)) if support is None else support
        w = lambda column: self.weights.get(column, 0.0)  # noqa: E731
        total = np.full((len(user_ids), len(self.movie_ids)), self.intercept) + w("support") * s[None, :]
        for name, model in self.members.items():
            cols = pd.Index(model.movie_ids).get_indexer(self.movie_ids)
            total += model.user_scores(user_ids)[:, cols] * (w(name) + w(f"{name}*support") * s)[None, :]
        return _clip(total)

    def top_k(self, user_ids, k: int, exclude: dict | None = None, history: dict | None = None,
              batch: int = 256) -> dict:
        """The k best movies by blended rating for each user every member knows; ties by movie_id."""
        known = np.ones(len(user_ids), dtype=bool)
        for model in self.members.values():
            known &= pd.Index(model.user_ids).get_indexer(np.asarray(user_ids, dtype=np.int64)) >= 0
        users = [int(u) for u, ok in zip(user_ids, known) if ok]
        return top_k_by_score(self.user_scores, users, self.movie_ids, k, exclude, batch)

    def item_embeddings(self):
        """The embeddings of the member with the largest weight among those that have some."""
        ranked = sorted(self.members, key=lambda n: -abs(self.weights[n]))
        for name in ranked:
            ids, vectors = self.members[name].item_embeddings()
            if vectors.shape[1] > 0:
                return ids, vectors
        return self.members[ranked[0]].item_embeddings()

    def save(self, folder: Path) -> Path:
        from pipeline.models.factor_model import baseline_arrays, write_model_files

        folder = Path(folder)
        for name, model in self.members.items():
            model.save(folder / "members" / name)
        arrays: dict = {}
        if self.support is not None:
            arrays.update(support_movie_ids=self.support.index.to_numpy(np.int64), support=self.support.to_numpy())
        meta = {"kind": "blend", "name": self.name, "members": list(self.members), "weights": self.weights,
                "intercept": self.intercept, "fallback": baseline_arrays(self.fallback, "fallback", arrays),
                "support": self.support is not None, "meta": self.meta}
        return write_model_files(folder, "blend.npz", arrays, meta)

    @classmethod
    def load(cls, folder: Path, load_member) -> Blend:
        """``load_member(folder)``: the loader of any saved model (``pipeline.models.saved.load_model``)."""
        from pipeline.models.factor_model import baseline_from_stored, read_model_files

        folder = Path(folder)
        meta, arrays = read_model_files(folder, "blend.npz")
        members = {name: load_member(folder / "members" / name) for name in meta["members"]}
        support = pd.Series(arrays["support"], index=pd.Index(arrays["support_movie_ids"])) if meta["support"] else None
        return cls(meta["name"], members, {k: float(v) for k, v in meta["weights"].items()}, float(meta["intercept"]),
                   support=support, fallback=baseline_from_stored(meta.get("fallback"), "fallback", arrays),
                   meta=meta.get("meta", {}))


def fit_blend(members: dict, train: pd.DataFrame, validation: pd.DataFrame, fallback: BiasBaseline, *,
              support: bool = True, ridges=DEFAULT_RIDGES, folds: int = 5, seed: int = 42,
              reference: str = "baseline") -> tuple[Blend, dict]:
    """(the blend, what was measured): weights fitted on the validation rows whose user and movie are in
    ``train`` (members trained on ``train`` only). The measurements hold ``validation_predictions`` (every
    validation row: out of fold where warm, the fallback where cold), the ridge and its K-fold RMSEs, and the
    members' Shapley shares of the out-of-fold gain over ``reference`` (when it is a member)."""
    names = list(members)
    users, movies = validation["user_id"].to_numpy(np.int64), validation["movie_id"].to_numpy(np.int64)
    warm = np.isin(users, train["user_id"].to_numpy()) & np.isin(movies, train["movie_id"].to_numpy())
    if warm.sum() < 2 * folds:
        raise ValueError(f"the blend needs at least {2 * folds} validation rows with a known user and movie, "
                         f"got {int(warm.sum())}")
    feature = support_feature(train.groupby("movie_id").size()) if support else None
    blend = Blend("blend", members, {}, 0.0, support=feature, fallback=fallback)
    x = blend.member_predictions(users[warm], movies[warm])
    s = blend._support_of(movies[warm])
    y = validation["rating"].to_numpy(np.float64)[warm]
    features, columns = blend_features(x, names, s)
    fit = fit_blend_weights(features, y, ridges, folds, seed)
    blend.weights = {c: float(w) for c, w in zip(columns, fit.weights)}
    blend.intercept = fit.intercept
    predictions = fallback.predict(users, movies)
    predictions[warm] = fit.out_of_fold
    measured = {"validation_predictions": predictions, "ridge": fit.ridge, "ridge_cv_rmse": fit.ridge_cv_rmse,
                "warm_rows": int(warm.sum()), "folds": int(folds)}
    if reference in names and len(names) > 1:
        measured["shapley"] = shapley_shares(x, y, names, reference, s, fit.ridge, folds, seed)
    return blend, measured
