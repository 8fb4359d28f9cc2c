"""The pipeline's one definition: its stages, what each one needs, and their order.

Both drivers follow it. ``recsys run`` runs the chosen stages in one process (``run_pipeline``): in this
order, or side by side (each once the chosen stages above it are done, a Spark stage beside a Python one: their
``lane``). The DAG (``dags/movielens_recsys.py``) is explicit TaskFlow wiring whose tasks call ``run_stage`` with
these names, and a test checks that its graph and this table agree. Each stage is a plain
function of a ``RunContext`` returning the report sections it adds (small, JSON-able: what XCom carries);
``run_stage`` also leaves that summary in the run folder, from which ``report.json`` is built.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import lineage, locks, memory, report, storage, tracking
from pipeline.config import RunContext, make_context
from pipeline.errors import ChampionUnavailableError, ConfigError, RecsysError
from pipeline.services import service_error
from pipeline.warm_up import WARM_UP_WAIT_S, WarmUp

log = logging.getLogger(__name__)

__all__ = ["PIPELINE", "STAGES", "Stage", "RunContext", "make_context", "parse_stages", "run_pipeline", "run_stage"]


def _ingest(ctx):
    from pipeline.data.ingest import ingest_movielens

    return ingest_movielens(ctx.source, ctx.stage_dir("ingest"), ctx.settings)


def _validate(ctx):
    from pipeline.data.validate import validate_tables

    return validate_tables(ctx.stage_dir("ingest"), ctx.stage_dir("validate"), ctx.params.quarantine_threshold,
                           suites_dir=ctx.settings.suites_dir, run_id=ctx.run_id)


def _etl(ctx):
    from pipeline.data.etl import split_ratings
    from pipeline.spark import get_spark

    p = ctx.params
    return split_ratings(get_spark(ctx.settings), ctx.stage_dir("validate"), ctx.stage_dir("etl"),
                         strategy=p.split_strategy, seed=p.seed, validation_fraction=p.validation_fraction,
                         test_fraction=p.test_fraction)


def _olap(ctx):
    from pipeline.data.olap import summarize_ratings
    from pipeline.spark import get_spark

    return summarize_ratings(get_spark(ctx.settings), ctx.stage_dir("validate"), ctx.stage_dir("olap"),
                             min_ratings=ctx.params.olap_min_ratings)


def _baseline(ctx):
    from pipeline.models.reference import run_baseline

    return run_baseline(ctx)


def _als(ctx):
    from pipeline.models.als import run_als

    return run_als(ctx)


def _autorec(ctx):
    from pipeline.models.autorec import run_autorec

    return run_autorec(ctx)


def _knn(ctx):
    from pipeline.models.rating_stages import run_knn

    return run_knn(ctx)


def _blend(ctx):
    from pipeline.models.rating_stages import run_blend

    return run_blend(ctx)


def _implicit_als(ctx):
    from pipeline.models.implicit_als import run_implicit_als

    return run_implicit_als(ctx)


def _ease(ctx):
    from pipeline.models.ease import run_ease

    return run_ease(ctx)


def _ltr(ctx):
    from pipeline.models.ltr import run_ltr

    return run_ltr(ctx)


def _compare_models(ctx):
    from pipeline.models.protocol import compare_models

    return compare_models(ctx)


def _gate(ctx):
    from pipeline.gate import evaluate_challenger

    return evaluate_challenger(ctx)


def _promotion(ctx):
    from pipeline.gate import apply_decision

    return apply_decision(ctx)


def _ranking_gate(ctx):
    from pipeline.gate import evaluate_ranker

    return evaluate_ranker(ctx)


def _ranking_promotion(ctx):
    from pipeline.gate import apply_ranker_decision

    return apply_ranker_decision(ctx)


def _cold_start(ctx):
    from pipeline.serving.cold_start import run_cold_start

    return run_cold_start(ctx)


def _similarity(ctx):
    from pipeline.similarity.stage import run_similarity

    return run_similarity(ctx)


def _recommend(ctx):
    from pipeline.serving.recommend import run_recommend

    return run_recommend(ctx)


def _report(ctx):
    from pipeline.report_page import publish_report_page

    return publish_report_page(ctx, ORDER)  # report.html; run_stage writes report.json after every stage


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], dict]
    upstream: tuple[str, ...]  # the stages whose output it reads
    doc: str = ""  # one line for the person reading the graph (the task's docs in the Airflow UI)
    dag_tasks: tuple[str, ...] = ()  # the DAG's task ids for this stage (default: its name)
    lane: str = "python"  # "spark": its work runs in the Spark JVM; recsys run runs one stage per lane at a time

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.dag_tasks or (self.name,)


PIPELINE: tuple[Stage, ...] = (
    Stage("ingest", _ingest, (), "Fetch the dataset (GroupLens, a folder or s3://), detect its MovieLens format, "
          "write the common tables as parquet."),
    Stage("validate", _validate, ("ingest",), "Run the Great Expectations suites: quarantine bad rows with their "
          "reason; stop on a table-level failure or too many bad rows."),
    Stage("etl", _etl, ("validate",), "Spark: index users and movies, split each user's ratings into train, "
          "validation and test.", lane="spark"),
    Stage("olap", _olap, ("etl",), "Spark SQL summaries: genre x year, user activity, popularity, ratings per "
          "month, tags; summary.md and plots.", lane="spark"),
    Stage("baseline", _baseline, ("etl",), "Global mean, the damped user+item bias baseline (every model's fallback "
          "for cold rows) and the popularity ranking."),
    Stage("als", _als, ("baseline",), "Spark ALS grid search on the baseline's residuals (validation RMSE), one "
          "MLflow child run per point.", lane="spark"),
    Stage("autorec", _autorec, ("baseline",), "TensorFlow item-based AutoRec on observed ratings, early-stopped on "
          "validation RMSE."),
    Stage("knn", _knn, ("baseline",), "Item kNN on the baseline's residuals (shrunk Pearson neighbours), grid on "
          "validation RMSE."),
    Stage("blend", _blend, ("baseline", "als", "autorec", "knn"), "Ridge blend of the rating models, weights "
          "fitted on validation and scored out of fold."),
    Stage("implicit_als", _implicit_als, ("baseline",), "Implicit-feedback ALS grid (validation NDCG@10): a "
          "ranking model for the top-N lists.", lane="spark"),
    Stage("ease", _ease, ("baseline",), "EASE, the closed-form item-item ranking model, lambda chosen on "
          "validation NDCG@10."),
    Stage("ltr", _ltr, ("baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease"), "Learning to rank: "
          "LightGBM LambdaRank over the ranking models' candidates with every model's features, trained on "
          "validation (cross-validated)."),
    Stage("compare_models", _compare_models, ("baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease",
                                              "ltr"),
          "Every model side by side on the same test rows (models.md)."),
    Stage("gate", _gate, ("compare_models",), "Rating gate: register the best candidate by validation RMSE and "
          "score it and the champion on this run's test rows.", dag_tasks=("gate", "decide")),
    Stage("promotion", _promotion, ("gate",), "Move the rating model's champion alias to the challenger, or keep "
          "the champion; record the decision.", dag_tasks=("promote", "keep_champion")),
    Stage("ranking_gate", _ranking_gate, ("compare_models",), "Ranking gate: score the best ranker by validation "
          "NDCG@10 and the ranking champion on this run's test lists."),
    Stage("ranking_promotion", _ranking_promotion, ("ranking_gate",), "Promote the ranker if it beats the "
          "ranking champion (by the margin) and popularity; else keep the champion."),
    Stage("similarity", _similarity, ("promotion", "ranking_promotion"), "Similar-movie tables (Euclidean, cosine, "
          "LSH) from the champion's item embeddings.", lane="spark"),
    Stage("recommend", _recommend, ("similarity",), "Top-N lists per user from the ranking champion and the "
          "popular list; publish the served set atomically."),
    Stage("cold_start", _cold_start, ("similarity",), "Measure the path new users get (five known ratings) "
          "against popularity."),
    Stage("report", _report, ("olap", "recommend", "cold_start"), "The run on one page, report.html (data, "
          "models, both gates' reasons, similar movies, users' lists, timings), logged to MLflow."),
)
STAGES = {stage.name: stage for stage in PIPELINE}
FIRST_TRACKED = "baseline"  # the stages from here on log to MLflow or read its registry
ORDER = [stage.name for stage in PIPELINE]
UPSTREAM = {stage.name: stage.upstream for stage in PIPELINE}
LANES = ("spark", "python")
_BOOKKEEPING = threading.Lock()  # the run folder's shared files (lineage, summaries, report.json): one writer


def parse_stages(text: str | None) -> list[str]:
    """Stage names from ``a,b,c`` (all when None), always in pipeline order. A text naming no stage (``""``,
    e.g. an empty shell variable) is refused: it must not mean "the whole pipeline, promotion included"."""
    if text is None:
        return list(ORDER)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--stages {text!r} names no stage: leave --stages out to run them all, or name them "
                          f"from: {', '.join(ORDER)}")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; available, in order: {', '.join(ORDER)}")
    return [s for s in ORDER if s in names]


def run_stage(name: str, ctx: RunContext, fn: Callable[[RunContext], dict] | None = None,
              fresh: bool = False) -> dict:
    """Run one stage (or ``fn`` in its place, e.g. one branch of it); leave its summary in the run folder,
    rebuild ``report.json``, and return the summary with ``timings_s``. ``fresh``: the stage starts a new run
    in the folder; once it has succeeded, the earlier run's summaries are dropped.

    Holds the stage's lock (``pipeline.locks``), refuses stale inputs, marks the stages downstream stale once
    it has succeeded (``pipeline.lineage``), and turns a service outage into a ``ServiceError``. A stage that
    fails leaves the folder's report, summaries and lineage as they were: its outputs are written atomically,
    so what the last good run left still describes the files there."""
    log.info("stage %s: starting (run %s, folder %s)", name, ctx.run_id, ctx.run_dir)
    memory.tune_malloc()
    with locks.stage_lock(ctx.run_dir, name):
        tracking.close_abandoned_runs(ctx.settings, ctx.run_dir)  # MLflow runs a killed process left RUNNING
        with _BOOKKEEPING:
            inputs = _prepare(name, ctx)
        started, wall = time.perf_counter(), time.time()
        sections = _call(name, ctx, fn or STAGES[name].run)
        seconds = round(time.perf_counter() - started, 2)
        summary = {**sections, "timings_s": {name: seconds}}
        with _BOOKKEEPING:
            if fresh:
                report.clear_summaries(ctx.run_dir)
            _mark_downstream_stale(name, ctx)
            lineage.record(ctx.run_dir, name, inputs, wall)
            report.write_summary(ctx.run_dir, name, summary)
            report.write_report(ctx, ORDER)
    memory.release_memory()
    log.info("stage %s: done in %.1f s", name, seconds)
    return summary


def _prepare(name: str, ctx: RunContext) -> dict:
    """Before a stage runs (under its lock): leftovers of a killed attempt removed and inputs checked.
    Returns the inputs' lineage."""
    removed = storage.remove_leftovers(ctx.run_dir, name)
    if removed:
        log.info("stage %s: removed %s left by an interrupted attempt", name, ", ".join(removed))
    return lineage.check_inputs(ctx.run_dir, name, STAGES[name].upstream)


def _mark_downstream_stale(name: str, ctx: RunContext) -> None:
    """After a stage succeeded: the stages downstream were built from its previous output, so they are stale
    (their report sections dropped) until they run again."""
    below = [s for s in lineage.downstream(name, UPSTREAM, ORDER) if s != "report"]  # report.json is rebuilt
    stale = lineage.mark_stale(ctx.run_dir, name, below)
    if stale:
        report.clear_summaries(ctx.run_dir, stale)
        log.warning("stage %s: re-running it makes %s stale until they run again", name, ", ".join(stale))


def _call(name: str, ctx: RunContext, fn: Callable[[RunContext], dict]) -> dict:
    """The stage function; a champion that cannot be loaded skips a serving stage with the reason recorded."""
    try:
        return fn(ctx)
    except ChampionUnavailableError as exc:
        log.warning("stage %s: skipped: %s", name, exc)
        return {"skipped": {name: str(exc)}}
    except RecsysError:
        raise
    except Exception as exc:
        error = service_error(exc, name, ctx.settings)
        if error is None:
            raise
        raise error from exc


def run_pipeline(ctx: RunContext, stages: list[str], fresh: bool = False, concurrent: bool | None = None) -> dict:
    """Run ``stages`` in this process, holding the run folder (one ``recsys run`` at a time); ``report.json``
    is rewritten after each one. ``fresh``: start a new report (a run from ingest). ``concurrent``: a Spark
    stage and a Python stage at once (``run_lanes``); False: one at a time, in pipeline order; None: by the
    cores (``side_by_side_by_default``)."""
    if concurrent is None:
        concurrent = side_by_side_by_default()
    with locks.run_folder_lock(ctx.run_dir):
        names = parse_stages(",".join(stages))
        first = names[0]  # a fresh run drops the earlier run's report only once its first stage succeeded

        def run(name: str) -> dict:
            return run_stage(name, ctx, fresh=fresh and name == first)

        warming = warm_up(ctx, names)
        try:
            with memory.survivors_frozen():
                if concurrent:
                    run_lanes(names, run)
                else:
                    for name in names:
                        run(name)
        finally:
            if warming is not None:
                # a run that failed early ends after the warm-up's step under way, not within it: stderr is a pipe
                # while the JVM starts, and MLflow may be creating its tables
                warming.finish(WARM_UP_WAIT_S)
        return report.write_report(ctx, ORDER)


def warm_up(ctx: RunContext, names: list[str]) -> WarmUp | None:
    """Start, on one thread, what later stages would otherwise start themselves, while earlier stages run:
    the Spark session (the JVM: a few seconds) where Python stages come ahead of the first Spark stage (ingest
    and validate in a whole run), then MLflow (its import, the store's tables on a first run, the experiment:
    about 2.5 s) where stages come ahead of the first one that tracks (``baseline``, first of the models and
    the stages after them). One after the other: the JVM's start puts its one-thread BLAS variables in this
    process's environment (``pipeline.spark``; docs/adr/0055-warm-up-thread.md). A failure is only logged at
    debug level: the stage that needs the session or the store meets it again and reports it. When the run ends
    first (a stage failed), the step under way finishes and the others are skipped (``WarmUp.finish``)."""
    lanes = [STAGES[name].lane for name in names]
    tracked = [i for i, name in enumerate(names) if ORDER.index(name) >= ORDER.index(FIRST_TRACKED)]
    steps = []
    if "spark" in lanes and lanes[0] != "spark":
        from pipeline.spark import get_spark

        steps.append(get_spark)
    if tracked and tracked[0] > 0:
        from pipeline.tracking import configure

        steps.append(configure)
    if not steps:
        return None
    thread = WarmUp(steps, ctx.settings)
    thread.start()
    return thread


SIDE_BY_SIDE_MIN_CORES = 4


def side_by_side_by_default() -> bool:
    """Whether ``recsys run`` runs two stages at once unless told: with SIDE_BY_SIDE_MIN_CORES cores or more.
    Each stage keeps about two cores busy by itself (Spark ``local[2]``, TensorFlow's and the scoring threads),
    so on 2 cores the pair mostly shares them (docs/adr/0037-stages-side-by-side-from-4-cores.md)."""
    return (os.cpu_count() or 1) >= SIDE_BY_SIDE_MIN_CORES


def run_lanes(names: list[str], run: Callable[[str], object]) -> list[str]:
    """Call ``run(name)`` for each stage in ``names``, each once every stage of ``names`` above it (directly or
    through others) is done, at most one stage per lane at a time, the earliest ready stage in pipeline order
    first. Returns the names in the order they finished.

    The two lanes keep both cores busy where one stage alone leaves them idle (its driver-side Python, MLflow
    logging, Spark's scheduling gaps) without stacking two stages' peaks in one memory: an ALS grid in the JVM
    beside AutoRec, kNN or EASE in this process. Stages in different lanes never read each other's output (a
    stage waits for everything it depends on), so the order of their completion changes no result.

    After a failure no stage starts; the running ones finish (their writes are atomic either way) and the
    first error is raised. The stages run on daemon threads: Ctrl-C ends the process at once, as before."""
    chosen = set(names)
    above = {name: set(lineage.upstream_closure(name, UPSTREAM)) & chosen for name in names}
    finished: queue.Queue = queue.Queue()
    pending, running, done, failure = list(names), {}, [], None

    def work(name: str) -> None:
        try:
            run(name)
            finished.put((name, None))
        except BaseException as exc:  # handed to the caller's thread
            finished.put((name, exc))

    while True:
        if failure is None:
            for name in list(pending):
                lane = STAGES[name].lane
                if above[name] <= set(done) and lane not in running.values():
                    pending.remove(name)
                    running[name] = lane
                    threading.Thread(target=work, args=(name,), name=f"stage-{name}", daemon=True).start()
        if not running:
            break
        name, exc = finished.get()
        del running[name]
        if exc is None:
            done.append(name)
        elif failure is None:
            failure = exc
    if failure is not None:
        raise failure
    return done
