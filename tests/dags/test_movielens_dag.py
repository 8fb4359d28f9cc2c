"""DagBag integrity (no import errors, tags, retries, docs, groups, Params) and a dag.test() run."""

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


@pytest.mark.parametrize("dag_id", ["movielens_recsys", "movielens_watch"])
def test_every_dag_is_tagged_documented_and_retries(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags
    assert dag.doc_md and dag.doc_md.strip().startswith("###")
    assert dag.default_args.get("retries", 0) >= 1
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    for task in dag.tasks:  # its own words, not the operator class's docstring
        assert task.doc_md and task.doc_md.strip() and "Wraps a Python callable" not in task.doc_md, task.task_id


def test_the_recsys_dag_retrains_weekly_by_default(dagbag):
    assert "0 0 * * 0" in str(dagbag.dags[DAG_ID].timetable)


def test_the_dag_docs_name_every_task(dagbag):
    dag = dagbag.dags[DAG_ID]
    for task in dag.tasks:
        assert f"`{task.task_id}`" in dag.doc_md, task.task_id


def test_every_task_but_the_report_sits_in_one_of_five_groups(dagbag):
    dag = dagbag.dags[DAG_ID]
    groups = {task.task_id: task.task_group.group_id for task in dag.tasks}
    assert groups.pop("report") is None  # the end of the run, outside the boxes
    assert set(groups.values()) == {"data", "rating_models", "ranking_models", "gates", "serving"}
    assert groups["decide"] == groups["promote"] == groups["gate"] == "gates"


def test_tasks_are_the_real_stages_in_order(dagbag):
    dag = dagbag.dags[DAG_ID]
    assert {t.task_id for t in dag.tasks} == {
        "ingest", "validate", "etl", "olap", "baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease",
        "ltr",
        "compare_models", "gate", "decide", "promote", "keep_champion", "ranking_gate", "ranking_promotion",
        "similarity", "recommend", "cold_start", "report"}
    assert dag.get_task("validate").upstream_task_ids == {"ingest"}
    assert dag.get_task("etl").upstream_task_ids == {"validate"}
    assert dag.get_task("olap").upstream_task_ids == {"etl"}
    assert dag.get_task("baseline").upstream_task_ids == {"etl"}
    for model in ("als", "autorec", "knn", "implicit_als", "ease"):  # in parallel after the baseline
        assert dag.get_task(model).upstream_task_ids == {"baseline"}
    assert dag.get_task("blend").upstream_task_ids == {"als", "autorec", "knn"}  # the rating models
    assert dag.get_task("ltr").upstream_task_ids == {"blend", "implicit_als", "ease"}  # over every model
    assert dag.get_task("compare_models").upstream_task_ids == {"ltr"}
    assert dag.get_task("ranking_gate").upstream_task_ids == {"compare_models"}
    assert dag.get_task("ranking_promotion").upstream_task_ids == {"ranking_gate"}
    assert dag.get_task("gate").upstream_task_ids == {"compare_models"}
    assert dag.get_task("decide").downstream_task_ids == {"promote", "keep_champion"}
    assert dag.get_task("similarity").upstream_task_ids == {"promote", "keep_champion", "ranking_promotion"}
    assert dag.get_task("similarity").trigger_rule == "none_failed_min_one_success"  # after either branch
    assert dag.get_task("recommend").upstream_task_ids == {"similarity"}
    assert dag.get_task("report").upstream_task_ids == {"olap", "recommend", "cold_start"}  # reads the run folder
    assert dag.get_task("validate").retries == 0  # bad data does not improve on retry
    assert dag.get_task("etl").retries == 2


def test_trigger_form_offers_every_param_with_its_default(dagbag):
    params = dagbag.dags[DAG_ID].params
    for spec in PARAMS:
        assert spec.name in params
        assert params[spec.name] == spec.default
        assert params.get_param(spec.name).schema["section"] == spec.section  # grouped on the form


def test_the_trigger_forms_defaults_validate_as_submitted(dagbag):
    """What the form sends with nothing typed (every default, source null) passes the Params' schemas."""
    import copy

    params = copy.deepcopy(dagbag.dags[DAG_ID].params)
    params.validate()
    for spec in PARAMS:
        params[spec.name] = spec.default  # ParamsDict re-validates each value against its schema
    assert params.validate()["source"] is None


def _stage_of_task(dag) -> dict:
    from pipeline.stages import PIPELINE

    mapping = {task: stage.name for stage in PIPELINE for task in stage.tasks}
    assert set(mapping) == {t.task_id for t in dag.tasks}, "every DAG task belongs to one pipeline stage"
    return mapping


def test_the_dag_and_the_command_line_follow_one_pipeline_definition(dagbag):
    """Every stage waits in the graph for exactly the stages whose output it reads, directly or through others;
    the graph draws no edge the definition does not imply; `recsys run` runs every stage in a topological order
    of the DAG."""
    from pipeline.lineage import upstream_closure
    from pipeline.stages import ORDER, UPSTREAM, parse_stages

    dag = dagbag.dags[DAG_ID]
    stage_of = _stage_of_task(dag)
    edges: dict[str, set] = {name: set() for name in ORDER}
    for task in dag.tasks:
        for up in task.upstream_task_ids:
            a, b = stage_of[up], stage_of[task.task_id]
            if a != b:
                edges[b].add(a)
    in_dag = {name: tuple(sorted(ups)) for name, ups in edges.items()}
    for name in ORDER:
        assert edges[name] <= upstream_closure(name, UPSTREAM), name
        assert upstream_closure(name, in_dag) == upstream_closure(name, UPSTREAM), name
    cli_order = parse_stages(None)
    assert set(cli_order) == set(ORDER)
    position = {name: i for i, name in enumerate(cli_order)}
    for task in dag.tasks:
        for up in task.upstream_task_ids:
            assert position[stage_of[up]] <= position[stage_of[task.task_id]], (up, task.task_id)


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


@pytest.fixture(scope="module")
def dag_run(airflow_db, dagbag, real_movielens, tmp_path_factory):
    """One dag.test() of the whole DAG with its own MLflow registry and serving folder."""
    import os

    from pipeline.config import load_settings
    from pipeline.storage import safe_run_id

    tmp_path = tmp_path_factory.mktemp("dag")
    previous = os.environ.get("RECSYS_HOME")
    os.environ["RECSYS_HOME"] = str(tmp_path / "home")
    try:
        # every user (a small sample's models do not beat the bias baseline, and the gate rightly keeps out a
        # challenger that does not); a small ALS grid and AutoRec's defaults keep it about a minute
        sample = _sample(real_movielens, tmp_path / "ml-sample", max_user=610)
        run = dagbag.dags[DAG_ID].test(run_conf={
            "source": str(sample), "seed": 7, "olap_min_ratings": 3, "als_ranks": [4, 8],
            "als_reg_params": [0.15], "als_max_iters": [10], "ials_ranks": [32], "ials_reg_params": [0.5],
            "ials_alphas": [1.0], "ease_lambdas": [200.0], "knn_neighbours": [50], "knn_shrinkages": [100.0],
            "knn_dampings": [0.5]})
        settings = load_settings()
    finally:
        if previous is None:
            os.environ.pop("RECSYS_HOME", None)
        else:
            os.environ["RECSYS_HOME"] = previous
    report = json.loads((settings.runs_dir / safe_run_id(run.run_id) / "report.json").read_text())
    return {"run": run, "report": report, "sample": sample, "settings": settings}


@pytest.mark.integration
def test_dag_test_runs_end_to_end_on_a_sample(dag_run):
    from pipeline.storage import safe_run_id

    run, report, sample, settings = dag_run["run"], dag_run["report"], dag_run["sample"], dag_run["settings"]
    expected = pd.read_csv(sample / "ratings.csv")
    assert run.state == "success"
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
    assert set(report["timings_s"]) == {"ingest", "validate", "etl", "olap", "baseline", "als", "autorec",
                                        "knn", "blend", "implicit_als", "ease", "ltr", "compare_models", "gate",
                                        "promotion",
                                        "ranking_gate", "ranking_promotion", "similarity", "recommend",
                                        "cold_start", "report"}
    assert report["params"]["als_ranks"] == [4, 8] and report["params"]["source"] == str(sample)
    models = report["models"]
    assert set(models) == {"baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease", "ltr"}
    assert [p["rank"] for p in models["als"]["grid"]] == [4, 8]
    for name in ("als", "autorec", "knn", "blend"):  # every model scored on every test row
        assert models[name]["test_rows"] == split["test"]
        assert models[name]["mlflow_run_id"]
    assert report["model_comparison"]["best_by_validation_rmse"] in ("als", "autorec", "knn", "blend")
    assert models["blend"]["members"] == ["baseline", "als", "autorec", "knn"]
    assert "test_precision_at_10" in report["ranking"]["popularity"]
    assert report["ranking_promotion"]["decision"] == "promoted"  # an empty registry: beating popularity is enough
    assert report["cold_start"]["users"] > 0
    # first run on an empty registry: the branch took `promote`, and what follows ran from the champion
    tis = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert report["gate"]["decision"] == "promote", report["gate"]["reason"]
    assert tis["promote"] == "success" and tis["keep_champion"] == "skipped"
    assert tis["similarity"] == tis["recommend"] == tis["report"] == "success"
    assert _return_value(run, "report") == str(settings.runs_dir / safe_run_id(run.run_id) / "report.json")
    assert report["promotion"]["decision"] == "promoted" and report["promotion"]["champion_version"] == "1"
    assert report["similarity"]["lsh_recall_at_k"] >= 0.95
    assert report["recommendations"]["users"] == 610
    assert (settings.serving_dir / "current" / "similar_movies.parquet").exists()


def _return_value(run, task_id: str):
    """A task's XCom return value, as the REST API and the extra links read it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(XComModel.get_many(key="return_value", run_id=run.run_id, dag_ids=DAG_ID,
                                                 task_ids=task_id).with_only_columns(XComModel.value)).first()
    value = row.value
    if isinstance(value, (str, bytes)):  # JSON text on some backends, the value itself on others
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _shape(value, depth: int = 2):
    """The keys of a report, two levels deep (values differ between runs; the sections must not)."""
    if isinstance(value, dict) and depth:
        return {key: _shape(v, depth - 1) for key, v in value.items()}
    return None


@pytest.mark.integration
def test_the_dag_and_recsys_run_write_the_same_report_sections(dag_run, real_pipeline):
    """Both drivers on the whole of ml-latest-small, each on an empty registry: the same sections."""
    dag_report, cli_report = dag_run["report"], real_pipeline["first"]
    for report in (dag_report, cli_report):
        report["timings_s"] = {stage: None for stage in report["timings_s"]}
    assert _shape(dag_report) == _shape(cli_report)
