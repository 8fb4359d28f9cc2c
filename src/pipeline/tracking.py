"""MLflow: the experiment, nested runs, plots, and the one pyfunc wrapper every registered model uses.

The rating pyfunc carries a saved rating model of any kind (a ``FactorModel``: factors, id mappings, the
baseline it may add and the fallback baseline for cold pairs; an ``ItemKNN``; a ``Blend`` with its members),
loaded by one dispatch (``pipeline.models.saved``), plus this package as code, so
``mlflow.pyfunc.load_model("models:/name@champion")`` scores any (user_id, movie_id) pairs without Spark or
TensorFlow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import locks
from pipeline.config import mask_secrets, restored_environment

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


# MLflow's UI opens an experiment in the view of its kind: without the tag MLflow 3 opens the GenAI view (traces,
# an assistant panel); this is a model-training project (docs/adr/0073-mlflow-and-data-docs-as-browsed.md)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_CONFIGURE_LOCK = threading.Lock()
_CONFIGURED: tuple | None = None  # (tracking URI, experiment name, experiment id) last configured in this process


def configure(settings) -> str:
    """Point MLflow at the settings' tracking URI and experiment; returns the experiment id.

    Every MLflow call of the pipeline goes through ``start_run`` or ``client``, which call this, so no stage
    depends on another having configured MLflow first. Repeated calls with the same settings are cheap. Safe
    from any thread: one configures at a time (``recsys run`` warms MLflow up on a thread while the data
    stages run, and a first configuration creates the store's tables).
    """
    with _CONFIGURE_LOCK:
        return _configure(settings)


def _configure(settings) -> str:
    import mlflow

    global _CONFIGURED
    key = (settings.mlflow_tracking_uri, settings.mlflow_experiment)
    if _CONFIGURED and _CONFIGURED[:2] == key and mlflow.get_tracking_uri() == key[0]:
        return _CONFIGURED[2]

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.mlflow_tracking_uri.startswith("sqlite:///"):
        Path(settings.mlflow_tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI, which load_settings
    # reads: a long-lived worker would then give every later configuration the first one's store. MLflow keeps
    # the URIs in its own globals, so the environment is put back as the operator set it.
    with restored_environment(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")):
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        artifact_location = None
        if settings.mlflow_tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the embedded store
            artifact_location = settings.mlflow_artifacts_dir.as_uri()
        experiment_id = mlflow.create_experiment(settings.mlflow_experiment, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag was set; a kind someone chose stays
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    _CONFIGURED = (*key, experiment_id)
    return experiment_id


def client(settings):
    """An ``MlflowClient`` on the settings' tracking server and registry (configured first)."""
    import mlflow

    configure(settings)
    return mlflow.MlflowClient()


@contextmanager
def start_run(ctx, run_name: str, split: dict | None = None, nested: bool = False):
    """An MLflow run of this pipeline run, opened before the work it records and closed after it (so the
    durations the UI shows are the work's own), tagged with the run id, folder and test rows.

    While it is open the run folder records it (``open_run_record``); first, the runs a killed process left
    open in the folder are ended KILLED (``close_abandoned_runs``)."""
    import mlflow

    configure(ctx.settings)
    close_abandoned_runs(ctx.settings, ctx.run_dir)
    record = None
    try:
        with mlflow.start_run(run_name=run_name, tags=run_tags(ctx, split), nested=nested) as run:
            record = open_run_record(ctx.run_dir, run.info.run_id, run_name)
            yield run
    finally:
        if record is not None:  # removed once the run has ended
            record.unlink(missing_ok=True)


@contextmanager
def child_run(parent, ctx, run_name: str, split: dict | None = None):
    """A child run of ``parent`` that may be opened from any thread (the ALS grid fits points concurrently):
    yields a ``log(params, metrics)`` function; the run ends FINISHED, or FAILED if the work raised."""
    import time

    from mlflow.entities import Metric, Param

    mlflow_client = client(ctx.settings)
    run = mlflow_client.create_run(parent.info.experiment_id, run_name=run_name,
                                   tags={"mlflow.parentRunId": parent.info.run_id, **run_tags(ctx, split)})
    record = open_run_record(ctx.run_dir, run.info.run_id, run_name)

    def log(params: dict, metrics: dict) -> None:
        now = int(time.time() * 1000)
        mlflow_client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    status = "FAILED"
    try:
        yield log
        status = "FINISHED"
    finally:
        mlflow_client.set_terminated(run.info.run_id, status)
        record.unlink(missing_ok=True)


OPEN_RUNS = Path(locks.STAGE_LOCKS) / "mlflow-runs"  # in the run folder: <mlflow run id>.json per open run


def open_run_record(run_dir, run_id: str, run_name: str) -> Path:
    """Note in the run folder that this process has the MLflow run ``run_id`` open (its pid and host, as a lock
    holder): a process killed with SIGKILL cannot end its runs, the next one can (``close_abandoned_runs``)."""
    from pipeline import storage

    return storage.write_json_atomic(Path(run_dir) / OPEN_RUNS / f"{run_id}.json",
                                     locks.this_holder(f"MLflow run {run_name!r}"))


def close_abandoned_runs(settings, run_dir) -> list[str]:
    """End KILLED the MLflow runs still RUNNING that a process gone from this host left open in ``run_dir``
    (killed with SIGKILL, OOM-killed); returns their ids, named in a warning. Never raises: a run that cannot be
    ended now (the store is away) keeps its record for the next try, with a warning."""
    folder = Path(run_dir) / OPEN_RUNS
    abandoned = [(path, holder) for path in (sorted(folder.glob("*.json")) if folder.is_dir() else [])
                 if not locks.holder_alive(holder := locks.read_holder(path))]
    if not abandoned:
        return []
    from mlflow.exceptions import MlflowException

    killed, by = [], {}
    for path, holder in abandoned:
        run_id = path.stem
        try:
            mlflow_client = client(settings)
            if mlflow_client.get_run(run_id).info.status == "RUNNING":
                mlflow_client.set_terminated(run_id, "KILLED")
                killed.append(run_id)
                by.setdefault(f"pid {holder.get('pid')} on host {holder.get('host')}", []).append(run_id)
        except Exception as exc:
            if not (isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"):
                log.warning("cannot mark the MLflow run %s left open by %s KILLED yet: %s", run_id,
                            locks.describe_holder(holder), exc)
                continue
            log.warning("the MLflow run %s left open by %s is not in the store %s: forgetting it", run_id,
                        locks.describe_holder(holder), mask_secrets(settings.mlflow_tracking_uri))
        path.unlink(missing_ok=True)
    for process, runs in by.items():
        log.warning("marked the MLflow run(s) %s KILLED: left RUNNING by %s, which is gone", ", ".join(runs), process)
    return killed


def run_tags(ctx, split: dict | None = None) -> dict:
    """Tags tying an MLflow run to the pipeline run, its dataset and its test rows."""
    tags = {"recsys.run_id": ctx.run_id, "recsys.run_dir": str(ctx.run_dir)}
    if split:
        tags["recsys.test_fingerprint"] = split.get("test_fingerprint", "")
        tags["recsys.split"] = f"{split.get('strategy')}/seed={split.get('seed')}"
    return tags


ROLE_TAG, PIPELINE_ROLE = "recsys.role", "pipeline"


def runs_of(ctx) -> list:
    """Every MLflow run of this pipeline run (tag ``recsys.run_id``) in the experiment, oldest first."""
    mlflow_client = client(ctx.settings)
    experiment = configure(ctx.settings)
    query = f"tags.`recsys.run_id` = '{ctx.run_id}'" if "'" not in ctx.run_id else ""
    found, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment], filter_string=query, max_results=1000, page_token=token)
        found += [r for r in page if r.data.tags.get("recsys.run_id") == ctx.run_id]
        token = page.token
        if not token:
            return sorted(found, key=lambda r: r.info.start_time or 0)


def pipeline_run(ctx, split: dict | None = None) -> str:
    """The id of the pipeline run's own MLflow run, named by its run id: the parent of every stage's run, from
    the first stage run's start to now. Made by the report stage (found again when it runs again); the stage
    runs of the pipeline run that have no parent are given it, so MLflow's runs table shows one row per
    pipeline run, with its stages, and their grid points, nested below."""
    import time

    mlflow_client = client(ctx.settings)
    runs = runs_of(ctx)
    mine = [r for r in runs if r.data.tags.get(ROLE_TAG) == PIPELINE_ROLE]
    if mine:
        parent = mine[0].info.run_id
    else:
        start = min((r.info.start_time for r in runs if r.info.start_time), default=None)
        parent = mlflow_client.create_run(configure(ctx.settings), start_time=start, run_name=ctx.run_id,
                                          tags={**run_tags(ctx, split), ROLE_TAG: PIPELINE_ROLE}).info.run_id
    for run in runs:
        if run.info.run_id != parent and "mlflow.parentRunId" not in run.data.tags:
            mlflow_client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
    mlflow_client.set_terminated(parent, "FINISHED", end_time=int(time.time() * 1000))
    return parent


@contextmanager
def quiet_mlflow():
    """MLflow logs a line per artifact upload and model-env inference; keep stage logs readable."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_class(factory):
    """Build a pyfunc class once per process, without MLflow's warning that its ``predict`` has no type hints
    (the contract is the logged signature, pipeline.serving.contract)."""
    import functools
    import warnings

    @functools.cache
    def build():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*")
            return factory()

    return build


@_quiet_class
def _pyfunc_class():
    import mlflow.pyfunc

    class RatingModelPyfunc(mlflow.pyfunc.PythonModel):
        """Input: user_id, movie_id (whole numbers). Output: one predicted rating per row (cold pairs: the bias
        baseline). The contract: pipeline.serving.contract, docs/serving.md."""

        def load_context(self, context):
            from pipeline.models.saved import load_model
            from pipeline.serving.contract import harden_scoring_server

            harden_scoring_server()
            self.model = load_model(context.artifacts["rating_model"])

        def predict(self, context, model_input, params=None):
            from pipeline.serving.contract import rating_rows

            return self.model.predict_all(*rating_rows(model_input))

    return RatingModelPyfunc


def input_example(model, rows: int = 3) -> pd.DataFrame:
    """Up to ``rows`` (user_id, movie_id) pairs the model knows, also when it knows fewer users or movies."""
    n = min(rows, max(len(model.user_ids), len(model.movie_ids)))
    return pd.DataFrame({"user_id": np.resize(model.user_ids, n).astype(np.int64),
                         "movie_id": np.resize(model.movie_ids, n).astype(np.int64)})


def _requirements(*modules) -> list[str]:
    import importlib

    import mlflow

    pins = {"mlflow": mlflow.__version__, "numpy": np.__version__, "pandas": pd.__version__}
    for name in ("pyarrow", "scipy", *modules):
        pins[name] = importlib.import_module(name).__version__
    return [f"{name}=={version}" for name, version in pins.items()]


def _log_pyfunc(python_model, artifact: str, folder: Path, name: str, signature, example, requirements,
                registered_model_name: str | None = None):
    import warnings

    import mlflow

    with quiet_mlflow(), warnings.catch_warnings():
        # integer ids are what callers pass; a type-hinted predict is not what a pyfunc wrapper needs
        warnings.filterwarnings("ignore", message=".*integer column.*")
        warnings.filterwarnings("ignore", message=".*type hints.*")
        return mlflow.pyfunc.log_model(
            name=name, python_model=python_model, artifacts={artifact: str(folder)}, code_paths=[str(PACKAGE_DIR)],
            signature=signature, input_example=example, pip_requirements=requirements,
            registered_model_name=registered_model_name)


def log_rating_model(model, name: str = "model", registered_model_name: str | None = None):
    """Log a rating model of any kind (factor model, item kNN, blend: ``pipeline.models.saved``) as a pyfunc
    with the rating contract's signature, an input example and explicit pip requirements."""
    from pipeline.serving.contract import rating_signature

    example = input_example(model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save(Path(tmp) / "rating_model")
        return _log_pyfunc(_pyfunc_class()(), "rating_model", folder, name, rating_signature(), example,
                           _requirements(), registered_model_name)


log_factor_model = log_rating_model  # the name from before the kNN and blend models


@_quiet_class
def _ranker_pyfunc_class():
    import mlflow.pyfunc

    class RankerPyfunc(mlflow.pyfunc.PythonModel):
        """Input: rows of user_id and/or history (movie ids) and, optionally, ratings (same order); param k.
        Output: one top-k list per row (row, user_id, rank, movie_id, title, score, source). The contract:
        pipeline.serving.contract and served_ranker, docs/serving.md."""

        def load_context(self, context):
            from pipeline.serving.contract import harden_scoring_server
            from pipeline.serving.served_ranker import ServedRanker

            harden_scoring_server()
            self.served = ServedRanker.load(context.artifacts["ranker"])
            self.model = self.served.model  # what the gates score and the recommend stage ranks with

        def predict(self, context, model_input, params=None):
            from pipeline.serving.contract import check_k, ranker_rows

            return self.served.answer(ranker_rows(model_input), check_k(params))

    return RankerPyfunc


def ranker_example(served) -> pd.DataFrame:
    """A user the ranker holds, by id, and a new user by a history of three popular movies and ratings."""
    from pipeline.serving.contract import ranker_example as example

    users = list(served.history)
    known = users[0] if users else 1
    return example(known, max(users, default=known) + 1, served.popular_ids[:3].tolist(),
                   [5.0, 4.0, 4.5][:len(served.popular_ids[:3])])


def log_ranker(model, ratings: pd.DataFrame, movies: pd.DataFrame | None, name: str = "ranker"):
    """Log any ranking model as the ranker pyfunc (``pipeline.serving.served_ranker``): lists from a history or a
    known user id, without Spark; ``ratings`` (every user's history) and ``movies`` (titles) go with it."""
    from pipeline.serving.contract import ranker_signature
    from pipeline.serving.served_ranker import ServedRanker

    served = ServedRanker.build(model, ratings, movies)
    extra = ("lightgbm",) if type(model).__name__ == "Reranker" else ()
    with tempfile.TemporaryDirectory() as tmp:
        folder = served.save(Path(tmp) / "ranker")
        return _log_pyfunc(_ranker_pyfunc_class()(), "ranker", folder, name, ranker_signature(),
                           ranker_example(served), _requirements(*extra))


def log_model(model, ratings: pd.DataFrame, movies: pd.DataFrame | None, rating: bool = True) -> dict:
    """The registrable pyfuncs of a model the stages train: ``{"model": the rating pyfunc's URI (``rating`` and a
    model that predicts ratings, else None), "ranker": the ranker pyfunc's URI}``; its item factors too, when
    it has them."""
    if hasattr(model, "item_factors"):
        log_item_factors(model)
    rated = log_rating_model(model).model_uri if rating and hasattr(model, "predict_all") else None
    return {"model": rated, "ranker": log_ranker(model, ratings, movies).model_uri}


def log_figure(fig, artifact_file: str) -> None:
    import mlflow

    mlflow.log_figure(fig, artifact_file)


def log_item_factors(model, artifact_path: str = "item_factors") -> None:
    """The item factors (embeddings) as parquet ``movie_id, vector``: what the similarity stage reads."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "item_factors.parquet"
        pd.DataFrame({"movie_id": model.movie_ids, "vector": list(model.item_factors)}).to_parquet(path, index=False)
        with quiet_mlflow():
            mlflow.log_artifact(str(path), artifact_path)
