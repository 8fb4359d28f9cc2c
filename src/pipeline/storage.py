"""The one place that owns run folders, atomic writes, manifests, fingerprints and S3 transfers.

A stage writes into a temporary sibling folder and renames it into place when complete, so a crash or a
retry never leaves a half-written output visible under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import ConfigError, SourceError, StageError

MANIFEST = "manifest.json"


def safe_run_id(run_id: str) -> str:
    """A run id usable as a folder name (Airflow run ids hold ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_") or "run"


def new_run_id() -> str:
    return "cli_" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "_" + uuid.uuid4().hex[:6]


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def writable_dir(path: Path, what: str) -> Path:
    """``path`` as a folder this process can write: created if missing, then a probe file written and removed.
    A path that is a file, lies under a file or a read-only or virtual file system (``/proc``), or is not
    writable is a ``ConfigError`` naming ``what`` and the path, before any stage has written anything."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError as exc:
        raise ConfigError(f"{what} {path}: {exc.filename or path} is a file, not a folder") from exc
    except NotADirectoryError as exc:
        raise ConfigError(f"{what} {path}: a part of the path is a file, not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be written here ({exc.strerror or exc}): choose a folder on a "
                          f"writable disk") from exc
    return path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` by rename, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finite_json(value):
    """``value`` with every non-finite float (NaN, Infinity; numpy's too) replaced by None: strict JSON."""
    if isinstance(value, float):  # numpy.float64 is a float
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy scalars
        return finite_json(value.item())
    return value


def strict_json(data, **kwargs) -> str:
    """JSON text that every parser accepts: NaN and Infinity become null (``json.dumps`` writes bare NaN)."""
    kwargs.setdefault("default", str)
    return json.dumps(finite_json(data), allow_nan=False, **kwargs)


def write_json_atomic(path: Path, data) -> Path:
    return write_text_atomic(path, strict_json(data, indent=2, sort_keys=True) + "\n")


def remove_leftovers(parent: Path, name: str) -> list[str]:
    """Remove ``.tmp-<name>-*`` / ``.old-<name>-*`` folders a killed writer of ``parent/name`` left behind.

    Only safe while holding that output's lock (``stages.run_stage`` holds the stage's): no live writer owns them.
    """
    removed = []
    for pattern in (f".tmp-{name}-*", f".old-{name}-*"):
        for leftover in Path(parent).glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    return removed


def write_manifest(folder: Path, stage: str, tables: dict, **extra) -> dict:
    """``manifest.json``: what the stage wrote (rows, schema, fingerprint per table) and when."""
    manifest = {
        "stage": stage,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tables": tables,
        **extra,
    }
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, needed_by: str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise StageError(
            f"stage {needed_by!r} needs the output of stage {Path(folder).name!r} at {folder}, "
            f"which has not completed for this run (no {MANIFEST})"
        )
    return json.loads(path.read_text())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combine_fingerprints(parts: dict[str, str]) -> str:
    """A short fingerprint of several named fingerprints (order-independent in the names)."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}={parts[name]}\n".encode())
    return digest.hexdigest()[:16]


# --- S3 -------------------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match:
        raise SourceError(f"not an s3:// URI: {uri!r}")
    return match.group(1), match.group(2).strip("/")


def s3_client(settings):
    """An S3 client whose credentials come from the environment *now* (boto3's usual chain): a fresh session
    each time, not boto3's process-wide default one, which keeps the keys it first found (a long-lived worker
    would never see rotated credentials)."""
    import boto3  # imported here: most runs never touch S3

    return boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url or None)


def download_s3_prefix(uri: str, dest: Path, settings) -> list[Path]:
    """Copy every object directly under ``s3://bucket/prefix/`` into ``dest`` (atomically); return the files."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(settings)
    listing_prefix = f"{prefix}/" if prefix else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listing_prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    except Exception as exc:  # botocore raises many types; all mean "cannot read the source"
        raise SourceError(f"cannot list {uri}: {exc}") from exc
    keys = [k for k in keys if "/" not in k[len(listing_prefix):] and not k.endswith("/")]
    if not keys:
        raise SourceError(f"no files under {uri}")
    with atomic_dir(Path(dest)) as tmp:
        for key in keys:
            try:
                client.download_file(bucket, key, str(tmp / key.rsplit("/", 1)[-1]))
            except Exception as exc:
                raise SourceError(f"cannot download s3://{bucket}/{key}: {exc}") from exc
    return sorted(Path(dest).iterdir())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
