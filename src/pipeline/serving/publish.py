"""What serving reads: versioned sets of tables under ``<data_root>/serving/``, switched by one pointer.

    serving/
      current -> versions/<fingerprint>      a symlink, replaced atomically (os.replace of a temp link)
      history.json                           the kept fingerprints, oldest first (what pruning keeps)
      versions/<fingerprint>/
        similar_movies.parquet recommendations.parquet movies.parquet popular.parquet manifest.json

A version folder is written completely (``storage.atomic_dir``) before the pointer moves, so a reader that
resolves ``current`` once sees one whole set, never half of one. The fingerprint hashes the tables' content
(Arrow IPC bytes of each canonical table, see ``table_fingerprint``), not the files' bytes or the manifest:
publishing the same tables again changes nothing on disk and reports ``published: false``.

Publish reads each version back (manifest, and every table's columns, types and rows decoded) before the
pointer moves to it; a version found damaged is written again. Reading, and those checks, are
``serving.served``'s.

With S3 configured the version is uploaded to ``s3://<bucket>/<prefix>/serving/versions/<fp>/`` and then the
small ``.../serving/CURRENT`` object is written last, so S3 readers switch atomically as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import locks, storage
from pipeline.errors import PublishError, StageError
from pipeline.serving.served import CURRENT, VERSIONS, current_target, verify_version

log = logging.getLogger(__name__)

HISTORY = "history.json"
S3_CURRENT = "CURRENT"
KEEP_VERSIONS = 3
TABLES = ("similar_movies", "recommendations", "movies", "popular")
# Row order of the canonical tables (order-independent fingerprints; row groups sorted for filtered reads).
SORT_KEYS = {
    "similar_movies": ["metric", "movie_id", "rank"],
    "recommendations": ["user_id", "rank"],
    "movies": ["movie_id"],
}
ROW_GROUP_SIZE = 64 * 1024


# --- canonical tables and fingerprints ---------------------------------------------------------------------


def canonical_table(data: pd.DataFrame | pa.Table | Path | str, name: str = "") -> pa.Table:
    """One Arrow table per content: internal ('_') columns and schema metadata dropped, dictionaries decoded,
    one chunk, rows sorted by the table's key columns (``SORT_KEYS``) when it has them."""
    if isinstance(data, (str, Path)):
        table = pq.read_table(data)
    elif isinstance(data, pd.DataFrame):
        table = pa.Table.from_pandas(data, preserve_index=False)
    else:
        table = data
    table = table.select([c for c in table.column_names if not c.startswith("_")])
    fields, columns = [], []
    for f, column in zip(table.schema, table.columns):
        if pa.types.is_dictionary(f.type):
            column = column.cast(f.type.value_type)
            f = pa.field(f.name, f.type.value_type, f.nullable)
        fields.append(pa.field(f.name, f.type, f.nullable))
        columns.append(column)
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields)).combine_chunks()
    keys = SORT_KEYS.get(name, [])
    if keys and all(k in table.column_names for k in keys):
        table = table.sort_by([(k, "ascending") for k in keys]).combine_chunks()
    return table


def table_fingerprint(table: pa.Table) -> str:
    """sha256 of the Arrow IPC stream of a canonical table: same columns, types and rows -> same hash."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def write_table(data: pd.DataFrame | pa.Table, path: Path, name: str | None = None) -> Path:
    """Parquet with fixed settings, so the same canonical table gives the same bytes."""
    table = data if isinstance(data, pa.Table) else canonical_table(data, name or Path(path).stem)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_SIZE, write_statistics=True)
    return Path(path)


# --- publishing --------------------------------------------------------------------------------------------


def current_fingerprint(serving_dir: Path) -> str | None:
    """The fingerprint of the published set ``current`` points to, or None when nothing is published."""
    target = current_target(Path(serving_dir))
    return target.name if target is not None else None


def publish(serving_dir: Path, tables: dict, manifest: dict | None = None, settings=None,
            keep: int = KEEP_VERSIONS) -> dict:
    """Publish ``tables`` ({name: DataFrame | Arrow table | parquet path}) as the served set.

    Writes ``versions/<fingerprint>/`` completely, then switches ``current`` to it; a set whose content
    equals the current one is left untouched (``published: false``). Keeps the ``keep`` newest versions.
    With ``settings.s3_bucket`` set, uploads the version and then the ``CURRENT`` pointer object.
    Returns {"serving_fingerprint", "published", "path", "s3_uri"?}.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: the current version is always kept")
    serving_dir = Path(serving_dir)
    canonical = {name: canonical_table(data, name) for name, data in sorted(tables.items())}
    parts = {name: table_fingerprint(table) for name, table in canonical.items()}
    fingerprint = storage.combine_fingerprints(parts)
    version = serving_dir / VERSIONS / fingerprint
    result = {"serving_fingerprint": fingerprint, "published": False, "path": str(version)}
    entries = {name: {"rows": table.num_rows, "schema": {f.name: str(f.type) for f in table.schema},
                      "fingerprint": parts[name]} for name, table in canonical.items()}

    serving_dir.mkdir(parents=True, exist_ok=True)
    with locks.publish_lock(serving_dir):  # one publisher at a time, whichever work dir it runs from
        newer = _newer_champion(_current_manifest(serving_dir).get("published_from"), manifest)
        if newer:
            log.warning("serving: not publishing %s: %s", fingerprint, newer)
            return {**result, "superseded": newer}
        link = serving_dir / CURRENT
        if link.is_dir() and not link.is_symlink():
            raise StageError(f"{link} is a folder, not the link publish switches to a version: move it away and "
                             f"publish again; nothing was published")
        unchanged = current_fingerprint(serving_dir) == fingerprint
        reusable = (version / storage.MANIFEST).exists()  # an earlier, still kept version is reused as is ...
        if reusable:
            try:
                verify_version(version, entries)
            except StageError as exc:  # ... unless it was damaged since: then it is written again
                log.warning("serving: writing version %s again: %s", fingerprint, exc)
                reusable = unchanged = False
        if unchanged:
            log.info("serving: %s is already the current set under %s; nothing to publish", fingerprint,
                     serving_dir)
        elif not reusable:
            with storage.atomic_dir(version) as tmp:
                for name, table in canonical.items():
                    write_table(table, tmp / f"{name}.parquet")
                storage.write_manifest(tmp, "serving", entries, serving_fingerprint=fingerprint,
                                       published_from=manifest or {})
                try:  # read back before anything points at it: a failure removes it and moves no pointer
                    verify_version(tmp, entries, shown_as=version)
                except StageError as exc:
                    raise StageError(f"serving: the set just written does not read back, so {link} was left "
                                     f"as it was: {exc}") from exc
        # S3 first: if the bucket fails, neither pointer has moved (the local one switches last)
        if settings is not None and getattr(settings, "s3_bucket", None):
            result.update(_publish_s3(version, fingerprint, settings, keep, manifest or {}))
        if not unchanged:
            _switch_current(serving_dir, version)
            _prune_versions(serving_dir, keep, fingerprint)
            result["published"] = True
            log.info("serving: published %s under %s", fingerprint, serving_dir)
    return result


def _current_manifest(serving_dir: Path) -> dict:
    target = current_target(serving_dir)
    try:
        return storage.read_json(target / storage.MANIFEST) if target is not None else {}
    except (OSError, ValueError):
        return {}


def _newer_champion(current: dict | None, ours: dict | None) -> str | None:
    """Why ``ours`` must not replace the served set ``current``: it was built from an older champion version
    of the same registered model (a slower run must not undo a newer promotion). None: publish."""
    current, ours = current or {}, ours or {}
    if current.get("registered_model") != ours.get("registered_model"):
        return None
    try:
        theirs, mine = int(current["champion_version"]), int(ours["champion_version"])
    except (KeyError, TypeError, ValueError):
        return None
    if theirs > mine:
        return (f"the served set comes from champion v{theirs} of {ours['registered_model']}, newer than v{mine} "
                f"this run built from; the served set was left as it is")
    return None


def _switch_current(serving_dir: Path, version: Path) -> None:
    link = serving_dir / CURRENT
    tmp = serving_dir / f".{CURRENT}-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(version, serving_dir), tmp)
    try:
        os.replace(tmp, link)  # atomic: a reader sees the old target or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prune_versions(serving_dir: Path, keep: int, fingerprint: str) -> None:
    """Delete all but the ``keep`` most recently published versions (``fingerprint``, just published, stays).

    The publishing order lives in ``history.json`` (file times are too coarse to order quick publishes).
    """
    history_file = serving_dir / HISTORY
    history = storage.read_json(history_file) if history_file.exists() else []
    history = [fp for fp in history if fp != fingerprint] + [fingerprint]
    kept = history[-keep:]
    storage.write_json_atomic(history_file, kept)
    for folder in (serving_dir / VERSIONS).iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in kept:
            log.info("serving: removing old version %s", folder.name)
            shutil.rmtree(folder, ignore_errors=True)


def s3_serving_prefix(settings) -> str:
    return "/".join(p for p in (settings.s3_prefix.strip("/"), "serving") if p)


def _publish_s3(version: Path, fingerprint: str, settings, keep: int, about: dict) -> dict:
    bucket, prefix = settings.s3_bucket, s3_serving_prefix(settings)
    version_prefix = f"{prefix}/{VERSIONS}/{fingerprint}/"
    uri = f"s3://{bucket}/{version_prefix}"
    client = storage.s3_client(settings)
    try:
        pointer = _s3_pointer(client, bucket, prefix)
        if pointer.get("serving_fingerprint") == fingerprint:
            return {"s3_uri": uri, "s3_published": False}
        newer = _newer_champion(pointer, about)
        if newer:
            log.warning("serving: not publishing %s to S3: %s", fingerprint, newer)
            return {"s3_uri": uri, "s3_published": False, "s3_superseded": newer}
        files = sorted(p for p in version.iterdir() if p.name != storage.MANIFEST) + [version / storage.MANIFEST]
        for path in files:  # the manifest last: a version prefix with a manifest is complete
            client.upload_file(str(path), bucket, version_prefix + path.name)
        pointer = {"serving_fingerprint": fingerprint, "prefix": version_prefix,
                   **{k: about[k] for k in ("registered_model", "champion_version") if k in about}}
        client.put_object(Bucket=bucket, Key=f"{prefix}/{S3_CURRENT}",
                          Body=(json.dumps(pointer, sort_keys=True) + "\n").encode(),
                          ContentType="application/json")
        _prune_s3_versions(client, bucket, prefix, fingerprint, keep)
    except Exception as exc:  # botocore raises many types; all mean "the bucket did not take it"
        raise PublishError(f"cannot publish the served set {fingerprint} to {uri}: {exc}") from exc
    log.info("serving: published %s to %s", fingerprint, uri)
    return {"s3_uri": uri, "s3_published": True}


def _s3_pointer(client, bucket: str, prefix: str) -> dict:
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{S3_CURRENT}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return {}
    try:
        pointer = json.loads(body)
    except ValueError:
        return {}
    return pointer if isinstance(pointer, dict) else {}


def _prune_s3_versions(client, bucket: str, prefix: str, current: str, keep: int) -> None:
    """Keep the ``keep`` newest version prefixes on S3 (by their manifest's upload time), current included."""
    versions_prefix = f"{prefix}/{VERSIONS}/"
    objects: dict[str, list[str]] = {}
    stamp: dict[str, object] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=versions_prefix):
        for obj in page.get("Contents", []):
            fp, _, name = obj["Key"][len(versions_prefix):].partition("/")
            objects.setdefault(fp, []).append(obj["Key"])
            if name == storage.MANIFEST:
                stamp[fp] = obj["LastModified"]
    others = sorted((fp for fp in stamp if fp != current), key=lambda fp: (stamp[fp], fp), reverse=True)
    doomed = [key for fp in others[keep - 1:] for key in objects[fp]]
    for start in range(0, len(doomed), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in doomed[start:start + 1000]]})
