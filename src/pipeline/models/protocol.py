"""The evaluation protocol every model goes through, and the one helper every model stage runs in.

- ``load_split``: the run's persisted train/validation/test rows (the ETL stage's parquet).
- ``load_baseline``: the damped bias baseline fitted by the ``baseline`` stage, the fallback for cold rows.
- ``evaluate``: RMSE/MAE on every test row (cold rows from the baseline), the cold rows' count and RMSE, and
  precision/recall/NDCG@10 of the model's top-10 (training movies excluded; users the model cannot score get
  the popularity list) against test ratings >= 4.0.
- ``run_candidate``: load split and baseline -> open the stage's MLflow run -> fit -> score on validation
  and test -> save the model, log params, metrics, artifacts and the pyfunc -> write the stage folder
  atomically with a manifest naming the model as a candidate for the gate.
- ``compare_models``: every model of the run side by side (``models.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline import storage
from pipeline.models.factor_model import FactorModel
from pipeline.models.metrics import ranking_metrics, rating_metrics
from pipeline.models.popularity import top_k_popular

log = logging.getLogger(__name__)

RANKING_K = 10
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """The run's persisted split as pandas frames, and the ETL manifest's ``split`` summary."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    summary: dict


def load_split(ctx, needed_by: str) -> Split:
    manifest = storage.read_manifest(ctx.stage_dir("etl"), needed_by)
    frames = {name: pd.read_parquet(manifest["tables"][name]["path"]) for name in SPLITS}
    return Split(**frames, summary=manifest["split"])


def load_baseline(ctx, needed_by: str):
    """The bias baseline the ``baseline`` stage fitted on this split (its damping chosen on validation)."""
    manifest = storage.read_manifest(ctx.stage_dir("baseline"), needed_by)
    return FactorModel.load(manifest["candidate"]["model_path"]).baseline


def seen_movies(train: pd.DataFrame) -> dict:
    return train.groupby("user_id")["movie_id"].agg(set).to_dict()


def evaluate(model: FactorModel, split: Split, fallback) -> dict:
    """The one evaluation: rating metrics on every test row and ranking metrics of the top-10."""
    train, test = split.train, split.test
    scores = rating_metrics(test, model.predict, fallback, train)
    users = pd.unique(test["user_id"])
    top = model.top_k(users, RANKING_K, seen_movies(train))
    missing = [u for u in users if u not in top]
    if missing:  # users the model cannot score are served the popularity list, not dropped
        top.update(top_k_popular(train, missing, RANKING_K))
    ranking = ranking_metrics(top, test, k=RANKING_K)
    scores["ranking_users"] = ranking.pop("users")
    scores["ranking"] = ranking
    return scores


def metrics_for_mlflow(scores: dict, prefix: str = "") -> dict:
    flat = {f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and v is not None}
    flat.update({f"{prefix}{k}": v for k, v in scores.get("ranking", {}).items() if v is not None})
    return flat


@dataclass
class Fitted:
    """What a model stage's ``fit`` returns to ``run_candidate``."""

    model: FactorModel
    params: dict  # logged as MLflow params and kept in the manifest and the report
    metrics: dict = field(default_factory=dict)  # extra MLflow metrics (e.g. training seconds)
    artifacts: list[Path] = field(default_factory=list)  # files fit wrote into the stage folder, logged too
    section: dict = field(default_factory=dict)  # extra fields of the model's report section
    sections: dict = field(default_factory=dict)  # extra report sections (e.g. the popularity ranking)


Fit = Callable[[Split, object, Path, object], Fitted]


def run_candidate(ctx, stage: str, fit: Fit, *, eligible: bool = True, log_model: bool = True,
                  needs_baseline: bool = True) -> dict:
    """Run one model stage through the protocol; the stage's report sections.

    ``fit(split, baseline, folder, mlflow_run)`` trains inside the stage's MLflow run (so nested runs and
    per-epoch metrics land inside it, at the time they happen) and may write files into ``folder``, the
    stage's temporary output folder. ``eligible``: the model can be the gate's challenger (not the baseline).
    ``log_model``: log the pyfunc (and item factors) so the gate can register it.
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
        fallback = baseline if baseline is not None else fitted.model.fallback
        val = rating_metrics(split.validation, fitted.model.predict, fallback, split.train, split="val")
        scores = evaluate(fitted.model, split, fallback)
        fitted.model.save(tmp / "model")
        mlflow.log_params({k: v for k, v in fitted.params.items()})
        mlflow.log_metrics({**metrics_for_mlflow(val), **metrics_for_mlflow(scores), "fit_seconds": fit_s,
                            **fitted.metrics})
        with tracking.quiet_mlflow():
            for path in fitted.artifacts:
                mlflow.log_artifact(str(path))
        model_uri = None
        if log_model:
            tracking.log_item_factors(fitted.model)
            model_uri = tracking.log_factor_model(fitted.model).model_uri
        candidate = {"name": stage, "eligible": eligible, "val_rmse": val["val_rmse"],
                     "test_rmse": scores["test_rmse"], "model_path": str(out_dir / "model"), "model_uri": model_uri,
                     "mlflow_run_id": run.info.run_id}
        storage.write_manifest(tmp, stage, {}, candidate=candidate, params=fitted.params,
                               mlflow_run_id=run.info.run_id)
    scores.pop("ranking_users", None)
    section = {"val_rmse": val["val_rmse"], "val_mae": val["val_mae"], **scores, "params": fitted.params,
               "fit_s": round(fit_s, 3), "mlflow_run_id": run.info.run_id, "model_path": str(out_dir / "model"),
               **fitted.section}
    log.info("%s: validation RMSE %.4f, test RMSE %.4f (%d rows, %d cold), NDCG@10 %.4f (%.1f s)", stage,
             val["val_rmse"], scores["test_rmse"], scores["test_rows"], scores["cold_test_rows"],
             scores["ranking"]["ndcg_at_10"] or 0.0, fit_s)
    return {"models": {stage: section}, **fitted.sections}


def read_candidates(run_dir: Path) -> dict:
    """{stage: candidate} of every model stage of the run that has completed (from their manifests)."""
    found = {}
    for manifest in sorted(Path(run_dir).glob(f"*/{storage.MANIFEST}")):
        candidate = storage.read_json(manifest).get("candidate")
        if candidate:
            found[candidate["name"]] = candidate
    return found


def compare_models(ctx) -> dict:
    """The models side by side; the best candidate by validation RMSE (test figures are reported, not used)."""
    from pipeline import report

    models = report.merged_sections(ctx.run_dir).get("models", {})
    eligible = {name for name, c in read_candidates(ctx.run_dir).items() if c.get("eligible")}
    rows = []
    for name, m in models.items():
        if "test_rmse" not in m:
            continue
        rows.append({"model": name, "val_rmse": m.get("val_rmse"), "test_rmse": m["test_rmse"],
                     "test_mae": m["test_mae"], "cold_test_rmse": m.get("cold_test_rmse"),
                     **{k: m.get("ranking", {}).get(k) for k in ("precision_at_10", "recall_at_10", "ndcg_at_10")}})
    candidates = [r for r in rows if r["model"] in eligible and r["val_rmse"] is not None]
    best = min(candidates, key=lambda r: r["val_rmse"])["model"] if candidates else None
    lines = ["| model | validation RMSE | test RMSE | test MAE | cold-row RMSE | P@10 | R@10 | NDCG@10 |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']}{' (best by validation)' if r['model'] == best else ''} | "
                     + " | ".join(fmt(r[k]) for k in ("val_rmse", "test_rmse", "test_mae", "cold_test_rmse",
                                                       "precision_at_10", "recall_at_10", "ndcg_at_10")) + " |")
    table = Path(ctx.run_dir) / "models.md"
    storage.write_text_atomic(table, "# Models of this run\n\n" + "\n".join(lines) + "\n")
    return {"model_comparison": {"best_by_validation_rmse": best, "rows": rows, "table": str(table)}}
