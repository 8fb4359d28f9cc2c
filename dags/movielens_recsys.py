"""
### MovieLens recommender: the data half

Takes MovieLens ratings through **ingest** (GroupLens download, local folder or `s3://` prefix, any
MovieLens format) → **validate** (Great Expectations suites from `expectations/`; bad rows quarantined
with their reason, the run stops above `quarantine_threshold` or on a table-level failure) → **etl**
(Spark: dense user/movie indices, per-user train/validation/test split) → **olap** (Spark SQL summaries
and `summary.md`) → **report** (`report.json` in the run folder).

Every run writes under `<data_root>/runs/<run_id>/<stage>/`; each task calls one function of the
`pipeline` package and returns only a small summary (paths, counts) through XCom. The trigger form's
Params are the run's configuration; `recsys params` lists the same Params for the command line.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline import stages
from pipeline.params import PARAMS


def _context() -> stages.RunContext:
    """The pipeline's run context for the running task: run folder keyed by the Airflow run id."""
    ctx = get_current_context()
    return stages.make_context(run_id=ctx["run_id"], params=dict(ctx["params"]))


@dag(
    dag_id="movielens_recsys",
    schedule="@weekly",  # retrain weekly; trigger manually from the UI for an ad-hoc run
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["movielens", "recsys", "spark", "great-expectations"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "recsys"},
    params={p.name: Param(p.default, description=p.description, **p.json_schema()) for p in PARAMS},
)
def movielens_recsys():
    @task
    def ingest() -> dict:
        """Fetch the dataset, detect its MovieLens format and write the common tables as parquet."""
        return stages.run_stage("ingest", _context())

    @task(retries=0)  # bad data does not get better on retry
    def validate() -> dict:
        """Run the GX suites; quarantine bad rows; stop on table-level failures or too many bad rows."""
        return stages.run_stage("validate", _context())

    @task
    def etl() -> dict:
        """Spark: index users and movies, split each user's ratings into train/validation/test."""
        return stages.run_stage("etl", _context())

    @task
    def olap() -> dict:
        """Spark SQL: genre x year, user activity, popularity, ratings per month, tags; summary.md."""
        return stages.run_stage("olap", _context())

    @task
    def report(summaries: list[dict]) -> str:
        """Merge the stages' summaries into report.json in the run folder."""
        ctx = _context()
        stages.merge_report(ctx, summaries)
        return str(ctx.run_dir / stages.REPORT)

    ingested, validated, split, summarized = ingest(), validate(), etl(), olap()
    ingested >> validated >> split >> summarized
    report([ingested, validated, split, summarized])


movielens_recsys()
