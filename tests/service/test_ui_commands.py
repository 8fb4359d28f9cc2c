"""The local UI commands and make run's task logs, on free loopback ports with a temporary RECSYS_HOME and
AIRFLOW_HOME: ``make ui`` starts Airflow (standalone, two LocalExecutor workers) and the MLflow UI, both answer,
the printed login works, and Ctrl-C stops every process they started; a run through ``scripts/dag_run.py`` (make
run's command) leaves task logs that the API server returns. Every process is stopped, also when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_service import REPO, AirflowService, free_port, http

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]

VENV = Path(sys.executable).parents[1]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 25  # under servers.py's 30 s grace: stopped by the Ctrl-C itself, not by SIGTERM/SIGKILL after it
MARKER = "tiny-dag-log-marker"

TINY_DAG = f'''
import logging
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="tiny_logs", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def tiny_logs():
    @task
    def first() -> int:
        logging.getLogger("pipeline").info("{MARKER} from the logging module")
        print("{MARKER} printed")
        return 1

    @task
    def second(value: int) -> None:
        print("{MARKER} second got", value)

    second(first())


tiny_logs()
'''


# A process is (pid, start time): a pid alone may name another process once its own has exited.
Proc = tuple[int, int]


def _processes() -> dict[Proc, tuple[int, str]]:
    """(pid, start time) -> (parent pid, state) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[(int(entry.name), int(fields[19]))] = (int(fields[1]), fields[0])
    return table


def _descendants(root: int) -> set[Proc]:
    table = _processes()
    found, frontier = set(), {root}
    while frontier:
        children = {proc for proc, (parent, _) in table.items() if parent in frontier} - found
        found |= children
        frontier = {pid for pid, _ in children}
    return found


def _alive(procs: set[Proc]) -> set[Proc]:
    table = _processes()
    return {proc for proc in procs if proc in table and table[proc][1] != "Z"}


def _processes_of(home: Path) -> set[Proc]:
    """Every live process (but this one) whose environment has AIRFLOW_HOME=home, also one that left its parent's
    tree; not those that rewrote their title over their environment (setproctitle): _descendants finds those."""
    needle = f"AIRFLOW_HOME={home}".encode()
    found = set()
    for proc in _alive(set(_processes())):
        try:
            if proc[0] != os.getpid() and needle in Path(f"/proc/{proc[0]}/environ").read_bytes().split(b"\0"):
                found.add(proc)
        except OSError:
            pass
    return found


def _kill_all(process: subprocess.Popen, procs: set[Proc]) -> None:
    """SIGKILL what is left: the group of ``process`` while it is not reaped, and those of ``procs`` still alive."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
    for pid, _ in _alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _cmdline(proc: Proc) -> str:
    try:
        return Path(f"/proc/{proc[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _wait_until(check, what: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"make exited ({process.returncode}) before {what}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"{what} not within {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def test_make_ui_serves_airflow_and_mlflow_and_ctrl_c_stops_both(tmp_path, artifacts):
    home, airflow_home = tmp_path / "recsys", tmp_path / "recsys" / "airflow"
    airflow_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "RECSYS_", "MLFLOW_"))}
    env.update({"RECSYS_HOME": str(home), "AIRFLOW_HOME": str(airflow_home),
                # the log servers of the LocalExecutor's tasks and the triggerer (8793, 8794 by default)
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())})
    log = artifacts / "make-ui.log"
    # -o: the installed venv counts as up to date (a test must not reinstall it)
    command = ["make", "-C", str(REPO), f"VENV={VENV}", "-o", f"{VENV}/.installed", "ui",
               f"AIRFLOW_PORT={airflow_port}", f"MLFLOW_PORT={mlflow_port}"]
    with open(log, "wb") as out:
        make = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    airflow_url, mlflow_url = f"http://127.0.0.1:{airflow_port}", f"http://127.0.0.1:{mlflow_port}"
    started: set[Proc] = set()
    try:
        health = _wait_until(lambda: _healthy(airflow_url), "Airflow's scheduler and API server answer", make, log)
        assert health["metadatabase"]["status"] == "healthy"
        _wait_until(lambda: http("GET", f"{mlflow_url}/health", timeout=5)[0] == 200, "MLflow answers", make, log)
        for url in (f"{airflow_url}/", f"{mlflow_url}/"):  # the UIs' pages
            status, page = http("GET", url, timeout=30)
            assert status == 200 and "<html" in str(page).lower(), (url, status)
        # the login the banner names: user admin, the generated password file
        passwords = json.loads((airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
        status, body = http("POST", f"{airflow_url}/auth/token", {"username": "admin", "password": passwords["admin"]})
        assert status in (200, 201) and body["access_token"], (status, body)
        # MLflow serves the pipeline's store: its database under RECSYS_HOME
        assert (home / "mlflow.db").exists()
        status, body = http("GET", f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5", timeout=30)
        assert status == 200, body
        printed = log.read_text(errors="replace")
        assert f"Airflow UI: {airflow_url}/" in printed and f"MLflow UI: {mlflow_url}/" in printed
        assert str(airflow_home / "simple_auth_manager_passwords.json.generated") in printed
        started = _descendants(make.pid) | _processes_of(airflow_home)
        titles = [_cmdline(proc) for proc in started]
        # sized for two cores: two LocalExecutor workers, not Airflow's default 32
        assert len([t for t in titles if t.startswith("airflow worker -- LocalExecutor")]) == 2, titles

        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            make.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make ui still running {STOP_TIMEOUT_S} s after Ctrl-C:\n{log.read_text()[-4000:]}")
        left = _alive(started) | _processes_of(airflow_home)
        assert not left, [_cmdline(proc) for proc in left]
        for url in (airflow_url, mlflow_url):
            with pytest.raises(OSError):
                http("GET", url, timeout=3)
    finally:
        _kill_all(make, started | _processes_of(airflow_home))


def _healthy(url: str) -> dict | None:
    status, body = http("GET", f"{url}/api/v2/monitor/health", timeout=5)
    if status == 200 and isinstance(body, dict) and body.get("scheduler", {}).get("status") == "healthy":
        return body
    return None


def test_make_runs_command_leaves_task_logs_the_api_server_returns(tmp_path, artifacts):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "tiny_logs.py").write_text(TINY_DAG)
    service = AirflowService(tmp_path / "airflow", {"AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                                                    "AIRFLOW__CORE__PARALLELISM": "2"})
    service.logs = artifacts
    run, started = None, set()
    try:
        service.cli("db", "migrate")
        with open(artifacts / "dag-run.log", "wb") as out:
            run = subprocess.Popen([sys.executable, str(REPO / "scripts" / "dag_run.py"), "tiny_logs"],
                                   env=service.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while run.poll() is None and time.monotonic() < deadline:
            started |= _descendants(run.pid)  # its execution API server, `dags test`, the executor's workers
            time.sleep(0.3)
        assert run.poll() == 0, (artifacts / "dag-run.log").read_text()[-4000:]
        left = _alive(started) | _processes_of(service.home)
        assert not left, f"the run's execution API server or workers outlived it: {[_cmdline(proc) for proc in left]}"
        files = sorted((service.home / "logs" / "dag_id=tiny_logs").glob("run_id=*/task_id=*/attempt=1.log"))
        assert [f.parent.name for f in files] == ["task_id=first", "task_id=second"]

        service.start_api_server()
        token = service.token()
        status, runs = http("GET", f"{service.url}/api/v2/dags/tiny_logs/dagRuns", token=token)
        assert status == 200 and runs["total_entries"] == 1, runs
        run_id = runs["dag_runs"][0]["dag_run_id"]
        assert runs["dag_runs"][0]["state"] == "success"
        status, logs = http("GET", f"{service.url}/api/v2/dags/tiny_logs/dagRuns/{quote(run_id, safe='')}"
                                   "/taskInstances/first/logs/1", token=token)
        assert status == 200, logs
        events = [entry.get("event", "") for entry in logs["content"]]
        assert f"{MARKER} from the logging module" in events, events
        assert f"{MARKER} printed" in events, events
        assert "Done. Returned value was: 1" in events, events
    finally:
        service.stop()
        if run is not None:
            _kill_all(run, started)
