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


def register_challenger(settings, name: str, model_uri: str, description: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed) with the ``challenger`` alias."""
    import mlflow

    client = tracking.client(settings)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=description)
    with tracking.quiet_mlflow():
        version = str(mlflow.register_model(model_uri, name).version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


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
