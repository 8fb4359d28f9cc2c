"""``report.json``: the run's report, assembled from the summaries the stages leave in the run folder.

Each stage writes its summary (the small JSON it returns, what XCom carries) to
``<run>/summaries/<stage>.json``; the report merges them in pipeline order. The DAG and ``recsys run`` build it
with the same function, so they produce the same sections, and no task needs another task's XCom for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import storage

REPORT = "report.json"
SUMMARIES = "summaries"
MERGED_SECTIONS = ("models", "ranking", "skipped")  # sections several stages add to (one key per model/stage)


def write_summary(run_dir: Path, stage: str, summary: dict) -> None:
    storage.write_json_atomic(Path(run_dir) / SUMMARIES / f"{stage}.json", summary)


def clear_summaries(run_dir: Path, stages: list[str] | None = None) -> None:
    """Forget the summaries of ``stages`` (all when None): a fresh run, or outputs about to be rebuilt."""
    folder = Path(run_dir) / SUMMARIES
    if stages is None:
        shutil.rmtree(folder, ignore_errors=True)
        (Path(run_dir) / REPORT).unlink(missing_ok=True)
        return
    for stage in stages:
        (folder / f"{stage}.json").unlink(missing_ok=True)


def read_summaries(run_dir: Path, order: list[str] | None = None) -> list[tuple[str, dict]]:
    """(stage, summary) pairs, in ``order`` (stages not in it afterwards, by name)."""
    folder = Path(run_dir) / SUMMARIES
    found = {p.stem: storage.read_json(p) for p in folder.glob("*.json")} if folder.is_dir() else {}
    rank = {name: i for i, name in enumerate(order or [])}
    return sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def merge(summaries: list[dict]) -> dict:
    """Sections of several summaries: later ones replace a section, except the merged ones and timings."""
    report: dict = {}
    timings: dict = {}
    for summary in summaries:
        for key, value in (summary or {}).items():
            if key == "timings_s":
                timings.update(value)
            elif key in MERGED_SECTIONS:
                report.setdefault(key, {}).update(value)
            else:
                report[key] = value
    report["timings_s"] = timings
    return report


def merged_sections(run_dir: Path, order: list[str] | None = None) -> dict:
    return merge([summary for _, summary in read_summaries(run_dir, order)])


def assemble(ctx, order: list[str]) -> dict:
    """The report of the run ``ctx`` from every summary in its folder (what ``write_report`` writes)."""
    from pipeline import lineage

    report = {"run_id": ctx.run_id, "source": ctx.source, "params": ctx.params.to_dict(),
              **merged_sections(ctx.run_dir, order)}
    stale = lineage.stale_stages(ctx.run_dir)
    if stale:  # outputs built from inputs that were replaced since: their sections are gone until they re-run
        report["stale"] = stale
    return report


def write_report(ctx, order: list[str]) -> dict:
    """``<run>/report.json`` from every summary in the run folder; returns it."""
    report = assemble(ctx, order)
    storage.write_json_atomic(Path(ctx.run_dir) / REPORT, report)
    return report
