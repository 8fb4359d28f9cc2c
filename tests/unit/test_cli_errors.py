"""Issue 10 through the command line: every user error is a documented exit code and one line naming what was
wrong; a bug prints its traceback and says so. Tiny generated data, early stages only (no Spark)."""

import codecs
import json
import os
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from movielens_fixtures import write_csv_variant
from pipeline import cli, errors, storage
from pipeline.config import load_settings
from pipeline.serving import publish as serving

RECSYS = Path(sys.executable).with_name("recsys")


def _recsys(*args, env=None, timeout=120):
    return subprocess.run([str(RECSYS), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("recsys: error:")]


# --- case 2: Params that cannot be NaN, Infinity or too large -------------------------------------------------


@pytest.mark.parametrize("param, named", [
    ("quarantine_threshold=NaN", "quarantine_threshold"),
    ("validation_fraction=NaN", "validation_fraction"),
    ("test_fraction=Infinity", "test_fraction"),
    ("als_reg_params=[NaN]", "als_reg_params"),
    ("seed=99999999999999999999999", "seed"),
    ("als_ranks=[99999999999]", "als_ranks"),
])
def test_a_non_finite_or_too_large_param_exits_2_before_any_work(tmp_path, param, named):
    data = write_csv_variant(tmp_path / "ml-tiny")
    work = tmp_path / "run"
    proc = _recsys("run", "--source", data.folder, "--work-dir", work, "--param", param)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert f"Param {named}" in line
    assert "Traceback" not in proc.stderr
    assert not (work / "ingest").exists()  # refused before any stage ran


def test_every_json_the_project_writes_is_strict(tmp_path):
    path = storage.write_json_atomic(tmp_path / "x.json", {"rmse": float("nan"), "grid": [float("inf"), 0.5]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == \
        {"rmse": None, "grid": [None, 0.5]}


# --- case 4: the documented exit codes instead of tracebacks --------------------------------------------------


def test_a_source_that_is_a_plain_file_exits_3(tmp_path):
    plain = tmp_path / "ratings.txt"
    plain.write_text("1,2,3\n")
    proc = _recsys("run", "--source", plain, "--work-dir", tmp_path / "run", "--stages", "ingest")
    assert proc.returncode == 3, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert str(plain) in line and "is a file" in line
    assert "Traceback" not in proc.stderr


def test_a_stray_carriage_return_in_the_csv_header_exits_4_naming_file_and_line(tmp_path):
    data = write_csv_variant(tmp_path / "ml-cr")
    ratings = data.folder / "ratings.csv"
    ratings.write_bytes(ratings.read_bytes().replace(b"movieId,", b"movieId\r,", 1))
    proc = _recsys("run", "--source", data.folder, "--work-dir", tmp_path / "run", "--stages", "ingest")
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert f"{ratings}: line 1:" in line and "carriage return" in line
    assert "Traceback" not in proc.stderr


@pytest.fixture
def served_home(tmp_path, monkeypatch):
    """RECSYS_HOME with one published set (the tables of the query tests)."""
    from test_query import MOVIES, POPULAR, RECS, _similar

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    serving.publish(load_settings({"RECSYS_HOME": str(tmp_path)}).serving_dir,
                    {"similar_movies": _similar(), "recommendations": RECS, "movies": MOVIES, "popular": POPULAR})
    return tmp_path


def test_a_user_id_beyond_64_bits_is_an_unknown_user(served_home):
    proc = _recsys("recommend", "--user", "99999999999999999999")
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "user 99999999999999999999 has no served recommendations" in line
    assert "Traceback" not in proc.stderr


def test_an_unexpected_exception_prints_the_traceback_and_says_it_is_a_bug(tmp_path, monkeypatch, capsys):
    from pipeline import stages

    def broken(ctx):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(stages.STAGES, "ingest", stages.Stage("ingest", broken, ()))
    assert cli.main(["run", "--work-dir", str(tmp_path / "run"), "--stages", "ingest"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "recsys: internal error (a bug, please report it with the traceback above): ZeroDivisionError" in err


# --- case 6: weaker spots -------------------------------------------------------------------------------------


def _run_early(data_folder: Path, work: Path, *params: str) -> dict:
    args = ["run", "--source", str(data_folder), "--work-dir", str(work), "--stages", "ingest,validate"]
    for p in params:
        args += ["--param", p]
    assert cli.main(args) == 0
    return json.loads((work / "report.json").read_text())


def test_a_utf8_bom_is_stripped(tmp_path):
    data = write_csv_variant(tmp_path / "ml-bom")
    ratings = data.folder / "ratings.csv"
    ratings.write_bytes(codecs.BOM_UTF8 + ratings.read_bytes())
    report = _run_early(data.folder, tmp_path / "run")
    assert report["dataset"]["ratings"] == data.ratings and report["validation"]["success"] is True


def test_unknown_extra_columns_are_dropped_from_clean_tables_and_listed(tmp_path):
    data = write_csv_variant(tmp_path / "ml-extra")
    ratings = data.folder / "ratings.csv"
    lines = ratings.read_text().splitlines()
    ratings.write_text("\n".join([lines[0] + ",comment"] + [line + ",ok" for line in lines[1:]]) + "\n")
    work = tmp_path / "run"
    report = _run_early(data.folder, work)
    assert report["validation"]["dropped_columns"] == {"ratings": ["comment"]}
    assert "comment" not in pq.read_schema(work / "validate" / "ratings.parquet").names


def test_non_integer_and_negative_ids_are_quarantined(tmp_path):
    data = write_csv_variant(tmp_path / "ml-ids", extra_ratings=[("1e15", 2, 3.0, 1_000_000_000),
                                                                 (-4, 2, 3.0, 1_000_000_000),
                                                                 (3, "-2", 3.0, 1_000_000_000)])
    work = tmp_path / "run"
    report = _run_early(data.folder, work, "quarantine_threshold=0.2")
    assert report["validation"]["quarantined_rows"] == 3
    quarantined = pd.read_parquet(work / "validate" / "quarantine" / "ratings.parquet")
    assert sorted(quarantined["_line"]) == [data.ratings - 1, data.ratings, data.ratings + 1]
    clean = pd.read_parquet(work / "validate" / "ratings.parquet")
    assert (clean["user_id"] >= 0).all() and (clean["movie_id"] >= 0).all() and clean["user_id"].max() < 10**6


def test_a_zip_member_that_expands_beyond_the_limits_is_refused(tmp_path, monkeypatch, capsys):
    data = write_csv_variant(tmp_path / "ml-zip")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in data.folder.iterdir():
            zf.write(path, f"ml-zip/{path.name}")
        zf.writestr("ml-zip/padding.bin", b"\0" * (8 * 2**20))  # 8 MiB of zeros: ~1000-fold
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    assert cli.main(["run", "--source", str(bomb), "--work-dir", str(tmp_path / "run"), "--stages", "ingest"]) == 3
    err = capsys.readouterr().err
    assert "padding.bin expands" in err and "not extracted" in err
    assert not list((tmp_path / "home" / "cache").rglob("padding.bin"))

    from pipeline.data import sources

    monkeypatch.setattr(sources, "MAX_UNZIPPED_BYTES", 1000)  # the total size limit too
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in data.folder.iterdir():
            zf.write(path, f"ml-zip/{path.name}")
    assert cli.main(["run", "--source", str(small), "--work-dir", str(tmp_path / "run"), "--stages", "ingest"]) == 3
    assert "beyond the limit of 1000 bytes" in capsys.readouterr().err


def test_leftover_tmp_folders_are_removed_by_the_next_run_of_that_stage(tmp_path):
    data = write_csv_variant(tmp_path / "ml-tmp")
    work = tmp_path / "run"
    for leftover in (".tmp-ingest-0badc0de", ".old-ingest-0badc0de", ".tmp-validate-0badc0de"):
        (work / leftover).mkdir(parents=True)
        (work / leftover / "half.parquet").write_bytes(b"PAR1")
    assert cli.main(["run", "--source", str(data.folder), "--work-dir", str(work), "--stages", "ingest"]) == 0
    assert sorted(p.name for p in work.iterdir() if p.name.startswith((".tmp-", ".old-"))) == \
        [".tmp-validate-0badc0de"]  # validate's is removed when validate runs next


def test_settings_and_logs_never_show_a_password(tmp_path, capsys, caplog):
    uri = "http://alice:s3cr3t@mlflow.example:5000"
    proc = _recsys("settings", env={"MLFLOW_TRACKING_URI": uri, "RECSYS_HOME": str(tmp_path)})
    assert proc.returncode == 0 and "s3cr3t" not in proc.stdout and "alice:***@mlflow.example" in proc.stdout

    import logging

    cli._mask_secrets_filter(record := logging.LogRecord("x", logging.ERROR, __file__, 1, "cannot reach %s", (uri,),
                                                         None))
    assert record.getMessage() == "cannot reach http://alice:***@mlflow.example:5000"


def test_similar_says_when_it_caps_k(served_home):
    proc = _recsys("similar", "--movie", "Toy Story (1995)", "-k", "100000")
    assert proc.returncode == 0, proc.stderr
    assert "recsys: note: the served set keeps 3 similar movies for this movie" in proc.stderr
    assert "not the 100000 asked for" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 + 3


def test_recommend_says_when_genres_filter_the_list(served_home):
    proc = _recsys("recommend", "--user", "1", "-k", "3", "--genres", "Comedy")
    assert proc.returncode == 0, proc.stderr
    assert "2 of them are in Comedy: showing 2, not the 3 asked for" in proc.stderr


def test_an_nfd_title_matches_its_nfc_form(served_home, tmp_path):
    from test_query import MOVIES, POPULAR, RECS, _similar

    movies = MOVIES.copy()
    movies.loc[movies["movie_id"] == 7, "title"] = "Misérables, Les (1995)"
    serving.publish(load_settings().serving_dir,
                    {"similar_movies": _similar(), "recommendations": RECS, "movies": movies, "popular": POPULAR})
    typed = unicodedata.normalize("NFD", "Les Misérables (1995)")
    assert typed != unicodedata.normalize("NFC", typed)
    proc = _recsys("similar", "--movie", typed, "-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["movie_id"] for r in json.loads(proc.stdout)] == [1, 3114]


def test_exit_codes_are_the_documented_ones():
    assert [errors.ConfigError.exit_code, errors.SourceError.exit_code, errors.DataFormatError.exit_code,
            errors.DataValidationError.exit_code, errors.StageError.exit_code, errors.RunLockedError.exit_code,
            errors.ServiceError.exit_code] == [2, 3, 4, 5, 6, 7, 8]
    page = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    for code in range(1, 9):
        assert f"| {code} |" in page, f"exit code {code} is missing from docs/errors.md's table"
