"""The stages as the DAG and the command line call them: one function per stage taking a ``RunContext``.

Each returns the sections it adds to ``report.json`` (small, JSON-able: what XCom carries). Stages find
their inputs by the run-folder convention ``<run_dir>/<stage>/`` and check the upstream manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.params import resolve_params
from pipeline.settings import Settings, load_settings

log = logging.getLogger(__name__)

REPORT = "report.json"


@dataclass
class RunContext:
    settings: Settings
    run_id: str
    run_dir: Path
    params: dict = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return storage.stage_dir(self.run_dir, stage)

    @property
    def source(self) -> str:
        return self.params.get("source") or self.settings.source


def make_context(run_id: str | None = None, work_dir: Path | str | None = None, params: dict | None = None,
                 settings: Settings | None = None) -> RunContext:
    """A run's context: the run folder is ``work_dir`` or ``<data_root>/runs/<run_id>``."""
    settings = settings or load_settings()
    run_id = run_id or storage.new_run_id()
    run_dir = Path(work_dir).resolve() if work_dir else settings.runs_dir / storage.safe_run_id(run_id)
    return RunContext(settings=settings, run_id=run_id, run_dir=run_dir, params=resolve_params(params))


def ingest(ctx: RunContext) -> dict:
    from pipeline.ingest import ingest_movielens

    return ingest_movielens(ctx.source, ctx.stage_dir("ingest"), ctx.settings)


def validate(ctx: RunContext) -> dict:
    from pipeline.validate import validate_tables

    return validate_tables(ctx.stage_dir("ingest"), ctx.stage_dir("validate"), ctx.params["quarantine_threshold"])


def etl(ctx: RunContext) -> dict:
    from pipeline.etl import split_ratings
    from pipeline.spark import get_spark

    p = ctx.params
    return split_ratings(get_spark(ctx.settings), ctx.stage_dir("validate"), ctx.stage_dir("etl"),
                         strategy=p["split_strategy"], seed=p["seed"],
                         validation_fraction=p["validation_fraction"], test_fraction=p["test_fraction"])


def olap(ctx: RunContext) -> dict:
    from pipeline.olap import summarize_ratings
    from pipeline.spark import get_spark

    return summarize_ratings(get_spark(ctx.settings), ctx.stage_dir("validate"), ctx.stage_dir("olap"),
                             min_ratings=ctx.params["olap_min_ratings"])


def baseline(ctx: RunContext) -> dict:
    from pipeline.models import run_baseline

    return run_baseline(ctx.stage_dir("etl"), ctx.stage_dir("baseline"), ctx)


def als(ctx: RunContext) -> dict:
    from pipeline.models import run_als
    from pipeline.spark import get_spark

    return run_als(get_spark(ctx.settings), ctx.stage_dir("etl"), ctx.stage_dir("als"), ctx)


def autorec(ctx: RunContext) -> dict:
    from pipeline.models import run_autorec

    return run_autorec(ctx.stage_dir("etl"), ctx.stage_dir("autorec"), ctx)


def gate(ctx: RunContext) -> dict:
    from pipeline.gate import run_gate

    return run_gate(ctx)


LSH_TARGET_RECALL = 0.95


def similarity(ctx: RunContext) -> dict:
    """Similar-movie tables (Euclidean, cosine, LSH) from the champion's item embeddings."""
    import mlflow

    from pipeline import tracking
    from pipeline.gate import load_champion
    from pipeline.similarity import similar_items
    from pipeline.spark import get_spark

    model, version = load_champion(ctx)
    if model is None:
        log.warning("similarity: no champion in the registry yet (nothing was promoted): nothing to serve")
        return {}
    movie_ids, vectors = model.item_embeddings()
    # Adjusted cosine: a direction every item shares (AutoRec's sigmoid codes sit within a few degrees of
    # their mean) says nothing about which movies are alike, so the embeddings are centred first. Euclidean
    # distances are unchanged; the exported embeddings are the centred ones the tables were computed from.
    vectors = vectors - vectors.mean(axis=0, keepdims=True)
    spark, k = get_spark(ctx.settings), ctx.params["similar_k"]
    # the parameters are chosen on a sample, then confirmed (or escalated) on every item inside similar_items
    out = similar_items(spark, (movie_ids, vectors), k, ctx.stage_dir("similarity"),
                        target_recall=LSH_TARGET_RECALL)
    section = out["similarity"]
    section.update(champion_version=version, registered_model=ctx.settings.registered_model)
    with mlflow.start_run(run_name="similarity", tags=tracking.run_tags(ctx)):
        mlflow.log_params({"k": section["k"], "champion_version": version, "embedding_model": model.name,
                           **{f"lsh_{k}": v for k, v in section["lsh_params"].items()}})
        mlflow.log_metrics({f"lsh_recall_at_{section['k']}": section["lsh_recall_at_k"], "items": section["items"],
                            "lsh_tries": len(section["lsh_attempts"]),
                            **{f"seconds_{name}": v for name, v in section["timings_s"].items()}})
    return out


def recommend(ctx: RunContext) -> dict:
    """Top-N per known user from the champion, popularity for cold users; publish the served set."""
    from pipeline.gate import load_champion
    from pipeline.recommend import materialize_recommendations

    model, version = load_champion(ctx)
    if model is None:
        log.warning("recommend: no champion in the registry yet (nothing was promoted): nothing to serve")
        return {}
    similar = storage.read_manifest(ctx.stage_dir("similarity"), "recommend")
    return materialize_recommendations(
        model, ctx.stage_dir("validate"), similar["tables"]["similar_movies"]["path"], ctx.stage_dir("recommend"),
        ctx.settings.serving_dir, k=ctx.params["recommend_k"], settings=ctx.settings,
        about={"registered_model": ctx.settings.registered_model, "champion_version": version, "run_id": ctx.run_id})


# In pipeline order. Later stages (baseline, als, autorec, gate, similarity, recommend) join this table
# when they exist; nothing is listed that does not really run.
STAGES = {"ingest": ingest, "validate": validate, "etl": etl, "olap": olap, "baseline": baseline, "als": als,
          "autorec": autorec, "gate": gate, "similarity": similarity, "recommend": recommend}
# Sections that several stages add to (one key per model) rather than replace.
MERGED_SECTIONS = ("models", "ranking")


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; available, in order: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always pipeline order


def run_stage(name: str, ctx: RunContext, fn=None) -> dict:
    """Run one stage (or ``fn``, a part of it); its report sections plus ``timings_s``."""
    log.info("stage %s: starting (run %s, folder %s)", name, ctx.run_id, ctx.run_dir)
    started = time.perf_counter()
    sections = (fn or STAGES[name])(ctx)
    seconds = round(time.perf_counter() - started, 2)
    log.info("stage %s: done in %.1f s", name, seconds)
    return {**sections, "timings_s": {name: seconds}}


def evaluate_gate(ctx: RunContext) -> dict:
    """The DAG's first half of ``gate``: scores and the decision, before the branch."""
    from pipeline.gate import evaluate_challenger

    return run_stage("gate", ctx, evaluate_challenger)


def apply_gate(ctx: RunContext, gate_summary: dict) -> dict:
    """The DAG's ``promote`` / ``keep_champion``: apply the gate's decision (compare-and-set on the alias)."""
    from pipeline.gate import apply_decision

    return run_stage("promotion", ctx, lambda c: apply_decision(c, gate_summary["gate"]))


def merge_report(ctx: RunContext, summaries: list[dict]) -> dict:
    """``report.json`` of the run: the existing one (if stages ran before) updated with these summaries."""
    path = ctx.run_dir / REPORT
    report = storage.read_json(path) if path.exists() else {}
    if report.get("run_id") not in (None, ctx.run_id):
        report = {}
    report["run_id"] = ctx.run_id
    report.setdefault("source", ctx.source)
    timings = report.get("timings_s", {})
    for summary in summaries:
        if not summary:
            continue
        for key, value in summary.items():
            if key == "timings_s":
                timings.update(value)
            elif key in MERGED_SECTIONS:
                report.setdefault(key, {}).update(value)
            else:
                report[key] = value
    report["timings_s"] = timings
    storage.write_json_atomic(path, report)
    return report


MODEL_STAGES = ("baseline", "als", "autorec")


def compare_models(ctx: RunContext, summaries: list[dict]) -> dict:
    """The summary after the model stages: every model of the run side by side (``models.md``)."""
    from pipeline.models import compare_models as compare

    report = merge_report(ctx, summaries)
    return compare(report.get("models", {}), ctx.run_dir)


def run_pipeline(ctx: RunContext, stages: list[str]) -> dict:
    """Run ``stages`` in order in this process, writing ``report.json`` after each one."""
    report = {}
    for name in stages:
        report = merge_report(ctx, [run_stage(name, ctx)])
    if any(name in MODEL_STAGES for name in stages):
        report = merge_report(ctx, [compare_models(ctx, [])])
    return report
