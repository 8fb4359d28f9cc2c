"""Airflow as a service, for the tests in this folder (helpers, not tests): its own AIRFLOW_HOME, servers on free
loopback ports, each in its own process group and always stopped (SIGTERM to the group, then SIGKILL), logs kept
under the test's temporary folder."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAG_ID = "movielens_recsys"
ADMIN = "admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 30):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class AirflowService:
    """One Airflow installation: environment, CLI, and the servers it started."""

    def __init__(self, home: Path, extra_env: dict | None = None):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.home / "server-logs"
        self.logs.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN: self.password}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            # a non-default port: the UI's links and the execution API (tasks report here) need the base URL
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # every component signs and checks the same JWTs
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "RECSYS_HOME": str(self.home / "recsys"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        })
        for var in ("RECSYS_SOURCE", "RECSYS_DATA_ROOT", "RECSYS_CACHE_DIR", "RECSYS_SETTINGS_FILE",
                    "MLFLOW_TRACKING_URI", "RECSYS_SCHEDULE"):
            env.pop(var, None)
        env.update(extra_env or {})
        self.env = env
        self.processes: dict[str, subprocess.Popen] = {}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                cwd=self.home)
        if result.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start ``airflow <args>`` in its own process group (so that its children are stopped with it)."""
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen([AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=self.home, start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def start_api_server(self) -> None:
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1")
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                status, _ = http("GET", f"{self.url}/api/v2/monitor/health", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the API server did not answer on {self.url} within {timeout} s:\n{self.tail()}")

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str | None = None, chars: int = 4000) -> str:
        names = [name] if name else list(self.processes)
        out = []
        for n in names:
            path = self.logs / f"{n}.log"
            if path.exists():
                out.append(f"--- {n} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def token(self, username: str = ADMIN, password: str | None = None) -> str:
        status, body = http("POST", f"{self.url}/auth/token",
                            {"username": username, "password": password or self.password})
        assert status in (200, 201), (status, body)
        return body["access_token"]

    def stop(self) -> None:
        """SIGTERM every started process group, wait, then SIGKILL what is left (also on failure)."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes.values():
            _signal_group(process, signal.SIGKILL)  # also children that outlived their parent
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def movielens_sample(real: Path, dest: Path, max_user: int) -> Path:
    """ml-latest-small restricted to the first users (every movie kept, so references hold)."""
    import pandas as pd

    dest.mkdir(parents=True, exist_ok=True)
    ratings = pd.read_csv(real / "ratings.csv")
    ratings[ratings.userId <= max_user].to_csv(dest / "ratings.csv", index=False)
    tags = pd.read_csv(real / "tags.csv")
    tags[tags.userId <= max_user].to_csv(dest / "tags.csv", index=False)
    for name in ("movies.csv", "links.csv"):
        (dest / name).write_bytes((real / name).read_bytes())
    return dest


def form_conf(dag_params: dict, **overrides) -> dict:
    """What the trigger form sends: every Param's default (as the DAG details API shows them) plus overrides."""
    conf = {name: spec.get("value") for name, spec in dag_params.items()}
    conf.update(overrides)
    return conf
