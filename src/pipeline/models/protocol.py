"""Stages ``baseline`` and ``als`` (and the shared helpers every model stage uses): read the persisted split,
fit, score with the one evaluation protocol, save the model in the run folder and log it to MLflow.

Every model is scored by ``evaluate``: RMSE/MAE on all test rows (cold rows from the bias baseline), the
cold rows' count and RMSE, and precision/recall/NDCG@10 of its top-10 (training movies excluded; users the
model cannot score get the popularity list) against test ratings >= 4.0.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.baseline import GlobalMean, fit_best_damping, popularity_ranking, top_k_popular
from pipeline.evaluation import ranking_metrics, rating_metrics
from pipeline.factor_model import FactorModel

log = logging.getLogger(__name__)

RANKING_K = 10
SPLITS = ("train", "validation", "test")


def load_split(etl_dir: Path, needed_by: str) -> tuple[dict, dict]:
    """(frames, split summary): train/validation/test as pandas, read from the ETL stage's parquet."""
    manifest = storage.read_manifest(etl_dir, needed_by)
    frames = {name: pd.read_parquet(manifest["tables"][name]["path"]) for name in SPLITS}
    return frames, manifest["split"]


def reference_baseline(frames: dict):
    """The damped bias baseline every model falls back on, its damping chosen on validation RMSE."""
    return fit_best_damping(frames["train"], frames["validation"])


def seen_movies(train: pd.DataFrame) -> dict:
    return train.groupby("user_id")["movie_id"].agg(set).to_dict()


def evaluate(predict, top_k, frames: dict, fallback) -> dict:
    """The one evaluation: rating metrics on every test row and ranking metrics of the top-10."""
    train, test = frames["train"], frames["test"]
    scores = rating_metrics(test, predict, fallback, train)
    users = pd.unique(test["user_id"])
    seen = seen_movies(train)
    top = top_k(users, RANKING_K, seen)
    missing = [u for u in users if u not in top]
    if missing:  # users the model cannot score are served the popularity list, not dropped
        top.update(top_k_popular(train, missing, RANKING_K))
    ranking = ranking_metrics(top, test, k=RANKING_K)
    scores["ranking"] = {k: v for k, v in ranking.items() if k != "users"}
    scores["ranking_users"] = ranking["users"]
    return scores


def evaluate_factor_model(model: FactorModel, frames: dict, fallback) -> dict:
    return evaluate(model.predict, lambda users, k, seen: model.top_k(users, k, seen), frames, fallback)


def _metrics_for_mlflow(scores: dict, prefix: str = "") -> dict:
    flat = {f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and v is not None}
    flat.update({f"{prefix}{k}": v for k, v in scores.get("ranking", {}).items() if v is not None})
    return flat


def _candidate(name: str, val_rmse: float, scores: dict, out_dir: Path, model_uri: str | None, run_id: str) -> dict:
    """What the gate needs of a model stage, kept in its manifest."""
    return {"name": name, "val_rmse": val_rmse, "test_rmse": scores["test_rmse"], "model_path": str(Path(out_dir) / "model"),
            "model_uri": model_uri, "mlflow_run_id": run_id}


def _log_candidate(tmp: Path, out_dir: Path, stage: str, model: FactorModel, artifacts: list, val_rmse: float,
                   scores: dict, run_id: str, **extra) -> None:
    """Inside the stage's MLflow run: artifacts, item factors and the pyfunc model; then the stage manifest
    naming the model as a candidate for the gate."""
    import mlflow

    from pipeline import tracking

    for path in artifacts:
        mlflow.log_artifact(str(path))
    tracking.log_item_factors(model)
    info = tracking.log_factor_model(model)
    storage.write_manifest(tmp, stage, {}, mlflow_run_id=run_id,
                           candidate=_candidate(stage, val_rmse, scores, out_dir, info.model_uri, run_id), **extra)


# --- stage: baseline ----------------------------------------------------------------------------------------


def run_baseline(etl_dir: Path, out_dir: Path, ctx) -> dict:
    """Global mean, damped user+item biases and popularity ranking on this run's split."""
    import mlflow

    from pipeline import tracking

    frames, split = load_split(etl_dir, "baseline")
    started = time.perf_counter()
    baseline, damping_grid = reference_baseline(frames)
    fit_s = time.perf_counter() - started
    train = frames["train"]
    users, movies = baseline.user_bias_.index.to_numpy(), baseline.item_bias_.index.to_numpy()
    # the baseline as a rank-0 factor model: same interface (and registry wrapper) as ALS and AutoRec
    bias_model = FactorModel("baseline", user_ids=users, movie_ids=movies, user_factors=np.zeros((len(users), 0)),
                             item_factors=np.zeros((len(movies), 0)), baseline=baseline, fallback=baseline,
                             meta={"params": {"damping_user": baseline.damping_user,
                                              "damping_item": baseline.damping_item}})
    scores = evaluate_factor_model(bias_model, frames, baseline)
    global_mean = GlobalMean().fit(train)
    gm_scores = rating_metrics(frames["test"], global_mean.predict, baseline, train)
    test = frames["test"]
    popularity = ranking_metrics(top_k_popular(train, pd.unique(test["user_id"]), RANKING_K), test, k=RANKING_K)
    popularity.pop("users")
    chosen = {"damping_user": baseline.damping_user, "damping_item": baseline.damping_item}
    val = min(damping_grid, key=lambda r: r["validation_rmse"])["validation_rmse"]
    tracking.configure(ctx.settings)
    with mlflow.start_run(run_name="baseline", tags=tracking.run_tags(ctx, split)) as run:
        mlflow.log_params({**chosen, "model": "damped user+item bias"})
        mlflow.log_metrics({"val_rmse": val, **_metrics_for_mlflow(scores),
                            "global_mean_test_rmse": gm_scores["test_rmse"]})
        mlflow.log_dict({"damping_grid": damping_grid}, "damping_grid.json")
    out_dir = Path(out_dir)
    with storage.atomic_dir(out_dir) as tmp:
        bias_model.save(tmp / "model")
        storage.write_manifest(tmp, "baseline", {}, damping_grid=damping_grid, params=chosen,
                               candidate=_candidate("baseline", val, scores, out_dir, None, run.info.run_id))
    section = {
        **scores, "val_rmse": val, "params": chosen, "fit_s": round(fit_s, 3), "mlflow_run_id": run.info.run_id,
        "model_path": str(out_dir / "model"),
        "global_mean": {"test_rmse": gm_scores["test_rmse"], "test_mae": gm_scores["test_mae"]},
    }
    section.pop("ranking_users", None)
    return {"models": {"baseline": section}, "ranking": {"popularity": popularity}}


# --- stage: als -----------------------------------------------------------------------------------------------


def _heatmap(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(results)
    table = frame.groupby(["rank", "reg_param"])["val_rmse"].min().unstack("reg_param")
    fig, ax = plt.subplots(figsize=(1.3 * len(table.columns) + 2, 0.6 * len(table.index) + 2))
    image = ax.imshow(table.to_numpy(), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(table.columns)), [f"{c:g}" for c in table.columns])
    ax.set_yticks(range(len(table.index)), [str(r) for r in table.index])
    ax.set(xlabel="regParam", ylabel="rank", title="ALS validation RMSE (best over maxIter)")
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{value:.4f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_als(spark, etl_dir: Path, out_dir: Path, ctx) -> dict:
    """Grid-search ALS on validation RMSE; score the chosen point on test; log the grid to MLflow."""
    import mlflow

    from pipeline import tracking
    from pipeline.als import grid_points, search_grid

    frames, split = load_split(etl_dir, "als")
    baseline, _ = reference_baseline(frames)
    p = ctx.params
    points = grid_points(p["als_ranks"], p["als_reg_params"], p["als_max_iters"])
    started = time.perf_counter()
    results, model = search_grid(spark, frames["train"], frames["validation"], baseline, points, seed=p["seed"],
                                 workers=p["als_parallel_fits"])
    grid_s = time.perf_counter() - started
    best = model.meta["params"]
    val = next(r for r in results if all(r[k] == best[k] for k in best))
    scores = evaluate_factor_model(model, frames, baseline)
    out_dir = Path(out_dir)
    tracking.configure(ctx.settings)
    with storage.atomic_dir(out_dir) as tmp:
        model.save(tmp / "model")
        heatmap = _heatmap(results, tmp / "als_val_rmse_heatmap.png")
        (tmp / "grid.json").write_text(json.dumps(results, indent=2))
        with mlflow.start_run(run_name="als-grid", tags=tracking.run_tags(ctx, split)) as parent:
            client = mlflow.MlflowClient()
            for result in results:  # one nested child run per grid point
                child = client.create_run(parent.info.experiment_id, run_name=(
                    f"als rank={result['rank']} reg={result['reg_param']:g} iters={result['max_iter']}"),
                    tags={"mlflow.parentRunId": parent.info.run_id, **tracking.run_tags(ctx, split)})
                from mlflow.entities import Metric, Param

                now = int(time.time() * 1000)
                client.log_batch(child.info.run_id, params=[
                    Param(k, str(result[k])) for k in ("rank", "reg_param", "max_iter")],
                    metrics=[Metric(k, float(result[k]), now, 0) for k in ("val_rmse", "val_mae", "fit_s")])
                client.set_terminated(child.info.run_id)
            mlflow.log_params({f"best_{k}": v for k, v in best.items()})
            mlflow.log_params({"grid_points": len(points), "model": "ALS on bias-baseline residuals",
                               "baseline_damping_user": baseline.damping_user,
                               "baseline_damping_item": baseline.damping_item})
            mlflow.log_metrics({"val_rmse": val["val_rmse"], "grid_seconds": grid_s, **_metrics_for_mlflow(scores)})
            _log_candidate(tmp, out_dir, "als", model, [heatmap, tmp / "grid.json"], val["val_rmse"], scores,
                           parent.info.run_id, best_params=best)
    section = {
        "grid": points, "grid_val_rmse": [r["val_rmse"] for r in results], "best_params": best,
        "val_rmse": val["val_rmse"], **scores, "mlflow_run_id": parent.info.run_id,
        "grid_seconds": round(grid_s, 2), "model_path": str(out_dir / "model"),
    }
    section.pop("ranking_users", None)
    return {"models": {"als": section}}


# --- stage: autorec ---------------------------------------------------------------------------------------


def _curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(frame["epoch"], frame["train_rmse"], label="training-set RMSE (observed ratings; not for decisions)")
    ax.plot(frame["epoch"], frame["val_rmse"], label="validation RMSE")
    best = frame.loc[frame["val_rmse"].idxmin()]
    ax.axvline(best["epoch"], color="grey", ls="--", lw=1)
    ax.set(xlabel="epoch", ylabel="RMSE", title=f"AutoRec (best epoch {int(best['epoch'])})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_autorec(etl_dir: Path, out_dir: Path, ctx) -> dict:
    """Train item-based AutoRec, early-stopped on validation RMSE; score on test; log curves and model."""
    p = ctx.params
    if not p["autorec_enabled"]:
        log.info("autorec: skipped (autorec_enabled is false)")
        return {}
    import mlflow

    from pipeline import tracking
    from pipeline.autorec import configure_threads, train_autorec

    configure_threads()
    frames, split = load_split(etl_dir, "autorec")
    baseline, _ = reference_baseline(frames)
    hyper = {k: p[f"autorec_{k}"] for k in ("hidden_units", "l2", "dropout", "learning_rate", "epochs",
                                            "batch_size", "patience", "normalization")}
    tracking.configure(ctx.settings)
    out_dir = Path(out_dir)
    with storage.atomic_dir(out_dir) as tmp, \
            mlflow.start_run(run_name="autorec", tags=tracking.run_tags(ctx, split)) as run:
        mlflow.log_params({**hyper, "seed": p["seed"], "model": "I-AutoRec (item-based)"})
        started = time.perf_counter()
        model, history = train_autorec(
            frames["train"], frames["validation"], seed=p["seed"], baseline=baseline,
            on_epoch=lambda row: mlflow.log_metrics(
                {"train_rmse": row["train_rmse"], "val_rmse": row["val_rmse"]}, step=int(row["epoch"])),
            **hyper)
        train_s = time.perf_counter() - started
        model.fallback = baseline
        val = rating_metrics(frames["validation"], model.predict, baseline, frames["train"])
        scores = evaluate_factor_model(model, frames, baseline)
        model.save(tmp / "model")
        curves = _curves(history, tmp / "autorec_curves.png")
        pd.DataFrame(history).to_csv(tmp / "history.csv", index=False)
        best_epoch = int(min(history, key=lambda r: r["val_rmse"])["epoch"])
        mlflow.log_metrics({"best_epoch": best_epoch, "val_rmse_all_rows": val["test_rmse"],
                            "train_seconds": train_s, **_metrics_for_mlflow(scores)})
        _log_candidate(tmp, out_dir, "autorec", model, [curves, tmp / "history.csv"], val["test_rmse"], scores,
                       run.info.run_id, params=hyper)
    section = {"params": hyper, "best_epoch": best_epoch, "epochs_run": len(history), "val_rmse": val["test_rmse"],
               **scores, "mlflow_run_id": run.info.run_id, "train_seconds": round(train_s, 2),
               "model_path": str(out_dir / "model")}
    section.pop("ranking_users", None)
    return {"models": {"autorec": section}}


# --- summary of the model half --------------------------------------------------------------------------------

CANDIDATES = ("als", "autorec")  # the challenger is chosen among these; the baseline is the bar to beat


def compare_models(models: dict, run_dir: Path) -> dict:
    """The models side by side; the best candidate by validation RMSE (test figures are reported, not used)."""
    rows = []
    for name, m in models.items():
        if "test_rmse" not in m:
            continue
        rows.append({"model": name, "val_rmse": m.get("val_rmse"), "test_rmse": m["test_rmse"],
                     "test_mae": m["test_mae"], "cold_test_rmse": m.get("cold_test_rmse"),
                     **{k: m.get("ranking", {}).get(k) for k in ("precision_at_10", "recall_at_10", "ndcg_at_10")}})
    candidates = [r for r in rows if r["model"] in CANDIDATES and r["val_rmse"] is not None]
    best = min(candidates, key=lambda r: r["val_rmse"])["model"] if candidates else None
    lines = ["| model | validation RMSE | test RMSE | test MAE | cold-row RMSE | P@10 | R@10 | NDCG@10 |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']}{' (best by validation)' if r['model'] == best else ''} | "
                     + " | ".join(fmt(r[k]) for k in ("val_rmse", "test_rmse", "test_mae", "cold_test_rmse",
                                                       "precision_at_10", "recall_at_10", "ndcg_at_10")) + " |")
    storage.write_text_atomic(Path(run_dir) / "models.md", "# Models of this run\n\n" + "\n".join(lines) + "\n")
    return {"model_comparison": {"best_by_validation_rmse": best, "rows": rows,
                                 "table": str(Path(run_dir) / "models.md")}}
