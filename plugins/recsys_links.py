"""Extra links from the pipeline's tasks to where their results are browsed, and the Data Docs they link to.

- **Run report** on every task of a DAG run: the run's report page (``report.html``, ``report_page.path`` of the
  report.json whose path the ``report`` task returns), served by the API server under
  `/recsys/run-report/<dag>/<run>/report.html` to users who may read the DAG's task instances; no button until
  the ``report`` task has returned it;
- **MLflow run** on the model tasks (`baseline`, `als`, `autorec`, `knn`, `blend`, `implicit_als`, `ease`: the
  model's run, `models.<task>.mlflow_run_id` of the task's return value), the gates (`gate`, `ranking_gate`:
  the challenger's run, `<gate>.challenger_run_id`) and `report` (the run the page is logged to,
  `report_page.mlflow_run_id`);
- **MLflow model version** on `gate` and `ranking_gate` (the registered challenger version,
  `<gate>.registered_model` / `<gate>.challenger_version`);
- **Data Docs** on `validate`: the run's Great Expectations Data Docs (`validation.data_docs`), served by the
  API server itself under `/recsys/data-docs/<dag>/<run>/` to users who may read the DAG's task instances
  (a browser does not follow `file://` links from an http page).

The links are *global* operator links: the API server computes them when the task's page asks, from the task
instance's XCom return value (the stage summary), so the DAG files need nothing. A task whose summary has no
such field (or has not run yet) simply shows no link.

The MLflow UI address is the setting ``mlflow_ui_url`` (``RECSYS_MLFLOW_UI_URL``); without it an ``http(s)``
``MLFLOW_TRACKING_URI`` (a tracking server serves its UI at the same address), else ``http://127.0.0.1:5000``
(`mlflow ui` on this machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse

DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
DOCS_PREFIX = "/recsys"  # where the Data Docs app is mounted on the API server
MODEL_TASKS = ("baseline", "als", "autorec", "knn", "blend", "implicit_als", "ease")
GATE_TASKS = ("gate", "ranking_gate")  # each one's report section has its name
REPORT_TASK = "report"  # report.json's path; its section report_page: {"path", "mlflow_run_id", "artifact_uri"}
REPORT_PAGE = "report.html"
# the page is self-contained (charts are data: URIs): the browser loads nothing else, runs no script
REPORT_PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"


def mlflow_ui_url(environ: dict | None = None) -> str:
    """The MLflow UI's base address (no trailing slash): the setting ``mlflow_ui_url``, else an ``http(s)``
    tracking URI, else the local default. ``environ`` (tests) replaces the environment."""
    configured = tracking = ""
    try:
        from pipeline.config import load_settings

        settings = load_settings(environ)
        configured, tracking = settings.mlflow_ui_url, settings.mlflow_tracking_uri
    except Exception:  # noqa: BLE001 - no package or a bad setting elsewhere: read the two names directly
        env = os.environ if environ is None else environ
        configured, tracking = env.get("RECSYS_MLFLOW_UI_URL", ""), env.get("MLFLOW_TRACKING_URI", "")
    url = (configured or "").strip()
    if not url:
        tracking = (tracking or "").strip()
        url = tracking if tracking.startswith(("http://", "https://")) else DEFAULT_MLFLOW_UI_URL
    return url.rstrip("/")


def airflow_base_path() -> str:
    """The API server's base URL (``[api] base_url``) without a trailing slash; '' when unset (the UI then
    resolves the link against its own origin)."""
    try:
        from airflow.configuration import conf

        return (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    except Exception:  # noqa: BLE001 - a link must never break the task page
        return ""


# --- what a stage summary says ------------------------------------------------------------------------------


def mlflow_run_id(task_id: str, summary: Any) -> str | None:
    """The MLflow run of a task's summary: a model's run, or the gate's challenger run."""
    if task_id == REPORT_TASK:
        return (report_page(summary) or {}).get("mlflow_run_id") or None
    if not isinstance(summary, dict):
        return None
    if task_id in GATE_TASKS:
        return (summary.get(task_id) or {}).get("challenger_run_id") or None
    model = (summary.get("models") or {}).get(task_id)
    if isinstance(model, dict) and model.get("mlflow_run_id"):
        return model["mlflow_run_id"]
    section = summary.get(task_id)
    return section.get("mlflow_run_id") or None if isinstance(section, dict) else None


def model_version(summary: Any, task_id: str = "gate") -> tuple[str, str] | None:
    """(registered model, version) of a gate's challenger."""
    gate = summary.get(task_id) if isinstance(summary, dict) else None
    if isinstance(gate, dict) and gate.get("registered_model") and gate.get("challenger_version"):
        return str(gate["registered_model"]), str(gate["challenger_version"])
    return None


def data_docs_index(summary: Any) -> Path | None:
    """The Data Docs index.html named by the validate task's summary."""
    validation = summary.get("validation") if isinstance(summary, dict) else None
    path = validation.get("data_docs") if isinstance(validation, dict) else None
    return Path(path) if path else None


def report_page(summary: Any) -> dict | None:
    """The ``report_page`` section of the report task's return value (None before the page is written): the
    stage summary itself, or the path of the run's report.json (what the DAG's ``report`` task returns, for REST
    clients), whose section of that name it is."""
    if isinstance(summary, str) and summary.endswith(".json"):
        try:
            summary = json.loads(Path(summary).read_text())
        except (OSError, ValueError):
            return None
    page = summary.get("report_page") if isinstance(summary, dict) else None
    return page if isinstance(page, dict) and page.get("path") else None


def mlflow_run_url(run_id: str, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/runs/{quote(run_id, safe='')}"


def mlflow_model_version_url(name: str, version: str, base: str | None = None) -> str:
    return f"{base or mlflow_ui_url()}/#/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"


def data_docs_url(dag_id: str, run_id: str, base: str | None = None) -> str:
    base = airflow_base_path() if base is None else base.rstrip("/")
    return f"{base}{DOCS_PREFIX}/data-docs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/index.html"


def run_report_url(dag_id: str, run_id: str, base: str | None = None) -> str:
    base = airflow_base_path() if base is None else base.rstrip("/")
    return f"{base}{DOCS_PREFIX}/run-report/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/{REPORT_PAGE}"


# --- the task instance's return value -----------------------------------------------------------------------


def task_return_value(dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> Any:
    """The XCom return value of one task instance, read from the metadata DB (None if absent)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(key="return_value", run_id=run_id, dag_ids=dag_id, task_ids=task_id,
                               map_indexes=map_index).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    value = row.value
    if isinstance(value, (str, bytes)):  # stored as JSON text on some backends
        try:
            value = json.loads(value)
        except ValueError:  # a plain string (the report task's path of report.json)
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return value


class _SummaryLink(BaseOperatorLink):
    """A link computed from the task instance's return value; '' (no button) when it does not apply."""

    tasks: tuple[str, ...] = ()

    def url(self, dag_id: str, task_id: str, run_id: str, summary: Any) -> str | None:
        raise NotImplementedError

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.task_id not in self.tasks:
            return ""
        try:
            summary = task_return_value(ti_key.dag_id, ti_key.task_id, ti_key.run_id, ti_key.map_index)
            return self.url(ti_key.dag_id, ti_key.task_id, ti_key.run_id, summary) or ""
        except Exception:  # noqa: BLE001 - a link must never break the task page
            return ""


class MlflowRunLink(_SummaryLink):
    name = "MLflow run"
    tasks = (*MODEL_TASKS, *GATE_TASKS, REPORT_TASK)

    def url(self, dag_id, task_id, run_id, summary):
        mlflow_run = mlflow_run_id(task_id, summary)
        return mlflow_run_url(mlflow_run) if mlflow_run else None


class MlflowModelVersionLink(_SummaryLink):
    name = "MLflow model version"
    tasks = GATE_TASKS

    def url(self, dag_id, task_id, run_id, summary):
        found = model_version(summary, task_id)
        return mlflow_model_version_url(*found) if found else None


class DataDocsLink(_SummaryLink):
    name = "Data Docs"
    tasks = ("validate",)

    def url(self, dag_id, task_id, run_id, summary):
        return data_docs_url(dag_id, run_id) if data_docs_index(summary) else None


class RunReportLink(BaseOperatorLink):
    """On every task: the DAG run's report page, once its ``report`` task has returned one."""

    name = "Run report"

    def get_link(self, operator, *, ti_key) -> str:
        try:
            if report_page(task_return_value(ti_key.dag_id, REPORT_TASK, ti_key.run_id)) is None:
                return ""
            return run_report_url(ti_key.dag_id, ti_key.run_id)
        except Exception:  # noqa: BLE001 - a link must never break the task page
            return ""


# --- the Data Docs and the report page, served to users allowed to read the DAG's task instances -------------


async def _authorized(request: Request, dag_id: str) -> None:
    """The API's own check: a JWT (Authorization header or the UI's session cookie) of a user who may read
    this DAG's task instances. 401 without one, 403 when not allowed."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import (
        COOKIE_NAME_JWT_TOKEN,
        requires_access_dag,
        resolve_user_from_token,
    )

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    user = await resolve_user_from_token(token)
    requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE)(request, user)


docs_app = FastAPI(title="MovieLens recsys: a run's Great Expectations Data Docs and report page", docs_url=None,
                   redoc_url=None, openapi_url=None)


@docs_app.get("/data-docs/{dag_id}/{run_id}/", dependencies=[Depends(_authorized)])
def _data_docs_root(dag_id: str, run_id: str):
    return RedirectResponse("index.html")


@docs_app.get("/data-docs/{dag_id}/{run_id}/{file_path:path}", dependencies=[Depends(_authorized)])
def data_docs_file(dag_id: str, run_id: str, file_path: str):
    """A file of the run's Data Docs: only below the folder the validate task reported."""
    index = data_docs_index(task_return_value(dag_id, "validate", run_id))
    if index is None:
        raise HTTPException(404, f"no Data Docs recorded for run {run_id!r} of {dag_id!r}")
    root = index.parent.resolve()
    target = (root / (file_path or index.name)).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise HTTPException(404, f"{file_path!r} is not part of the run's Data Docs")
    return FileResponse(target)


@docs_app.get("/run-report/{dag_id}/{run_id}/{file_name}", dependencies=[Depends(_authorized)])
def run_report_file(dag_id: str, run_id: str, file_name: str):
    """The run's report page: only the file the report task returned (``report_page.path``)."""
    page = report_page(task_return_value(dag_id, REPORT_TASK, run_id))
    if page is None:
        raise HTTPException(404, f"no report page recorded for run {run_id!r} of {dag_id!r}")
    target = Path(page["path"])
    if file_name != REPORT_PAGE or not target.is_file():
        raise HTTPException(404, f"{file_name!r} is not the run's report page")
    return FileResponse(target, media_type="text/html", headers={"Content-Security-Policy": REPORT_PAGE_CSP})


class RecsysPlugin(AirflowPlugin):
    name = "recsys"
    global_operator_extra_links = [RunReportLink(), MlflowRunLink(), MlflowModelVersionLink(), DataDocsLink()]
    fastapi_apps = [{"app": docs_app, "url_prefix": DOCS_PREFIX, "name": "recsys Data Docs and run report"}]
    external_views = [{"name": "MLflow", "href": mlflow_ui_url(), "destination": "nav"}]
