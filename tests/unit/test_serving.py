"""Publishing the served set: versions switched by one pointer, content fingerprints, crashes, and S3."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline import errors
from pipeline.config import load_settings
from pipeline.serving import publish as serving
from pipeline.serving import served


def _tables(shift: float = 0.0) -> dict:
    similar = pd.DataFrame({"movie_id": [1, 1, 2, 2], "similar_movie_id": [2, 3, 1, 3],
                            "metric": ["cosine"] * 4, "rank": pd.array([1, 2, 1, 2], dtype="int32"),
                            "score": [0.9 + shift, 0.5, 0.9 + shift, 0.4]})
    recs = pd.DataFrame({"user_id": [7, 7], "rank": pd.array([1, 2], dtype="int32"), "movie_id": [3, 2],
                         "score": [4.5, 4.0]})
    movies = pd.DataFrame({"movie_id": [1, 2, 3], "title": ["A (2000)", "B (2001)", "C (2002)"],
                           "year": [2000, 2001, 2002], "genres": [["Drama"], ["Comedy"], ["Drama", "War"]],
                           "_line": [2, 3, 4]})
    return {"similar_movies": similar, "recommendations": recs, "movies": movies}


def _snapshot(root: Path) -> dict:
    """Every entry under root: (bytes or link target, mtime) -- what a no-op publish must leave alone."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if path.is_symlink():
                out[str(path)] = (os.readlink(path), st.st_mtime_ns)
            elif path.is_file():
                out[str(path)] = (path.read_bytes(), st.st_mtime_ns)
            else:
                out[str(path)] = (None, st.st_mtime_ns)
    return out


@pytest.fixture
def serving_dir(tmp_path):
    return load_settings({"RECSYS_HOME": str(tmp_path)}).serving_dir


def test_publish_writes_a_complete_version_and_points_current_at_it(serving_dir):
    result = serving.publish(serving_dir, _tables(), {"model": "als", "run_id": "r1"})

    fp = result["serving_fingerprint"]
    assert result["published"] is True and result["path"] == str(serving_dir / "versions" / fp)
    assert os.readlink(serving_dir / "current") == f"versions/{fp}"
    assert serving.current_fingerprint(serving_dir) == fp
    assert sorted(p.name for p in (serving_dir / "versions" / fp).iterdir()) == [
        "manifest.json", "movies.parquet", "recommendations.parquet", "similar_movies.parquet"]

    current_set = served.open_served(serving_dir)
    assert current_set.fingerprint == fp and current_set.manifest["published_from"]["run_id"] == "r1"
    assert current_set.manifest["tables"]["movies"]["rows"] == 3
    assert "_line" not in current_set.movies.columns  # internal columns are not served
    assert current_set.recommendations["movie_id"].tolist() == [3, 2]
    assert current_set.table("similar_movies", filters=[("movie_id", "=", 2)])["similar_movie_id"].tolist() == [1, 3]


def test_republishing_the_same_content_changes_nothing_on_disk(serving_dir):
    first = serving.publish(serving_dir, _tables(), {"run_id": "r1"})
    before = _snapshot(serving_dir)

    # The same rows in another order, from a parquet file, with another manifest: same content.
    tables = _tables()
    tables["similar_movies"] = tables["similar_movies"].iloc[::-1]
    path = serving_dir.parent / "recs.parquet"
    tables["recommendations"].to_parquet(path)
    tables["recommendations"] = path
    again = serving.publish(serving_dir, tables, {"run_id": "r2"})

    assert again == {**first, "published": False}
    assert _snapshot(serving_dir) == before


def test_new_content_switches_the_pointer_and_keeps_a_bounded_number_of_versions(serving_dir):
    fps = [serving.publish(serving_dir, _tables(shift=i / 100), keep=2)["serving_fingerprint"] for i in range(4)]

    assert len(set(fps)) == 4
    assert serving.current_fingerprint(serving_dir) == fps[-1]
    assert sorted(p.name for p in (serving_dir / "versions").iterdir()) == sorted(fps[-2:])
    assert [p.name for p in serving_dir.iterdir() if p.name.startswith(".")] == []  # no temp links left
    assert served.open_served(serving_dir).similar_movies["score"].max() == pytest.approx(0.93)

    # Going back to a kept version switches the pointer without rewriting its files.
    kept = serving_dir / "versions" / fps[-2] / "similar_movies.parquet"
    mtime = kept.stat().st_mtime_ns
    back = serving.publish(serving_dir, _tables(shift=0.02), keep=2)
    assert back["published"] is True and serving.current_fingerprint(serving_dir) == fps[-2]
    assert kept.stat().st_mtime_ns == mtime
    assert json.loads((serving_dir / "history.json").read_text()) == [fps[-1], fps[-2]]


def test_a_crash_while_writing_leaves_current_on_the_previous_complete_version(serving_dir, monkeypatch):
    old = serving.publish(serving_dir, _tables())["serving_fingerprint"]
    real_write = serving.pq.write_table
    calls = []

    def write_then_crash(table, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(table, path, **kwargs)

    monkeypatch.setattr(serving.pq, "write_table", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        serving.publish(serving_dir, _tables(shift=0.05))

    assert serving.current_fingerprint(serving_dir) == old
    assert [p.name for p in (serving_dir / "versions").iterdir()] == [old]  # no half-written version left
    assert served.open_served(serving_dir).recommendations["movie_id"].tolist() == [3, 2]


def test_reading_before_anything_is_published_says_to_run_the_pipeline(serving_dir):
    with pytest.raises(errors.NothingPublishedError, match="nothing has been published yet under .*run the pipeline"):
        served.open_served(serving_dir)
    assert serving.current_fingerprint(serving_dir) is None


def test_publish_reads_back_what_it_wrote_before_moving_current(serving_dir, monkeypatch):
    old = serving.publish(serving_dir, _tables())["serving_fingerprint"]
    real_write = serving.pq.write_table

    def write_truncated(table, path, **kwargs):  # a write that "succeeds" but leaves half a file
        real_write(table, path, **kwargs)
        if Path(path).name == "recommendations.parquet":
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(serving.pq, "write_table", write_truncated)
    new = None
    with pytest.raises(errors.StageError, match=r"does not read back, so .*current was left as it was: "
                                                r".*/versions/\w+/recommendations\.parquet: table 'recommendations'"):
        new = serving.publish(serving_dir, _tables(shift=0.05))
    assert new is None
    assert serving.current_fingerprint(serving_dir) == old
    assert sorted(p.name for p in (serving_dir / "versions").iterdir()) == [old]  # nothing half-written kept
    assert served.open_served(serving_dir).recommendations["movie_id"].tolist() == [3, 2]


def test_a_manifest_that_does_not_read_back_stops_the_publish(serving_dir, monkeypatch):
    def broken_manifest(folder, stage, tables, **extra):
        (Path(folder) / "manifest.json").write_text('{"stage": "serving", "tables": {')

    monkeypatch.setattr(serving.storage, "write_manifest", broken_manifest)
    with pytest.raises(errors.StageError, match=r"versions/\w+/manifest\.json: does not read back"):
        serving.publish(serving_dir, _tables())
    assert serving.current_fingerprint(serving_dir) is None
    assert list((serving_dir / "versions").iterdir()) == []


def test_a_kept_version_damaged_since_is_written_again(serving_dir):
    first = serving.publish(serving_dir, _tables(), keep=3)["serving_fingerprint"]
    serving.publish(serving_dir, _tables(shift=0.01), keep=3)
    damaged = serving_dir / "versions" / first / "similar_movies.parquet"
    damaged.write_bytes(b"not parquet")

    back = serving.publish(serving_dir, _tables(), keep=3)
    assert back["published"] is True and serving.current_fingerprint(serving_dir) == first
    assert served.open_served(serving_dir).similar_movies["score"].max() == pytest.approx(0.9)

    damaged.write_bytes(b"not parquet")  # the current set itself: republishing the same content mends it
    again = serving.publish(serving_dir, _tables(), keep=3)
    assert again["published"] is True
    assert served.open_served(serving_dir).similar_movies["score"].max() == pytest.approx(0.9)


@pytest.mark.parametrize("target, message", [
    ("versions/gone", r"current points to versions/gone, which does not exist"),
    ("/elsewhere/versions/x", r"current points to /elsewhere/versions/x, which does not exist"),
    ("current", r"current points to current, a loop of links"),
], ids=["dangling", "absolute", "loop"])
def test_a_broken_current_link_is_named_and_the_next_publish_mends_it(serving_dir, target, message):
    serving_dir.mkdir(parents=True)
    (serving_dir / "current").symlink_to(target)
    with pytest.raises(errors.StageError, match=message) as raised:
        served.open_served(serving_dir)
    assert "nothing has been published yet" not in str(raised.value)
    assert serving.current_fingerprint(serving_dir) is None

    fp = serving.publish(serving_dir, _tables())["serving_fingerprint"]
    assert served.open_served(serving_dir).fingerprint == fp


def test_a_folder_in_place_of_current_is_refused_not_replaced(serving_dir):
    (serving_dir / "current").mkdir(parents=True)
    (serving_dir / "current" / "notes.txt").write_text("keep me")
    with pytest.raises(errors.StageError, match=r"current is a folder, not a link"):
        served.open_served(serving_dir)
    with pytest.raises(errors.StageError, match=r"current is a folder, not the link publish switches.*move it away"):
        serving.publish(serving_dir, _tables())
    assert (serving_dir / "current" / "notes.txt").read_text() == "keep me"


@pytest.fixture
def s3_settings(tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="recsys-test")
    yield load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_S3_ENDPOINT_URL": endpoint,
                         "RECSYS_S3_BUCKET": "recsys-test", "RECSYS_S3_PREFIX": "team"})
    server.stop()


def test_s3_gets_the_version_then_the_current_pointer(s3_settings):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url)
    first = serving.publish(s3_settings.serving_dir, _tables(), settings=s3_settings)
    fp = first["serving_fingerprint"]
    assert first["s3_uri"] == f"s3://recsys-test/team/serving/versions/{fp}/" and first["s3_published"] is True

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="recsys-test")["Contents"]}
    assert keys == {f"team/serving/versions/{fp}/{name}" for name in
                    ("manifest.json", "movies.parquet", "recommendations.parquet", "similar_movies.parquet")} | {
                       "team/serving/CURRENT"}
    pointer = json.loads(client.get_object(Bucket="recsys-test", Key="team/serving/CURRENT")["Body"].read())
    assert pointer == {"serving_fingerprint": fp, "prefix": f"team/serving/versions/{fp}/"}
    local = (s3_settings.serving_dir / "versions" / fp / "movies.parquet").read_bytes()
    assert client.get_object(Bucket="recsys-test", Key=f"team/serving/versions/{fp}/movies.parquet")[
        "Body"].read() == local

    assert serving.publish(s3_settings.serving_dir, _tables(), settings=s3_settings)["s3_published"] is False
    second = serving.publish(s3_settings.serving_dir, _tables(shift=0.01), settings=s3_settings, keep=1)
    pointer = json.loads(client.get_object(Bucket="recsys-test", Key="team/serving/CURRENT")["Body"].read())
    assert pointer["serving_fingerprint"] == second["serving_fingerprint"]
    versions = {o["Key"].split("/")[3] for o in client.list_objects_v2(Bucket="recsys-test")["Contents"]
                if "/versions/" in o["Key"]}
    assert versions == {second["serving_fingerprint"]}  # keep=1: the old S3 version is gone


def test_an_unreachable_bucket_is_a_publish_error(serving_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    settings = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_S3_ENDPOINT_URL": "http://127.0.0.1:9",
                              "RECSYS_S3_BUCKET": "nowhere"})
    with pytest.raises(errors.PublishError, match="cannot publish the served set .* to s3://nowhere/recsys/serving"):
        serving.publish(settings.serving_dir, _tables(), settings=settings)
    # S3 goes first and the local pointer last: with the bucket away, neither pointer has moved
    assert serving.current_fingerprint(settings.serving_dir) is None
