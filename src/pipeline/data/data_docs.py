"""Great Expectations Data Docs that render without a network.

GX's pages load Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega from CDNs, and its index page builds
its tables in the browser with bootstrap-table: air-gapped, the index is blank. GX does not ship those files
and its templates cannot be overridden (its own template loader comes first), so the built pages are rewritten
(``make_offline``): every CDN tag and every script goes, the index's tables are written out as plain HTML
tables from the rows GX embedded for bootstrap-table, the logo is GX's local copy, and a small inline stylesheet
lays the pages out. Decision: docs/adr/0073-mlflow-and-data-docs-as-browsed.md.
"""

from __future__ import annotations

import ast
import html
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# in the cells of the index's tables, the fields GX fills with plain text (the others are GX's own HTML)
PLAIN_FIELDS = ("run_time", "run_name", "asset_name", "expectation_suite_name", "batch_identifier")

_REMOTE = r"""["']https?://[^"']*["']"""
_REMOTE_SCRIPT = re.compile(rf"<script\b[^>]*\bsrc={_REMOTE}[^>]*>\s*</script>\s*", re.I)
_REMOTE_LINK = re.compile(rf"<link\b[^>]*\bhref={_REMOTE}[^>]*>\s*", re.I)
_REMOTE_IMG = re.compile(r"""(<img\b[^>]*\bsrc=)["']https?://[^"']*/(logo-long\.png)[^"']*["']""", re.I)
_REMOTE_CSS_URL = re.compile(r"""url\(\s*["']?https?://[^)]*\)""", re.I)
_LOCAL_STATIC = re.compile(r"""\b(href|src)=["'](?:\./|(?:\.\./)+)static/([^"']+)["']""", re.I)
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>\s*", re.I | re.S)
_EMPTY_TABLE = re.compile(r'<table\s+id="(?P<id>[^"]+)"(?P<attrs>[^>]*)>\s*</table>', re.I)
_TABLE_CALL = (r"\$\('#{id}'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{{\s*columns:\s*(?P<columns>.*?),\s*"
               r"data:\s*(?P<data>.*?),\s*toolbar:\s*'#{id}-toolbar'\s*\}},\s*(?P<options>\{{.*?\}})\s*\)\s*\);")

OFFLINE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; font-size: 15px;
  line-height: 1.45; margin: 0; padding-bottom: 40px; color: #212529; }
a { color: #0062cc; }
.row { display: flex; flex-wrap: wrap; }
[class*="col-"] { box-sizing: border-box; flex: 1 1 100%; min-width: 0; padding: 0 10px; }
@media (min-width: 768px) {
  .col-md-2 { flex: 0 0 16.66%; } .col-md-3 { flex: 0 0 25%; } .col-md-4 { flex: 0 0 33.33%; }
  .col-md-6 { flex: 0 0 50%; } .col-md-8 { flex: 0 0 66.66%; } .col-md-9 { flex: 0 0 75%; }
  .col-md-10 { flex: 0 0 83.33%; } .col-md-12, .col-12 { flex: 0 0 100%; }
}
.container-fluid { box-sizing: border-box; padding: 16px 24px; }
.navbar { display: flex; align-items: center; padding: 8px 24px; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; margin: 8px 0 16px; width: 100%; }
th, td { border: 1px solid #dee2e6; padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: #f1f3f5; }
.alert { padding: 10px 14px; margin-bottom: 12px; border-radius: 4px; background: #e2e3e5; }
.alert-danger { background: #f8d7da; } .alert-success { background: #d4edda; }
.card { border: 1px solid #dee2e6; border-radius: 4px; margin-bottom: 12px; }
.card-header { padding: 6px 10px; background: #f1f3f5; border-bottom: 1px solid #dee2e6; }
.card-body { padding: 8px 10px; }
.nav, .breadcrumb { list-style: none; display: flex; flex-wrap: wrap; gap: 14px; padding: 0; margin: 6px 0; }
.breadcrumb-item + .breadcrumb-item::before { content: "/ "; color: #6c757d; }
.tab-pane { margin-top: 16px; }
.text-success { color: #28a745; } .text-danger { color: #dc3545; } .text-warning { color: #b8860b; }
.badge { display: inline-block; padding: 1px 6px; border-radius: 8px; background: #e9ecef; font-size: 85%; }
.modal, .d-none, .sr-only, [onclick], .card:has([onclick]), [data-toggle="collapse"] { display: none !important; }
.collapse { display: block !important; }
i.fas::before, i.fa::before, i.far::before { font-style: normal; }
.fa-check-circle::before, .fa-check::before { content: "\\2714"; }
.fa-times::before, .fa-times-circle::before { content: "\\2716"; }
.fa-exclamation-triangle::before { content: "\\26A0"; }
.fa-info-circle::before { content: "\\2139"; }
"""


def make_offline(docs_dir: Path) -> list[Path]:
    """Rewrite every page under ``docs_dir`` to render without a network; the pages rewritten."""
    docs_dir = Path(docs_dir)
    pages = sorted(docs_dir.rglob("*.html"))
    for page in pages:
        static = Path(os.path.relpath(docs_dir / "static", page.parent)).as_posix()
        text = offline_html(page.read_text(encoding="utf-8"), f"{static}/images/logo-long.png")
        # GX links the favicon of a validation page one folder short (validations/static/...)
        text = _LOCAL_STATIC.sub(rf'\1="{static}/\2"', text)
        page.write_text(text, encoding="utf-8")
    for sheet in docs_dir.rglob("*.css"):  # GX's copy of its styles (the pages inline them): its dark-mode logo
        sheet.write_text(_REMOTE_CSS_URL.sub("none", sheet.read_text(encoding="utf-8")), encoding="utf-8")
    return pages


def offline_html(text: str, local_logo: str = "static/images/logo-long.png") -> str:
    """One Data Docs page without its CDN tags and scripts, its bootstrap-table tables written out, the logo at
    ``local_logo`` and ``OFFLINE_STYLE`` inlined."""
    text = _EMPTY_TABLE.sub(lambda m: _static_table(m, text), text)
    text = _REMOTE_SCRIPT.sub("", text)
    text = _REMOTE_LINK.sub("", text)
    text = _SCRIPT.sub("", text)  # every script left needs jQuery/Bootstrap/Vega: dead without them
    text = _REMOTE_IMG.sub(lambda m: f'{m.group(1)}"{local_logo}"', text)
    text = _REMOTE_CSS_URL.sub("none", text)
    return text.replace("</head>", f"<style>{OFFLINE_STYLE}</style>\n</head>", 1)


def _static_table(match: re.Match, text: str) -> str:
    """The plain HTML table of an empty ``<table>`` GX fills with bootstrap-table, from the columns and rows in
    its script (the table as it was when the script is not found or not read)."""
    table_id = match.group("id")
    call = re.search(_TABLE_CALL.format(id=re.escape(table_id)), text, re.S)
    if call is None:
        log.warning("Data Docs: no bootstrap-table rows found for table %s; it stays empty offline", table_id)
        return match.group(0)
    try:
        columns = ast.literal_eval(call.group("columns"))
        rows = ast.literal_eval(call.group("data"))
        options = ast.literal_eval(call.group("options"))
    except (ValueError, SyntaxError) as exc:
        log.warning("Data Docs: cannot read the rows of table %s (%s); it stays empty offline", table_id, exc)
        return match.group(0)
    rows = _sorted_rows(rows, columns, options)
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = "".join(f"<tr>{_cells(row, columns)}</tr>\n" for row in rows)
    return (f'<table id="{table_id}"{match.group("attrs")}>\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody>\n</table>")


def _sorted_rows(rows: list[dict], columns: list[dict], options: dict) -> list[dict]:
    """The rows in bootstrap-table's initial order: by ``sortName`` (a column's own ``sortName`` key if it has
    one), descending under ``sortOrder`` "desc"."""
    field = options.get("sortName")
    if not field:
        return rows
    column = next((c for c in columns if c.get("field") == field), {})
    key = column.get("sortName", field)
    return sorted(rows, key=lambda row: str(row.get(key, "")) if not isinstance(row.get(key), (int, float))
                  else f"{row[key]:020.6f}", reverse=options.get("sortOrder") == "desc")


def _cells(row: dict, columns: list[dict]) -> str:
    """A row's cells; the first plain-text cell links to the row's page (bootstrap-table made the row
    clickable)."""
    link = row.get("_table_row_link_path")
    cells = []
    for column in columns:
        field = column["field"]
        value = row.get(field, "")
        cell = html.escape(str(value)) if field in PLAIN_FIELDS and "<" not in str(value) else str(value)
        if link and "<" not in cell:
            cell, link = f'<a href="{html.escape(link, quote=True)}">{cell}</a>', None
        cells.append(f"<td>{cell}</td>")
    return "".join(cells)
