"""`mlflow models serve` on the champions a real run registered (the session's ``real_pipeline`` on
ml-latest-small): the requests docs/serving.md shows get the answers it describes, over HTTP, and the bad ones
a 400 with one line and no stack trace.

The requests are read from docs/serving.md itself: every ``curl`` line there with a ``-d '<body>'`` is sent to
the server its port names (5001: the ranker, 5002: the rating model); a line ending in ``# 400`` must be
refused, every other one answered."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from loopback import BIN, free_ports, stop_group, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.timeout(600)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
PORTS = {"5001": "ranker", "5002": "rating"}


def documented_requests() -> list[tuple[str, str, bool]]:
    """(model, body, refused) of every curl line of docs/serving.md."""
    found = []
    for line in DOC.read_text().splitlines():
        match = re.search(r"curl .*127\.0\.0\.1:(\d+)/invocations.* -d '(.*)'", line)
        if match:
            found.append((PORTS[match.group(1)], match.group(2), line.rstrip().endswith("# 400")))
    return found


@pytest.fixture(scope="module")
def servers(real_pipeline, tmp_path_factory):
    """Both champions served by MLflow's own scoring server on loopback: {"ranker": url, "rating": url}."""
    settings = real_pipeline["settings"]
    root = tmp_path_factory.mktemp("serve")
    # the server starts uvicorn from PATH: this environment's, as docs/serving.md says
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = {}
    try:
        for (key, name), port in zip((("ranker", settings.registered_ranker), ("rating", settings.registered_model)),
                                     free_ports(2)):
            log = root / f"{key}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                                         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                        stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            started[key] = (proc, f"http://127.0.0.1:{port}", log)
        for proc, url, log in started.values():
            wait_http(f"{url}/ping", proc, log, timeout=180)
        yield {key: url for key, (_, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            stop_group(proc, grace=5)


def post(url: str, body: str | bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body if isinstance(body, bytes) else body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"message": text}


def test_the_documented_requests_get_their_answers_and_the_bad_ones_a_400(servers):
    requests = documented_requests()
    assert {m for m, _, refused in requests if not refused} == {"ranker", "rating"}, "docs/serving.md lost its curls"
    assert sum(refused for _, _, refused in requests) >= 5
    for model, body, refused in requests:
        status, answer = post(servers[model], body)
        if refused:
            assert status == 400, (body, answer)
            assert "\n" not in answer["message"] and "stack_trace" not in answer, (body, answer)
            assert len(answer["message"]) <= 400, (body, answer)
        else:
            assert status == 200, (body, answer)
            assert answer["predictions"], body


def test_a_known_user_gets_the_served_list_and_each_row_its_own(servers, real_pipeline):
    served = pd.read_parquet(Path(real_pipeline["serving"]) / "current" / "recommendations.parquet")
    user = int(served["user_id"].iloc[0])
    expected = served[served.user_id == user].sort_values("rank")["movie_id"].head(5).tolist()
    status, answer = post(servers["ranker"], json.dumps({"dataframe_records": [{"user_id": user}, {"user_id": user}],
                                                         "params": {"k": 5}}))
    assert status == 200
    rows = pd.DataFrame(answer["predictions"])
    assert rows.groupby("row").size().tolist() == [5, 5]  # two rows of one user: two lists, none merged
    assert rows[rows.row == 0]["movie_id"].tolist() == expected
    assert rows["title"].str.len().min() > 0 and set(rows["source"]) == {"model"}


def test_an_empty_history_gets_the_served_popular_list(servers, real_pipeline):
    popular = pd.read_parquet(Path(real_pipeline["serving"]) / "current" / "popular.parquet")
    status, answer = post(servers["ranker"], json.dumps({"dataframe_records": [{"history": []}]}))
    assert status == 200
    rows = pd.DataFrame(answer["predictions"])
    assert rows["movie_id"].tolist() == popular["movie_id"].head(10).tolist()
    assert set(rows["source"]) == {"popularity"}


def test_the_rating_model_answers_one_rating_per_row_and_refuses_float_ids(servers):
    status, answer = post(servers["rating"], json.dumps({"dataframe_split": {
        "columns": ["user_id", "movie_id"], "data": [[1, 1], [1, 2], [999999, 1]]}}))
    assert status == 200 and len(answer["predictions"]) == 3
    assert all(0.5 <= p <= 5.0 for p in answer["predictions"])
    status, answer = post(servers["rating"], json.dumps({"dataframe_records": [{"user_id": 1.5, "movie_id": 1}]}))
    assert status == 400 and "user_id must be a whole number" in answer["message"]
    status, answer = post(servers["rating"], b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and "nests JSON too deeply" in answer["message"]
