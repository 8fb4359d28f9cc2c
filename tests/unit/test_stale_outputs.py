"""Issue 10, case 5: a stage re-run on new inputs makes everything downstream stale; a stage refuses to read a
stale upstream output (exit 6, naming both), and the report says which sections are stale."""

import json

import pytest

from movielens_fixtures import RATINGS, write_csv_variant
from pipeline import cli, lineage, stages


def _run(capsys, work, *args) -> tuple[int, str]:
    code = cli.main(["run", "--work-dir", str(work), *map(str, args)])
    return code, capsys.readouterr().err


def _report(work) -> dict:
    return json.loads((work / "report.json").read_text())


def test_downstream_follows_the_pipeline_graph():
    below = lineage.downstream("etl", stages.UPSTREAM, stages.ORDER)
    assert below[:3] == ["olap", "baseline", "als"] and below[-1] == "report"
    assert "ingest" not in below and "validate" not in below
    assert lineage.downstream("report", stages.UPSTREAM, stages.ORDER) == []


def test_a_stage_refuses_an_upstream_output_built_from_replaced_inputs(tmp_path, capsys, caplog):
    first = write_csv_variant(tmp_path / "ml-a")
    second = write_csv_variant(tmp_path / "ml-b", ratings=RATINGS[:-6])  # user 6 gone
    work = tmp_path / "run"
    assert _run(capsys, work, "--source", first.folder, "--stages", "ingest,validate")[0] == 0
    validate_manifest = json.loads((work / "validate" / "manifest.json").read_text())
    assert set(validate_manifest["inputs"]) == {"ingest"}  # what it was built from
    assert validate_manifest["inputs"]["ingest"]["manifest_sha256"]

    code, err = _run(capsys, work, "--source", second.folder, "--stages", "ingest")
    assert code == 0 and "re-running it makes validate stale" in caplog.text
    report = _report(work)
    assert report["dataset"]["ratings"] == second.ratings
    assert "validation" not in report and "stage 'ingest' was re-run" in report["stale"]["validate"]

    code, err = _run(capsys, work, "--stages", "etl")
    assert code == 6
    (line,) = [x for x in err.splitlines() if x.startswith("recsys: error:")]
    assert "stage 'etl' needs the output of stage 'validate', which is stale" in line
    assert "stage 'ingest' was re-run" in line and "--stages validate,etl" in line
    assert not (work / "etl").exists()

    assert _run(capsys, work, "--stages", "validate")[0] == 0  # re-running it clears the condition
    assert "stale" not in _report(work) and _report(work)["validation"]["success"] is True


@pytest.mark.spark
def test_baseline_refuses_the_old_split_after_new_data_was_validated(tmp_path, capsys, spark):
    """The issue's case: ingest,validate re-run on other data in a finished work dir, then --stages baseline."""
    first = write_csv_variant(tmp_path / "ml-a")
    second = write_csv_variant(tmp_path / "ml-b", ratings=RATINGS[:-6])
    work = tmp_path / "run"
    assert _run(capsys, work, "--source", first.folder, "--stages", "ingest,validate,etl")[0] == 0
    old_split = _report(work)["split"]
    assert set(json.loads((work / "etl" / "manifest.json").read_text())["inputs"]) == {"validate"}

    assert _run(capsys, work, "--source", second.folder, "--stages", "ingest,validate")[0] == 0
    report = _report(work)
    assert report["dataset"]["ratings"] == second.ratings and "split" not in report
    assert set(report["stale"]) == {"etl"}

    code, err = _run(capsys, work, "--stages", "baseline")
    assert code == 6
    assert "stage 'baseline' needs the output of stage 'etl', which is stale" in err
    assert "stage 'ingest' was re-run" in err  # the first of the re-run stages above it
    assert not (work / "baseline").exists()

    assert _run(capsys, work, "--stages", "etl")[0] == 0
    report = _report(work)
    assert "stale" not in report and report["split"]["test_fingerprint"] != old_split["test_fingerprint"]
    assert lineage.check_inputs(work, "baseline", stages.UPSTREAM["baseline"])["etl"]["id"]
