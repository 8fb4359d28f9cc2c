"""The local UIs on the embedded defaults (make airflow / mlflow / ui): each server in its own process group, its
address printed once it answers, all of them stopped together on Ctrl-C or when one exits.

    python scripts/servers.py airflow mlflow

``airflow`` is ``airflow standalone`` on AIRFLOW_PORT (8080), its executor sized by the Makefile's exports;
``mlflow`` is ``mlflow ui`` on the store the pipeline writes (``pipeline.config``) on MLFLOW_PORT (5000), one
worker. Both bind 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
STOP_GRACE_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def wait_http(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Until ``url`` answers 200 (True), ``process`` exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if answers(url):
            return True
        time.sleep(0.5)
    return False


def stop(processes: list[subprocess.Popen], leaders_only: tuple[subprocess.Popen, ...] = ()) -> None:
    """SIGINT to each server's process group (what Ctrl-C does in a terminal), or to the leader alone for those in
    ``leaders_only``; then SIGTERM and SIGKILL to the groups still there after the grace period, so that children
    which outlived their parent go too."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        alive = [p for p in processes if _group_alive(p.pid)]
        for process in alive:
            try:
                if sig == signal.SIGINT and process in leaders_only:
                    os.kill(process.pid, sig)
                else:
                    os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            for process in alive:
                process.poll()  # reap the leader
            alive = [p for p in alive if _group_alive(p.pid)]
            time.sleep(0.2)
        if not alive:
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Server:
    name: str
    port: int
    args: list[str]
    env: dict
    health: str
    banner: str
    interrupt_leader_only: bool = False  # Ctrl-C to the leader alone, which stops its children itself


def airflow(env: dict) -> Server:
    port = int(env.get("AIRFLOW_PORT") or 8080)
    base = f"http://{HOST}:{port}"
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone starts its components as `airflow`
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(port),
        # the UI's links, and tasks report to the execution API at {base_url}/execution/: must be this port
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
    })
    if not env.get("RECSYS_MLFLOW_UI_URL") and not env.get("MLFLOW_TRACKING_URI"):  # the plugin's MLflow links
        env["RECSYS_MLFLOW_UI_URL"] = f"http://{HOST}:{int(env.get('MLFLOW_PORT') or 5000)}"
    passwords = (env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
                 or str(Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"))
    # standalone's Ctrl-C sends SIGTERM to each component; one that also had the SIGINT can hang in its shutdown
    # (the scheduler's LocalExecutor: a worker left without its stop message is waited for at exit)
    return Server("airflow", port, [str(BIN / "airflow"), "standalone"], env, f"{base}/api/v2/monitor/health",
                  f"Airflow UI: {base}/  (user admin, password in {passwords})", interrupt_leader_only=True)


def mlflow(env: dict) -> Server:
    from pipeline.config import load_settings

    settings = load_settings(env)
    store = settings.mlflow_tracking_uri
    if store.startswith(("http://", "https://")):
        sys.exit(f"MLFLOW_TRACKING_URI is a tracking server ({store}): its UI is there")
    artifacts = str(settings.mlflow_artifacts_dir)
    settings.home.mkdir(parents=True, exist_ok=True)
    # MLflow's job runners (GenAI scorers, trace archival) are 8 more processes, 2.5 GB with the server instead of 0.5
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    port = int(env.get("MLFLOW_PORT") or 5000)
    url = f"http://{HOST}:{port}"
    args = [str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--default-artifact-root", artifacts,
            "--artifacts-destination", artifacts, "--host", HOST, "--port", str(port), "--workers", "1"]
    return Server("mlflow", port, args, env, f"{url}/health", f"MLflow UI: {url}/  (store {store})")


KINDS = {"airflow": airflow, "mlflow": mlflow}


def main(names: list[str]) -> int:
    if not names or set(names) - set(KINDS):
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(KINDS)}}}...")
    servers = [KINDS[name](dict(os.environ)) for name in names]
    for server in servers:
        if port_taken(server.port):
            print(f"port {server.port} is in use: choose another, e.g. make {server.name} "
                  f"{server.name.upper()}_PORT={server.port + 1}", file=sys.stderr)
            return 2
    # Ctrl-C, SIGTERM or a closed terminal stop the servers; set here also because a SIGINT that this process
    # ignores (started in the background by a shell) would be ignored by the servers too
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    processes: list[subprocess.Popen] = []
    try:
        for server in servers:
            print(f"==> starting {server.banner}", flush=True)
            processes.append(subprocess.Popen(server.args, env=server.env, start_new_session=True))
        waiting = dict(zip(names, servers))
        while True:
            for server, process in zip(servers, processes):
                if process.poll() is not None:
                    print(f"==> {server.name} exited ({process.returncode}): stopping", file=sys.stderr, flush=True)
                    return 1
            for name, server in list(waiting.items()):
                if answers(server.health):
                    print(f"==> {server.banner}", flush=True)
                    del waiting[name]
                    if not waiting:
                        print("==> Ctrl-C stops " + (" and ".join(names) if len(names) > 1 else "it"), flush=True)
            time.sleep(1)
    except KeyboardInterrupt:
        print("==> stopping " + ", ".join(names), flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C does not leave them half-stopped
            signal.signal(sig, signal.SIG_IGN)
        stop(processes, tuple(p for p, server in zip(processes, servers) if server.interrupt_leader_only))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
