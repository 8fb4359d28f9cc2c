"""
### MovieLens source watch

Every hour, fingerprints the dataset source that `movielens_recsys` reads (the setting `RECSYS_SOURCE`, else
`MOVIELENS_DIR`, else `grouplens:ml-latest-small`) without downloading it: file names, sizes and modification
times of a local folder or `.zip`, keys, sizes and ETags of an `s3://` prefix, or the MD5 GroupLens publishes
beside the zip. When the fingerprint differs from the one recorded by the asset's last event (or there is
none yet), the task records an event on the asset **`movielens_ratings`**, with the fingerprint as its extra;
otherwise it ends *skipped* and records nothing.

`movielens_recsys` retrains on those events when `RECSYS_SCHEDULE` is `asset` or `both` (default `weekly`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from pipeline.data.watch import ASSET_NAME, ASSET_URI

RATINGS = Asset(name=ASSET_NAME, uri=ASSET_URI)


@dag(
    dag_id="movielens_watch",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["movielens", "recsys", "assets"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5), "owner": "recsys"},
)
def movielens_watch():
    @task(inlets=[RATINGS], outlets=[RATINGS])
    def check_source(*, inlet_events=None, outlet_events=None) -> dict:
        """Fingerprint the source; record an asset event only when it changed since the last one."""
        from pipeline.config import load_settings
        from pipeline.data.watch import has_changed, source_fingerprint

        settings = load_settings()
        current = source_fingerprint(settings.source, settings)
        last = list(inlet_events[RATINGS].ascending(False).limit(1))
        previous = dict(last[0].extra or {}) if last else None
        if not has_changed(current, previous):
            raise AirflowSkipException(f"{current['source']}: unchanged (fingerprint {current['fingerprint'][:16]})")
        outlet_events[RATINGS].extra = current
        return current

    check_source()


movielens_watch()
