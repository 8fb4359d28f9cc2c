"""Stage ``ltr``: the learning-to-rank candidate (``pipeline.models.reranker``), trained on validation.

- The candidate generators are the run's ranking models (EASE, implicit ALS) and the features come from every
  model the run trained (the rating models: baseline, ALS, AutoRec, kNN, blend), all fitted on the training
  split and scoring from the training history, as the protocol wants.
- Labels: the validation ratings. A candidate is relevant when its validation rating is >= 4 (the protocol's
  relevance); the LambdaRank model learns to put those first. Users whose candidates hold nothing relevant
  teach nothing and are left out of the fits (they are still ranked and measured).
- Its hyper-parameters (leaves, learning rate, rounds) are chosen by ``ltr_folds``-fold cross-validation over
  the validation users (LightGBM's NDCG@10 on each held-out fold, round by round); the validation NDCG@10 the
  ranking gate chooses by is the protocol's, on lists each user gets from the fold model that did not see
  them: out of fold, as the blend's validation RMSE is. The final model is fitted on every validation user.
- Test is scored once, by the protocol, like every candidate; the lists leave out training and validation
  movies.
docs/adr/0070-learning-to-rank-over-every-model.md.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.errors import DataValidationError
from pipeline.models.metrics import RELEVANCE_THRESHOLD, ranking_metrics
from pipeline.models.protocol import Fitted, load_split, manifest_entries, run_candidate
from pipeline.models.ranking import RANKING_K, fill_with_popularity, measured_users
from pipeline.models.reranker import MovieStats, Reranker, ranked
from pipeline.models.saved import load_model

log = logging.getLogger(__name__)

GENERATORS = ("ease", "implicit_als")  # ranking stages whose lists are the candidates
RATERS = ("baseline", "als", "autorec", "knn", "blend")  # rating stages whose predictions are features


def lightgbm_params(objective: str, leaves: int, learning_rate: float, min_child: int, seed: int) -> dict:
    return {"objective": objective, "metric": "ndcg", "eval_at": [RANKING_K], "num_leaves": int(leaves),
            "learning_rate": float(learning_rate), "min_child_samples": int(min_child), "feature_fraction": 0.9,
            "bagging_fraction": 0.8, "bagging_freq": 1, "lambdarank_truncation_level": 3 * RANKING_K,
            "seed": int(seed), "deterministic": True, "force_row_wise": True, "num_threads": 2, "verbose": -1}


def labelled(frame: pd.DataFrame, users: np.ndarray, held_out: pd.DataFrame) -> np.ndarray:
    """1 for the candidates whose held-out rating is relevant, else 0."""
    liked = held_out[held_out["rating"] >= RELEVANCE_THRESHOLD]
    keys = pd.MultiIndex.from_arrays([liked["user_id"].to_numpy(np.int64), liked["movie_id"].to_numpy(np.int64)])
    pairs = pd.MultiIndex.from_arrays([users[frame["row"].to_numpy(np.int64)], frame["movie_id"].to_numpy(np.int64)])
    return pairs.isin(keys).astype(np.float32)


def _dataset(frame: pd.DataFrame, labels: np.ndarray, features: list[str], rows_kept: np.ndarray):
    import lightgbm

    part = frame[rows_kept]
    groups = np.bincount(pd.factorize(part["row"].to_numpy())[0])  # frame is sorted by row
    return lightgbm.Dataset(part[features].to_numpy(np.float64), label=labels[rows_kept], group=groups,
                            feature_name=[f.replace("-", "_") for f in features], free_raw_data=False)


def cross_validate(frame: pd.DataFrame, labels: np.ndarray, features: list[str], folds: np.ndarray,
                   useful: np.ndarray, params: dict, rounds: int) -> tuple[list, int, np.ndarray]:
    """(one booster per fold, the round count, each candidate's out-of-fold score) for one grid point.

    Each fold's booster learns from the other folds' users and is measured (LightGBM's NDCG@10) on its own,
    round by round; the round count is the best of the mean curve, and each user's candidates are scored by
    the booster that did not see them, at that count. Only users with a relevant candidate are learnt from
    and measured (``useful``: the rows of such users); every user is scored."""
    import lightgbm

    boosters, curves, parts = [], [], []
    for f in np.unique(folds):
        if not (useful & (folds != f)).any() or not (useful & (folds == f)).any():
            continue  # a fold without a user to learn from or to measure on
        record: dict = {}
        boosters.append(lightgbm.train(params, _dataset(frame, labels, features, useful & (folds != f)),
                                       num_boost_round=rounds,
                                       valid_sets=[_dataset(frame, labels, features, useful & (folds == f))],
                                       valid_names=["held"], callbacks=[lightgbm.record_evaluation(record)]))
        curves.append(record["held"][f"ndcg@{RANKING_K}"])
        parts.append(f)
    if not boosters:
        raise DataValidationError("ltr: no validation user has a relevant movie among their candidates in two "
                                  "folds: nothing to learn from")
    best = int(np.argmax(np.mean(np.asarray(curves), axis=0))) + 1
    x = frame[features].to_numpy(np.float64)
    oof = np.zeros(len(frame))
    for f, booster in zip(parts, boosters):
        mine = folds == f
        oof[mine] = booster.predict(x[mine], num_iteration=best)
    outside = ~np.isin(folds, parts)  # a fold that could not be held out: scored by every booster
    if outside.any():
        oof[outside] = np.mean([b.predict(x[outside], num_iteration=best) for b in boosters], axis=0)
    return [_truncated(b, best) for b in boosters], best, oof


def _truncated(booster, rounds: int):
    import lightgbm

    return lightgbm.Booster(model_str=booster.model_to_string(num_iteration=rounds))


def _members(ctx) -> tuple[dict, dict]:
    """(generators, raters) of this run: the completed model stages' saved models."""
    ranking = manifest_entries(ctx.run_dir, "ranking_candidate")
    rating = manifest_entries(ctx.run_dir, "candidate")
    generators = {n: load_model(ranking[n]["model_path"]) for n in GENERATORS if n in ranking}
    raters = {n: load_model(rating[n]["model_path"]) for n in RATERS if n in rating}
    return generators, raters


def _movies_table(ctx) -> pd.DataFrame | None:
    path = ctx.stage_dir("validate") / "movies.parquet"
    return pd.read_parquet(path, columns=["movie_id", "genres", "year"]) if path.exists() else None


def fit_reranker(split, generators: dict, raters: dict, movies: pd.DataFrame | None, p) -> tuple[Reranker, dict]:
    """The reranker trained on ``split``'s validation users, and what the fit measured (its section).

    Every grid point (objective x leaves x learning rate) is cross-validated; the point whose out-of-fold lists
    score the best validation NDCG@10 by the protocol is the model: its fold boosters, whose mean scores."""
    model = Reranker(generators, raters, MovieStats.build(split.train, movies), depth=p.ltr_candidates)
    seen_train, _ = split.seen
    users, val_rows = measured_users(split.validation, *(split.ranking_sample or (None, 0)))
    users = np.asarray(users, dtype=np.int64)
    started = time.perf_counter()
    frame = model.candidates(users.tolist(), seen_train, seen_train)
    candidate_s = time.perf_counter() - started
    labels = labelled(frame, users, val_rows)
    features = model.features
    user_fold = np.random.default_rng(p.seed).permutation(len(users)) % p.ltr_folds
    folds = user_fold[frame["row"].to_numpy(np.int64)]
    useful = pd.Series(labels).groupby(frame["row"].to_numpy()).transform("max").to_numpy() > 0
    results, best = [], None
    for objective in p.ltr_objectives:
        for leaves in p.ltr_num_leaves:
            for rate in p.ltr_learning_rates:
                params = lightgbm_params(objective, leaves, rate, p.ltr_min_child_samples, p.seed)
                boosters, rounds, oof = cross_validate(frame, labels, features, folds, useful, params,
                                                        p.ltr_max_rounds)
                lists = fill_with_popularity(ranked(frame, oof, users.tolist(), RANKING_K), users.tolist(), seen_train,
                                             split.train, RANKING_K)  # the protocol: no candidate, popularity
                val = ranking_metrics(lists, val_rows, k=RANKING_K)
                result = {"objective": objective, "num_leaves": leaves, "learning_rate": rate, "rounds": rounds,
                          "val_ndcg_at_10": val["ndcg_at_10"]}
                results.append(result)
                log.info("ltr: %s, %d leaves, learning rate %g: out-of-fold validation NDCG@10 %.4f at %d rounds",
                         objective, leaves, rate, val["ndcg_at_10"] or 0.0, rounds)
                if best is None or (val["ndcg_at_10"] or 0.0) > (best[1]["ndcg_at_10"] or 0.0):
                    best = (result, val, boosters)
    chosen, val, model.boosters = best
    section = {"features": features, "feature_importance": model.feature_importance(), "grid": results,
               "chosen": chosen, "folds": p.ltr_folds, "candidates_per_user": round(len(frame) / max(len(users), 1), 1),
               "training_users": int(pd.unique(frame.loc[useful, "row"]).size),
               "relevant_candidate_share": round(float(labels.mean()) if len(labels) else 0.0, 4),
               "candidate_seconds": round(candidate_s, 3), "generators": list(generators), "raters": list(raters)}
    validation = {f"val_{name}": value for name, value in val.items() if name != "users"}
    validation["val_users"] = val["users"]
    return model, {"section": section, "validation": validation}


def run_ltr(ctx) -> dict:
    """Stage ``ltr``: the reranker over the run's models, a ranking candidate like the others."""
    p = ctx.params
    generators, raters = _members(ctx)
    if not generators:
        reason = f"no candidate generator: none of the ranking stages {', '.join(GENERATORS)} produced a model"
        log.warning("ltr: skipped: %s", reason)
        return {"models": {"ltr": {"skipped": reason}}}
    movies = _movies_table(ctx)
    split = load_split(ctx, "ltr")
    relevant = split.validation.loc[split.validation["rating"] >= RELEVANCE_THRESHOLD, "user_id"].nunique()
    if relevant < 2 * p.ltr_folds:
        reason = (f"{relevant} validation users with a relevant rating: {p.ltr_folds}-fold cross-validation "
                  f"(ltr_folds={p.ltr_folds}) needs at least {2 * p.ltr_folds}")
        log.warning("ltr: skipped: %s", reason)
        return {"models": {"ltr": {"skipped": reason}}}

    def fit(split, _baseline, folder, parent) -> Fitted:
        started = time.perf_counter()
        model, fitted = fit_reranker(split, generators, raters, movies, p)
        (folder / "grid.json").write_text(storage.strict_json(fitted["section"]["grid"], indent=2))
        (folder / "features.json").write_text(json.dumps(fitted["section"]["feature_importance"], indent=2))
        chosen = fitted["section"]["chosen"]
        log.info("ltr: out-of-fold validation NDCG@10 %.4f (%d users); features by gain: %s",
                 fitted["validation"]["val_ndcg_at_10"] or 0.0, fitted["validation"]["val_users"],
                 ", ".join(f"{k} {v:.2f}" for k, v in sorted(fitted["section"]["feature_importance"].items(),
                                                             key=lambda kv: -kv[1])[:5]))
        return Fitted(model, params={f"best_{k}": v for k, v in chosen.items() if k != "val_ndcg_at_10"}
                      | {"candidates": p.ltr_candidates, "folds": p.ltr_folds},
                      metrics={"grid_seconds": time.perf_counter() - started},
                      artifacts=[folder / "grid.json", folder / "features.json"], section=fitted["section"],
                      validation=fitted["validation"])

    return run_candidate(ctx, "ltr", fit, kind="ranking", needs_baseline=False)
