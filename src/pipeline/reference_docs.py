"""The reference pages that mirror code: ``docs/params.md`` is generated from ``PARAMS``; ``docs/report.md`` is
written by hand in a fixed shape that ``documented_report`` reads back, so that tests compare it with a real
``report.json`` (``report_drift``).

    recsys params --markdown > docs/params.md
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pipeline.params import PARAMS, SECTIONS, ParamSpec

PARAMS_PAGE = "docs/params.md"
PARAMS_COMMAND = f".venv/bin/recsys params --markdown > {PARAMS_PAGE}"
REPORT_PAGE = "docs/report.md"

_PARAMS_INTRO = f"""\
# Params

Params are the per-run knobs: each run of the pipeline takes its own values, and the ones left out keep the
defaults below. Set them on the Airflow DAG's trigger form (grouped in the sections below), or on the command
line with `recsys run --param NAME=VALUE` (VALUE is JSON: `--param als_ranks=[10,25]`,
`--param autorec_enabled=false`; a bare word is taken as a string). `recsys params` lists them in the terminal
and `recsys params --json` as JSON schemas. A run's `report.json` keeps the values it ran with (its `params`
section). Settings that belong to the deployment rather than to a run (the Spark master, MLflow, S3, the data
root) come from the environment: `recsys settings` prints them.

An unknown name, a value of the wrong type, a value outside the bounds, NaN or Infinity stop the run before it
starts, with a message naming the Param. Array Params take a non-empty list; their bounds apply to each element.

This page is generated from `src/pipeline/params.py`, not edited by hand: after changing a Param, regenerate it
with `{PARAMS_COMMAND}` (a unit test fails while the page and the code differ).
"""


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _type(p: ParamSpec) -> str:
    kind = f"array of {p.item_type}" if p.type == "array" else p.type
    return kind + (" or null" if p.nullable else "")


def _bounds(p: ParamSpec) -> str:
    if p.enum:
        return "one of " + ", ".join(f"`{v}`" for v in p.enum)
    x = "each value" if p.type == "array" else "value"
    if p.minimum is not None and p.maximum is not None:
        return f"{_number(p.minimum)} ≤ {x} ≤ {_number(p.maximum)}"
    if p.minimum is not None:
        return f"{x} ≥ {_number(p.minimum)}"
    if p.maximum is not None:
        return f"{x} ≤ {_number(p.maximum)}"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def params_markdown() -> str:
    """``docs/params.md``: the intro, then one table per section of the trigger form, in the form's order."""
    parts = [_PARAMS_INTRO]
    for section in SECTIONS:
        parts.append(f"\n## {section}\n\n| Param | type | default | bounds | description |\n"
                     "| --- | --- | --- | --- | --- |\n")
        for p in (p for p in PARAMS if p.section == section):
            default = _cell(json.dumps(p.default))
            parts.append(f"| `{p.name}` | {_type(p)} | `{default}` | {_cell(_bounds(p))} | {_cell(p.description)} |\n")
    return "".join(parts)


# docs/report.md, read back: each heading names the objects it documents by their paths in backticks
# (``models.<model>.ranking``: ``<...>`` stands for any key); the table under it has one row per key, the key in
# backticks in the first cell; "optional" in the type cell marks a key only some runs write; an "in" cell with
# names in backticks limits a row to the objects of those names (``models.<model>`` rows to some models).
_PATH = re.compile(r"`([^`]+)`")
_SPLIT = re.compile(r"(?<!\\)\|")
ROOT = "report.json"


@dataclass(frozen=True)
class DocumentedKey:
    optional: bool
    only: frozenset[str] | None  # the names of the objects that have it; None: every object of the path


def documented_report(page: str) -> dict[str, dict[str, DocumentedKey]]:
    """{path: {key: DocumentedKey}} from the page's headings and tables (``report.json`` is the top level)."""
    documented: dict[str, dict[str, DocumentedKey]] = {}
    paths: list[str] = []
    header: list[str] | None = None
    for line in page.splitlines():
        if line.startswith("#"):
            paths, header = _PATH.findall(line) if line.startswith("##") else [], None
            continue
        if not paths or not line.startswith("|"):
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in _SPLIT.split(line.strip().strip("|"))]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        key = re.fullmatch(r"`([^`]+)`", cells[0])
        if not key:
            continue
        row = dict(zip(header, cells))
        names = frozenset(_PATH.findall(row.get("in", "")))
        entry = DocumentedKey("optional" in row.get("type", ""), names or None)
        for path in paths:
            documented.setdefault(path, {})[key.group(1)] = entry
    return documented


def _join(where: str, key: str) -> str:
    return key if where == ROOT else f"{where}.{key}"


def _objects(report: dict, path: str):
    """(concrete path, name, object) for each dict that ``path`` names in ``report``."""
    found = [(ROOT, ROOT, report)]
    if path != ROOT:
        for part in path.split("."):
            wildcard = part.startswith("<") and part.endswith(">")
            found = [(_join(where, name), name, value) for where, _, node in found if isinstance(node, dict)
                     for name, value in node.items() if wildcard or name == part]
    return [(where, name, node) for where, name, node in found if isinstance(node, dict)]


def report_drift(page: str, full: dict, others: tuple[dict, ...] = ()) -> list[str]:
    """What ``page`` and real reports disagree on: a key a report has that the page does not document (any of
    the reports), or a documented key, not optional, that ``full`` (a run of every stage) lacks."""
    documented = documented_report(page)
    problems = []
    for path in documented:  # the page against itself: a heading's object is a key of the table above it
        parent, _, last = path.rpartition(".")
        if path != ROOT and not last.startswith("<") and last not in documented.get(parent or ROOT, {last: None}):
            problems.append(f"{REPORT_PAGE} documents `{path}`, but the table of `{parent or ROOT}` has no `{last}`")
    for path, keys in documented.items():
        for report in (full, *others):
            for where, name, node in _objects(report, path):
                own = {key for key, d in keys.items() if d.only is None or name in d.only}
                problems += [f"`{_join(where, key)}` is in report.json but not documented in {REPORT_PAGE}"
                             for key in sorted(set(node) - own)]
                if report is full:
                    problems += [f"`{_join(where, key)}` is documented in {REPORT_PAGE} but a full run did not write it"
                                 for key in sorted(own - set(node)) if not keys[key].optional]
    return sorted(set(problems))
