"""Reading what serving publishes: the ``current`` pointer, the version folder it leads to, and its tables.

Readers check ``current`` (a link to a folder directly under ``versions/``) and each table before using it: a
broken pointer or a damaged file is an error naming it (exit 6), never an Arrow or JSON traceback. Publish
reads each version back with the same checks (``verify_version``) before the pointer moves to it
(docs/adr/0064-served-sets-read-back-and-checked.md). The layout is described in ``serving.publish``.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import NothingPublishedError, StageError

CURRENT = "current"
VERSIONS = "versions"


# --- the pointer -------------------------------------------------------------------------------------------


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


def current_target(serving_dir: Path) -> Path | None:
    """The version folder ``current`` leads to, when it holds a manifest; None otherwise."""
    target, _ = current_version(serving_dir)
    return target if target is not None and (target / storage.MANIFEST).exists() else None


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
