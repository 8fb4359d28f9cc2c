"""Stage ``gate``: compare this run's challenger with the registered champion on this run's test rows, and
promote it (MLflow Model Registry alias ``champion``) only if it is better.

- Challenger: the run's best candidate (ALS or AutoRec) by validation RMSE. It is registered as a new version
  of the registered model and gets the alias ``challenger``.
- Champion: the version holding the alias ``champion``, loaded back from the registry and scored on the same
  test rows with the same protocol (cold pairs from this run's bias baseline).
- Promote iff the challenger beats the champion's RMSE by at least ``promotion_margin`` (and strictly) and
  beats the bias baseline; with no champion yet, beating the baseline is enough.
- The switch is a compare-and-set: under an exclusive lock, the alias moves only if it still points at the
  version this run compared against. Two runs racing cannot both win: the later one finds the champion
  changed and keeps it (it never saw that version's score).
The decision (both RMSEs, margin, test fingerprint, run ids) is written as tags on the challenger version and
returned for ``report.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

from pipeline import storage
from pipeline.errors import StageError
from pipeline.evaluation import rating_metrics
from pipeline.factor_model import FactorModel

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
CANDIDATE_STAGES = ("als", "autorec")


def _candidates(run_dir: Path) -> dict:
    found = {}
    for stage in ("baseline", *CANDIDATE_STAGES):
        manifest = Path(run_dir) / stage / storage.MANIFEST
        if manifest.exists():
            found[stage] = storage.read_json(manifest)["candidate"]
    return found


@contextlib.contextmanager
def registry_lock(settings):
    """An exclusive lock around the alias compare-and-set (the data root is shared by every worker)."""
    path = Path(settings.data_root) / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def champion_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def load_registered(name: str, version: str) -> FactorModel:
    """A registered version loaded back through its pyfunc, as serving would."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model


def evaluate_challenger(ctx) -> dict:
    """Score challenger and champion on this run's test rows; register the challenger; decide."""
    import mlflow

    from pipeline import tracking
    from pipeline.models import load_split, reference_baseline

    settings, margin = ctx.settings, float(ctx.params["promotion_margin"])
    candidates = _candidates(ctx.run_dir)
    contenders = [c for name, c in candidates.items() if name in CANDIDATE_STAGES and c.get("model_uri")]
    if not contenders or "baseline" not in candidates:
        raise StageError(f"stage 'gate' needs the baseline and at least one of {CANDIDATE_STAGES} in {ctx.run_dir}")
    challenger = min(contenders, key=lambda c: c["val_rmse"])
    frames, split = load_split(ctx.stage_dir("etl"), "gate")
    baseline, _ = reference_baseline(frames)
    score = lambda model: rating_metrics(frames["test"], model.predict, baseline, frames["train"])["test_rmse"]  # noqa: E731
    challenger_rmse = score(FactorModel.load(challenger["model_path"]))
    baseline_rmse = candidates["baseline"]["test_rmse"]

    tracking.configure(settings)
    client = mlflow.MlflowClient()
    name = settings.registered_model
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="MovieLens rating predictor (FactorModel pyfunc): "
                                                          "aliases champion / challenger set by the gate")
    before = champion_version(client, name)
    champion_rmse = score(load_registered(name, before)) if before else None
    with tracking.quiet_mlflow():
        version = str(mlflow.register_model(challenger["model_uri"], name).version)  # the registry's aliases say "1"
    client.set_registered_model_alias(name, CHALLENGER, version)

    beats_baseline = challenger_rmse < baseline_rmse
    beats_champion = champion_rmse is None or (challenger_rmse < champion_rmse
                                               and champion_rmse - challenger_rmse >= margin)
    if not beats_baseline:
        reason = f"challenger test RMSE {challenger_rmse:.4f} does not beat the bias baseline {baseline_rmse:.4f}"
    elif not beats_champion:
        reason = (f"challenger test RMSE {challenger_rmse:.4f} does not beat champion v{before} "
                  f"({champion_rmse:.4f}) by the margin {margin}")
    elif before is None:
        reason = f"no champion yet; challenger beats the bias baseline ({challenger_rmse:.4f} < {baseline_rmse:.4f})"
    else:
        reason = f"challenger {challenger_rmse:.4f} beats champion v{before} {champion_rmse:.4f} by >= {margin}"
    gate = {
        "registered_model": name, "challenger": challenger["name"], "challenger_version": version,
        "challenger_run_id": challenger["mlflow_run_id"], "challenger_val_rmse": challenger["val_rmse"],
        "challenger_test_rmse": challenger_rmse, "baseline_test_rmse": baseline_rmse,
        "champion_version_before": before, "champion_test_rmse_before": champion_rmse, "margin": margin,
        "test_fingerprint": split["test_fingerprint"], "run_id": ctx.run_id,
        "decision": "promote" if beats_baseline and beats_champion else "keep", "reason": reason,
    }
    client.set_model_version_tag(name, version, "recsys.decision", "pending")
    for key in ("challenger_test_rmse", "champion_test_rmse_before", "baseline_test_rmse", "margin",
                "test_fingerprint", "run_id", "challenger_run_id", "champion_version_before", "reason"):
        client.set_model_version_tag(name, version, f"recsys.{key}", str(gate[key]))
    log.info("gate: %s (%s)", gate["decision"], reason)
    storage.write_json_atomic(ctx.stage_dir("gate") / "gate.json", gate)
    return {"gate": gate}


def apply_decision(ctx, gate: dict) -> dict:
    """Move the ``champion`` alias to the challenger if the gate said so and nobody promoted meanwhile."""
    import mlflow

    from pipeline import tracking

    tracking.configure(ctx.settings)
    client = mlflow.MlflowClient()
    name, version = gate["registered_model"], gate["challenger_version"]
    decision, reason = "kept", gate["reason"]
    with registry_lock(ctx.settings):
        current = champion_version(client, name)
        if gate["decision"] == "promote":
            if current != gate["champion_version_before"]:  # compare-and-set failed: another run won
                reason = (f"champion moved to v{current} while this run compared against "
                          f"v{gate['champion_version_before']}; keeping it (re-run to compare against it)")
            else:
                client.set_registered_model_alias(name, CHAMPION, version)
                decision, current = "promoted", version
    client.set_model_version_tag(name, version, "recsys.decision", decision)
    client.set_model_version_tag(name, version, "recsys.decision_reason", reason)
    log.info("gate: challenger v%s %s; champion is v%s", version, decision, current)
    promotion = {
        "registered_model": name, "challenger": gate["challenger"], "challenger_version": version,
        "challenger_test_rmse": gate["challenger_test_rmse"],
        "champion_version_before": gate["champion_version_before"],
        "champion_test_rmse_before": gate["champion_test_rmse_before"],
        "baseline_test_rmse": gate["baseline_test_rmse"], "decision": decision, "champion_version": current,
        "margin": gate["margin"], "test_fingerprint": gate["test_fingerprint"], "reason": reason,
    }
    storage.write_json_atomic(ctx.stage_dir("gate") / "promotion.json", promotion)
    return {"promotion": promotion}


def run_gate(ctx) -> dict:
    """The command line's ``gate`` stage: evaluate, then apply the decision (the DAG branches in between)."""
    gate = evaluate_challenger(ctx)["gate"]
    return apply_decision(ctx, gate)


def load_champion(ctx) -> tuple[FactorModel, str] | tuple[None, None]:
    """(model, version) of the current champion, or (None, None) when nothing was ever promoted."""
    import mlflow

    from pipeline import tracking

    tracking.configure(ctx.settings)
    version = champion_version(mlflow.MlflowClient(), ctx.settings.registered_model)
    if version is None:
        return None, None
    return load_registered(ctx.settings.registered_model, version), version
