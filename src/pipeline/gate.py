"""Stages ``gate`` and ``promotion``: compare this run's challenger with the registered champion on this run's
test rows, and move the ``champion`` alias (``pipeline.registry``) only if the challenger is better.

- Challenger: the run's best candidate by validation RMSE among the model stages whose manifest names them
  eligible (every rating model but the bias baseline). It is registered as a new version of the registered
  model with the alias ``challenger``, promoted or not: the registry is the audit trail of the gate.
- Champion: the version holding the alias ``champion``, loaded back from the registry and scored on the same
  test rows with the same protocol (cold pairs from this run's bias baseline).
- Rule (``decide``): promote iff the challenger beats the bias baseline and beats the champion by at least
  ``promotion_margin`` (strictly); with no champion, beating the baseline is enough. A champion that cannot be
  loaded or scored (deleted artifacts, an incompatible version) is recorded, not fatal: the challenger is
  judged against the baseline alone, so the registry heals itself, and the reason names the broken version.
- ``promotion`` moves the alias by compare-and-set (``registry.move_champion``); the DAG branches between
  ``promote`` and ``keep_champion``, the command line runs whichever the gate decided.
The decision (scores, margin, test fingerprint, run ids) is written as tags on the challenger version, into
``gate/gate.json`` and ``gate/promotion.json``, and returned for ``report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import registry, storage, tracking
from pipeline.errors import StageError
from pipeline.models import protocol
from pipeline.models.factor_model import FactorModel
from pipeline.models.metrics import rating_metrics

log = logging.getLogger(__name__)

GATE_FILE, PROMOTION_FILE = "gate.json", "promotion.json"


def decide(challenger: float, champion: float | None, baseline: float, margin: float,
           lower_is_better: bool = True) -> tuple[bool, str]:
    """(promote, why) for the challenger's and champion's test scores; ``champion`` None: no usable champion."""
    better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
    gain = (lambda a, b: b - a) if lower_is_better else (lambda a, b: a - b)
    if not better(challenger, baseline):
        return False, f"challenger {challenger:.4f} does not beat the baseline {baseline:.4f}"
    if champion is None:
        return True, f"challenger beats the baseline ({challenger:.4f} vs {baseline:.4f}) and there is no champion"
    if better(challenger, champion) and gain(challenger, champion) >= margin:
        return True, f"challenger {challenger:.4f} beats the champion {champion:.4f} by >= {margin}"
    return False, f"challenger {challenger:.4f} does not beat the champion {champion:.4f} by the margin {margin}"


def evaluate_challenger(ctx) -> dict:
    """Stage ``gate``: score challenger and champion on this run's test rows, register the challenger, decide."""
    settings, margin = ctx.settings, float(ctx.params.promotion_margin)
    candidates = protocol.read_candidates(ctx.run_dir)
    contenders = [c for c in candidates.values() if c.get("eligible") and c.get("model_uri")]
    if not contenders or "baseline" not in candidates:
        raise StageError(f"stage 'gate' needs the baseline and at least one candidate model in {ctx.run_dir} "
                         f"(found: {sorted(candidates) or 'none'})")
    challenger = min(contenders, key=lambda c: c["val_rmse"])
    split = protocol.load_split(ctx, "gate")
    fallback = protocol.load_baseline(ctx, "gate")

    def score(model: FactorModel) -> float:
        return rating_metrics(split.test, model.predict, fallback, split.train)["test_rmse"]

    challenger_rmse = score(FactorModel.load(challenger["model_path"]))
    baseline_rmse = candidates["baseline"]["test_rmse"]
    name = settings.registered_model
    before = registry.champion_version(tracking.client(settings), name)
    champion_rmse, champion_error = None, None
    if before is not None:
        try:
            champion_rmse = score(registry.load_registered(name, before))
        except Exception as exc:  # an unloadable champion must not block every later run
            champion_error = f"champion v{before} cannot be loaded or scored ({type(exc).__name__}: {exc})"
            log.warning("gate: %s; judging the challenger against the baseline alone", champion_error)
    version = registry.register_challenger(
        settings, name, challenger["model_uri"],
        "MovieLens rating predictor (FactorModel pyfunc): aliases champion / challenger set by the gate")
    promote, reason = decide(challenger_rmse, champion_rmse, baseline_rmse, margin)
    if champion_error:
        reason = f"{champion_error}; {reason}"
    gate = {
        "registered_model": name, "challenger": challenger["name"], "challenger_version": version,
        "challenger_run_id": challenger["mlflow_run_id"], "challenger_val_rmse": challenger["val_rmse"],
        "challenger_test_rmse": challenger_rmse, "baseline_test_rmse": baseline_rmse,
        "champion_version_before": before, "champion_test_rmse_before": champion_rmse,
        "champion_error": champion_error, "margin": margin, "test_fingerprint": split.summary["test_fingerprint"],
        "run_id": ctx.run_id, "decision": "promote" if promote else "keep", "reason": reason,
    }
    registry.tag_version(settings, name, version, {
        "recsys.decision": "pending",
        **{f"recsys.{key}": gate[key] for key in (
            "challenger_test_rmse", "champion_test_rmse_before", "baseline_test_rmse", "margin", "test_fingerprint",
            "run_id", "challenger_run_id", "champion_version_before", "reason")}})
    log.info("gate: %s (%s)", gate["decision"], reason)
    storage.write_json_atomic(ctx.stage_dir("gate") / GATE_FILE, gate)
    return {"gate": gate}


def _read_gate(ctx) -> dict:
    path = Path(ctx.stage_dir("gate")) / GATE_FILE
    if not path.exists():
        raise StageError(f"stage 'promotion' needs the gate's decision at {path}; run stage 'gate' first")
    return storage.read_json(path)


def _record(ctx, gate: dict, decision: str, champion: str | None, reason: str) -> dict:
    name, version = gate["registered_model"], gate["challenger_version"]
    registry.tag_version(ctx.settings, name, version, {"recsys.decision": decision, "recsys.decision_reason": reason})
    log.info("gate: challenger v%s %s; champion is v%s", version, decision, champion)
    promotion = {key: gate[key] for key in (
        "registered_model", "challenger", "challenger_version", "challenger_test_rmse", "champion_version_before",
        "champion_test_rmse_before", "baseline_test_rmse", "margin", "test_fingerprint")}
    promotion.update(decision=decision, champion_version=champion, reason=reason)
    storage.write_json_atomic(ctx.stage_dir("gate") / PROMOTION_FILE, promotion)
    return {"promotion": promotion}


def promote(ctx) -> dict:
    """The DAG's ``promote`` branch: move ``champion`` to the challenger, if nobody promoted meanwhile."""
    gate = _read_gate(ctx)
    moved, current = registry.move_champion(ctx.settings, gate["registered_model"], gate["challenger_version"],
                                            gate["champion_version_before"])
    if moved:
        return _record(ctx, gate, "promoted", current, gate["reason"])
    reason = (f"champion moved to v{current} while this run compared against v{gate['champion_version_before']}; "
              f"keeping it (re-run to compare against it)")
    return _record(ctx, gate, "kept", current, reason)


def keep_champion(ctx) -> dict:
    """The DAG's ``keep_champion`` branch: leave the alias, record the decision on the challenger's version."""
    gate = _read_gate(ctx)
    current = registry.champion_version(tracking.client(ctx.settings), gate["registered_model"])
    return _record(ctx, gate, "kept", current, gate["reason"])


def apply_decision(ctx) -> dict:
    """Stage ``promotion`` as the command line runs it: the branch the gate decided."""
    return promote(ctx) if _read_gate(ctx)["decision"] == "promote" else keep_champion(ctx)
