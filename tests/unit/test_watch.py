"""Cheap source fingerprints for the watch DAG: equal while nothing changes, different after any change."""

from __future__ import annotations

import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest

from pipeline.data.watch import has_changed, source_fingerprint
from pipeline.errors import SourceError


def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    return folder


def test_local_folder_fingerprint_changes_with_content_size_or_mtime(settings, tmp_path):
    folder = _dataset(tmp_path / "ml-tiny")
    first = source_fingerprint(str(folder), settings)
    assert first == source_fingerprint(str(folder), settings)
    assert first["kind"] == "local" and first["files"] == 2 and not has_changed(first, dict(first))
    (folder / ".hidden").write_text("editor swap file")  # ignored
    assert source_fingerprint(str(folder), settings) == first

    with open(folder / "ratings.csv", "a") as fh:
        fh.write("1,2,3.5,964982704\n")
    appended = source_fingerprint(str(folder), settings)
    assert appended["fingerprint"] != first["fingerprint"] and has_changed(appended, first)

    stat = (folder / "movies.csv").stat()
    os.utime(folder / "movies.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, same size
    assert source_fingerprint(str(folder), settings)["fingerprint"] != appended["fingerprint"]


def test_a_source_never_seen_or_another_source_counts_as_changed(settings, tmp_path):
    a = source_fingerprint(str(_dataset(tmp_path / "a")), settings)
    assert has_changed(a, None) and has_changed(a, {})
    assert has_changed(a, {**a, "source": "/elsewhere"})


def test_zip_and_missing_sources(settings, tmp_path):
    archive = tmp_path / "ml-tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-tiny/ratings.csv", "userId,movieId,rating,timestamp\n")
    first = source_fingerprint(str(archive), settings)
    assert first["files"] == 1
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("ml-tiny/movies.csv", "movieId,title,genres\n")
    assert source_fingerprint(str(archive), settings)["fingerprint"] != first["fingerprint"]
    with pytest.raises(SourceError, match="does not exist"):
        source_fingerprint(str(tmp_path / "missing"), settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no files"):
        source_fingerprint(str(tmp_path / "empty"), settings)


def test_s3_prefix_fingerprint_is_one_listing_of_keys_sizes_and_etags(settings, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="movielens/ml-tiny/ratings.csv", Body=b"a,b\n1,2\n")
        s3.put_object(Bucket="data", Key="movielens/ml-tiny/old/ratings.csv", Body=b"ignored: a sub-folder")
        first = source_fingerprint("s3://data/movielens/ml-tiny", settings)
        assert first["kind"] == "s3" and first["files"] == 1
        assert source_fingerprint("s3://data/movielens/ml-tiny", settings) == first
        s3.put_object(Bucket="data", Key="movielens/ml-tiny/ratings.csv", Body=b"a,b\n1,3\n")  # same size
        assert source_fingerprint("s3://data/movielens/ml-tiny", settings)["fingerprint"] != first["fingerprint"]
        with pytest.raises(SourceError, match="no files"):
            source_fingerprint("s3://data/nothing-here", settings)


def test_grouplens_fingerprint_is_the_published_md5(tmp_path):
    from pipeline.config import load_settings

    (tmp_path / "ml-tiny.zip.md5").write_text("0123456789abcdef0123456789abcdef  ml-tiny.zip\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"),
                                  "RECSYS_GROUPLENS_URL": f"http://127.0.0.1:{server.server_port}"})
        first = source_fingerprint("grouplens:ml-tiny", settings)
        assert first["kind"] == "grouplens" and first["files"] == 1
        (tmp_path / "ml-tiny.zip.md5").write_text("fedcba9876543210fedcba9876543210  ml-tiny.zip\n")
        assert has_changed(source_fingerprint("grouplens:ml-tiny", settings), first)
        with pytest.raises(SourceError, match="cannot read"):
            source_fingerprint("grouplens:ml-missing", settings)
    finally:
        server.shutdown()
        server.server_close()
