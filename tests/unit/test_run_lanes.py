"""``recsys run`` runs a Spark stage beside a Python stage (``stages.run_lanes``): each stage after every chosen
stage it depends on, one stage per lane, nothing new after a failure, and Spark reachable from the threads."""

import threading
import time

import pytest

from pipeline import lineage, memory, stages


class Recorder:
    """A stand-in for run_stage: logs start and end, and can wait for another stage to be running."""

    def __init__(self, waits_for: dict[str, str] | None = None, fails: str | None = None):
        self.events, self.lock, self.waits_for, self.fails = [], threading.Lock(), waits_for or {}, fails
        self.started = {name: threading.Event() for name in stages.ORDER}
        self.overlapped = {}

    def __call__(self, name: str) -> None:
        with self.lock:
            self.events.append(("start", name))
        self.started[name].set()
        if name in self.waits_for:  # proves the two ran side by side (it would time out one after the other)
            self.overlapped[name] = self.started[self.waits_for[name]].wait(timeout=10)
        time.sleep(0.01)
        if name == self.fails:
            raise RuntimeError(f"{name} broke")
        with self.lock:
            self.events.append(("end", name))


def _check_order(events, names):
    """Every stage starts after the chosen stages above it ended; never two of one lane at once."""
    ended, running = set(), {}
    for kind, name in events:
        if kind == "start":
            above = lineage.upstream_closure(name, stages.UPSTREAM) & set(names)
            assert above <= ended, f"{name} started before {sorted(above - ended)} ended"
            lane = stages.STAGES[name].lane
            assert lane not in running.values(), f"{name} started while {running} ran"
            running[name] = lane
        else:
            ended.add(name)
            del running[name]


def test_every_stage_runs_once_after_what_it_needs_a_spark_stage_beside_a_python_one():
    names = list(stages.ORDER)
    run = Recorder(waits_for={"als": "autorec", "olap": "baseline"})
    done = stages.run_lanes(names, run)
    assert sorted(done) == sorted(names) and done[-1] == "report"
    _check_order(run.events, names)
    assert run.overlapped == {"als": True, "olap": True}


def test_lanes_are_set_for_the_spark_stages():
    assert {s.name for s in stages.PIPELINE if s.lane == "spark"} == {"etl", "olap", "als", "implicit_als",
                                                                         "similarity"}
    assert {s.lane for s in stages.PIPELINE} == set(stages.LANES)


def test_a_chosen_subset_waits_through_stages_that_are_not_chosen():
    """etl and als without baseline: als still runs after etl (it reads etl's split through the baseline)."""
    run = Recorder()
    assert stages.run_lanes(["etl", "als", "knn"], run) in (["etl", "als", "knn"], ["etl", "knn", "als"])
    _check_order(run.events, ["etl", "als", "knn"])
    assert run.events[:2] == [("start", "etl"), ("end", "etl")]


def test_after_a_failure_no_stage_starts_the_running_one_ends_and_the_error_is_raised():
    names = list(stages.ORDER)
    run = Recorder(waits_for={"autorec": "als"}, fails="autorec")
    with pytest.raises(RuntimeError, match="autorec broke"):
        stages.run_lanes(names, run)
    started = [name for kind, name in run.events if kind == "start"]
    assert ("end", "als") in run.events  # the Spark stage beside it finished its work
    assert "blend" not in started and "compare_models" not in started and "report" not in started
    _check_order([e for e in run.events if e != ("start", "autorec")], names)


def test_one_at_a_time_keeps_pipeline_order(tmp_path, monkeypatch):
    import gc

    calls, freezing = [], []

    def run_stage(name, ctx, fresh=False):
        calls.append(name)
        freezing.append(memory._FREEZE_SURVIVORS)  # a whole run: release_memory freezes what outlives a stage
        memory.release_memory()

    monkeypatch.setattr(stages, "run_stage", run_stage)
    ctx = stages.make_context(run_id="r1", work_dir=tmp_path / "run", params={})
    stages.run_pipeline(ctx, ["ease", "als", "etl"], concurrent=False)
    assert calls == ["etl", "als", "ease"]
    assert all(freezing) and not memory._FREEZE_SURVIVORS and gc.get_freeze_count() == 0  # unfrozen at the end
    calls.clear()
    stages.run_pipeline(ctx, ["ease", "als", "etl"], concurrent=True)
    assert calls[0] == "etl" and sorted(calls) == ["als", "ease", "etl"]


def test_the_warm_up_starts_spark_and_mlflow_only_where_stages_come_before_the_first_that_needs_them(
        tmp_path, monkeypatch):
    import pipeline.spark
    import pipeline.tracking

    started = []
    monkeypatch.setattr(pipeline.spark, "get_spark", lambda settings: started.append(("spark", settings)))
    monkeypatch.setattr(pipeline.tracking, "configure", lambda settings: started.append(("mlflow", settings)))
    ctx = stages.make_context(run_id="r1", work_dir=tmp_path / "run", params={})
    for names, expected in ((["ingest", "validate", "etl", "olap"], ["spark"]),
                            (["ingest", "validate", "etl", "baseline", "als"], ["spark", "mlflow"]),
                            (["etl", "olap", "baseline"], ["mlflow"]), (["baseline", "als"], ["spark"]),
                            (["etl"], []), (["als", "autorec"], []), (["ingest", "validate"], []),
                            (["autorec", "knn"], []), (["gate", "promotion"], [])):
        started.clear()
        thread = stages.warm_up(ctx, names)
        if thread is not None:
            thread.join()
        assert started == [(step, ctx.settings) for step in expected] and (thread is None) == (not expected), names


def test_a_failed_warm_up_step_is_left_to_the_stage_that_needs_it(tmp_path, monkeypatch, caplog):
    import pipeline.spark
    import pipeline.tracking

    def no_java(settings):
        raise RuntimeError("Java gateway process exited")

    seen = []
    monkeypatch.setattr(pipeline.spark, "get_spark", no_java)
    monkeypatch.setattr(pipeline.tracking, "configure", lambda settings: seen.append("mlflow"))
    ctx = stages.make_context(run_id="r1", work_dir=tmp_path / "run", params={})
    with caplog.at_level("DEBUG", logger="pipeline.warm_up"):
        stages.warm_up(ctx, ["ingest", "validate", "etl", "baseline"]).join()
    assert seen == ["mlflow"]  # the next step still runs
    assert "warm-up: no_java failed" in caplog.text


def test_a_run_that_ends_during_the_warm_up_waits_for_the_step_under_way_and_skips_the_rest(tmp_path, monkeypatch):
    """Validation stopped the run while the JVM was starting: the run waits for the session (stderr is a pipe
    until then) but no longer sets MLflow up."""
    import pipeline.spark
    import pipeline.tracking

    started, warming = [], []

    def get_spark(settings):  # still starting when the run ends
        started.append("spark")
        deadline = time.monotonic() + 10
        while not (warming and warming[0].cancelled.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(pipeline.spark, "get_spark", get_spark)
    monkeypatch.setattr(pipeline.tracking, "configure", lambda settings: started.append("mlflow"))
    ctx = stages.make_context(run_id="r1", work_dir=tmp_path / "run", params={})
    warming.append(stages.warm_up(ctx, ["ingest", "validate", "etl", "baseline"]))
    while not started:
        time.sleep(0.01)
    warming[0].finish(10)
    assert started == ["spark"] and not warming[0].is_alive()


@pytest.mark.parametrize("flags, cores, expected", [([], 2, False), ([], 8, True), (["--side-by-side"], 2, True),
                                                    (["--one-at-a-time"], 8, False)])
def test_recsys_run_is_side_by_side_from_four_cores_unless_told(tmp_path, monkeypatch, flags, cores, expected):
    from pipeline import cli

    seen = {}

    def run_pipeline(ctx, names, fresh=False, concurrent=None):
        seen["concurrent"] = stages.side_by_side_by_default() if concurrent is None else concurrent
        return {}

    monkeypatch.setattr(stages, "run_pipeline", run_pipeline)
    monkeypatch.setattr(stages.os, "cpu_count", lambda: cores)
    assert cli.main(["run", "--work-dir", str(tmp_path / "run"), "--stages", "olap", *flags]) == 0
    assert seen == {"concurrent": expected}


def test_side_by_side_and_one_at_a_time_exclude_each_other(tmp_path, capsys):
    from pipeline import cli

    assert cli.main(["run", "--work-dir", str(tmp_path), "--side-by-side", "--one-at-a-time"]) == 2
    assert "recsys: error: run: argument --one-at-a-time: not allowed with argument" in capsys.readouterr().err


@pytest.mark.spark
def test_get_spark_from_another_thread_is_the_same_session(spark):
    from pyspark.sql import SparkSession

    from pipeline.config import load_settings
    from pipeline.spark import get_spark

    seen = {}

    def work():
        seen["active"] = SparkSession.getActiveSession()  # per thread: None here, hence get_spark's own record
        seen["session"] = get_spark(load_settings())
        seen["rows"] = seen["session"].range(5).count()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["session"] is spark and seen["rows"] == 5
