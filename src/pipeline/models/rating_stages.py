"""Stages ``knn`` and ``blend``: the item-neighbourhood rating model, and the blend of the run's rating models.

- ``knn``: item kNN on the bias baseline's residuals (``pipeline.models.neighbourhood``), its grid
  (neighbours x shrinkage x damping) chosen on validation RMSE, one MLflow child run per point.
- ``blend``: a linear blend of every rating candidate the run trained (``pipeline.models.blend``), weights
  fitted on validation; its validation figure (what the gate chooses by) is out of fold. MLflow: the weights
  as params and metrics, each member's Shapley share of the gain, the ridge's K-fold RMSEs.

Both go through ``run_candidate`` (every test row, cold rows from the baseline) and are registered as the same
Spark-free rating pyfunc.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline import storage, tracking
from pipeline.models.metrics import metrics_of_predictions, rating_metrics
from pipeline.models.protocol import Fitted, known_pairs, load_split, manifest_entries, run_candidate
from pipeline.models.saved import load_model

log = logging.getLogger(__name__)

BLEND = "blend"
REFERENCE = "baseline"


def run_knn(ctx) -> dict:
    """Stage ``knn``: the neighbourhood grid on validation RMSE (one MLflow child run per point); score the best."""
    from pipeline.models.neighbourhood import fit_knn_grid

    p = ctx.params
    if not p.knn_enabled:
        log.info("knn: skipped (knn_enabled is false)")
        return {}

    def fit(split, baseline, folder, parent) -> Fitted:
        started = time.perf_counter()
        points = fit_knn_grid(split.train, baseline, p.knn_neighbours, p.knn_shrinkages, p.knn_dampings,
                              max_user_ratings=p.knn_max_user_ratings, seed=p.seed)
        similarity_s = time.perf_counter() - started
        total = len(p.knn_neighbours) * len(p.knn_shrinkages) * len(p.knn_dampings)
        log.info("knn: neighbour tables in %.1f s; %d grid points to score on validation", similarity_s, total)
        results, best, shared = [], None, {}

        def predict(model, table):  # the dampings of one neighbour table share its (numerator, denominator)
            def scored(user_ids, movie_ids):
                if shared.get("table") != table:
                    shared.update(table=table, parts=model.parts(user_ids, movie_ids))
                return model.predict_from(shared["parts"])
            return scored

        for point, model in points:
            name = f"knn k={point['k']} shrinkage={point['shrinkage']:g} damping={point['damping']:g}"
            with tracking.child_run(parent, ctx, name, split.summary) as record:
                scores = rating_metrics(split.validation, predict(model, (point["k"], point["shrinkage"])), baseline,
                                        split.train, split="val")
                record(point, {"val_rmse": scores["val_rmse"], "val_mae": scores["val_mae"]})
            results.append({**point, "val_rmse": scores["val_rmse"]})
            log.info("knn grid point %d/%d (k=%d shrinkage=%g damping=%g): validation RMSE %.4f", len(results),
                     total, point["k"], point["shrinkage"], point["damping"], scores["val_rmse"])
            if best is None or scores["val_rmse"] < best[0]["val_rmse"]:
                best = (results[-1], model, scores)
        (folder / "grid.json").write_text(storage.strict_json(results, indent=2))
        chosen, model, validation = best
        log.info("knn: %d grid points, best %s (validation RMSE %.4f; similarities %.1f s)", len(results),
                 {k: chosen[k] for k in ("k", "shrinkage", "damping")}, chosen["val_rmse"], similarity_s)
        params = {f"best_{k}": chosen[k] for k in ("k", "shrinkage", "damping")} | {
            "grid_points": len(results), "max_user_ratings": p.knn_max_user_ratings}
        # the chosen point's validation figures are the protocol's already (rating_metrics): not scored twice
        return Fitted(model, params=params, metrics={"similarity_seconds": similarity_s},
                      validation=validation, artifacts=[folder / "grid.json"],
                      section={"grid": results, "best_params": {k: chosen[k] for k in ("k", "shrinkage", "damping")},
                               "similarity_seconds": round(similarity_s, 2)})

    return run_candidate(ctx, "knn", fit)


def blend_members(ctx) -> dict:
    """{name: saved model} of the run's rating candidates (the baseline first), the blend excepted."""
    entries = {n: e for n, e in manifest_entries(ctx.run_dir, "candidate").items() if n != BLEND}
    names = sorted(entries, key=lambda n: (n != REFERENCE, n))
    return {name: load_model(entries[name]["model_path"]) for name in names}


def _validation_known(ctx) -> int:
    """The validation ratings whose user and movie are in training: the baseline stage counted them."""
    counts = storage.read_manifest(ctx.stage_dir(REFERENCE), BLEND).get("split_counts")
    if counts is None:  # a baseline output from before it counted
        split = load_split(ctx, BLEND)
        return int(known_pairs(split.train, split.validation).sum())
    return counts["validation_known"]


def run_blend(ctx) -> dict:
    """Stage ``blend``: weights on validation (ridge by K-fold), scored out of fold on validation and on test."""
    from pipeline.models.blend import fit_blend

    p = ctx.params
    if not p.blend_enabled:
        log.info("blend: skipped (blend_enabled is false)")
        return {}
    members = blend_members(ctx)
    if len([n for n in members if n != REFERENCE]) < 1:
        reason = f"no rating model besides the baseline to blend (found {sorted(members) or 'none'})"
        log.warning("blend: skipped: %s", reason)
        return {"models": {BLEND: {"skipped": reason}}}
    known = _validation_known(ctx)
    if known < 2 * p.blend_folds:
        reason = (f"{known:,} validation rating{'' if known == 1 else 's'} whose user and movie are in the training "
                  f"split; its weights' K-fold needs at least {2 * p.blend_folds} (2 x blend_folds={p.blend_folds})")
        log.warning("blend: skipped: %s", reason)
        return {"models": {BLEND: {"skipped": reason}}}

    def fit(split, baseline, folder, run) -> Fitted:
        blend, measured = fit_blend(members, split.train, split.validation, baseline, support=p.blend_support,
                                    ridges=p.blend_ridges, folds=p.blend_folds, seed=p.seed)
        users = split.validation["user_id"].to_numpy()
        movies = split.validation["movie_id"].to_numpy()
        cold = ~(np.isin(users, split.train["user_id"].to_numpy())
                 & np.isin(movies, split.train["movie_id"].to_numpy()))
        validation = metrics_of_predictions(split.validation, measured["validation_predictions"], cold, split="val")
        shares = measured.get("shapley", {})
        metrics = {f"weight_{c.replace('*', '_x_')}": w for c, w in blend.weights.items()}
        metrics.update({f"share_{m}": v for m, v in shares.get("shares", {}).items()})
        section = {"members": list(members), "weights": blend.weights, "intercept": blend.intercept,
                   "ridge": measured["ridge"], "ridge_cv_rmse": measured["ridge_cv_rmse"],
                   "folds": measured["folds"], "fitted_on_rows": measured["warm_rows"],
                   "validation": "out of fold (K-fold over the validation rows; ridge by an inner K-fold)",
                   "gain": {k: v for k, v in shares.items() if k != "shares"}, "shares": shares.get("shares", {})}
        params = {"members": ",".join(members), "support": p.blend_support, "ridge": measured["ridge"],
                  "folds": measured["folds"], "intercept": round(blend.intercept, 6),
                  **{f"weight_{c.replace('*', '_x_')}": round(w, 6) for c, w in blend.weights.items()}}
        log.info("blend: members %s, ridge %g, out-of-fold validation RMSE %.4f; shares of the gain %s",
                 list(members), measured["ridge"], validation["val_rmse"],
                 {m: round(v, 4) for m, v in shares.get("shares", {}).items()})
        return Fitted(blend, params=params, metrics=metrics, section=section, validation=validation)

    return run_candidate(ctx, BLEND, fit)
