import pytest

from pipeline import storage
from pipeline.errors import StageError


def test_atomic_dir_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "stage"
    with storage.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash mid-stage")
    assert (target / "a.txt").read_text() == "first"  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp folder left behind

    with storage.atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_manifest_round_trip_and_missing_upstream_is_a_stage_error(tmp_path):
    storage.write_manifest(tmp_path, "ingest", {"ratings": {"rows": 3}}, extra_key=1)
    assert storage.read_manifest(tmp_path, "validate")["tables"]["ratings"]["rows"] == 3
    with pytest.raises(StageError, match="needs the output of stage 'nothing'"):
        storage.read_manifest(tmp_path / "nothing", "validate")


def test_run_ids_become_safe_folder_names():
    assert storage.safe_run_id("manual__2026-11-27T23:46:24.500863+00:00") == \
        "manual__2026-11-27T23_46_24.500863_00_00"


def test_combined_fingerprint_depends_on_every_part():
    a = storage.combine_fingerprints({"ratings": "x", "movies": "y"})
    assert a == storage.combine_fingerprints({"movies": "y", "ratings": "x"})
    assert a != storage.combine_fingerprints({"ratings": "x", "movies": "z"})
