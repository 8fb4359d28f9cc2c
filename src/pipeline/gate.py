"""The promotion gates: compare this run's challenger with the registered champion on this run's test rows,
and move the ``champion`` alias (``pipeline.registry``) only if the challenger is better.

Two registered models go through the same code, with the metric and its direction as arguments (``GateSpec``):

- the **rating model** (stages ``gate`` / ``promotion``; setting ``registered_model``): the challenger is
  the best rating candidate by validation RMSE, scored by test RMSE (lower is better) against the bias
  baseline; it answers "what would this user rate this movie";
- the **ranker** (stages ``ranking_gate`` / ``ranking_promotion``; setting ``registered_ranker``): the
  challenger is the best ranking candidate by validation NDCG@10, scored by test NDCG@10 (higher is better)
  against popularity; its champion serves the per-user lists.

For each: the challenger is registered as a new version with the alias ``challenger``, promoted or not (the
registry is the audit trail of the gate); the version is tagged with the run id, so a retried gate (Airflow
retries the task) reuses the version its run registered from the same model instead of adding one. The
champion is loaded back from the registry and scored on the same test rows by the same protocol. ``decide``:
promote iff the challenger beats the baseline and beats the champion by at least the margin (strictly); with
no champion, beating the baseline is enough. A champion that cannot be loaded or scored (deleted artifacts, an
incompatible version) is recorded, not fatal: the challenger is judged against the baseline alone, so the
registry heals itself, and the reason names the broken version. The alias moves by compare-and-set
(``registry.move_champion``). The DAG branches between ``promote`` and ``keep_champion`` for the rating model;
the command line (and the ranker's task) applies whichever the gate decided. Decisions are tags on the
version, files under ``gate/`` and report sections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import registry, storage, tracking
from pipeline.errors import StageError
from pipeline.models import protocol
from pipeline.models.metrics import rating_metrics
from pipeline.models.ranking import evaluate_ranking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateSpec:
    kind: str  # "rating" | "ranking"
    gate_section: str  # report section / file stem of the decision
    promotion_section: str  # report section / file stem of the applied decision
    metric: str  # "rmse" | "ndcg_at_10": test_<metric> is the score
    lower_is_better: bool
    candidate_key: str  # the manifest key of a model stage naming it a candidate of this gate
    selection: str  # the candidate's validation figure the challenger is chosen by
    baseline: str  # what the challenger must beat
    margin_param: str
    registered_model: Callable  # settings -> registered model name
    description: str


RATING = GateSpec("rating", "gate", "promotion", "rmse", True, "candidate", "val_rmse", "baseline",
                  "promotion_margin", lambda s: s.registered_model,
                  "MovieLens rating predictor (FactorModel pyfunc): aliases champion / challenger set by the gate")
RANKING = GateSpec("ranking", "ranking_gate", "ranking_promotion", "ndcg_at_10", False, "ranking_candidate",
                   "val_ndcg_at_10", "popularity", "ranking_promotion_margin", lambda s: s.registered_ranker,
                   "MovieLens top-N ranker (pyfunc): aliases champion / challenger set by the ranking gate")


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


def _scorer(spec: GateSpec, ctx, split):
    if spec.kind == "rating":
        fallback = protocol.load_baseline(ctx, spec.gate_section)
        return lambda model: rating_metrics(split.test, model.predict, fallback, split.train)["test_rmse"]
    return lambda model: evaluate_ranking(model, split, splits=("test",))["test_ndcg_at_10"]


def _baseline_score(spec: GateSpec, ctx, candidates: dict) -> float:
    if spec.kind == "rating":
        if "baseline" not in candidates:
            raise StageError(f"stage {spec.gate_section!r} needs the baseline stage's output in {ctx.run_dir}")
        return candidates["baseline"]["test_rmse"]
    popularity = storage.read_manifest(ctx.stage_dir("baseline"), spec.gate_section).get("popularity")
    if not popularity:
        raise StageError(f"stage {spec.gate_section!r} needs the popularity ranking of the baseline stage")
    return popularity["test_ndcg_at_10"]


def evaluate_challenger(ctx, spec: GateSpec = RATING) -> dict:
    """Stage ``gate`` (or ``ranking_gate``): score challenger and champion on this run's test rows, register the
    challenger, decide."""
    settings, margin = ctx.settings, float(getattr(ctx.params, spec.margin_param))
    candidates = protocol.manifest_entries(ctx.run_dir, spec.candidate_key)
    contenders = [c for c in candidates.values()
                  if c.get("eligible", True) and c.get("model_uri") and c.get(spec.selection) is not None]
    if not contenders:
        raise StageError(f"stage {spec.gate_section!r} needs at least one {spec.kind} candidate model in "
                         f"{ctx.run_dir} (found: {sorted(candidates) or 'none'})")
    pick = min if spec.lower_is_better else max
    challenger = pick(contenders, key=lambda c: c[spec.selection])
    split = protocol.load_split(ctx, spec.gate_section)
    score = _scorer(spec, ctx, split)
    challenger_score = score(protocol.load_model(challenger["model_path"]))
    baseline_score = _baseline_score(spec, ctx, candidates)
    name = spec.registered_model(settings)
    before = registry.champion_version(tracking.client(settings), name)
    champion_score, champion_error = None, None
    if before is not None:
        try:
            champion_score = score(registry.load_registered(name, before))
        except Exception as exc:  # an unloadable champion must not block every later run
            champion_error = f"champion v{before} cannot be loaded or scored ({type(exc).__name__}: {exc})"
            log.warning("%s: %s; judging the challenger against the baseline alone", spec.gate_section,
                        champion_error)
    version = registry.register_challenger(settings, name, challenger["model_uri"], spec.description,
                                          run_id=ctx.run_id)
    promote, reason = decide(challenger_score, champion_score, baseline_score, margin, spec.lower_is_better)
    if champion_error:
        reason = f"{champion_error}; {reason}"
    m = spec.metric
    gate = {
        "registered_model": name, "challenger": challenger["name"], "challenger_version": version,
        "challenger_run_id": challenger["mlflow_run_id"], f"challenger_{spec.selection}": challenger[spec.selection],
        f"challenger_test_{m}": challenger_score, f"{spec.baseline}_test_{m}": baseline_score,
        "champion_version_before": before, f"champion_test_{m}_before": champion_score,
        "champion_error": champion_error, "margin": margin, "test_fingerprint": split.summary["test_fingerprint"],
        "run_id": ctx.run_id, "decision": "promote" if promote else "keep", "reason": reason,
    }
    registry.tag_version(settings, name, version, {
        "recsys.decision": "pending",
        **{f"recsys.{key}": gate[key] for key in (
            f"challenger_test_{m}", f"champion_test_{m}_before", f"{spec.baseline}_test_{m}", "margin",
            "test_fingerprint", "run_id", "challenger_run_id", "champion_version_before", "reason")}})
    log.info("%s: %s (%s)", spec.gate_section, gate["decision"], reason)
    storage.write_json_atomic(ctx.stage_dir("gate") / f"{spec.gate_section}.json", gate)
    return {spec.gate_section: gate}


def _read_gate(ctx, spec: GateSpec) -> dict:
    path = Path(ctx.stage_dir("gate")) / f"{spec.gate_section}.json"
    if not path.exists():
        raise StageError(f"stage {spec.promotion_section!r} needs the gate's decision at {path}; "
                         f"run stage {spec.gate_section!r} first")
    return storage.read_json(path)


def _record(ctx, spec: GateSpec, gate: dict, decision: str, champion: str | None, reason: str) -> dict:
    name, version, m = gate["registered_model"], gate["challenger_version"], spec.metric
    registry.tag_version(ctx.settings, name, version, {"recsys.decision": decision, "recsys.decision_reason": reason})
    log.info("%s: challenger v%s %s; champion is v%s", spec.promotion_section, version, decision, champion)
    promotion = {key: gate[key] for key in (
        "registered_model", "challenger", "challenger_version", f"challenger_test_{m}", "champion_version_before",
        f"champion_test_{m}_before", f"{spec.baseline}_test_{m}", "margin", "test_fingerprint")}
    promotion.update(decision=decision, champion_version=champion, reason=reason)
    storage.write_json_atomic(ctx.stage_dir("gate") / f"{spec.promotion_section}.json", promotion)
    return {spec.promotion_section: promotion}


def promote(ctx, spec: GateSpec = RATING) -> dict:
    """The ``promote`` branch: move ``champion`` to the challenger, if nobody promoted meanwhile."""
    gate = _read_gate(ctx, spec)
    moved, current = registry.move_champion(ctx.settings, gate["registered_model"], gate["challenger_version"],
                                            gate["champion_version_before"])
    if moved:
        return _record(ctx, spec, gate, "promoted", current, gate["reason"])
    reason = (f"champion moved to v{current} while this run compared against v{gate['champion_version_before']}; "
              f"keeping it (re-run to compare against it)")
    return _record(ctx, spec, gate, "kept", current, reason)


def keep_champion(ctx, spec: GateSpec = RATING) -> dict:
    """The ``keep_champion`` branch: leave the alias, record the decision on the challenger's version."""
    gate = _read_gate(ctx, spec)
    current = registry.champion_version(tracking.client(ctx.settings), gate["registered_model"])
    return _record(ctx, spec, gate, "kept", current, gate["reason"])


def apply_decision(ctx, spec: GateSpec = RATING) -> dict:
    """Stage ``promotion`` (or ``ranking_promotion``): the branch the gate decided."""
    decided = _read_gate(ctx, spec)["decision"]
    return promote(ctx, spec) if decided == "promote" else keep_champion(ctx, spec)


def evaluate_ranker(ctx) -> dict:
    """Stage ``ranking_gate``."""
    return evaluate_challenger(ctx, RANKING)


def apply_ranker_decision(ctx) -> dict:
    """Stage ``ranking_promotion``."""
    return apply_decision(ctx, RANKING)
