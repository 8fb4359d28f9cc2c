"""``recsys synth --out`` where it must not write: a real dataset is refused and left byte for byte as it was,
an unusable path is exit 2 naming it; only a new, an empty or an earlier synth folder is (re)written."""

from __future__ import annotations

import json
import os

import pytest

from hostile.conftest import recsys, tree_digest

SIZES = ["--ratings", "300", "--users", "15", "--movies", "80"]


def synth(out, *extra):
    return recsys("synth", *SIZES, "--out", out, *extra)


@pytest.mark.parametrize("drop", [[], ["README.txt"], ["README.txt", "tags.csv", "links.csv"]],
                         ids=["as-downloaded", "csv-files-only", "ratings-and-movies-only"])
def test_a_real_dataset_is_refused_and_left_as_it_was(source_copy, drop):
    for name in drop:
        (source_copy / name).unlink()
    before = tree_digest(source_copy)
    synth(source_copy).refused(2, str(source_copy), "synth.json")
    assert tree_digest(source_copy) == before
    assert [p.name for p in source_copy.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_a_folder_with_a_foreign_synth_json_is_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    (out / "synth.json").write_text('{"note": "not written by recsys synth"}')
    before = tree_digest(out)
    synth(out).refused(2, str(out))
    assert tree_digest(out) == before


def test_an_earlier_synth_folder_is_written_again(tmp_path):
    out = tmp_path / "synth"
    synth(out, "--seed", "1").succeeded()
    first = tree_digest(out)
    synth(out, "--seed", "2").succeeded()
    assert tree_digest(out) != first
    assert json.loads((out / "synth.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temp or old folder left


def test_an_empty_folder_is_written(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    synth(out).succeeded()
    assert (out / "ratings.csv").exists() and (out / "synth.json").exists()


UNUSABLE = [
    pytest.param("{file}", ["{file}", "is a file"], id="a-file"),
    pytest.param("{file}/synth", ["{file}/synth", "is a file"], id="under-a-file"),
    pytest.param("{link}", ["{link}", "link"], id="a-link"),
    pytest.param("/proc/recsys-hostile", ["/proc/recsys-hostile"], id="in-proc"),
    pytest.param("/proc/recsys-hostile/deeper", ["/proc/recsys-hostile/deeper"], id="under-proc"),
    pytest.param("/sys/recsys-hostile", ["/sys/recsys-hostile"], id="in-sys"),
    pytest.param("/dev/null/synth", ["/dev/null/synth"], id="under-dev-null"),
]


@pytest.mark.parametrize("out, named", UNUSABLE)
def test_an_unusable_out_path_is_refused_naming_it(tmp_path, out, named):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    earlier = tmp_path / "earlier"
    synth(earlier).succeeded()
    link = tmp_path / "link"
    os.symlink(earlier, link)
    fill = {"{file}": str(afile), "{link}": str(link)}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    before = tree_digest(tmp_path)
    synth(filled(out)).refused(2, *map(filled, named))
    assert tree_digest(tmp_path) == before
    assert afile.read_text() == "not a folder\n"
