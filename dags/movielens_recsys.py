"""
### MovieLens recommender

Takes MovieLens ratings through **ingest** (GroupLens download, local folder or `s3://` prefix, any
MovieLens format) → **validate** (Great Expectations suites from `expectations/`; bad rows quarantined
with their reason, the run stops above `quarantine_threshold` or on a table-level failure) → **etl**
(Spark: dense user/movie indices, per-user train/validation/test split) → **olap** (Spark SQL summaries
and `summary.md`) beside the models: **baseline** (global mean, damped user+item biases — every model's
fallback for cold rows — and popularity), then in parallel **als** (Spark ALS grid search on the
baseline's residuals, one MLflow child run per grid point), **autorec** (TensorFlow item-based
autoencoder, early-stopped on validation RMSE) and **knn** (item neighbourhood on the baseline's residuals)
→ **blend** (their linear blend, weights fitted on validation) → **compare_models** (every model on the same test rows) → **gate** (the best candidate by
validation RMSE against the registry's `champion`, both scored on this run's test rows) → branch:
**promote** (compare-and-set of the `champion` alias) or **keep_champion** → **similarity** (Euclidean,
cosine and LSH similar-movie tables from the champion's embeddings) → **recommend** (top-N per user and
cold start, published atomically under `<data_root>/serving/`) → **report** (`report.json`).

Every run writes under `<data_root>/runs/<run_id>/<stage>/`; each task calls one stage of the `pipeline`
package (`pipeline.stages.PIPELINE`, the definition `recsys run` follows too) and returns only a small
summary (paths, metrics, MLflow run ids) through XCom. The trigger form's Params are the run's
configuration (an empty `source` means the configured default); `recsys params` lists the same Params.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipeline import stages
from pipeline.config import load_settings
from pipeline.data.watch import ASSET_NAME, ASSET_URI
from pipeline.gate import keep_champion as keep
from pipeline.gate import promote as move_alias
from pipeline.params import PARAMS

AFTER_BRANCH = "none_failed_min_one_success"  # run whichever branch was taken
WEEKLY = "0 0 * * 0"  # Sundays 00:00 UTC


def _schedule(choice: str):
    """The setting RECSYS_SCHEDULE: ``weekly``, ``asset`` (each new fingerprint of the source, recorded by the
    movielens_watch DAG on the asset movielens_ratings), or ``both``; manual triggers always work."""
    ratings = Asset(name=ASSET_NAME, uri=ASSET_URI)
    if choice == "asset":
        return [ratings]
    if choice == "both":
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(WEEKLY, timezone="UTC"), assets=[ratings])
    return WEEKLY


def _context() -> stages.RunContext:
    """The pipeline's run context for the running task: run folder keyed by the Airflow run id."""
    ctx = get_current_context()
    return stages.make_context(run_id=ctx["run_id"], params=dict(ctx["params"]))


@dag(
    dag_id="movielens_recsys",
    schedule=_schedule(load_settings().schedule),  # weekly by default; trigger from the UI for an ad-hoc run
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["movielens", "recsys", "spark", "mlflow", "tensorflow", "great-expectations"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "recsys"},
    params={p.name: Param(p.default, description=p.description, section=p.section, **p.json_schema())
            for p in PARAMS},
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
    def baseline() -> dict:
        """Global mean, damped user+item bias baseline (every model's fallback) and popularity ranking."""
        return stages.run_stage("baseline", _context())

    @task
    def als() -> dict:
        """Spark ALS grid search (validation RMSE), one MLflow child run per point, test metrics of the best."""
        return stages.run_stage("als", _context())

    @task
    def autorec() -> dict:
        """TensorFlow item-based AutoRec, early-stopped on validation RMSE; curves and model in MLflow."""
        return stages.run_stage("autorec", _context())

    @task
    def knn() -> dict:
        """Item kNN on the baseline's residuals (shrunk Pearson neighbours), grid on validation RMSE."""
        return stages.run_stage("knn", _context())

    @task
    def blend() -> dict:
        """Blend of the rating models (weights fitted on validation, scored out of fold), tested like the rest."""
        return stages.run_stage("blend", _context())

    @task
    def implicit_als() -> dict:
        """Spark implicit-feedback ALS grid (validation NDCG@10): a ranking model for the top-N lists."""
        return stages.run_stage("implicit_als", _context())

    @task
    def ease() -> dict:
        """EASE: closed-form item-item ranking model, lambda chosen on validation NDCG@10."""
        return stages.run_stage("ease", _context())

    @task
    def compare_models() -> dict:
        """Every model of the run side by side on the same test rows (models.md)."""
        return stages.run_stage("compare_models", _context())

    @task
    def gate() -> dict:
        """Score the challenger and the registry's champion on this run's test rows; register the challenger."""
        return stages.run_stage("gate", _context())

    @task.branch
    def decide(gate_summary: dict) -> str:
        """Promote only a challenger that beats the champion (by the margin) and the bias baseline."""
        return "promote" if gate_summary["gate"]["decision"] == "promote" else "keep_champion"

    @task
    def promote() -> dict:
        """Move the `champion` alias to the challenger (compare-and-set: only if the champion did not move)."""
        return stages.run_stage("promotion", _context(), move_alias)

    @task
    def keep_champion() -> dict:
        """Keep the champion; record the decision on the challenger's version."""
        return stages.run_stage("promotion", _context(), keep)

    @task
    def ranking_gate() -> dict:
        """Score the best ranker (validation NDCG@10) and the ranking champion on this run's test lists."""
        return stages.run_stage("ranking_gate", _context())

    @task
    def ranking_promotion() -> dict:
        """Promote the ranker if it beats the ranking champion (by the margin) and popularity; else keep it."""
        return stages.run_stage("ranking_promotion", _context())

    @task(trigger_rule=AFTER_BRANCH)
    def similarity() -> dict:
        """Similar-movie tables (Euclidean, cosine, LSH) from the champion's item embeddings."""
        return stages.run_stage("similarity", _context())

    @task
    def recommend() -> dict:
        """Top-N per user from the champion, cold start by similar movies / popularity; publish atomically."""
        return stages.run_stage("recommend", _context())

    @task
    def cold_start() -> dict:
        """Measure the cold-start path new users get (a few known ratings) against popularity."""
        return stages.run_stage("cold_start", _context())

    @task
    def report() -> str:
        """Write report.json from the summaries every stage left in the run folder."""
        ctx = _context()
        stages.run_stage("report", ctx)
        return str(ctx.run_dir / "report.json")

    split = etl()
    ingest() >> validate() >> split
    summarized = olap()
    reference = baseline()
    split >> [summarized, reference]
    raters = [als(), autorec(), knn()]
    rankers = [implicit_als(), ease()]
    reference >> [*raters, *rankers]
    blended = blend()
    [reference, *raters] >> blended
    compared = compare_models()
    [reference, *raters, blended, *rankers] >> compared
    gated, ranked = gate(), ranking_gate()
    compared >> [gated, ranked]
    similar = similarity()
    decide(gated) >> [promote(), keep_champion()] >> similar
    ranked >> ranking_promotion() >> similar
    served, measured = recommend(), cold_start()
    similar >> [served, measured]
    [summarized, served, measured] >> report()


movielens_recsys()
