"""make run: one run of a DAG (``airflow dags test``) that leaves its task logs where the Airflow UI reads them.

    python scripts/dag_run.py DAG_ID [more `airflow dags test` arguments, e.g. --conf '{...}']

``dags test --use-executor`` hands each task to the LocalExecutor, which writes the task's log file under
``$AIRFLOW_HOME/logs`` as for a scheduled run (without it the tasks run inside the command and leave none).
Those tasks report to an execution API, so one is started here (``api-server --apps execution`` on a free
loopback port) for the length of the run, and stopped after it. The executor runs [core] parallelism tasks at a
time (the Makefile exports 2).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from servers import BIN, HOST, free_port, stop, wait_http


def main(args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        sys.exit(f"usage: {sys.argv[0]} DAG_ID [airflow dags test arguments]")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored by the servers, see servers.py
    env = dict(os.environ)
    url = f"http://{HOST}:{free_port()}"
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"{url}/execution/"
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))  # signs and checks the task tokens
    log = Path(env["AIRFLOW_HOME"]) / "logs" / "execution-api.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        api = subprocess.Popen([str(BIN / "airflow"), "api-server", "--apps", "execution", "--host", HOST,
                                "--port", url.rsplit(":", 1)[1], "--workers", "1"], env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_http(f"{url}/execution/health", api, timeout=180):
            print(f"no execution API on {url} (log: {log}):\n{log.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
            return 1
        run = subprocess.Popen([str(BIN / "airflow"), "dags", "test", "--use-executor", *args], env=env)
        while True:
            try:
                code = run.wait()
                break
            except KeyboardInterrupt:
                continue  # `dags test` had the same Ctrl-C: it stops its tasks, which still need the API
        port = int(env.get("AIRFLOW_PORT") or 8080)
        print(f"==> this run and its task logs in the Airflow UI: make airflow, then "
              f"http://{HOST}:{port}/dags/{args[0]}", flush=True)
        return code
    finally:
        stop([api])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
