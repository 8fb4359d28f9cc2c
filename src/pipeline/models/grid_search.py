"""The grid search both ALS stages run, without Spark: successive halving over iterations, a line search over
regParam in the first rung and a walk over the finalists' ranks, under an ``Objective`` (the metric and its
direction). ``pipeline.models.als.grid_search`` stages the training rows in Spark and calls ``run_search`` with
the stage's own fit and score functions.

Decisions: docs/adr/0021-als-successive-halving.md, docs/adr/0025-halving-eta-5.md,
docs/adr/0031-regparam-line-search.md, docs/adr/0035-rank-walk-over-finalists.md,
docs/adr/0040-implicit-als-chooses-among-every-fit.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

HALVING_MIN_ROWS = 100_000  # under this many training rows halving is the full grid, which is cheap there
HALVING_MIN_ITERS = 3  # a first rung's fits run at least this many ALS iterations


def halving_rungs(n_points: int, max_iter: int, eta: int = 3, min_iters: int = HALVING_MIN_ITERS) -> list[dict]:
    """Successive halving's plan over ALS iterations: per rung, the share of each point's ``max_iter`` its fits
    run (``fraction``), how many points it fits and how many of them go on (``keep``).

    Rung budgets grow ``eta``-fold up to all the iterations, the first one at least ``min_iters`` (when
    ``max_iter`` leaves no room for a full ``eta`` step but is at least twice ``min_iters``, one screening rung
    at ``min_iters``: implicit ALS's 10 iterations at eta 5 are screened at 3); the first
    rung fits every point, each later one the best ``1/eta`` of the previous rung; the last rung fits its
    points with all their iterations, and the best of those is the model. Every rung fits on all the training
    data: ranked on a sample of users, the points favour too high a regParam, since a smaller sample gives every
    movie fewer ratings (docs/adr/0021-als-successive-halving.md).
    """
    rungs = 1
    while max_iter / eta ** rungs >= min_iters:
        rungs += 1
    if rungs == 1 and max_iter >= 2 * min_iters:  # no room for a full eta step: screen at min_iters instead
        rungs = 2
    plan, points = [], n_points
    for i in range(rungs):
        fraction = 1.0 if i == rungs - 1 else max(1.0 / eta ** (rungs - 1 - i), min_iters / max_iter)
        plan.append({"fraction": fraction, "points": points, "keep": 1})
        if points == 1:
            plan[-1]["fraction"] = 1.0
            break
        points = -(-points // eta)
        plan[-1]["keep"] = points if i < rungs - 1 else 1
    return plan


SKIPPED_BY_LINE_SEARCH = "line search: a lower regParam of the same rank scored better"  # grid.json's "skipped"
SKIPPED_BY_RANK_WALK = "line search: a finalist of a lower rank scored better with all its iterations"


def reg_chains(points: list[dict]) -> list[list[int]]:
    """The grid as line searches over regParam: indices of the points that differ only in ``reg_param``, each
    chain in ascending regParam, the chains in the grid's order."""
    chains: dict[tuple, list[int]] = {}
    for i, point in enumerate(points):
        chains.setdefault(tuple(sorted((k, v) for k, v in point.items() if k != "reg_param")), []).append(i)
    return [sorted(chain, key=lambda i: (points[i]["reg_param"], i)) for chain in chains.values()]


def is_nan(score) -> bool:
    return score != score


def improves(new: float, old: float, better) -> bool:
    """``better(new, old)``, where the NaN of a diverged fit is worse than every score: a NaN never improves
    on anything and every score improves on a NaN (``better(x, nan)`` alone is False: a NaN kept first would
    never be replaced)."""
    return not is_nan(new) and (is_nan(old) or better(new, old))


def best_first(score: float, higher: bool) -> tuple:
    """Sort key: the best score first (``higher``: the highest), a diverged fit's NaN last."""
    return (True, 0.0) if is_nan(score) else (False, -score if higher else score)


def walk_chain(chain: list[int], score, better) -> dict[int, float]:
    """Score ``chain``'s points in order and stop after the first one that is not ``better`` than the one
    before it (``improves``: a diverged NaN score counts as worse, and a point after one goes on); {index:
    score} of the points scored."""
    scores: dict[int, float] = {}
    previous = None
    for i in chain:
        scores[i] = value = score(i)
        if previous is not None and not improves(value, previous, better):
            break
        previous = value
    return scores


def rank_groups(points: list[dict], indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by the points' rank, lowest rank first (each group in the given order): the order
    in which the last rung's line search fits the finalists."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(points[i]["rank"], []).append(i)
    return [groups[rank] for rank in sorted(groups)]


def walk_ranks(groups: list[list[int]], score_group, better) -> list[int]:
    """Fit the finalists rank by rank (``score_group(group)`` -> their scores) and stop after the first rank
    whose best is not ``better`` than the lower rank's best (validation error is U-shaped in the rank at a
    tuned regParam: past the rank the data supports, more factors overfit;
    docs/adr/0035-rank-walk-over-finalists.md); the indices fitted."""
    fitted: list[int] = []

    def score(g: int) -> float:
        values = score_group(groups[g])
        fitted.extend(groups[g])
        finite = [v for v in values if not is_nan(v)]  # a diverged fit is no rank's best
        return functools.reduce(lambda a, b: b if better(b, a) else a, finite) if finite else float("nan")

    walk_chain(list(range(len(groups))), score, better)
    return fitted


def rung_iters(point: dict, fraction: float) -> int:
    return point["max_iter"] if fraction >= 1.0 else max(1, min(point["max_iter"], round(point["max_iter"] * fraction)))


@dataclass(frozen=True)
class Objective:
    """What a grid search is chosen on: the only things in which the explicit and the implicit grid differ."""

    metric: str  # the validation score that ranks the fits (a key of the ``score`` function's dict)
    higher_is_better: bool
    full_metrics: tuple[str, ...] = ()  # more of the scores kept and logged for a fit with all its iterations
    every_fit: bool = False  # choose among every fit, a screen's too; else among the fits with all their iterations

    def better(self, new: float, old: float) -> bool:
        return new > old if self.higher_is_better else new < old

    def best_first(self, score: float) -> tuple:
        return best_first(score, self.higher_is_better)


# the explicit grid: the lowest validation RMSE among the fits with all their iterations
RMSE = Objective("val_rmse", higher_is_better=False, full_metrics=("val_mae",))
# the implicit grid: the highest validation NDCG@10 of every fit, the screen's included, so that the iterations
# are chosen on validation (docs/adr/0040-implicit-als-chooses-among-every-fit.md)
NDCG = Objective("val_ndcg_at_10", higher_is_better=True, every_fit=True)


@dataclass
class Searched:
    """A grid search's outcome: ``results`` (one dict per point, in grid order), the chosen fit's ``model``,
    ``point`` (its ``max_iter`` the iterations it ran), validation ``score`` and whether it ran ``full``, and
    ``search`` (the plan as run: strategy, eta, line search, per rung the share of iterations, seconds and the
    points fitted)."""

    results: list[dict]
    model: object
    point: dict
    score: float
    full: bool
    search: dict


def search_rungs(rows: int, points: list[dict], strategy: str, eta: int, min_rows: int) -> list[dict]:
    """The rungs a search runs: ``halving_rungs`` under ``strategy`` "halving" from ``min_rows`` training rows,
    else one rung that fits every point with all its iterations."""
    if strategy == "halving" and rows >= min_rows:
        return halving_rungs(len(points), max(p["max_iter"] for p in points), eta)
    return [{"fraction": 1.0, "points": len(points), "keep": 1}]


def _ranked(scores: dict[int, float], objective: Objective) -> list[int]:
    """The fitted indices best first, the earlier grid point on a tie, a diverged fit (NaN) last."""
    return sorted(scores, key=lambda i: (objective.best_first(scores[i]), i))


def _map(pool: ThreadPoolExecutor, fn, items: list) -> list:
    return list(pool.map(fn, items))


@contextlib.contextmanager
def _fit_run(track, point: dict, lock: threading.Lock):
    """``track(point)``'s child run around one fit (opened and closed under ``lock``, as every MLflow call of the
    search): yields its ``log(params, metrics)``, the point's params logged; without ``track`` a no-op."""
    if track is None:
        yield lambda params, metrics: None
        return
    run = track(point)
    with lock:
        record = run.__enter__()
        record(point, {})
    try:
        yield record
    except BaseException as exc:
        with lock:
            if not run.__exit__(type(exc), exc, exc.__traceback__):
                raise
    else:
        with lock:
            run.__exit__(None, None, None)


def run_search(points: list[dict], fit, score, objective: Objective, rungs: list[dict], *, line_search: bool = False,
               workers: int = 1, track=None, label: str = "ALS") -> Searched:
    """Search ``points`` rung by rung (``rungs``: ``search_rungs``), ``workers`` fits side by side.

    ``fit(point, iters)`` fits one point with ``iters`` iterations and returns the model; ``score(model)``
    its validation scores, ``objective.metric`` among them. Each result holds the point, the objective's
    metrics of its fit with all its iterations (None for a point only fitted with fewer) and ``fit_s``; under
    halving ``rung_<metric>`` and ``rung_iters`` (one value per rung it reached). ``line_search`` (halving
    only): the first rung walks each rank's regParams upwards (``reg_chains``, ``walk_chain``) and stops at the
    first point worse than the one before; the points it skips are never fitted (marked
    ``SKIPPED_BY_LINE_SEARCH``). The last rung then fits its finalists rank by rank, lowest first
    (``walk_ranks``), and stops after the first rank whose best is worse than the lower rank's (the finalists
    left are marked ``SKIPPED_BY_RANK_WALK``). Each later rung fits the best ``keep`` of the one before. The
    choice: the best score (``objective``; a diverged NaN never wins while a number is left), on a tie the fit
    with all its iterations, then the earlier grid point, never the order in which the fits finished.
    ``track(point)``, if given, is a context manager yielding ``log(params, metrics)``: one MLflow child run per
    fit, opened when the fit starts and closed once it is scored, so that the run's duration is that fit's
    (``point["max_iter"]`` the iterations it runs; a point refitted in a later rung has a run per rung;
    docs/adr/0073-mlflow-and-data-docs-as-browsed.md).
    """
    halving = len(rungs) > 1
    line_search = line_search and halving
    metric, kept = objective.metric, (objective.metric, *objective.full_metrics)
    results = [{**p, **dict.fromkeys(kept), "fit_s": 0.0} for p in points]
    lock = threading.Lock()  # the results, the best fit, the log lines and the MLflow calls, one thread at a time
    best: dict = {}

    def fit_one(rung_no: int, rung: dict, scored: dict, i: int) -> float:
        point = points[i]
        full = rung["fraction"] >= 1.0
        iters = rung_iters(point, rung["fraction"])
        with _fit_run(track, {**point, "max_iter": iters}, lock) as record:
            started = time.perf_counter()
            model = fit(point, iters)
            fit_s = time.perf_counter() - started
            scores = score(model)
            value = scores[metric]
            with lock:
                logged = {k: scores[k] for k in kept} if full else {f"rung{rung_no}_{metric}": value}
                record({}, {**logged, "fit_s": fit_s})
        with lock:
            scored[i] = value
            result = results[i]
            result["fit_s"] = round(result["fit_s"] + fit_s, 3)
            if halving:
                result.setdefault(f"rung_{metric}", []).append(value)
                result.setdefault("rung_iters", []).append(iters)
            if full:
                result.update({k: scores[k] for k in kept})
            rung["done"] += 1
            log.info("%s %s point %d/%d%s (%s, %d iterations): %s %.4f (%.1f s)", label,
                     f"halving rung {rung_no + 1}/{len(rungs)}" if halving else "grid", rung["done"],
                     len(rung["fit"]), " at most" if rung["line_search"] or rung["rank_walk"] else "",
                     " ".join(f"{k}={v:g}" for k, v in point.items() if k != "max_iter"), iters, metric, value, fit_s)
            if full or objective.every_fit:
                key = (objective.best_first(value), not full, i)
                if not best or key < best["key"]:
                    best.update(key=key, model=model, point={**point, "max_iter": iters}, score=value, full=full)
        return value

    alive = list(range(len(points)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rung_no, rung in enumerate(rungs):
            started = time.perf_counter()
            scored: dict[int, float] = {}
            fit_alive = functools.partial(fit_one, rung_no, rung, scored)
            groups = rank_groups(points, alive) if line_search and rung_no == len(rungs) - 1 else []
            rung.update(fit=list(alive), done=0, line_search=line_search and rung_no == 0, rank_walk=len(groups) > 1)
            if halving:
                log.info("%s halving rung %d/%d: %s%d points at %.0f %% of their iterations", label, rung_no + 1,
                         len(rungs), "line search over regParam, at most " if rung["line_search"] else
                         "line search over rank, at most " if rung["rank_walk"] else "", len(alive),
                         100 * rung["fraction"])
            if rung["line_search"]:  # one chain per rank, the chains on the workers
                chains = [[alive[j] for j in chain] for chain in reg_chains([points[i] for i in alive])]
                _map(pool, functools.partial(walk_chain, score=fit_alive, better=objective.better), chains)
                rung["fit"] = sorted(scored)
            elif rung["rank_walk"]:  # the finalists rank by rank, each rank's side by side
                walk_ranks(groups, functools.partial(_map, pool, fit_alive), objective.better)
                for i in set(alive) - set(scored):
                    results[i]["skipped"] = SKIPPED_BY_RANK_WALK
                rung["fit"] = sorted(scored)
            else:
                _map(pool, fit_alive, alive)
            alive = _ranked(scored, objective)[:rung["keep"]]
            rung["seconds"] = round(time.perf_counter() - started, 2)
    for result in results:
        if "rung_iters" not in result and result[metric] is None:  # never fitted
            result["skipped"] = SKIPPED_BY_LINE_SEARCH
    search = {"strategy": "halving" if halving else "full", "eta": None, "line_search": line_search,
              "rungs": [{"fraction": r["fraction"], "seconds": r["seconds"], "points": r["fit"]} for r in rungs]}
    return Searched(results, best["model"], best["point"], best["score"], best["full"], search)
