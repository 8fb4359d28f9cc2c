"""DagBag integrity (no import errors, tags, retries, Params) and a dag.test() run of the data half."""

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.params import PARAMS

DAG_ID = "movielens_recsys"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dags


@pytest.mark.parametrize("dag_id", ["movielens_recsys"])
def test_every_dag_is_tagged_documented_and_retries(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags
    assert dag.doc_md and "validate" in dag.doc_md
    assert dag.default_args.get("retries", 0) >= 1
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert "0 0 * * 0" in str(dag.timetable)  # weekly retraining by default


def test_tasks_are_the_real_stages_in_order(dagbag):
    dag = dagbag.dags[DAG_ID]
    assert {t.task_id for t in dag.tasks} == {"ingest", "validate", "etl", "olap", "baseline", "als", "autorec",
                                              "compare_models", "gate", "decide", "promote", "keep_champion",
                                              "similarity", "recommend", "report"}
    assert dag.get_task("validate").upstream_task_ids == {"ingest"}
    assert dag.get_task("etl").upstream_task_ids == {"validate"}
    assert dag.get_task("olap").upstream_task_ids == {"etl"}
    for model in ("baseline", "als", "autorec"):  # in parallel after the split
        assert dag.get_task(model).upstream_task_ids == {"etl"}
    assert dag.get_task("compare_models").upstream_task_ids == {"baseline", "als", "autorec"}
    assert dag.get_task("gate").upstream_task_ids == {"compare_models"}
    assert dag.get_task("decide").downstream_task_ids == {"promote", "keep_champion"}
    assert dag.get_task("similarity").upstream_task_ids == {"promote", "keep_champion"}
    assert dag.get_task("similarity").trigger_rule == "none_failed_min_one_success"  # after either branch
    assert dag.get_task("recommend").upstream_task_ids == {"similarity"}
    assert "recommend" in dag.get_task("report").upstream_task_ids
    assert dag.get_task("validate").retries == 0  # bad data does not improve on retry
    for task in dag.tasks:
        assert task.doc_md or task.doc or task.__doc__


def test_trigger_form_offers_every_param_with_its_default(dagbag):
    params = dagbag.dags[DAG_ID].params
    for spec in PARAMS:
        assert spec.name in params
        assert params[spec.name] == spec.default


def _sample(real: Path, dest: Path, max_user: int = 40) -> Path:
    """ml-latest-small restricted to the first users (every movie kept, so references hold)."""
    dest.mkdir(parents=True)
    ratings = pd.read_csv(real / "ratings.csv")
    ratings[ratings.userId <= max_user].to_csv(dest / "ratings.csv", index=False)
    tags = pd.read_csv(real / "tags.csv")
    tags[tags.userId <= max_user].to_csv(dest / "tags.csv", index=False)
    for name in ("movies.csv", "links.csv"):
        (dest / name).write_bytes((real / name).read_bytes())
    return dest


@pytest.mark.integration
def test_dag_test_runs_end_to_end_on_a_sample(airflow_db, dagbag, real_movielens, tmp_path, monkeypatch):
    from pipeline.settings import load_settings
    from pipeline.storage import safe_run_id

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))  # its own MLflow registry and serving folder
    # every user (a small sample's models do not beat the bias baseline, and the gate rightly keeps out a
    # challenger that does not); a small ALS grid and AutoRec's defaults keep it about a minute
    sample = _sample(real_movielens, tmp_path / "ml-sample", max_user=610)
    expected = pd.read_csv(sample / "ratings.csv")
    dag = dagbag.dags[DAG_ID]
    run = dag.test(run_conf={"source": str(sample), "seed": 7, "olap_min_ratings": 3, "als_ranks": [4, 8],
                             "als_reg_params": [0.15], "als_max_iters": [10]})
    assert run.state == "success"
    report_path = load_settings().runs_dir / safe_run_id(run.run_id) / "report.json"
    report = json.loads(report_path.read_text())
    assert report["run_id"] == run.run_id
    assert report["dataset"]["variant"] == "ml-sample"
    assert report["dataset"]["ratings"] == len(expected)
    assert report["dataset"]["users"] == 610
    assert report["validation"]["success"] is True
    split = report["split"]
    assert split["seed"] == 7
    assert split["train"] + split["validation"] + split["test"] == len(expected)
    assert set(report["olap"]["tables"]) >= {"genre_year", "user_activity", "movie_popularity",
                                              "ratings_per_month", "tags_per_movie"}
    assert set(report["timings_s"]) == {"ingest", "validate", "etl", "olap", "baseline", "als", "autorec", "gate",
                                        "promotion", "similarity", "recommend"}
    models = report["models"]
    assert set(models) == {"baseline", "als", "autorec"}
    assert [p["rank"] for p in models["als"]["grid"]] == [4, 8]
    for name in ("als", "autorec"):  # every model scored on every test row
        assert models[name]["test_rows"] == split["test"]
        assert models[name]["mlflow_run_id"]
    assert report["model_comparison"]["best_by_validation_rmse"] in ("als", "autorec")
    assert "precision_at_10" in report["ranking"]["popularity"]
    # first run on an empty registry: the branch took `promote`, and what follows ran from the champion
    tis = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert report["gate"]["decision"] == "promote", report["gate"]["reason"]
    assert tis["promote"] == "success" and tis["keep_champion"] == "skipped"
    assert tis["similarity"] == tis["recommend"] == tis["report"] == "success"
    assert report["promotion"]["decision"] == "promoted" and report["promotion"]["champion_version"] == "1"
    assert report["similarity"]["lsh_recall_at_k"] >= 0.95
    assert report["recommendations"]["users"] == 610
    assert (load_settings().serving_dir / "current" / "similar_movies.parquet").exists()
