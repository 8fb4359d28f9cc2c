"""Which output each stage of a run folder was built from, so that a changed input makes its downstream stale.

Every completed stage leaves ``<run>/lineage/<stage>.json``: an id for that completion, when it completed, and
the ids of its upstream stages' outputs it read (``inputs``; the same record goes into the stage's
``manifest.json`` when it writes one, with the upstream manifests' ``written_at`` and SHA-256). Running a
stage marks every stage downstream of it ``stale`` and drops their report sections (``report.json`` lists
them under ``stale``); a stage refuses to read an upstream output that is stale or was built from an older
output than its own upstream's current one, naming both (``StageError``, exit 6). Re-run the stale stages
to clear it.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pipeline import storage
from pipeline.errors import StageError

LINEAGE = "lineage"


def _path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / LINEAGE / f"{stage}.json"


def read(run_dir: Path, stage: str) -> dict | None:
    path = _path(run_dir, stage)
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def downstream(stage: str, graph: dict[str, tuple[str, ...]], order: list[str]) -> list[str]:
    """Every stage that reads ``stage``'s output, directly or through others, in pipeline order."""
    below: set[str] = set()
    frontier = {stage}
    while frontier:
        frontier = {s for s, ups in graph.items() if set(ups) & frontier} - below
        below |= frontier
    return [s for s in order if s in below]


def upstream_closure(stage: str, graph: dict[str, tuple[str, ...]]) -> set[str]:
    """Every stage whose output ``stage`` reads, directly or through others."""
    above: set[str] = set()
    frontier = set(graph[stage])
    while frontier:
        above |= frontier
        frontier = {u for s in frontier for u in graph[s]} - above
    return above


def check_inputs(run_dir: Path, stage: str, upstream: tuple[str, ...]) -> dict:
    """The lineage ids of ``stage``'s inputs; StageError if one of them is stale or built from older inputs.

    An upstream without a record (it has not run: the stage's own read of its manifest says so) is skipped.
    """
    inputs = {}
    for name in upstream:
        record = read(run_dir, name)
        if record is None:
            continue
        if record.get("stale"):
            raise StageError(
                f"stage {stage!r} needs the output of stage {name!r}, which is stale: it was built at "
                f"{record['completed_at']}, and {record['stale']}; re-run {name!r} and the stages after it "
                f"(e.g. --stages {name},{stage})")
        for source, used in (record.get("inputs") or {}).items():
            current = read(run_dir, source)
            if current is not None and current["id"] != used["id"]:
                raise StageError(
                    f"stage {stage!r} needs the output of stage {name!r}, built at {record['completed_at']} from "
                    f"the output of {source!r} of {used['completed_at']}; {source!r} was re-run since (its current "
                    f"output is of {current['completed_at']}): re-run {name!r} first (e.g. --stages {name},{stage})")
        inputs[name] = {"id": record["id"], "completed_at": record["completed_at"], **_manifest_stamp(run_dir, name)}
    return inputs


def _manifest_stamp(run_dir: Path, stage: str) -> dict:
    path = Path(run_dir) / stage / storage.MANIFEST
    if not path.exists():
        return {}
    data = path.read_bytes()
    try:
        written_at = storage.read_json(path).get("written_at")
    except ValueError:
        written_at = None
    return {"manifest_written_at": written_at, "manifest_sha256": hashlib.sha256(data).hexdigest()[:16]}


def mark_stale(run_dir: Path, stage: str, below: list[str]) -> list[str]:
    """Mark the records of ``below`` (the stages downstream of ``stage``) stale; return those newly marked."""
    marked = []
    reason = f"stage {stage!r} was re-run at {_now()} after it"
    for name in below:
        record = read(run_dir, name)
        if record is not None and not record.get("stale"):
            record["stale"] = reason
            storage.write_json_atomic(_path(run_dir, name), record)
            marked.append(name)
    return marked


def record(run_dir: Path, stage: str, inputs: dict, started: float) -> dict:
    """Record a completed stage; its ``manifest.json``, when this run of the stage wrote one, gets ``inputs``."""
    entry = {"stage": stage, "id": uuid.uuid4().hex[:12], "completed_at": _now(), "inputs": inputs}
    manifest = Path(run_dir) / stage / storage.MANIFEST
    if manifest.exists() and manifest.stat().st_mtime >= started:
        try:
            data = storage.read_json(manifest)
        except ValueError:
            data = None
        if isinstance(data, dict):
            data["inputs"] = inputs
            storage.write_json_atomic(manifest, data)
    storage.write_json_atomic(_path(run_dir, stage), entry)
    return entry


def stale_stages(run_dir: Path) -> dict[str, str]:
    """{stage: why it is stale} for the run folder (what ``report.json`` shows under ``stale``)."""
    folder = Path(run_dir) / LINEAGE
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = storage.read_json(path)
        except (OSError, ValueError):
            continue
        if entry.get("stale"):
            out[path.stem] = entry["stale"]
    return out
