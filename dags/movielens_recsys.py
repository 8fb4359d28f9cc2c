"""
### MovieLens recommender

Trains, gates and serves a movie recommender from MovieLens ratings. Each task calls one stage of the
`pipeline` package (`pipeline.stages.PIPELINE`, the definition `recsys run` follows too), writes under
`<data_root>/runs/<run_id>/<stage>/` and returns only a small summary (paths, metrics, MLflow run ids).

The trigger form's Params are the run's configuration (an empty `source` means the configured default);
`recsys params` and docs/params.md list them. Retrains weekly, or on each new version of the source
(`RECSYS_SCHEDULE`, and the `movielens_watch` DAG).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TaskGroup,
    dag,
    get_current_context,
    task,
)

from pipeline import stages
from pipeline.config import load_settings
from pipeline.data.watch import ASSET_NAME, ASSET_URI
from pipeline.gate import keep_champion, promote
from pipeline.params import PARAMS

# The graph's boxes: each task group holds these stages' tasks; task ids stay the stage names
# (docs/adr/0061-dag-tasks-from-the-pipeline-definition-in-groups.md).
GROUPS = {
    "data": ("ingest", "validate", "etl", "olap"),
    "rating_models": ("baseline", "als", "autorec", "knn", "blend"),
    "ranking_models": ("implicit_als", "ease", "ltr"),
    "gates": ("compare_models", "gate", "promotion", "ranking_gate", "ranking_promotion"),
    "serving": ("similarity", "recommend", "cold_start"),
}
BRANCH_DOCS = {
    "decide": "Branch: `promote` when the challenger beats the champion (by the margin) and the bias baseline, "
              "else `keep_champion`.",
    "promote": "Move the `champion` alias to the challenger (compare-and-set: only if the champion did not move).",
    "keep_champion": "Keep the champion; record the decision on the challenger's version.",
}
NO_RETRY = {"validate"}  # bad data does not get better on retry
AFTER_BRANCH = "none_failed_min_one_success"  # the stages after the promotion branch run whichever was taken
WEEKLY = "0 0 * * 0"  # Sundays 00:00 UTC


def _schedule(choice: str):
    """RECSYS_SCHEDULE: ``weekly``, ``asset`` (each new fingerprint of the source, recorded on the asset
    movielens_ratings by the movielens_watch DAG) or ``both``; manual triggers always work."""
    ratings = Asset(name=ASSET_NAME, uri=ASSET_URI)
    if choice == "asset":
        return [ratings]
    if choice == "both":
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(WEEKLY, timezone="UTC"), assets=[ratings])
    return WEEKLY


def _task_list() -> str:
    """The DAG's docs: every task, group by group, with its stage's one line."""
    lines = []
    for group, names in [*GROUPS.items(), ("end of the run", ("report",))]:
        lines.append(f"\n**{group.replace('_', ' ')}**\n")
        for stage in (stages.STAGES[name] for name in names):
            for task_id in stage.tasks:
                lines.append(f"- `{task_id}`: {BRANCH_DOCS.get(task_id, stage.doc)}")
    return "\n".join(lines)


def _context() -> stages.RunContext:
    """The pipeline's run context for the running task: run folder keyed by the Airflow run id."""
    ctx = get_current_context()
    return stages.make_context(run_id=ctx["run_id"], params=dict(ctx["params"]))


def stage_task(name: str, fn=None, task_id: str | None = None):
    """A task that runs stage ``name`` (or ``fn`` in its place: one branch of it) and returns its summary."""
    task_id, stage = task_id or name, stages.STAGES[name]
    options = {"retries": 0} if name in NO_RETRY else {}
    if "promotion" in stage.upstream:
        options["trigger_rule"] = AFTER_BRANCH

    @task(task_id=task_id, doc_md=BRANCH_DOCS.get(task_id, stage.doc), **options)
    def run() -> dict:
        return stages.run_stage(name, _context(), fn)

    return run()


@task.branch(doc_md=BRANCH_DOCS["decide"])
def decide(gate_summary: dict) -> str:
    return "promote" if gate_summary["gate"]["decision"] == "promote" else "keep_champion"


@task(doc_md=stages.STAGES["report"].doc + " Returns the path of report.json.")
def report() -> str:
    ctx = _context()
    stages.run_stage("report", ctx)
    return str(ctx.run_dir / "report.json")


@dag(
    dag_id="movielens_recsys",
    schedule=_schedule(load_settings().schedule),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__ + _task_list(),
    tags=["movielens", "recsys", "spark", "mlflow", "tensorflow", "great-expectations"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "recsys"},
    params={p.name: Param(p.default, description=p.description, section=p.section, **p.json_schema())
            for p in PARAMS},
)
def movielens_recsys():
    t = {}
    for group, names in GROUPS.items():
        with TaskGroup(group, prefix_group_id=False, tooltip=", ".join(names)):
            for name in names:
                if name == "gate":
                    t["gate"] = stage_task("gate")
                    t["decide"] = decide(t["gate"])
                elif name == "promotion":
                    t["promote"] = stage_task("promotion", promote, "promote")
                    t["keep_champion"] = stage_task("promotion", keep_champion, "keep_champion")
                else:
                    t[name] = stage_task(name)
    t["report"] = report()

    # the edges the definition does not already imply (tests/dags holds the two to the same order)

    t["ingest"] >> t["validate"] >> t["etl"] >> [t["olap"], t["baseline"]]
    t["baseline"] >> [t["als"], t["autorec"], t["knn"], t["implicit_als"], t["ease"]]
    [t["als"], t["autorec"], t["knn"]] >> t["blend"]
    [t["blend"], t["implicit_als"], t["ease"]] >> t["ltr"] >> t["compare_models"] >> [t["gate"], t["ranking_gate"]]
    t["decide"] >> [t["promote"], t["keep_champion"]] >> t["similarity"]
    t["ranking_gate"] >> t["ranking_promotion"] >> t["similarity"]
    t["similarity"] >> [t["recommend"], t["cold_start"]]
    [t["olap"], t["recommend"], t["cold_start"]] >> t["report"]


movielens_recsys()
