"""Issue 10, case 1: one writer per run folder (two real `recsys run` processes), a lock left by a killed
process taken over, the DAG's parallel tasks of one run side by side, and the served set and the champion
alias safe against two processes from different work dirs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from movielens_fixtures import write_csv_variant
from pipeline import cli, errors, locks
from pipeline.config import load_settings
from pipeline.serving import publish as serving
from pipeline.serving import served

RECSYS = Path(sys.executable).with_name("recsys")


def _blocking_source(folder: Path) -> bytes:
    """Make movies.csv a named pipe: a run that reads it waits (holding its locks) until the test writes it."""
    movies = folder / "movies.csv"
    content = movies.read_bytes()
    movies.unlink()
    os.mkfifo(movies)
    return content


def _feed(fifo: Path, content: bytes) -> None:
    """Let the waiting reader go on; the pipe is replaced by the plain file for any later read (the hash)."""
    plain = fifo.with_name(".plain-" + fifo.name)
    plain.write_bytes(content)
    with open(fifo, "wb") as pipe:  # returns once the reader has the pipe open
        os.replace(plain, fifo)
        pipe.write(content)


def _wait_for_holder(lock_file: Path, pid: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads(lock_file.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == pid:
            return holder
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} never took {lock_file}")


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([str(RECSYS), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_recsys_run_on_the_same_work_dir_is_refused_while_the_first_writes(tmp_path):
    data = write_csv_variant(tmp_path / "ml-tiny")
    content = _blocking_source(data.folder)
    work = tmp_path / "run"
    first = _start("run", "--source", data.folder, "--work-dir", work, "--stages", "ingest,validate")
    try:
        holder = _wait_for_holder(work / locks.RUN_LOCK, first.pid)
        assert holder["host"] == socket.gethostname() and holder["what"] == "recsys run"
        second = subprocess.run([str(RECSYS), "run", "--source", str(data.folder), "--work-dir", str(work),
                                 "--stages", "ingest,validate"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 7, second.stderr
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("recsys: error:")]
        assert f"the run folder {work} is being written by another process" in line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
        _feed(data.folder / "movies.csv", content)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err
    report = json.loads((work / "report.json").read_text())
    assert report["dataset"]["ratings"] == data.ratings and report["validation"]["success"] is True
    assert (work / locks.RUN_LOCK).read_text() == ""  # released cleanly


def test_a_lock_and_a_half_written_stage_left_by_a_killed_run_are_taken_over(tmp_path):
    data = write_csv_variant(tmp_path / "ml-tiny")
    content = _blocking_source(data.folder)
    work = tmp_path / "run"
    killed = _start("run", "--source", data.folder, "--work-dir", work, "--stages", "ingest")
    _wait_for_holder(work / locks.RUN_LOCK, killed.pid)
    deadline = time.monotonic() + 60
    while not list(work.glob(".tmp-ingest-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)  # mid-ingest: its temporary folder and its lock file stay behind
    killed.wait(timeout=30)
    assert list(work.glob(".tmp-ingest-*"))
    assert json.loads((work / locks.RUN_LOCK).read_text())["pid"] == killed.pid

    movies = data.folder / "movies.csv"
    movies.unlink()
    movies.write_bytes(content)
    proc = subprocess.run([str(RECSYS), "run", "--source", str(data.folder), "--work-dir", str(work), "--stages",
                           "ingest"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"left by pid {killed.pid} on host {socket.gethostname()}" in proc.stderr
    assert "that process is gone" in proc.stderr
    assert not list(work.glob(".tmp-ingest-*"))  # the half-written folder was removed by the next ingest
    assert (work / "ingest" / "manifest.json").exists()


_HOLD_STAGE = textwrap.dedent("""
    import sys, time
    from pipeline import locks
    with locks.stage_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_the_parallel_tasks_of_one_dag_run_share_the_folder_but_not_a_stage(tmp_path, capsys):
    run = tmp_path / "runs" / "manual__2026-11-29"
    task = subprocess.Popen([sys.executable, "-c", _HOLD_STAGE, str(run), "als"], stdout=subprocess.PIPE, text=True)
    try:
        assert task.stdout.readline().strip() == "held"
        with locks.stage_lock(run, "autorec"), locks.stage_lock(run, "olap"):  # side by side with als
            pass
        with pytest.raises(errors.RunLockedError, match=f"stage 'als' of {run} is already running") as caught:
            with locks.stage_lock(run, "als"):
                pass
        assert f"pid {task.pid}" in str(caught.value)
        assert cli.main(["run", "--work-dir", str(run), "--stages", "olap"]) == 7  # a recsys run waits its turn
        assert "is being written by another process" in capsys.readouterr().err
    finally:
        task.kill()
        task.wait()
    with locks.run_folder_lock(run):  # released with the process
        pass


_PUBLISH = textwrap.dedent("""
    import sys
    import pandas as pd
    from pipeline.serving import publish as serving
    serving_dir, tag = sys.argv[1], int(sys.argv[2])
    for i in range(12):
        movies = pd.DataFrame({"movie_id": [1, 2], "title": [f"a{tag}-{i}", "b"], "genres": [["x"], ["y"]]})
        recs = pd.DataFrame({"user_id": [1], "rank": pd.array([1], dtype="int32"), "movie_id": [2],
                             "score": [float(tag * 100 + i)]})
        similar = pd.DataFrame({"movie_id": [1], "similar_movie_id": [2], "metric": ["cosine"],
                                "rank": pd.array([1], dtype="int32"), "score": [0.5]})
        popular = pd.DataFrame({"movie_id": [1, 2], "n_ratings": [2, 1]})
        serving.publish(serving_dir, {"movies": movies, "recommendations": recs, "similar_movies": similar,
                                      "popular": popular}, {"run": tag})
    print("done", flush=True)
""")


def test_two_processes_publishing_at_once_leave_one_complete_current_set(tmp_path):
    serving_dir = tmp_path / "data" / "serving"
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISH, str(serving_dir), str(tag)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in (1, 2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "done", err
    current_set = served.open_served(serving_dir)  # current resolves to a complete version
    assert (current_set.path / "manifest.json").exists() and len(current_set.movies) == 2
    history = json.loads((serving_dir / serving.HISTORY).read_text())
    kept = sorted(p.name for p in (serving_dir / serving.VERSIONS).iterdir() if not p.name.startswith("."))
    assert current_set.fingerprint == history[-1] and sorted(history) == kept and len(kept) == serving.KEEP_VERSIONS


def test_a_set_built_from_an_older_champion_does_not_replace_a_newer_one(tmp_path):
    from test_query import MOVIES, POPULAR, RECS, _similar

    serving_dir = tmp_path / "serving"
    tables = {"similar_movies": _similar(), "recommendations": RECS, "movies": MOVIES, "popular": POPULAR}
    newer = serving.publish(serving_dir, tables, {"registered_model": "m", "champion_version": "3"})
    older = serving.publish(serving_dir, {**tables, "recommendations": RECS.assign(score=RECS.score - 1)},
                            {"registered_model": "m", "champion_version": "2"})
    assert older["published"] is False and "newer than v2" in older["superseded"]
    assert serving.current_fingerprint(serving_dir) == newer["serving_fingerprint"]


_MOVE = textwrap.dedent("""
    import sys, time
    from pipeline import registry
    from pipeline.config import load_settings
    settings = load_settings()
    registry.tracking.client(settings)  # configured before the start line
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    moved, current = registry.move_champion(settings, "m", sys.argv[1], None)
    print(f"{moved} {current}", flush=True)
""")


def test_two_runs_racing_for_the_champion_alias_cannot_both_win(tmp_path, monkeypatch):
    """Two processes (different work dirs, one data root and registry) both compared against "no champion"."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    from pipeline import registry, tracking

    settings = load_settings()
    client = tracking.client(settings)
    client.create_registered_model("m")
    versions = [client.create_model_version("m", source=str(tmp_path / f"model{i}")).version for i in (1, 2)]
    start = time.time() + 8
    procs = [subprocess.Popen([sys.executable, "-c", _MOVE, str(v), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for v in versions]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(out.split())
    winners = [v for v, (moved, _) in zip(versions, results) if moved == "True"]
    assert len(winners) == 1
    assert {current for _, current in results} == {str(winners[0])}
    assert registry.champion_version(client, "m") == str(winners[0])


_OPEN_MLFLOW_RUNS = textwrap.dedent("""
    import sys, time
    from pipeline import locks, stages, tracking
    from pipeline.config import load_settings
    ctx = stages.make_context(run_id="killed", work_dir=sys.argv[1], settings=load_settings())
    with locks.stage_lock(ctx.run_dir, "als"), tracking.start_run(ctx, "als") as parent:
        with tracking.child_run(parent, ctx, "als rank=2"):
            print(parent.info.run_id, flush=True)
            time.sleep(120)
""")


def test_the_mlflow_runs_of_a_stage_killed_with_sigkill_are_marked_killed_by_the_next_run(tmp_path, caplog):
    """kill -9 leaves the stage's MLflow runs RUNNING; the next run that opens one in the folder (after taking
    the lock over) ends them KILLED and names them; a live process's open runs are left alone."""
    import logging

    from pipeline import stages, tracking

    home, run = tmp_path / "home", tmp_path / "run"
    settings = load_settings({"RECSYS_HOME": str(home)})
    client = tracking.client(settings)  # the store's tables exist before two processes open it
    task = subprocess.Popen([sys.executable, "-c", _OPEN_MLFLOW_RUNS, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RECSYS_HOME": str(home)})
    try:
        parent = task.stdout.readline().strip()
        assert parent, task.stderr.read()
        (child,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent}'")
        ctx = stages.make_context(run_id="next", work_dir=run, settings=settings)
        with tracking.start_run(ctx, "baseline"):  # beside a live stage: its runs are its own
            pass
        assert {client.get_run(r).info.status for r in (parent, child.info.run_id)} == {"RUNNING"}
    finally:
        task.send_signal(signal.SIGKILL)
        task.wait(timeout=30)
    with caplog.at_level(logging.WARNING), locks.stage_lock(run, "als"), tracking.start_run(ctx, "als") as again:
        pass
    assert client.get_run(parent).info.status == client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(again.info.run_id).info.status == "FINISHED"
    warning = next(r.getMessage() for r in caplog.records if "KILLED" in r.getMessage())
    assert parent in warning and child.info.run_id in warning and f"pid {task.pid}" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING), tracking.start_run(ctx, "als"):
        pass
    assert "KILLED" not in caplog.text  # marked once


def test_the_next_stage_to_take_the_folder_over_closes_a_killed_stages_runs(tmp_path):
    """Whichever stage runs next in the folder, tracked or not (here a rerun of ingest), ends them KILLED."""
    from pipeline import stages, tracking

    home, run = tmp_path / "home", tmp_path / "run"
    settings = load_settings({"RECSYS_HOME": str(home)})
    client = tracking.client(settings)
    task = subprocess.Popen([sys.executable, "-c", _OPEN_MLFLOW_RUNS, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RECSYS_HOME": str(home)})
    try:
        parent = task.stdout.readline().strip()
        assert parent, task.stderr.read()
    finally:
        task.send_signal(signal.SIGKILL)
        task.wait(timeout=30)
    assert client.get_run(parent).info.status == "RUNNING"
    ctx = stages.make_context(run_id="next", work_dir=run, settings=settings)
    stages.run_stage("ingest", ctx, fn=lambda ctx: {})
    assert client.get_run(parent).info.status == "KILLED"
