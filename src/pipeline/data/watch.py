"""Has the dataset source changed? A cheap fingerprint of a source, for the watch DAG (asset-triggered retraining).

Nothing is downloaded or parsed: a local folder or ``.zip`` is fingerprinted by its files' names, sizes and
modification times; an ``s3://`` prefix by its objects' keys, sizes and ETags (one listing); ``grouplens:<name>``
by the MD5 that GroupLens publishes beside the zip (a few bytes). Two fingerprints of an unchanged source are
equal; any added, removed, resized, rewritten or touched file changes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import storage
from pipeline.errors import SourceError

ASSET_NAME = "movielens_ratings"  # the Airflow Asset both DAGs name (this package imports no Airflow)
ASSET_URI = "recsys://movielens/ratings"
MAX_DEPTH = 2  # a dataset folder, or a folder holding one dataset sub-folder


def source_fingerprint(source: str, settings) -> dict:
    """``{"source", "kind", "files", "fingerprint"}`` of a dataset source (the same forms as ingest)."""
    if source.startswith("grouplens:"):
        kind, entries = "grouplens", _grouplens(source.split(":", 1)[1], settings)
    elif source.startswith("s3://"):
        kind, entries = "s3", _s3(source, settings)
    else:
        kind, entries = "local", _local(Path(source).expanduser())
    digest = hashlib.sha256(json.dumps(sorted(entries), separators=(",", ":")).encode()).hexdigest()
    return {"source": source, "kind": kind, "files": len(entries), "fingerprint": digest}


def has_changed(current: dict, previous: dict | None) -> bool:
    """True unless ``previous`` (the extra of the asset's last event) recorded the same source and fingerprint;
    a source never seen before counts as changed."""
    if not previous:
        return True
    return (previous.get("source"), previous.get("fingerprint")) != (current["source"], current["fingerprint"])


def _local(path: Path) -> list:
    if not path.exists():
        raise SourceError(f"dataset source {str(path)!r} does not exist")
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    entries = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if (len(relative.parts) > MAX_DEPTH or any(p.startswith(".") for p in relative.parts)
                or not file.is_file()):
            continue
        stat = file.stat()
        entries.append([relative.as_posix(), stat.st_size, stat.st_mtime_ns])
    if not entries:
        raise SourceError(f"dataset source {str(path)!r} holds no files")
    return entries


def _s3(uri: str, settings) -> list:
    bucket, prefix = storage.parse_s3_uri(uri)
    listing_prefix = f"{prefix}/" if prefix else ""
    try:
        pages = storage.s3_client(settings).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=listing_prefix)
        objects = [obj for page in pages for obj in page.get("Contents", [])]
    except Exception as exc:  # botocore raises many types; all mean "cannot read the source"
        raise SourceError(f"cannot list {uri}: {exc}") from exc
    entries = [[o["Key"][len(listing_prefix):], o["Size"], o.get("ETag", "").strip('"')] for o in objects
               if "/" not in o["Key"][len(listing_prefix):] and not o["Key"].endswith("/")]
    if not entries:
        raise SourceError(f"no files under {uri}")
    return entries


def _grouplens(name: str, settings) -> list:
    url = f"{settings.grouplens_url.rstrip('/')}/{name}.zip.md5"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"cannot read {url}: {exc}") from exc
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not match:
        raise SourceError(f"{url} holds no MD5 checksum")
    return [[f"{name}.zip", match.group(0).lower()]]
