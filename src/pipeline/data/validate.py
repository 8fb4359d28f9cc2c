"""Stage ``validate``: run the Great Expectations suites in ``expectations/`` on every ingested table.

Each expectation's ``meta.level`` says what a failure means:
- ``schema`` — checked on the table as read (expected columns); a failure stops the run;
- ``row`` — failing rows are quarantined (kept aside with the reason); the run goes on while the quarantined
  share of each table stays at or under ``quarantine_threshold``, and stops above it;
- ``table`` — checked on the table after quarantine (non-empty, integer ids); a failure stops the run.
Whatever happens, the quarantined rows (each with its reason, its file, ``_line`` and ``_raw``, its text as in
the file), the GX results and the Data Docs are kept in the stage folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ConfigError, DataValidationError

log = logging.getLogger(__name__)

MIN_TS = 788_918_400  # 1995-01-01T00:00:00Z: MovieLens ratings start in 1995
TABLE_ORDER = ("movies", "ratings", "tags", "links")  # movies first: the others reference it


def load_suite_json(table: str, suites_dir: Path | None = None) -> dict:
    """The GX suite of ``table`` from ``suites_dir`` (default: the settings' ``suites_dir``)."""
    if suites_dir is None:
        from pipeline.config import load_settings

        suites_dir = load_settings().suites_dir
    path = Path(suites_dir) / f"{table}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"expectation suite {path}: cannot be read ({exc})") from exc


def _gx_context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        "run",
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "show_how_to_buttons": False,  # GX's tutorial footer: links out, shown over the table
        },
    )
    return context


def _run_suite(context, table: str, level: str, expectations: list, df: pd.DataFrame, parameters: dict,
               labels: tuple[str, str] | None = None):
    """One GX validation of ``df`` against the expectations of one level; results are stored for Data Docs,
    labelled ``labels``: (run name, data asset name), ``run_labels``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    name = f"{table}.{level}"
    run_name, asset_name = labels or run_labels(None, table, f"{table}.csv")
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    if len(suite.expectations) != len(expectations):  # GX drops invalid expectations with only a log line
        raise ConfigError(f"expectation suite {table}.json: {len(expectations) - len(suite.expectations)} "
                          f"expectation(s) of level {level!r} are not valid GX expectations")
    suite = context.suites.add(suite)
    source = context.data_sources.add_or_update_pandas(f"{name}.source")
    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.UTC))
    result = definition.run(
        batch_parameters={"dataframe": df},
        expectation_parameters=parameters,
        result_format={"result_format": "COMPLETE"},
        run_id=run_id,
    )
    # run() stored the result, which is what Data Docs render; a dataframe's batch has no asset name there
    # ("Data asset: None" on the page): stored again with it
    result.meta["batch_spec"] = {**(result.meta.get("batch_spec") or {}), "data_asset_name": asset_name}
    store = context.validation_results_store
    for key in store.list_keys():
        if key.expectation_suite_identifier.name == name and key.run_id.to_tuple() == run_id.to_tuple():
            store.set(key, result)
    return result


def run_labels(run_id: str | None, table: str, file: str) -> tuple[str, str]:
    """(run name, data asset name) of a table's validations in Data Docs: the pipeline run and the table
    (``<run id> <table>``, the table alone without a run id) and the table with the file it was read from."""
    return (f"{run_id} {table}" if run_id else table), f"{table} ({file})"


def _describe(result, table: str, file: str, level: str, df: pd.DataFrame | None = None) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "value_set")}
    info = {
        "table": table,
        "file": file,
        "level": level,
        "expectation": config.type,
        "kwargs": kwargs,
        "what": (config.meta or {}).get("what", ""),
    }
    res = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        info["error"] = result.exception_info.get("exception_message")
    if "unexpected_count" in res:
        info["unexpected_count"] = int(res["unexpected_count"])
        info["sample"] = [_plain(v) for v in (res.get("partial_unexpected_list") or [])[:5]]
        if df is not None and res.get("unexpected_index_list"):
            info["lines"] = [int(x) for x in df.loc[res["unexpected_index_list"][:5], "_line"]]
    else:
        info["observed"] = _plain(res.get("observed_value"))
        if res.get("details"):
            info["details"] = _plain(res["details"])
    return info


def _plain(value):
    """JSON-able copy of a GX value (numpy scalars, NA)."""
    return json.loads(pd.Series([value]).to_json(orient="values"))[0] if not isinstance(value, (dict, list)) \
        else json.loads(json.dumps(value, default=str))


def _message(failures: list[dict], header: str) -> str:
    lines = [header]
    for f in failures:
        where = f"{f['file']}"
        if f.get("lines"):
            where += f" lines {f['lines']}"
        what = f"{f['expectation']}({', '.join(f'{k}={v}' for k, v in f['kwargs'].items())})"
        if "unexpected_count" in f:
            detail = f"{f['unexpected_count']} rows, e.g. {f['sample']}"
        else:
            detail = f"observed {f.get('observed')}" + (f", {f['details']}" if f.get("details") else "")
        if f.get("error"):
            detail += f" [error: {f['error']}]"
        lines.append(f"  - {where}: {what} -- {f['what']}: {detail}")
    return "\n".join(lines)


def _hint(df: pd.DataFrame, expected: list[str]) -> str:
    odd = [c for c in df.columns if not c.startswith("_") and c not in expected]
    if odd and any(sep in c for c in odd for sep in (";", "\t", "|", ":")):
        return f" (found column {odd[0]!r}: wrong delimiter?)"
    return ""


def _raw_text(path: str, positions: np.ndarray) -> list:
    """The ``_raw`` text ingest kept for the rows at ``positions`` (ascending), read from their row groups only:
    the checks run without it, the quarantine needs it for a few rows."""
    file = pq.ParquetFile(path)
    if "_raw" not in file.schema_arrow.names:  # an ingest output written before every row kept its text
        return [None] * len(positions)
    texts, first = [], 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(positions, [first, first + rows])
        if hi > lo:
            column = file.read_row_group(group, columns=["_raw"]).column(0)
            texts += column.take(pa.array(positions[lo:hi] - first)).to_pylist()
        first += rows
    return texts


def _clean_types(df: pd.DataFrame, schema: dict) -> pd.DataFrame:
    """After quarantine no id is null: give integer columns back their integer type."""
    out = df.copy()
    for col, typ in schema.items():
        if col in out and typ == "int64" and out[col].notna().all():
            out[col] = out[col].astype("int64")
    return out


def validate_tables(ingest_dir: Path, out_dir: Path, quarantine_threshold: float, now: int | None = None,
                    suites_dir: Path | None = None, run_id: str | None = None) -> dict:
    """Validate the ingested tables; write clean tables, quarantine and Data Docs into ``out_dir`` (its pages
    name the pipeline run ``run_id`` and the file of each table, and render without a network)."""
    from pipeline.data.data_docs import make_offline
    from pipeline.data.formats import SCHEMAS

    manifest = storage.read_manifest(ingest_dir, "validate")
    now = int(time.time()) if now is None else now
    parameters = {"rating_values": manifest["rating_values"], "min_ts": MIN_TS, "max_ts": now}
    failures: list[dict] = []
    stop: str | None = None
    written: dict = {}
    quarantined_total = 0
    dropped: dict[str, list[str]] = {}
    out_dir = Path(out_dir)
    with storage.atomic_dir(out_dir) as tmp:
        context = _gx_context(tmp / "data_docs")
        known_movies: pd.Series | None = None
        for table in TABLE_ORDER:
            info = manifest["tables"].get(table)
            if info is None:
                continue
            file = info["source_file"]
            labels = run_labels(run_id, table, file)
            columns = [c for c in pq.read_schema(info["path"]).names if c != "_raw"]
            df = pq.read_table(info["path"], columns=columns).to_pandas()
            if known_movies is not None and "movie_id" in df:
                df["_movie_known"] = df["movie_id"].isin(known_movies)
            suite = load_suite_json(table, suites_dir)
            by_level = {lvl: [e for e in suite["expectations"] if e["meta"]["level"] == lvl]
                        for lvl in ("schema", "row", "table")}

            schema_result = _run_suite(context, table, "schema", by_level["schema"], df, parameters, labels)
            schema_failed = [_describe(r, table, file, "schema") for r in schema_result.results if not r.success]
            if schema_failed:
                expected = by_level["schema"][0]["kwargs"]["column_set"]
                schema_failed[0]["what"] += _hint(df, expected)
                failures += schema_failed
                stop = stop or f"{file}: the {table} table does not have the expected columns"
                continue

            row_result = _run_suite(context, table, "row", by_level["row"], df, parameters, labels)
            bad = np.zeros(len(df), dtype=bool)
            # the failing rows only: a list per row costs 72 MB per million rows
            # (docs/adr/0058-quarantine-reasons-for-failing-rows-only.md)
            reasons: dict[int, list[str]] = {}
            for r in row_result.results:
                if r.success:
                    continue
                failures.append(_describe(r, table, file, "row", df))
                idx = (r.result or {}).get("unexpected_index_list") or []
                positions = df.index.get_indexer(idx)
                bad[positions] = True
                label = r.expectation_config.type + "(" + str(
                    r.expectation_config.kwargs.get("column") or r.expectation_config.kwargs.get("column_list")) + ")"
                for p in positions:
                    reasons.setdefault(int(p), []).append(label)
            n_bad = int(bad.sum())
            quarantined_total += n_bad
            if n_bad:
                rejected = df[bad].copy()
                rejected["_raw"] = _raw_text(info["path"], np.flatnonzero(bad))
                rejected["_file"] = file
                rejected["_reason"] = ["; ".join(reasons[int(p)]) for p in np.flatnonzero(bad)]
                (tmp / "quarantine").mkdir(exist_ok=True)
                rejected.to_parquet(tmp / "quarantine" / f"{table}.parquet", index=False)
            share = n_bad / len(df) if len(df) else 0.0
            if share > quarantine_threshold:
                stop = stop or (f"{file}: {n_bad} of {len(df)} {table} rows ({share:.3%}) failed row-level "
                                f"expectations, above quarantine_threshold {quarantine_threshold:.3%}")
                continue

            extra = [c for c in df.columns if not c.startswith("_") and c not in SCHEMAS[table]]
            if extra:  # columns the format does not know: listed in the result, kept out of the clean table
                log.warning("validate: %s: dropping unknown column(s) %s from the clean %s table", file, extra, table)
            # with those ingest dropped (named like a column it makes from another): every column not used
            unused = [c["column"] for c in info.get("dropped_columns", [])] + extra
            if unused:
                dropped[table] = unused
            clean = _clean_types(df[~bad].drop(columns=["_movie_known", *extra], errors="ignore"), SCHEMAS[table])
            table_result = _run_suite(context, table, "table", by_level["table"], clean, parameters, labels)
            table_failed = [_describe(r, table, file, "table") for r in table_result.results if not r.success]
            if table_failed:
                failures += table_failed
                stop = stop or f"{file}: the {table} table failed table-level expectations"
                continue
            if table == "movies":
                known_movies = clean["movie_id"]
            clean_table = pa.Table.from_pandas(clean, preserve_index=False)
            pq.write_table(clean_table, tmp / f"{table}.parquet")
            written[table] = {"rows": len(clean), "quarantined": n_bad, "path": str(out_dir / f"{table}.parquet"),
                              "source_file": file}

        context.build_data_docs()
        make_offline(tmp / "data_docs")  # GX's pages load their scripts and styles from CDNs
        result = {
            "success": stop is None,
            "quarantined_rows": quarantined_total,
            "failed_expectations": failures,
            "data_docs": str(out_dir / "data_docs" / "index.html"),
        }
        if dropped:
            result["dropped_columns"] = dropped
        storage.write_json_atomic(tmp / "result.json", result)
        if stop is None:  # the manifest marks a usable output; a stopped run keeps only evidence
            storage.write_manifest(tmp, "validate", written, dataset=manifest["dataset"],
                                   rating_values=manifest["rating_values"], validation=result)
    if stop is not None:
        raise DataValidationError(_message(failures, f"validation stopped the run: {stop}. "
                                                     f"Details and Data Docs: {out_dir}"))
    return {"validation": result}
