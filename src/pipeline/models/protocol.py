"""The evaluation protocol every model goes through, and the one helper every model stage runs in.

- ``load_split``: the run's persisted train/validation/test rows (the ETL stage's parquet).
- ``load_baseline``: the damped bias baseline fitted by the ``baseline`` stage, the fallback for cold rows.
- ``require_enough_data``: the least a split must hold for the protocol to run, checked by the ``baseline``
  stage before any model trains (docs/adr/0065-minimum-data-for-the-models.md).
- ``evaluate``: RMSE/MAE on every test row (cold rows from the baseline), the cold rows' count and RMSE, and
  the ranking metrics of the model's top-10 lists (``pipeline.models.ranking``: validation and test, the
  same protocol for every candidate), with what the test lists hold besides hits (``list_metrics``:
  coverage, long-tail share, novelty, genre diversity, NDCG@10 per user segment).
- ``run_candidate``: load split and baseline -> open the stage's MLflow run -> fit -> score on validation
  and test -> save the model, log params, metrics, artifacts and the pyfunc -> write the stage folder
  atomically with a manifest naming the model as a candidate for the gates (rating and ranking).
- ``compare_models``: every model of the run side by side (``models.md``), the ranking section.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from pipeline import storage
from pipeline.errors import DataValidationError
from pipeline.models.factor_model import FactorModel
from pipeline.models.item_item import ItemItemModel
from pipeline.models.list_metrics import LIST_KEYS, list_quality_lines, mlflow_metrics, quality_of_lists, read_genres
from pipeline.models.metrics import RELEVANCE_THRESHOLD, rating_metrics
from pipeline.models.ranking import RANKING_K, Seen, evaluate_ranking, histories
from pipeline.models.saved import load_model

log = logging.getLogger(__name__)

__all__ = ["RANKING_K", "Fitted", "Split", "compare_models", "evaluate", "known_pairs", "load_baseline", "load_model",
           "load_split", "manifest_entries", "require_enough_data", "run_candidate"]
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """The run's persisted split as pandas frames, and the ETL manifest's ``split`` summary."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    summary: dict
    # (most users, seed) of the ranking measurement: a seeded sample of the users with a relevant held-out
    # rating, the same for every model of the run (Params ranking_max_users); None: every user
    ranking_sample: tuple[int, int] | None = None
    movies_path: Path | None = None  # the validate stage's movies table (genres); None: no genre diversity

    @cached_property
    def seen(self) -> tuple[Seen, Seen]:
        """(training movies, training + validation movies) per user: built once per split, shared by every
        ranking measurement on it (the grid searches measure many points)."""
        return histories(self.train), histories(self.train, self.validation)

    @cached_property
    def genres(self) -> pd.Series | None:
        """movie_id -> the movie's genres (``movies_path``), None without it."""
        return read_genres(self.movies_path)


def load_split(ctx, needed_by: str) -> Split:
    manifest = storage.read_manifest(ctx.stage_dir("etl"), needed_by)
    frames = {name: pd.read_parquet(manifest["tables"][name]["path"]) for name in SPLITS}
    return Split(**frames, summary=manifest["split"],
                 ranking_sample=(ctx.params.ranking_max_users, ctx.params.seed),
                 movies_path=ctx.stage_dir("validate") / "movies.parquet")


def load_baseline(ctx, needed_by: str):
    """The bias baseline the ``baseline`` stage fitted on this split (its damping chosen on validation)."""
    manifest = storage.read_manifest(ctx.stage_dir("baseline"), needed_by)
    return FactorModel.load(manifest["candidate"]["model_path"]).baseline


def known_pairs(train: pd.DataFrame, rows: pd.DataFrame) -> pd.Series:
    """Which of ``rows`` have both their user and their movie in ``train`` (what a trained model can predict)."""
    return rows["user_id"].isin(train["user_id"]) & rows["movie_id"].isin(train["movie_id"])


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def require_enough_data(split: Split, etl_dir: Path) -> dict:
    """The split's counts the protocol needs; DataValidationError (exit 5) naming each one that is 0.

    At least one of each: validation ratings (every model's parameters are chosen on them) of which one has a
    user and movie seen in training (else no rating model is chosen on anything it predicts), test ratings (the
    gates score on them), and a user with a relevant (>= 4) validation and test rating (rankers are chosen and
    gated on them). Tiny data (1 user, 1 or 2 movies, a test_fraction of 0) stops here, before any model trains,
    instead of part-way through the run."""
    train, validation, test = split.train, split.validation, split.test
    ratings = pd.concat([train, validation, test])
    fractions = storage.read_manifest(etl_dir, "baseline").get("fractions", {})
    most = int(ratings["user_id"].value_counts().max()) if len(ratings) else 0

    def held_out(name: str) -> str:
        share = f"{fractions[name]:g}" if isinstance(fractions.get(name), (int, float)) else "?"
        return (f"{name}_fraction={share} of each user's ratings, rounded, is held out; the users here have at "
                f"most {_plural(most, 'rating')}")

    def relevant(rows: pd.DataFrame) -> int:
        return int(rows.loc[rows["rating"] >= RELEVANCE_THRESHOLD, "user_id"].nunique())

    counts = {
        "validation": (len(validation), "validation ratings", f"models are chosen on them; {held_out('validation')}"),
        "test": (len(test), "test ratings", f"the gates score on them; {held_out('test')}"),
        "validation_known": (int(known_pairs(train, validation).sum()),
                             "validation ratings whose user and movie are in the training split",
                             "the rating models are chosen on ratings they can predict"),
        "validation_relevant_users": (relevant(validation),
                                      f"users with a validation rating >= {RELEVANCE_THRESHOLD:g}",
                                      "the rankers are chosen on them"),
        "test_relevant_users": (relevant(test), f"users with a test rating >= {RELEVANCE_THRESHOLD:g}",
                                "the ranking gate scores on them"),
    }
    empty = {key for key in ("validation", "test") if counts[key][0] == 0}
    within = {"validation_known": "validation", "validation_relevant_users": "validation",
              "test_relevant_users": "test"}  # what an empty split also leaves at 0 is not named twice
    short = [f"{count:,} {what} (at least 1: {why})" for key, (count, what, why) in counts.items()
             if count < 1 and within.get(key) not in empty]
    if short:
        raise DataValidationError(
            f"too little data for the models in {etl_dir}: {_plural(ratings['user_id'].nunique(), 'user')}, "
            f"{_plural(ratings['movie_id'].nunique(), 'movie')}, {len(ratings):,} ratings ({len(train):,} "
            f"training, {len(validation):,} validation, {len(test):,} test); " + "; ".join(short))
    return {key: count for key, (count, _, _) in counts.items()}


def evaluate(model, split: Split, fallback, lists_path: Path | None = None,
             splits: tuple[str, ...] = ("val", "test")) -> dict:
    """The one evaluation: rating metrics on every test row (rating models) and the ranking protocol on
    ``splits``."""
    scores = {}
    if hasattr(model, "predict"):
        scores = rating_metrics(split.test, model.predict, fallback, split.train)
    scores["ranking"] = evaluate_ranking(model, split, lists_path, splits=splits)
    if lists_path is not None:
        scores["ranking"].update(quality_of_lists(lists_path, split))
    return scores


def metrics_for_mlflow(scores: dict, prefix: str = "") -> dict:
    flat = {f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and v is not None}
    flat.update({f"{prefix}{k}": v for k, v in scores.get("ranking", {}).items()
                 if isinstance(v, (int, float)) and v is not None and k not in LIST_KEYS})
    flat.update(mlflow_metrics(scores.get("ranking", {}), f"{prefix}test_"))
    return flat


@dataclass
class Fitted:
    """What a model stage's ``fit`` returns to ``run_candidate``."""

    model: FactorModel | ItemItemModel
    params: dict  # logged as MLflow params and kept in the manifest and the report
    metrics: dict = field(default_factory=dict)  # extra MLflow metrics (e.g. training seconds)
    artifacts: list[Path] = field(default_factory=list)  # files fit wrote into the stage folder, logged too
    section: dict = field(default_factory=dict)  # extra fields of the model's report section
    sections: dict = field(default_factory=dict)  # extra report sections (e.g. the popularity ranking)
    manifest: dict = field(default_factory=dict)  # extra manifest entries (what later stages read)
    # the validation figures, when scoring the model on validation would be in sample (the blend's weights are
    # fitted on validation: its figures are out of fold) or the fit already has them (kNN's grid scores its
    # points with the protocol's rating_metrics); None: the protocol scores the model on validation
    validation: dict | None = None


Fit = Callable[[Split, object, Path, object], Fitted]


def run_candidate(ctx, stage: str, fit: Fit, *, kind: str = "rating", eligible: bool = True,
                  log_model: bool = True, needs_baseline: bool = True) -> dict:
    """Run one model stage through the protocol; the stage's report sections.

    ``fit(split, baseline, folder, mlflow_run)`` trains inside the stage's MLflow run (so nested runs and
    per-epoch metrics land inside it, at the time they happen) and may write files into ``folder``, the
    stage's temporary output folder. ``kind``: "rating" models are scored on ratings and rankings and are
    candidates of both gates; "ranking" models on rankings only. ``eligible``: the model can be the rating
    gate's challenger (not the baseline). ``log_model``: log the pyfunc so the gates can register it.
    """
    import mlflow

    from pipeline import tracking

    split = load_split(ctx, stage)
    baseline = load_baseline(ctx, stage) if needs_baseline else None
    out_dir = ctx.stage_dir(stage)
    with storage.atomic_dir(out_dir) as tmp, tracking.start_run(ctx, stage, split.summary) as run:
        started = time.perf_counter()
        fitted = fit(split, baseline, tmp, run)
        fit_s = time.perf_counter() - started
        model = fitted.model
        fallback = baseline if baseline is not None else getattr(model, "fallback", None)
        val = {}
        if kind == "rating":
            val = fitted.validation or rating_metrics(split.validation, model.predict, fallback, split.train,
                                                      split="val")
        # a ranker fitted on the validation ratings brings its out-of-fold validation figures: test alone here
        out_of_fold = kind == "ranking" and bool(fitted.validation)
        scores = evaluate(model if kind == "rating" else _RankingOnly(model), split, fallback,
                          tmp / "test_lists.parquet", splits=("test",) if out_of_fold else ("val", "test"))
        if out_of_fold:
            scores["ranking"].update(fitted.validation)
        scores["ranking"]["test_lists"] = str(out_dir / "test_lists.parquet")
        model.save(tmp / "model")
        mlflow.log_params(dict(fitted.params))
        mlflow.log_metrics({**metrics_for_mlflow(val), **metrics_for_mlflow(scores), "fit_seconds": fit_s,
                            **fitted.metrics})
        with tracking.quiet_mlflow():
            for path in fitted.artifacts:
                mlflow.log_artifact(str(path))
        uris = tracking.log_model(model, *served_inputs(split), rating=kind == "rating") if log_model else {}
        ranking = scores["ranking"]
        candidates = {"ranking_candidate": {
            "name": stage, "val_ndcg_at_10": ranking["val_ndcg_at_10"], "test_ndcg_at_10": ranking["test_ndcg_at_10"],
            "model_path": str(out_dir / "model"), "model_uri": uris.get("ranker"), "mlflow_run_id": run.info.run_id}}
        if kind == "rating":
            candidates["candidate"] = {
                "name": stage, "eligible": eligible, "val_rmse": val["val_rmse"], "test_rmse": scores["test_rmse"],
                "model_path": str(out_dir / "model"), "model_uri": uris.get("model"), "mlflow_run_id": run.info.run_id}
        storage.write_manifest(tmp, stage, {}, **candidates, params=fitted.params, mlflow_run_id=run.info.run_id,
                               **fitted.manifest)
    section = {**{k: val[k] for k in ("val_rmse", "val_mae") if k in val}, **scores, "params": fitted.params,
               "fit_s": round(fit_s, 3), "mlflow_run_id": run.info.run_id, "model_path": str(out_dir / "model"),
               **fitted.section}
    log.info("%s: %svalidation NDCG@10 %.4f, test NDCG@10 %.4f (%d users) (%.1f s)", stage,
             f"validation RMSE {val['val_rmse']:.4f}, test RMSE {scores['test_rmse']:.4f}, " if val else "",
             ranking["val_ndcg_at_10"] or 0.0, ranking["test_ndcg_at_10"] or 0.0, ranking["users"], fit_s)
    return {"models": {stage: section}, **fitted.sections}


def served_inputs(split: Split) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(every rating of the split, the movies) of the run: what a logged ranker answers known users and titles
    from (``pipeline.serving.served_ranker``). The split holds every validated rating, the recommend stage's
    input, so a known user's list is their served list."""
    ratings = pd.concat([frame[["user_id", "movie_id", "rating"]] for frame in (split.train, split.validation,
                                                                                   split.test)], ignore_index=True)
    movies = split.movies_path
    return ratings, pd.read_parquet(movies) if movies is not None and Path(movies).exists() else None


class _RankingOnly:
    """A ranking model seen by ``evaluate``: its lists only (its scores are not ratings)."""

    def __init__(self, model):
        self.model = model
        self.prefix_consistent = getattr(model, "prefix_consistent", True)

    def top_k(self, *args, **kwargs):
        return self.model.top_k(*args, **kwargs)


def compare_models(ctx) -> dict:
    """The models side by side (``models.md``): rating metrics of the rating models, ranking metrics of every
    candidate next to popularity; the best candidates by validation (test figures are reported, not used)."""
    from pipeline import report

    merged = report.merged_sections(ctx.run_dir)
    models = merged.get("models", {})
    popularity = merged.get("ranking", {}).get("popularity")
    eligible = {name for name, c in manifest_entries(ctx.run_dir, "candidate").items() if c.get("eligible")}
    rows = [{"model": name, "val_rmse": m.get("val_rmse"), "test_rmse": m["test_rmse"], "test_mae": m["test_mae"],
             "cold_test_rmse": m.get("cold_test_rmse")} for name, m in models.items() if "test_rmse" in m]
    rated = [r for r in rows if r["model"] in eligible and r["val_rmse"] is not None]
    best = min(rated, key=lambda r: r["val_rmse"])["model"] if rated else None
    keys = ("val_ndcg_at_10", "test_ndcg_at_10", "test_precision_at_10", "test_recall_at_10", "test_map_at_10",
            "users", "test_lists", *LIST_KEYS)
    candidates = {name: {k: m["ranking"].get(k) for k in keys} for name, m in models.items() if "ranking" in m}
    for name, c in candidates.items():  # a learnt ranker names what it ranks by
        c.update({k: models[name][k] for k in ("features", "feature_importance") if k in models[name]})
    rankable = {n: c for n, c in candidates.items() if c["val_ndcg_at_10"] is not None}
    best_ranker = max(rankable, key=lambda n: rankable[n]["val_ndcg_at_10"]) if rankable else None
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["## Rating error (all test rows; cold rows from the bias baseline)", "",
             "| model | validation RMSE | test RMSE | test MAE | cold-row RMSE |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']}{' (best by validation)' if r['model'] == best else ''} | "
                     + " | ".join(fmt(r[k]) for k in ("val_rmse", "test_rmse", "test_mae", "cold_test_rmse")) + " |")
    if "weights" in models.get("blend", {}):
        lines += [""] + blend_lines(models["blend"])
    lines += ["", "## Top-10 lists (test lists leave out train and validation movies; relevant: rating >= 4)", "",
              "| model | validation NDCG@10 | NDCG@10 | P@10 | R@10 | MAP@10 | users |",
              "|---|---|---|---|---|---|---|"]
    listed = ([("popularity", popularity)] if popularity else []) + list(candidates.items())
    for name, c in listed:
        label = f"{name}{' (best by validation)' if name == best_ranker else ''}"
        lines.append(f"| {label} | " + " | ".join(fmt(c.get(k)) for k in keys[:5]) + f" | {c.get('users')} |")
    lines += [""] + list_quality_lines(listed)
    table = Path(ctx.run_dir) / "models.md"
    storage.write_text_atomic(table, "# Models of this run\n\n" + "\n".join(lines) + "\n")
    return {"model_comparison": {"best_by_validation_rmse": best, "rows": rows, "table": str(table)},
            "ranking": {"candidates": candidates, "best_by_validation_ndcg": best_ranker}}


def blend_lines(blend: dict) -> list[str]:
    """models.md's blend section: its weights, and each member's share of its gain over the baseline."""
    gain = blend.get("gain", {})
    lines = [f"## Blend (weights fitted on {blend['fitted_on_rows']} validation rows, ridge {blend['ridge']:g} "
             f"chosen by {blend['folds']}-fold; validation RMSE out of fold)", "",
             "| feature | weight |", "|---|---|", f"| intercept | {blend['intercept']:.4f} |"]
    lines += [f"| {name} | {w:.4f} |" for name, w in blend["weights"].items()]
    if gain:
        lines += ["", f"Out-of-fold validation RMSE (warm rows): baseline {gain['reference_rmse']:.4f}, blend "
                  f"{gain['blend_rmse']:.4f} (at its ridge), gain {gain['gain']:.4f}. Each member's share of the gain "
                  "(Shapley value over the blends of the baseline with every subset of members):", "",
                  "| member | share (RMSE) | share of the gain |", "|---|---|---|"]
        total = gain["gain"] or 1.0
        shares = {**blend["shares"], "baseline recalibration": gain["recalibration"]}
        lines += [f"| {name} | {v:.4f} | {100 * v / total:.1f} % |" for name, v in shares.items()]
    return lines


def manifest_entries(run_dir: Path, key: str) -> dict:
    """{name: entry} of the ``key`` entries (e.g. "candidate") of every completed stage's manifest."""
    found = {}
    for manifest in sorted(Path(run_dir).glob(f"*/{storage.MANIFEST}")):
        entry = storage.read_json(manifest).get(key)
        if entry:
            found[entry["name"]] = entry
    return found
