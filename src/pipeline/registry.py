"""The MLflow Model Registry as the pipeline uses it: aliases ``champion`` / ``challenger``, registered versions
loaded back through their pyfunc, and the compare-and-set that moves the champion.

The alias moves under an exclusive lock on a file in the data root (shared by every worker), and only if it
still points at the version the caller compared against: two runs racing cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

from pipeline import tracking
from pipeline.errors import ChampionUnavailableError
from pipeline.models.factor_model import FactorModel

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@contextlib.contextmanager
def registry_lock(settings):
    """An exclusive lock around the alias compare-and-set (the data root is shared by every worker)."""
    path = Path(settings.data_root) / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def champion_version(client, name: str) -> str | None:
    """The version holding the ``champion`` alias of ``name``, or None (no champion, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def load_registered(name: str, version: str) -> FactorModel:
    """A registered version loaded back through its pyfunc, as serving would."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model


def load_champion(settings, name: str | None = None) -> tuple[FactorModel, str] | tuple[None, None]:
    """(model, version) of the current champion of ``name`` (default: the rating model), or (None, None)."""
    name = name or settings.registered_model
    version = champion_version(tracking.client(settings), name)
    if version is None:
        return None, None
    try:
        return load_registered(name, version), version
    except Exception as exc:
        from pipeline.services import service_error

        if service_error(exc, "serving", settings) is not None:
            raise  # the tracking server is away: a service fault, not a broken champion
        # Serving never reads from a champion it cannot load: the stage is skipped with this reason and the
        # served tables stay as they were (the next promotion, which the gate allows, replaces the champion).
        raise ChampionUnavailableError(
            f"champion v{version} of {name} cannot be loaded "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            f"the served tables were left as they were") from exc


RUN_TAG, MODEL_URI_TAG = "recsys.run_id", "recsys.model_uri"


def register_challenger(settings, name: str, model_uri: str, description: str, run_id: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed) with the ``challenger`` alias.

    With ``run_id``, the version is tagged with it and the model URI, and a version this run already registered
    for the same model is reused: a retried gate task (Airflow retries it) adds no second version."""
    import mlflow

    client = tracking.client(settings)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=description)
    version = registered_for_run(client, name, run_id, model_uri) if run_id else None
    if version is not None:
        log.info("%s v%s was registered by an earlier attempt of run %s: reusing it", name, version, run_id)
    else:
        tags = {RUN_TAG: run_id, MODEL_URI_TAG: model_uri} if run_id else None
        with tracking.quiet_mlflow():
            version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def registered_for_run(client, name: str, run_id: str, model_uri: str) -> str | None:
    """The version of ``name`` that run ``run_id`` registered from ``model_uri``, or None."""
    query = f"name = '{name}'"
    if "'" not in run_id:  # narrowed by the store where the id quotes cleanly; the tags are checked here anyway
        query += f" and tags.`{RUN_TAG}` = '{run_id}'"
    found = [v for v in client.search_model_versions(query)
             if v.tags.get(RUN_TAG) == run_id and v.tags.get(MODEL_URI_TAG) == model_uri]
    return str(min(int(v.version) for v in found)) if found else None


def tag_version(settings, name: str, version: str, tags: dict) -> None:
    client = tracking.client(settings)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def move_champion(settings, name: str, version: str, expected: str | None) -> tuple[bool, str | None]:
    """Compare-and-set: give ``version`` the champion alias only if the champion is still ``expected``.

    Returns (moved, the champion version afterwards).
    """
    client = tracking.client(settings)
    with registry_lock(settings):
        current = champion_version(client, name)
        if current != expected:
            return False, current
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, version
