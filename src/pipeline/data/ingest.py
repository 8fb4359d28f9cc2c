"""Stage ``ingest``: fetch a MovieLens variant, detect its format and normalise it to the common schema.

Sources (``pipeline.data.sources``): ``grouplens:<name>``, a local folder or .zip, or ``s3://bucket/prefix``.
Output: one parquet file per table plus ``manifest.json``.
Parse failures (undecodable bytes, a row with the wrong number of fields, an empty file) stop here, naming
the file and line, and so do header names the pipeline could misread (a name twice, a name starting with
``_``). Everything that parses goes on to validation, bad values included, so that row-level problems can be
quarantined there with their reason; each row keeps ``_line``, the line of the file it starts on, and ``_raw``,
its text as it is there. Only decimal ASCII text is a number. Which names and numbers, and why:
``docs/adr/0063-input-columns-numbers-and-row-text.md``.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.formats import (
    DERIVED,
    GENRES_100K,
    HALF_STARS,
    RESERVED_PREFIX,
    SCHEMAS,
    Format,
    TableFile,
    detect_format,
)
from pipeline.data.sources import VARIANT_NAME, resolve_source
from pipeline.errors import DataFormatError, SourceError

log = logging.getLogger(__name__)

# --- reading one file -------------------------------------------------------------------------------------


def _decode(data: bytes, path: Path, encodings: tuple[str, ...]) -> bytes:
    """The file's bytes as UTF-8 (transcoded when the variant allows Latin-1); bad bytes name their line."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as exc:
        if "latin-1" in encodings:
            return data.decode("latin-1").encode("utf-8")
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(
            f"{path}: line {line}: bytes {data[exc.start:exc.start + 4]!r} are not valid UTF-8 "
            f"({exc.reason}); MovieLens CSV files are UTF-8"
        ) from exc


def _split_line(line: str, delimiter: str, quoted: bool) -> list[str]:
    if quoted:
        try:
            return next(csv.reader([line], delimiter=delimiter), [])
        except csv.Error:  # e.g. a stray CR inside a field: not a row of the expected shape
            return [line]
    return line.split(delimiter)


def _first_bad_row(text: str, delimiter: str, quoted: bool, ncols: int, first_line: int) -> tuple[int, str, int]:
    """The first row of ``text`` without ``ncols`` fields: the line it starts on, its text and its field count
    (line -1 if none). LF, CRLF or a lone CR ends a line; a quoted field may hold line ends."""
    stream = io.StringIO(text, newline="")
    if quoted:
        reader = csv.reader(stream, delimiter=delimiter)
        before = 0
        for fields in reader:
            if fields and len(fields) != ncols:
                return first_line + before, delimiter.join(fields), len(fields)
            before = reader.line_num
        return -1, "", ncols
    for offset, line in enumerate(stream):
        line = line.rstrip("\r\n")
        if line and len(line.split(delimiter)) != ncols:
            return first_line + offset, line, len(line.split(delimiter))
    return -1, "", ncols


def _check_header(path: Path, names: list[str], spec: TableFile) -> None:
    """Refuse a header the pipeline could misread: a name twice, a name of the pipeline's own columns, or a common
    column's name in place of the file column it is made from (which of the two is meant cannot be known)."""
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DataFormatError(f"{path}: line 1: column {name!r} appears twice in the header: which of the two "
                                  "holds the data cannot be known")
        if name.startswith(RESERVED_PREFIX):
            raise DataFormatError(f"{path}: line 1: column {name!r}: names starting with {RESERVED_PREFIX!r} are "
                                  "the pipeline's own columns (such as _line and _raw): rename or remove it")
    made_from = {common: column for column, common in spec.rename.items()}
    for name in names:
        column = made_from.get(name)
        if column is not None and name not in spec.rename and column not in names:
            raise DataFormatError(f"{path}: line 1: column {name!r}: this format names it {column!r}, which the "
                                  f"header lacks: rename {name!r} to {column!r} if it holds the {name} values")


def _shadowing_columns(names: list[str], spec: TableFile) -> list[dict]:
    """File columns named like a common column that the pipeline makes from another column: never used.

    ``[{"column": ..., "reason": ...}]``; ``userId`` makes ``user_id``, so a file's own ``user_id`` would replace
    it, and the title makes ``year``."""
    made_from = {common: column for column, common in spec.rename.items()}
    shadowing = []
    for name in names:
        if name in SCHEMAS[spec.table] and name not in spec.rename:
            origin = f"the column {made_from[name]!r}" if name in made_from else DERIVED[(spec.table, name)]
            shadowing.append({"column": name, "reason": f"the pipeline makes its {name!r} column from {origin}; "
                                                         "a file column of that name is never used"})
    return shadowing


_CHUNK = 1 << 24  # bytes compared at once when looking for line ends: bounds the mask's memory


def _positions(buf: np.ndarray, byte: int) -> np.ndarray:
    found = [np.flatnonzero(buf[i:i + _CHUNK] == byte) + i for i in range(0, len(buf), _CHUNK)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _physical_lines(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The offset where each line of ``data`` starts, and whether it holds anything. LF, CRLF or a lone CR ends
    a line, as for the CSV reader, which skips empty lines."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = content_ends = _positions(buf, 10)
    if b"\r" in data:
        cr = _positions(buf, 13)
        before_lf = np.isin(cr + 1, ends)
        ends = np.union1d(ends, cr[~before_lf])
        content_ends = ends - np.isin(ends - 1, cr[before_lf])
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((content_ends, [len(buf)]))
    return starts, stops > starts


def _quoted_row_lines(text: str, delimiter: str) -> np.ndarray:
    """The line each non-empty row of ``text`` starts on, read as a CSV reader reads quoted fields that hold line
    ends (the slow way, for files that have such fields)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines, before = [], 0
    for row in reader:
        if row:
            lines.append(before + 1)
        before = reader.line_num
    return np.array(lines, dtype=np.int64)


def _row_lines(path: Path, data: bytes, spec: TableFile, skip: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The line each of the ``rows`` rows read from ``data`` starts on (the header's ``skip`` lines left out), and
    the offset where each line starts.

    Rows that each take one line are the non-empty lines; only where a quoted field holds a line end (there
    are fewer rows than non-empty lines) are the rows read again, to find their first lines."""
    starts, filled = _physical_lines(data)
    lines = np.flatnonzero(filled) + 1
    lines = lines[lines > skip]
    if len(lines) != rows and spec.quoted:
        try:
            lines = _quoted_row_lines(data.decode("utf-8"), spec.delimiter)[skip:]
        except csv.Error as exc:
            raise DataFormatError(f"{path}: its rows cannot be told apart ({exc})") from exc
    if len(lines) != rows:
        raise DataFormatError(f"{path}: {rows} rows were read from {len(lines)} lines that start a row: the line "
                              "each row starts on cannot be told; check the file's quoting and line ends")
    return lines, starts


def _row_text(data: bytes, starts: np.ndarray) -> pa.Array:
    """Each row's text as in the file: from where it starts to where the next one starts, line ends trimmed."""
    offsets = np.append(starts, len(data)).astype(np.int64)
    spans = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets), pa.py_buffer(data))
    return pc.utf8_rtrim(spans, characters="\r\n")


def read_table_file(path: Path, spec: TableFile) -> pa.Table:
    """Read one file as strings (every column), with ``_line``, the line each row starts on in the file, and
    ``_raw``, the row's text as it is there."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # spreadsheet exports start with one; it is not part of the header
        data = data[len(codecs.BOM_UTF8):]
    if not data.strip():
        raise DataFormatError(f"{path}: the file is empty ({len(data)} bytes): expected a {spec.table} table")
    data = _decode(data, path, spec.encodings)
    delimiter = spec.delimiter
    if len(delimiter) > 1:  # ml-1m/10m '::' -- arrow wants one byte
        data = data.replace(delimiter.encode(), b"\x1f")
        delimiter = "\x1f"
    text_head = data[: data.find(b"\n") if b"\n" in data else len(data)].decode("utf-8").rstrip("\r")
    if spec.header:
        if "\r" in text_head:
            shown = text_head[:120] + ("..." if len(text_head) > 120 else "")  # a file of CR-ended lines: all of it
            raise DataFormatError(f"{path}: line 1: the header {shown!r} holds a carriage return inside it "
                                  "(a stray CR: re-save the file with plain line endings)")
        names = [n.strip() for n in _split_line(text_head, delimiter, spec.quoted)]
        _check_header(path, names, spec)
        skip = 1
    else:
        names = list(spec.columns)
        skip = 0
    quotes = spec.quoted and b'"' in data
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if spec.quoted else False,
                                             newlines_in_values=quotes),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        body = data.decode("utf-8").split("\n", skip)[-1] if skip else data.decode("utf-8")
        line, row, got = _first_bad_row(body, delimiter, spec.quoted, len(names), skip + 1)
        if line > 0:
            shown = row.replace("\x1f", spec.delimiter)
            raise DataFormatError(
                f"{path}: line {line}: expected {len(names)} fields, found {got}: {shown[:120]!r} "
                "(truncated row or stray delimiter)"
            ) from exc
        raise DataFormatError(f"{path}: cannot be parsed as a {spec.delimiter!r}-separated table: {exc}") from exc
    lines, line_starts = _row_lines(path, data, spec, skip, table.num_rows)
    raw = _row_text(data, line_starts[lines - 1])
    if delimiter != spec.delimiter:
        raw = pc.replace_substring(raw, delimiter, spec.delimiter)
    return table.append_column("_line", pa.array(lines, type=pa.int64())).append_column("_raw", raw)


# --- normalising to the common schema --------------------------------------------------------------------

# Decimal ASCII text, a sign and spaces or tabs around allowed: Arrow's cast also reads "0x10" as 16 and "inf" or
# "nan" as floats, and Python's float() reads "1_0" and Arabic-Indic digits.
_INTEGER_TEXT = r"^[ \t]*[+-]?[0-9]{1,18}[ \t]*$"
_NUMBER_TEXT = r"^[ \t]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?[ \t]*$"


def _parse_decimal(col: pa.ChunkedArray, pattern: str, type_: pa.DataType) -> pa.Array:
    """``col`` cast to ``type_`` where its text matches ``pattern``, null elsewhere."""
    matches = pc.fill_null(pc.match_substring_regex(col, pattern), False)
    text = pc.replace_substring_regex(pc.utf8_trim(col, " \t"), r"^\+", "")
    return pc.cast(pc.if_else(matches, text, pa.scalar(None, pa.string())), type_)


def _to_int(col: pa.ChunkedArray) -> pa.Array:
    """int64 from decimal integer text; anything else ("0x10", "1e3", "3.0", "1_000", "١", blank, beyond 18
    digits) becomes null, and validation quarantines the row with its text."""
    if pc.all(pc.ascii_is_decimal(col)).as_py() is not False:  # digits only, the usual case: one cast
        try:
            return pc.cast(col, pa.int64())
        except pa.ArrowInvalid:  # beyond 64 bits
            pass
    return _parse_decimal(col, _INTEGER_TEXT, pa.int64())


def _to_float(col: pa.ChunkedArray) -> pa.Array:
    """float64 from decimal number text (digits, a fraction, an exponent); anything else ("inf", "nan",
    "0x1p1", "1_0", "٣.٥", blank) becomes null, and validation quarantines the row with its text."""
    try:
        values = pc.cast(col, pa.float64())
        if pc.all(pc.is_finite(values)).as_py() is not False:  # cast reads only decimal text, and inf and nan
            return values
    except pa.ArrowInvalid:
        pass
    values = _parse_decimal(col, _NUMBER_TEXT, pa.float64())
    return pc.if_else(pc.is_finite(values), values, pa.scalar(None, pa.float64()))


_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")


def _parse_year(title: str) -> int | None:
    match = _YEAR.search(title or "")
    return int(match.group(1)) if match else None


def normalise(raw: pa.Table, spec: TableFile) -> pa.Table:
    """Rename to the common columns and convert types; a value that is not what its column holds becomes null,
    the row's text kept in ``_raw`` so that validation can quarantine the row with what was actually there."""
    columns: dict[str, pa.Array] = {}
    present = {src: dst for src, dst in spec.rename.items() if src in raw.column_names}
    for src, dst in present.items():
        col = raw.column(src)
        if dst in ("user_id", "movie_id", "ts", "tmdb_id"):
            columns[dst] = _to_int(col)
        elif dst == "rating":
            columns[dst] = _to_float(col)
        else:
            columns[dst] = col
    if spec.table == "movies" and "title" in columns:
        titles = columns["title"].to_pylist()
        columns["title"] = pa.array([t.strip() for t in titles], type=pa.string())
        columns["year"] = pa.array([_parse_year(t) for t in titles], type=pa.int64())
        if "genres" in columns:
            columns["genres"] = pa.array(
                [[] if g in ("", "(no genres listed)") else g.split("|") for g in columns["genres"].to_pylist()],
                type=pa.list_(pa.string()),
            )
        elif all(g in raw.column_names for g in GENRES_100K):
            flags = np.column_stack([np.asarray(raw.column(g).to_pylist()) == "1" for g in GENRES_100K])
            columns["genres"] = pa.array(
                [[g for g, on in zip(GENRES_100K, row) if on and g != "unknown"] for row in flags],
                type=pa.list_(pa.string()),
            )
    # keep columns the variant does not know about (a wrong delimiter shows up as one odd column)
    for name in raw.column_names:
        if name not in spec.rename and name not in spec.columns and name not in ("_line", "_raw"):
            columns[name] = raw.column(name)
    columns["_line"] = raw.column("_line")
    columns["_raw"] = raw.column("_raw")
    return pa.table(columns)


# --- the stage --------------------------------------------------------------------------------------------


def ingest_movielens(source: str, out_dir: Path, settings) -> dict:
    """Read the dataset at ``source`` and write ``<table>.parquet`` + ``manifest.json`` into ``out_dir``."""
    folder, name = resolve_source(source, settings)
    files = {p.name for p in folder.iterdir() if p.is_file()}
    fmt: Format = detect_format(files)
    variant = name if VARIANT_NAME.match(name) else f"movielens-{fmt.name}"
    tables, counts, dropped = {}, {}, {}
    users = 0  # stays 0 when ratings has no user_id column (a wrong delimiter): validation names the problem
    with storage.atomic_dir(Path(out_dir)) as tmp:
        for spec in fmt.files:
            path = folder / spec.filename
            if not path.exists():
                if spec.required:
                    raise SourceError(f"{folder}: {spec.filename} is missing ({fmt.name} format needs it)")
                continue
            raw = read_table_file(path, spec)
            shadowing = _shadowing_columns(raw.column_names, spec)
            for column in shadowing:
                log.warning("%s: column %r dropped: %s", path, column["column"], column["reason"])
            table = normalise(raw.drop_columns([c["column"] for c in shadowing]), spec)
            out = tmp / f"{spec.table}.parquet"
            pq.write_table(table, out)
            counts[spec.table] = table.num_rows
            if spec.table == "ratings" and "user_id" in table.column_names:
                users = pc.count_distinct(table.column("user_id")).as_py()
            tables[spec.table] = {
                "rows": table.num_rows,
                "path": str(Path(out_dir) / out.name),
                "source_file": str(path),
                "sha256": storage.file_sha256(path),
                "columns": table.column_names,
            }
            if shadowing:
                tables[spec.table]["dropped_columns"] = dropped[spec.table] = shadowing
            log.info("ingested %s: %d rows from %s", spec.table, table.num_rows, path)
        fingerprint = storage.combine_fingerprints({t: info["sha256"] for t, info in tables.items()})
        dataset = {
            "variant": variant,
            "format": fmt.name,
            "rating_values": "halves" if fmt.rating_values == HALF_STARS else "whole",
            "ratings": counts["ratings"],
            "users": users,
            "movies": counts["movies"],
            "tags": counts.get("tags"),
            "fingerprint": fingerprint,
        }
        if dropped:
            dataset["dropped_columns"] = dropped
        storage.write_manifest(tmp, "ingest", tables, source=source, dataset=dataset,
                               rating_values=list(fmt.rating_values))
    return {"source": source, "dataset": dataset}
