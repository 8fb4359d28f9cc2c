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
pointer moves to it; a version found damaged is written again. Readers check ``current`` (a link to a folder
directly under ``versions/``) and each table before using it: a broken pointer or a damaged file is an error
naming it (exit 6), never an Arrow or JSON traceback (docs/adr/0064-served-sets-read-back-and-checked.md).

With S3 configured the version is uploaded to ``s3://<bucket>/<prefix>/serving/versions/<fp>/`` and then the
small ``.../serving/CURRENT`` object is written last, so S3 readers switch atomically as well.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import locks, storage
from pipeline.errors import NothingPublishedError, PublishError, StageError

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
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
    target = _current_target(Path(serving_dir))
    return target.name if target is not None else None


def current_version(serving_dir: Path) -> tuple[Path | None, str | None]:
    """(the version folder ``current`` leads to, None), or (None, what is wrong with ``current``), or (None, None)
    when there is no ``current`` at all (nothing published yet).

    ``current`` must be a link (relative as publish writes it, or absolute) to a folder directly under
    ``<serving>/versions``: a dangling link, a loop, a link elsewhere (e.g. into the home a data root was
    copied from) or a plain file or folder in its place is reported, never read."""
    serving_dir = Path(serving_dir)
    link = serving_dir / CURRENT
    if not os.path.lexists(link):
        return None, None
    versions = serving_dir / VERSIONS
    if not link.is_symlink():
        if link.is_dir():
            return None, (f"{link} is a folder, not a link to a version folder under {versions} (publish switches "
                          f"a link: move the folder away)")
        return None, f"{link} is a file, not a link to a version folder under {versions}"
    target = os.readlink(link)
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, f"{link} points to {target}, a loop of links"
        return None, f"{link} points to {target}, which does not exist"
    real = Path(os.path.realpath(link))
    if real.parent != Path(os.path.realpath(versions)) or not real.is_dir():
        return None, f"{link} points to {target}, which is not a version folder under {versions}"
    return real, None


def _current_target(serving_dir: Path) -> Path | None:
    target, _ = current_version(serving_dir)
    return target if target is not None and (target / storage.MANIFEST).exists() else None


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
    target = _current_target(serving_dir)
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


# --- reading -----------------------------------------------------------------------------------------------

# The columns the queries read, by kind: a served table without one of them, or with another kind, is damaged.
QUERY_COLUMNS = {
    "similar_movies": {"movie_id": "integer", "similar_movie_id": "integer", "metric": "string",
                       "rank": "integer", "score": "number"},
    "recommendations": {"user_id": "integer", "rank": "integer", "movie_id": "integer", "score": "number"},
    "movies": {"movie_id": "integer", "title": "string", "genres": "list"},
    "popular": {"movie_id": "integer", "score": "number", "genres": "list"},
}
_KINDS = {  # an all-null column (an empty table from pandas) has Arrow's null type: any kind
    "integer": lambda t: pa.types.is_integer(t) or pa.types.is_null(t),
    "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t),
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
    "list": lambda t: pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_null(t),
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _type_text(arrow_type: pa.DataType | str) -> str:
    """A type as the manifest records it; a list's child is unnamed (Parquet reads "item" back as "element")."""
    return re.sub(r"<(item|element): ", "<", str(arrow_type))


def table_problem(file: Path, expected: dict | None = None, decode: bool = False,
                  queried_as: str | None = None) -> str | None:
    """What is wrong with the served table ``file``, or None: it opens as Parquet, and has the columns, types
    and row count ``expected`` records (a manifest's entry: {"rows", "schema"}); ``decode``: every row group
    is read too (what publish does to what it has just written); ``queried_as``: it has the columns the
    queries read from that table (``QUERY_COLUMNS``)."""
    try:
        parquet = pq.ParquetFile(file)
        schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        if decode:
            decoded = sum(parquet.read_row_group(i).num_rows for i in range(parquet.num_row_groups))
            if decoded != rows:
                return f"its row groups hold {decoded} rows, its footer says {rows}"
    except FileNotFoundError:
        return "is missing"
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"cannot be read as a Parquet table ({_one_line(exc)})"
    expected = expected or {}
    recorded = expected.get("schema")
    if isinstance(recorded, dict):
        found = {f.name: _type_text(f.type) for f in schema}
        recorded = {name: _type_text(text) for name, text in recorded.items()}
        if found != recorded:
            missing = sorted(set(recorded) - set(found))
            extra = sorted(set(found) - set(recorded))
            changed = sorted(n for n in set(found) & set(recorded) if found[n] != recorded[n])
            parts = ([f"lacks {missing}"] if missing else []) + ([f"has unrecorded {extra}"] if extra else []) + [
                f"{n} is {found[n]}, not {recorded[n]}" for n in changed]
            return f"its columns differ from the manifest's: {'; '.join(parts)}"
    if "rows" in expected and expected["rows"] != rows:
        return f"it holds {rows} rows, the manifest says {expected['rows']}"
    return _query_columns_problem(queried_as, schema) if queried_as else None


def _query_columns_problem(name: str, schema: pa.Schema) -> str | None:
    wanted = QUERY_COLUMNS.get(name, {})
    missing = [column for column in wanted if column not in schema.names]
    if missing:
        return f"it lacks the column(s) {missing} the queries read; it has {schema.names}"
    wrong = [f"{column} is {schema.field(column).type}, not {kind}" for column, kind in wanted.items()
             if not _KINDS[kind](schema.field(column).type)]
    return f"wrong column types: {'; '.join(wrong)}" if wrong else None


def verify_version(folder: Path, tables: dict, shown_as: Path | None = None) -> None:
    """Check a version folder against ``tables`` (the manifest entries publish meant to write): its manifest
    reads back with those entries, and each table decodes with the recorded columns, types and rows.
    StageError naming the file (as under ``shown_as``, the folder's final name) otherwise."""
    folder = Path(folder)
    shown = Path(shown_as or folder)
    try:
        recorded = json.loads((folder / storage.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{shown / storage.MANIFEST}: does not read back ({_one_line(exc)})") from exc
    if not isinstance(recorded, dict) or recorded.get("tables") != storage.finite_json(tables):
        raise StageError(f"{shown / storage.MANIFEST}: does not read back as written (its tables differ)")
    for name, expected in tables.items():
        problem = table_problem(folder / f"{name}.parquet", expected, decode=True)
        if problem:
            raise StageError(f"{shown / f'{name}.parquet'}: table {name!r} does not read back as written: {problem}")


@dataclass
class ServedTables:
    """One published set, resolved once: every table read comes from the same version folder.

    Each table is checked on first use (it opens as Parquet, with the manifest's columns and rows and the
    columns the queries read); a damaged file is a StageError naming it."""

    path: Path
    fingerprint: str
    manifest: dict
    _cache: dict = field(default_factory=dict, repr=False)
    _checked: set = field(default_factory=set, repr=False)

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").exists()

    def damaged(self, file: Path, what: str) -> StageError:
        return StageError(f"the served set is damaged: {file}: {what}; re-run the recommend stage (or the "
                          f"pipeline) to publish it again")

    def _check(self, name: str, file: Path) -> None:
        if name in self._checked:
            return
        listed = self.manifest["tables"].get(name)
        if not file.exists():
            if listed is not None:
                raise self.damaged(file, "is missing, though the manifest lists it")
            raise NothingPublishedError(
                f"the served set {self.fingerprint} at {self.path} has no {name!r} table; "
                f"it has {', '.join(sorted(p.stem for p in self.path.glob('*.parquet')))}"
            )
        problem = table_problem(file, listed, queried_as=name)
        if problem:
            raise self.damaged(file, problem)
        self._checked.add(name)

    def table(self, name: str, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
        """A served table as pandas; whole tables are cached, filtered reads go to the file each time."""
        file = self.path / f"{name}.parquet"
        self._check(name, file)
        try:
            if columns is None and filters is None:
                if name not in self._cache:
                    self._cache[name] = pq.read_table(file).to_pandas()
                return self._cache[name]
            return pq.read_table(file, columns=columns, filters=filters).to_pandas()
        except (pa.ArrowException, OSError, ValueError) as exc:  # a page damaged behind an intact footer
            raise self.damaged(file, f"cannot be read ({_one_line(exc)})") from exc

    @property
    def similar_movies(self) -> pd.DataFrame:
        return self.table("similar_movies")

    @property
    def recommendations(self) -> pd.DataFrame:
        return self.table("recommendations")

    @property
    def movies(self) -> pd.DataFrame:
        return self.table("movies")

    @property
    def popular(self) -> pd.DataFrame:
        return self.table("popular")


def open_served(serving_dir: Path) -> ServedTables:
    """The current published set: NothingPublishedError when there is none or ``current`` does not lead to
    one (saying what is wrong with it); StageError naming the file when its manifest is missing or damaged."""
    serving_dir = Path(serving_dir)
    target, problem = current_version(serving_dir)
    if target is None and problem is None:
        raise NothingPublishedError(
            f"nothing has been published yet under {serving_dir}; run the pipeline first "
            f"(recsys run, or the DAG) so that its recommend stage publishes the served tables"
        )
    if target is None:
        raise NothingPublishedError(f"{problem}; nothing can be served until the next publish (the recommend "
                                    f"stage of recsys run or the DAG) switches it to a complete version")
    served = ServedTables(path=target, fingerprint=target.name, manifest={})
    manifest_file = target / storage.MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise served.damaged(manifest_file, "is missing") from None
    except (OSError, ValueError) as exc:
        raise served.damaged(manifest_file, f"is not readable JSON ({_one_line(exc)})") from exc
    tables = manifest.get("tables") if isinstance(manifest, dict) else None
    if not isinstance(tables, dict) or not all(isinstance(entry, dict) for entry in tables.values()):
        raise served.damaged(manifest_file, "holds no list of tables (an object with 'tables': {name: {rows, "
                                            "schema}})")
    served.manifest = manifest
    return served
