"""Asset-triggered retraining: the watch DAG records an event on the ratings asset when the source's fingerprint
changes, and only then (dag.test() on a real metadata DB); RECSYS_SCHEDULE schedules movielens_recsys weekly,
on that asset, or on either."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.watch import ASSET_NAME

REPO = Path(__file__).resolve().parents[2]


def _events() -> list[dict]:
    """The extras of the ratings asset's events, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == ASSET_NAME).order_by(AssetEvent.id)).all()
        return [dict(row.extra or {}) for row in rows]


def _dag(file: str, dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / file))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def test_watch_records_an_event_only_when_the_source_changed(airflow_db, tmp_path, monkeypatch):
    source = tmp_path / "ml-tiny"
    source.mkdir()
    (source / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    (source / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    monkeypatch.setenv("RECSYS_SOURCE", str(source))
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    dag = _dag("movielens_watch.py", "movielens_watch")
    before = len(_events())

    def check() -> str:
        run = dag.test()
        return run.get_task_instance("check_source").state

    assert check() == "success"  # never seen: recorded
    events = _events()
    assert len(events) == before + 1
    assert events[-1]["source"] == str(source) and events[-1]["fingerprint"]

    assert check() == "skipped"  # unchanged: no event
    assert len(_events()) == before + 1

    with open(source / "ratings.csv", "a") as fh:
        fh.write("1,2,3.5,964982704\n")
    assert check() == "success"  # changed: a new event with the new fingerprint
    events = _events()
    assert len(events) == before + 2 and events[-1]["fingerprint"] != events[-2]["fingerprint"]


@pytest.mark.parametrize("choice", ["weekly", "asset", "both"])
def test_recsys_schedule_chooses_weekly_asset_or_both(airflow_db, monkeypatch, choice):
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable

    monkeypatch.setenv("RECSYS_SCHEDULE", choice)
    timetable = _dag("movielens_recsys.py", "movielens_recsys").timetable
    assets = ({a.name for a in timetable.asset_condition.objects}
              if isinstance(timetable, AssetTriggeredTimetable) else set())
    if choice == "weekly":
        assert "0 0 * * 0" in str(timetable) and not assets
    elif choice == "asset":
        assert assets == {ASSET_NAME} and not isinstance(timetable, AssetOrTimeSchedule)
    else:  # either: each asset event, and Sundays 00:00 UTC
        assert isinstance(timetable, AssetOrTimeSchedule) and assets == {ASSET_NAME}
        assert "0 0 * * 0" in repr(timetable)


def test_an_unknown_schedule_is_refused(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RECSYS_SCHEDULE", "daily")
    bag = DagBag(dag_folder=str(REPO / "dags" / "movielens_recsys.py"))
    assert "RECSYS_SCHEDULE" in str(bag.import_errors)
