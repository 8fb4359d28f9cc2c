"""Hostile command lines, settings and output paths: refused with the documented exit code and one line naming
the argument, key or path, before any stage writes; a failed rerun keeps what the last good run left; a full
disk is the machine's fault (exit 9), not a bug."""

from __future__ import annotations

import errno
import os

import pytest

from hostile.conftest import recsys, recsys_process, tree_digest

# --- refused before any stage runs --------------------------------------------------------------------------

BEFORE_ANY_WORK = [
    pytest.param(["--stages", ""], {}, 2, ["--stages", "names no stage"], id="empty-stages"),
    pytest.param(["--stages", " , "], {}, 2, ["--stages"], id="blank-stages"),
    pytest.param(["--stages", "ingest,promote"], {}, 2, ["promote"], id="unknown-stage"),
    pytest.param(["--param", "seed=1", "--param", "seed=2"], {}, 2, ["seed", "twice"], id="param-twice"),
    pytest.param(["--param", "olap_min_ratings=100000000000"], {}, 2, ["olap_min_ratings"], id="count-unbounded"),
    pytest.param(["--param", "quarantine_threshold=NaN"], {}, 2, ["quarantine_threshold"], id="param-nan"),
    pytest.param(["--param", "no_such_param=1"], {}, 2, ["no_such_param"], id="unknown-param"),
    pytest.param(["--param", "seed"], {}, 2, ["NAME=VALUE"], id="param-without-value"),
    pytest.param(["--work-dir", "{file}"], {}, 2, ["--work-dir", "{file}", "is a file"], id="work-dir-is-a-file"),
    pytest.param(["--work-dir", "{file}/run"], {}, 2, ["--work-dir", "{file}/run"], id="work-dir-under-a-file"),
    pytest.param(["--work-dir", "/proc/recsys-hostile"], {}, 2, ["--work-dir", "/proc/recsys-hostile"],
                 id="work-dir-in-proc"),
    pytest.param([], {"RECSYS_HOME": "/proc/recsys-hostile"}, 2, ["RECSYS_HOME", "/proc/recsys-hostile"],
                 id="home-in-proc"),
    pytest.param([], {"RECSYS_HOME": "{file}"}, 2, ["RECSYS_HOME", "{file}"], id="home-is-a-file"),
    pytest.param([], {"RECSYS_DATA_ROOT": "/proc/recsys-hostile"}, 2, ["RECSYS_DATA_ROOT"], id="data-root-in-proc"),
    pytest.param([], {"RECSYS_SPARK_SHUFFLE_PARTITIONS": "0"}, 2, ["spark_shuffle_partitions"],
                 id="shuffle-partitions-zero"),
]


@pytest.mark.parametrize("args, env, code, named", BEFORE_ANY_WORK)
def test_a_bad_argument_is_refused_before_any_stage_runs(tmp_path, source_copy, args, env, code, named):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    fill = {"{file}": str(afile)}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    work = tmp_path / "run"
    argv = ["run", "--source", source_copy, "--stages", "ingest", *map(filled, args)]
    if "--work-dir" not in args:
        argv += ["--work-dir", work]
    outcome = recsys(*argv, env={"RECSYS_HOME": tmp_path / "home", **{k: filled(str(v)) for k, v in env.items()}})
    outcome.refused(code, *map(filled, named))
    assert not (work / "ingest").exists()


# --- settings files with the wrong types ---------------------------------------------------------------------

SETTINGS_FILES = [
    pytest.param("spark_shuffle_partitions = [1]", ["spark_shuffle_partitions", "an integer"], id="partitions-list"),
    pytest.param("spark_shuffle_partitions = true", ["spark_shuffle_partitions", "an integer"], id="partitions-bool"),
    pytest.param("spark_shuffle_partitions = 0", ["spark_shuffle_partitions"], id="partitions-zero"),
    pytest.param("source = 5", ["source", "a string"], id="source-integer"),
    pytest.param("home = 3.5", ["home", "a string"], id="home-float"),
    pytest.param("spark_ui = 'maybe'", ["spark_ui", "true or false"], id="spark-ui-text"),
    pytest.param("[recsys.source]\nx = 1", ["source", "a string"], id="source-table"),
    pytest.param("recsys = 5", ["[recsys]"], id="recsys-not-a-table"),
    pytest.param("spark_master = ", ["not valid TOML"], id="not-toml"),
    pytest.param("sparkmaster = 'local[2]'", ["sparkmaster"], id="unknown-key"),
]


@pytest.mark.parametrize("text, named", SETTINGS_FILES)
def test_a_settings_file_with_a_wrong_type_is_refused_naming_the_key(tmp_path, text, named):
    path = tmp_path / "recsys.toml"
    path.write_text(text + "\n")
    recsys("settings", env={"RECSYS_SETTINGS_FILE": path}).refused(2, str(path), *named)


def test_a_settings_file_with_the_right_types_is_taken(tmp_path):
    path = tmp_path / "recsys.toml"
    path.write_text("[recsys]\nspark_shuffle_partitions = 4\nspark_ui = false\nsource = 'grouplens:ml-1m'\n")
    outcome = recsys("settings", env={"RECSYS_SETTINGS_FILE": path, "MOVIELENS_DIR": None, "RECSYS_SOURCE": None,
                                      "RECSYS_SPARK_SHUFFLE_PARTITIONS": None})  # the environment wins over the file
    outcome.succeeded()
    assert '"spark_shuffle_partitions": 4' in outcome.stdout and "grouplens:ml-1m" in outcome.stdout


def test_a_url_without_a_password_is_left_alone():
    from pipeline.config import mask_secrets

    for text in ["see http://127.0.0.1:5000/#/experiments/1 and http://h:80/p", "http://127.0.0.1:5000/ a@b",
                 "mysql://u:***@h and then https://x@y/z"]:
        assert mask_secrets(text) == text


@pytest.mark.parametrize("password", ["p@ss w@rd", "s3cr3t", "with space", "tr@iling@", "a:b@c", "sl/ash", "a/b@c"])
def test_recsys_settings_masks_any_password_in_a_uri(password):
    uri = f"postgresql://mlflow:{password}@db.internal:5432/mlflow"
    outcome = recsys("settings", env={"MLFLOW_TRACKING_URI": uri})
    outcome.succeeded()
    assert "postgresql://mlflow:***@db.internal:5432/mlflow" in outcome.stdout
    assert password not in outcome.stdout


# --- what the last good run left is kept ---------------------------------------------------------------------


@pytest.fixture
def validated_folder(tmp_path, source_copy):
    """A run folder where ingest and validate succeeded on the real data: its report and summaries."""
    work = tmp_path / "run"
    recsys("run", "--source", source_copy, "--work-dir", work, "--stages", "ingest,validate",
           env={"RECSYS_HOME": tmp_path / "home"}).succeeded()
    return work


@pytest.mark.parametrize("source, code", [("/nonexistent/ml-latest-small", 3), ("{bad}", 4)],
                         ids=["missing-source", "undecodable-source"])
def test_a_failed_rerun_keeps_the_last_good_report(tmp_path, validated_folder, source, code):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,\xff,4,1\n")
    (bad / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    before = {p: d for p, d in tree_digest(validated_folder).items() if not p.startswith(".")}
    outcome = recsys("run", "--source", source.replace("{bad}", str(bad)), "--work-dir", validated_folder,
                     "--stages", "ingest", env={"RECSYS_HOME": tmp_path / "home"})
    outcome.refused(code)
    after = {p: d for p, d in tree_digest(validated_folder).items() if not p.startswith(".")}
    assert after == before
    assert "report.json" in after and "summaries/validate.json" in after


def _undecodable(folder):
    ratings = folder / "ratings.csv"
    ratings.write_bytes(ratings.read_bytes() + b"7,1,4.0,\xff964982703\n")


def _mostly_bad(folder):
    ratings = folder / "ratings.csv"
    lines = ratings.read_text().splitlines()
    lines[1:2001] = [line.replace(",", ",x", 1) for line in lines[1:2001]]  # 2 % of the user ids unreadable
    ratings.write_text("\n".join(lines) + "\n")


def _one_user(folder):
    ratings = folder / "ratings.csv"
    lines = ratings.read_text().splitlines()
    ratings.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.startswith("1,")]) + "\n")


RERUNS = [
    pytest.param(None, [], 3, ["/nonexistent"], ("current", "served", "aliases", "run"), id="missing-source"),
    pytest.param(_undecodable, [], 4, ["ratings.csv", "not valid UTF-8"], ("current", "served", "aliases", "run"),
                 id="undecodable-ratings"),
    pytest.param(None, ["--param", "split_strategy=newest"], 2, ["split_strategy"],
                 ("current", "served", "aliases", "run"), id="bad-param"),
    pytest.param(_mostly_bad, [], 5, ["ratings", "quarantine_threshold"], ("current", "served", "aliases"),
                 id="quarantine-above-threshold"),
    pytest.param(_one_user, ["--param", "autorec_enabled=false"], 5, ["1 user"], ("current", "served", "aliases"),
                 id="one-user"),
]


@pytest.mark.integration
@pytest.mark.parametrize("edit, extra, code, named, kept", RERUNS)
def test_a_failed_rerun_on_a_completed_run_changes_nothing_it_published(completed_run, source_copy, edit, extra,
                                                                         code, named, kept):
    """The whole pipeline rerun, as a user would, over a completed run's folder and home: the champion aliases
    and the served set stay; so does the report where the rerun failed before any stage succeeded (past
    ingest, the folder holds the new data and its report says so, ADR 0066)."""
    source = source_copy if edit else "/nonexistent/ml-latest-small"
    if edit:
        edit(source_copy)
    outcome = recsys("run", "--source", source, "--work-dir", completed_run["run_dir"], *extra)
    outcome.refused(code, *named)
    completed_run["untouched"].check(*kept)


def test_a_damaged_report_is_named_when_a_run_continues(tmp_path, validated_folder):
    (validated_folder / "report.json").write_text('{"run_id": ')
    outcome = recsys("run", "--work-dir", validated_folder, "--stages", "validate",
                     env={"RECSYS_HOME": tmp_path / "home"})
    outcome.refused(6, str(validated_folder / "report.json"))


# --- the machine's faults ------------------------------------------------------------------------------------


def test_a_full_disk_is_the_machines_fault_not_a_bug(tmp_path, source_copy, validated_folder, monkeypatch):
    import pyarrow.parquet as pq

    def full(table, where, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    before = {p: d for p, d in tree_digest(validated_folder).items() if not p.startswith(".")}
    monkeypatch.setattr(pq, "write_table", full)
    outcome = recsys("run", "--source", source_copy, "--work-dir", validated_folder, "--stages", "ingest",
                     env={"RECSYS_HOME": tmp_path / "home"})
    line = outcome.refused(9, "No space left on device", "ratings.parquet")
    assert "not the data" in line
    after = {p: d for p, d in tree_digest(validated_folder).items() if not p.startswith(".")}
    assert after == before


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(tmp_path, source_copy):
    import subprocess
    import sys

    work = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline import locks\n"
         "with locks.run_folder_lock(sys.argv[1], 'another recsys run'):\n"
         "    print('held', flush=True); time.sleep(60)", str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        outcome = recsys("run", "--source", source_copy, "--work-dir", work, "--stages", "ingest",
                         env={"RECSYS_HOME": tmp_path / "home"})
    finally:
        holder.kill()
        holder.wait()
    outcome.refused(7, str(holder.pid), "another recsys run")
    assert not (work / "ingest").exists()


# --- arguments argparse reads --------------------------------------------------------------------------------

ARGUMENTS = [
    pytest.param(["similar", "--movie", "1", "-k", "\u0661"], ["-k", "0-9"], id="k-arabic-indic"),
    pytest.param(["similar", "--movie", "1", "-k", "0"], ["-k"], id="k-zero"),
    pytest.param(["recommend", "--popular", "-k", "99999999999"], ["-k"], id="k-huge"),
    pytest.param(["synth", "--ratings", "\uff11\uff10", "--users", "5", "--movies", "5", "--out", "x"],
                 ["--ratings"], id="synth-fullwidth"),
    pytest.param(["synth", "--ratings", "10", "--users", "1e9", "--movies", "5", "--out", "x"], ["--users"],
                 id="synth-float"),
    pytest.param(["run", "--no-such-option"], ["--no-such-option"], id="unknown-option"),
    pytest.param(["recommend"], ["one of the arguments"], id="recommend-whom"),
]


@pytest.mark.parametrize("args, named", ARGUMENTS)
def test_an_argument_argparse_refuses_is_one_error_line(args, named):
    recsys(*args).refused(2, *named)


def test_no_secret_reaches_the_output_or_the_run_folder(tmp_path, source_copy):
    secret = "hostile-Secret-0f3a"
    env = {"RECSYS_HOME": tmp_path / "home", "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAHOSTILE",
           "RECSYS_GROUPLENS_URL": f"https://user:{secret}@files.example.org/movielens"}
    work = tmp_path / "run"
    outcome = recsys_process("-v", "run", "--source", source_copy, "--work-dir", work, "--stages", "ingest,validate",
                             env=env)  # a process of its own: its log lines reach its stderr
    outcome.succeeded()
    assert "DEBUG" in outcome.stderr and secret not in outcome.stdout + outcome.stderr
    settings = recsys("settings", env=env)
    assert secret not in settings.stdout and "user:***@files.example.org" in settings.stdout
    for path in [p for p in work.rglob("*") if p.is_file()]:
        assert secret.encode() not in path.read_bytes(), path
