"""One writer at a time: run folders, their stages, and the served set.

Locks are ``flock`` locks on small files, so a process that dies (kill -9, OOM, a lost worker) releases them
with it: a lock left by a dead process is taken over by the next one, with a warning naming it. Each lock file
also holds its last holder (pid, host, what, since) for the message of a refused writer.

- **Run folder**: ``recsys run`` holds ``<run>/.recsys.lock`` exclusively for the whole command; a second
  ``recsys run`` on the same folder is refused (``RunLockedError``, exit 7).
- **Stage**: a DAG task (``stages.run_stage`` outside ``run_pipeline``) holds the run folder *shared* and its
  stage ``<run>/.locks/<stage>.lock`` exclusively: the parallel tasks of one DAG run (olap, als, autorec) work
  side by side, while a second writer of the same stage, or a ``recsys run`` on that folder, is refused.
- **Serving**: ``serving.publish`` waits for ``<data_root>/.serving.publish.lock`` (publishing takes seconds).

The MLflow runs a stage has open are noted the same way, one holder file each under
``<run>/.locks/mlflow-runs/`` (``pipeline.tracking``): the next run in the folder ends those a dead process left
RUNNING as KILLED.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import RunLockedError

log = logging.getLogger(__name__)

RUN_LOCK = ".recsys.lock"
STAGE_LOCKS = ".locks"
PUBLISH_LOCK = ".publish.lock"

_held: dict[str, str] = {}  # lock file -> "exclusive" | "shared", held by this process
_guard = threading.Lock()


def read_holder(path: Path) -> dict:
    """The holder a lock (or open-run) file names, {} when it is empty or unreadable."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('what', '?')}, "
            f"since {holder.get('since', '?')})")


def this_holder(what: str) -> dict:
    """This process as a holder: pid, host, what it does, since when."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def holder_alive(holder: dict) -> bool:
    """False only when the holder ran on this host and its pid is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


@contextlib.contextmanager
def hold(path: Path, what: str, *, shared: bool = False, wait_s: float = 0.0,
         refused: str = "") -> Iterator[None]:
    """Hold the lock file ``path`` (exclusive, or shared) while the block runs.

    Waits up to ``wait_s`` seconds, then raises RunLockedError naming the holder (``refused`` is prepended).
    Re-entrant within a process: a lock this process already holds is not taken twice.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.parent.resolve() / path.name)
    with _guard:
        if key in _held and (shared or _held[key] == "exclusive"):
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        yield
        return
    handle = open(path, "a+")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = read_holder(path)
                    raise RunLockedError(f"{refused or 'locked'}: {path} is held by {describe_holder(holder)}"
                                         ) from None
                time.sleep(0.2)
        previous = read_holder(path)
        if previous and not holder_alive(previous):
            log.warning("taking over the lock %s left by %s: that process is gone", path, describe_holder(previous))
        me = this_holder(what)
        if not shared or not previous or not holder_alive(previous):
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(me) + "\n")
            handle.flush()
        with _guard:
            _held[key] = "shared" if shared else "exclusive"
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            last = not shared
            if shared:  # the last of the shared holders leaves the file empty too
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    last = True
                except BlockingIOError:
                    pass
            if last:
                handle.seek(0)
                handle.truncate()  # an empty file: released cleanly (a non-empty one names a holder)
                handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def run_folder_lock(run_dir: Path, what: str = "recsys run") -> contextlib.AbstractContextManager:
    """The whole run folder, exclusively (``recsys run``)."""
    return hold(Path(run_dir) / RUN_LOCK, what,
                refused=f"the run folder {run_dir} is being written by another process; wait for it to finish "
                        f"or use another --work-dir")


@contextlib.contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[None]:
    """One stage of a run folder: the folder shared (its other stages may run beside it), the stage exclusive."""
    run_dir = Path(run_dir)
    with hold(run_dir / RUN_LOCK, f"stage {stage}", shared=True,
              refused=f"stage {stage!r} cannot run: the run folder {run_dir} is being written by a `recsys run`"), \
            hold(run_dir / STAGE_LOCKS / f"{stage}.lock", f"stage {stage}",
                 refused=f"stage {stage!r} of {run_dir} is already running in another process"):
        yield


def publish_lock(serving_dir: Path, wait_s: float = 600.0) -> contextlib.AbstractContextManager:
    """The served set (local pointer, history and S3 pointer): one publisher at a time, the others wait."""
    serving_dir = Path(serving_dir)  # the lock lives beside the folder: readers of the folder never see it
    return hold(serving_dir.with_name(f".{serving_dir.name}{PUBLISH_LOCK}"), "serving publish", wait_s=wait_s,
                refused=f"cannot publish under {serving_dir}: another publish did not finish within {wait_s:.0f} s")
