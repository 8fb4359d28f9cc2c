"""The command line: Params listing, stage selection, and bad input -> message on stderr + non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

from movielens_fixtures import write_csv_variant
from pipeline import cli
from pipeline.params import PARAMS


def test_params_lists_every_param_with_default_and_description(capsys):
    assert cli.main(["params", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert set(listed) == {p.name for p in PARAMS}
    assert listed["seed"]["default"] == 42 and listed["seed"]["description"]


def test_unknown_stage_and_unknown_param_are_errors(tmp_path, capsys):
    assert cli.main(["run", "--work-dir", str(tmp_path), "--stages", "ingest,trian"]) == 2
    assert "unknown stages ['trian']" in capsys.readouterr().err
    assert cli.main(["run", "--work-dir", str(tmp_path), "--param", "sed=1"]) == 2
    assert "unknown Params ['sed']" in capsys.readouterr().err


def test_ingest_and_validate_write_the_report_sections(tmp_path):
    data = write_csv_variant(tmp_path / "ml-tiny")
    work = tmp_path / "run"
    assert cli.main(["run", "--source", str(data.folder), "--work-dir", str(work),
                     "--stages", "ingest,validate"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert report["source"] == str(data.folder)
    assert report["dataset"]["ratings"] == data.ratings and report["dataset"]["users"] == data.users
    assert report["validation"]["success"] is True
    assert Path(report["validation"]["data_docs"]).is_absolute()
    assert set(report["timings_s"]) == {"ingest", "validate"}
    assert "split" not in report  # sections of stages not run are absent


def test_a_later_stage_without_its_inputs_says_which_stage_is_missing(tmp_path, capsys):
    assert cli.main(["run", "--work-dir", str(tmp_path / "empty"), "--stages", "validate"]) == 6
    assert "needs the output of stage 'ingest'" in capsys.readouterr().err


def test_bad_data_exits_non_zero_naming_file_and_expectation(tmp_path):
    """Through the installed console script, as a user would run it."""
    data = write_csv_variant(tmp_path / "ml-bad", extra_ratings=[(1, 2, 9.0, 1_000_000_000)])
    recsys = Path(sys.executable).with_name("recsys")
    proc = subprocess.run([str(recsys), "run", "--source", str(data.folder), "--work-dir", str(tmp_path / "run"),
                           "--stages", "ingest,validate"], capture_output=True, text=True)
    assert proc.returncode == 5
    assert "recsys: error: validation stopped the run" in proc.stderr
    assert "ratings.csv" in proc.stderr and "expect_column_values_to_be_between" in proc.stderr
    assert (tmp_path / "run" / "validate" / "quarantine" / "ratings.parquet").exists()
