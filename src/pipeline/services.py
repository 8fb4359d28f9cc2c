"""Faults of the services a run talks to (the MLflow tracking server, the S3 endpoint), told apart from bugs.

``stages.run_stage`` passes every exception of a stage through ``service_error``: one that comes from a
service that cannot be reached, timed out or answered with a server error becomes a ``ServiceError`` (exit 8)
whose one-line message names the service and the stage to re-run; anything else is left as it was.
How long the MLflow client retries before giving up is MLflow's (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``); boto3's is botocore's (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``).
The machine's own faults (a full disk, a read-only file system) are told apart the same way, by
``machine_error`` (exit 9), which the command line asks before it calls an exception a bug.
"""

from __future__ import annotations

import re

from pipeline.config import mask_secrets
from pipeline.errors import MachineError, ServiceError

_MLFLOW_UNREACHABLE = re.compile(
    r"API request to .* failed with (timeout )?exception|failed with error code 5\d\d|Max retries exceeded|"
    r"Connection refused|Connection aborted|RemoteDisconnected")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return mask_secrets(text if len(text) <= limit else text[:limit] + "...")


def _is_s3(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, HTTPClientError))


def _is_mlflow(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(exc, requests.HTTPError) and exc.response is not None and exc.response.status_code >= 500:
        return True
    return type(exc).__name__ in ("MlflowException", "RestException") and bool(_MLFLOW_UNREACHABLE.search(str(exc)))


def service_error(exc: BaseException, stage: str, settings) -> ServiceError | None:
    """A ServiceError naming the service ``exc`` (raised by ``stage``) came from, or None when it is no
    service fault."""
    for cause in _chain(exc):
        if _is_s3(cause):
            where = f"the S3 endpoint {settings.s3_endpoint_url or '(AWS default)'}"
        elif _is_mlflow(cause):
            where = f"the MLflow tracking server {mask_secrets(settings.mlflow_tracking_uri)}"
        else:
            continue
        return ServiceError(
            f"stage {stage!r} stopped: {where} failed or went away ({type(cause).__name__}: {_short(cause)}); "
            f"its output was not replaced and no later stage ran; re-run from stage {stage!r} once the service "
            f"is back")
    return None


# errno values, and the words other libraries (Arrow, the JVM, SQLite) use for them, that mean the machine
_MACHINE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EMFILE", "ENFILE"}
_MACHINE_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "database or disk is full",
                  "Too many open files")


def machine_error(exc: BaseException) -> MachineError | None:
    """A ``MachineError`` for ``exc`` when it (or an exception it was raised from) says the disk is full, a quota
    is exceeded, the file system is read-only or file handles ran out; None otherwise."""
    import errno as errno_names

    for cause in _chain(exc):
        code = errno_names.errorcode.get(getattr(cause, "errno", None) or -1)
        word = next((w for w in _MACHINE_WORDS if w in str(cause)), None)
        if code in _MACHINE_ERRNOS or word:
            what = getattr(cause, "strerror", None) or word or code
            where = getattr(cause, "filename", None)
            place = f" writing {where}" if where else ""
            return MachineError(f"the machine refused a write: {what}{place}. This is the machine, not the data "
                                f"or the pipeline: free space (or fix the file system) and run again; what the "
                                f"last good run left is unchanged")
    return None
