"""bench/pipeline.py's report: docs/benchmarks.md's tables, the targets' met/missed lines and the commit each run
records, on hand-made runs (the benchmark itself runs the whole pipeline at several sizes, far beyond a test's
budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench_scripts import load_bench

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scale():
    return load_bench("pipeline")


def _run(size, ratings, wall_s, stages, rc=0, stopped=None, measured_at="2026-12-03 19:00 UTC", reference=(0.5, 0.5)):
    return {"size": size, "ratings": ratings, "rc": rc, "wall_s": wall_s, "stopped": stopped, "cpus": 2,
            "cores_busy": 1.5, "peak": {"driver_mb": 1024, "jvm_mb": 2048, "total_mb": 3072},
            "stages": {name: {"seconds": s, "total_mb": 1024, **({"stopped": True} if name == (stopped or {}).get(
                "in_stage") else {})} for name, s in stages.items()},
            "measured_at": measured_at, "reference_s": list(reference)}


def test_the_table_names_each_columns_day_and_the_targets_say_met_or_missed(scale):
    runs = [_run("1m", 994_300, 140.0, {"etl": 20.0, "als": 50.0}),
            _run("10m", 9_950_000, 950.0, {"etl": 40.0, "als": 250.0}, measured_at="2026-11-30 09:18 UTC",
                 reference=(0.10, 0.11)),
            _run("25m", 24_910_000, 2500.0, {"etl": 60.0, "knn": 2400.0}, rc=-15,
                 stopped={"after_s": 2400, "in_stage": "knn"})]
    table = scale.table(runs).splitlines()
    assert table[0] == "| stage | 1m (0.99 M) | 10m (9.95 M) | 25m (24.91 M) |"
    assert "| als | 50.0 s / 1.0 GiB | 250.0 s / 1.0 GiB | - |" in table
    assert "| knn | - | - | 2400.0 s / 1.0 GiB (stopped) |" in table
    assert "(stopped after 2400 s in knn)" in table[-4]
    assert table[-1] == ("| measured at (reference workload) | 2026-12-03 19:00 UTC (0.50, 0.50 s) | "
                         "2026-11-30 09:18 UTC (0.10, 0.11 s) | 2026-12-03 19:00 UTC (0.50, 0.50 s) |")
    lines = scale.targets(runs).splitlines()
    assert lines[0] == ("targets 1m: whole run 140.0 s (target 150 s: met); "
                        "peak RSS 3.0 GiB (target 4 GiB: met)")
    assert "whole run 950.0 s (target 900 s: MISSED)" in lines[1]
    assert "stage als 250.0 s (target 240 s: MISSED)" in lines[1]
    # a run that did not finish never meets its wall-time target, whatever its figure
    assert lines[2].startswith("targets 25m: whole run 2500.0 s (target 2400 s: MISSED)")
    assert lines[2].endswith("-- the run did not finish")


def test_the_benchmark_refuses_an_unknown_size_before_running_anything(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline.py"), "--sizes", "2m",
                           "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown sizes ['2m']" in done.stderr
    assert not (tmp_path / "s.json").exists()


def test_the_other_bench_scripts_still_import_the_pipeline_package_beside_bench_pipeline_py():
    # a script run from bench/ has bench/ first on sys.path, where bench/pipeline.py would shadow the package
    # (knn_tables.py imports pipeline.models... at module level; --help parses after those imports)
    for script in ("knn_tables.py", "pipeline.py"):
        done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=REPO / "bench")
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout
    probe = ("import pipeline, pipeline.stages; "
             "print(pipeline.__file__); print(pipeline.stages.side_by_side_by_default.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=REPO / "bench")
    assert done.returncode == 0, done.stderr
    package, module = done.stdout.split()
    assert Path(package).name == "__init__.py" and module == "pipeline.stages"


def test_a_baseline_commit_runs_before_each_run_of_this_checkout_and_the_ratio_is_printed(scale, monkeypatch, tmp_path):
    calls = []
    walls = iter([300.0, 280.0, 290.0, 270.0])  # baseline, ours, baseline, ours

    def measure(size, args, code=None, tag=""):
        calls.append((size, code, tag))
        return {"size": size, "wall_s": next(walls), "rc": 0}

    monkeypatch.setattr(scale, "measure", measure)
    monkeypatch.setattr(scale, "reference_seconds", lambda: 0.1)
    args = SimpleNamespace(rounds=2, baseline="abc123", baseline_wall=160.0)
    runs = {}
    comparison = scale.run_size("1m", args, runs, tmp_path / "src")
    assert calls == [("1m", tmp_path / "src", "-baseline-1"), ("1m", None, ""),
                     ("1m", tmp_path / "src", "-baseline-2"), ("1m", None, "")]
    assert runs["1m"]["wall_s"] == 270.0 and runs["1m"]["baseline"] is comparison  # this checkout's last run
    assert comparison["ratio"] == round(275.0 / 295.0, 3) and comparison["estimate_s"] == round(160 * 0.932, 1)
    assert comparison["line"] == ("baseline 1m: abc123 300.0, 290.0 s (mean 295.0), this checkout 280.0, 270.0 s "
                                  "(mean 275.0): ratio 0.932; where abc123 took 160.0 s, this checkout: about 149.1 s "
                                  "(target 150 s: met, an estimate)")
    # without a baseline: one run, no comparison
    calls.clear()
    walls = iter([100.0])
    assert scale.run_size("small", SimpleNamespace(rounds=1, baseline=None, baseline_wall=None), runs, None) is None
    assert calls == [("small", None, "")] and "baseline" not in runs["small"]


def test_the_baselines_code_is_exported_and_first_on_its_runs_pythonpath(scale, monkeypatch, tmp_path):
    code = scale.export_code("HEAD", tmp_path)
    assert code == tmp_path / "src" and (code / "pipeline" / "stages.py").is_file()
    assert (tmp_path / "expectations").is_dir()  # the settings look for it beside src/
    seen = {}

    class Started(Exception):
        pass

    def popen(cmd, env, **kwargs):
        seen.update(cmd=cmd, env=env)
        raise Started

    monkeypatch.setattr(scale, "code_commit", lambda rev=None: "abc1234")  # git, before the fake Popen
    monkeypatch.setattr(scale.subprocess, "Popen", popen)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    args = SimpleNamespace(data_dir=tmp_path / "data", work_dir=tmp_path / "runs", param=[], side_by_side=False,
                           timeout=None)
    with pytest.raises(Started):
        scale.measure("small", args, code=code, tag="-baseline-1")
    assert seen["env"]["PYTHONPATH"].split(os.pathsep) == [str(code), "/elsewhere"]
    assert seen["cmd"][-1] == str(tmp_path / "runs" / "small-baseline-1" / "run")
    with pytest.raises(Started):
        scale.measure("small", args)
    assert seen["env"]["PYTHONPATH"] == "/elsewhere"  # this checkout's run: the environment as it is


def test_the_benchmark_refuses_a_baseline_that_is_not_a_commit(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline.py"), "--sizes", "1m", "--baseline",
                           "no-such-revision", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--baseline no-such-revision: cannot export its code" in done.stderr
    assert not (tmp_path / "s.json").exists()


def test_the_plot_goes_beside_the_json_unless_one_is_named(scale, monkeypatch, tmp_path):
    """A run measured into another JSON (a comparison, a trial) must not redraw docs/scale.png, nor rewrite
    docs/benchmarks.md."""
    drawn = []
    monkeypatch.setattr(scale, "run_size", lambda size, args, runs, code: None)
    monkeypatch.setattr(scale, "plot", lambda runs, path: drawn.append(path))
    monkeypatch.setattr(scale, "render_page", lambda text, runs: pytest.fail("a trial rewrote a page"))
    trial = tmp_path / "trial.json"
    trial.write_text(json.dumps({"runs": [_run("small", 100_836, 125.0, {"etl": 10.0})]}))
    for extra in ([], ["--plot", str(tmp_path / "named.png")]):
        monkeypatch.setattr(sys, "argv", ["pipeline.py", "--sizes", "small", "--json", str(trial), *extra])
        assert scale.main() == 0
    assert drawn == [tmp_path / "trial.png", tmp_path / "named.png"]


def test_each_run_records_the_commit_it_measured_dirty_when_the_code_has_changes(scale, monkeypatch, tmp_path):
    def git(*words):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com",
                               *words], capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    for folder in ("src", "bench", "docs"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(scale, "REPO", tmp_path)
    assert scale.code_commit() == head
    (tmp_path / "docs" / "a.py").write_text("x = 2\n")  # outside the code: still the commit's code
    assert scale.code_commit() == head
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    assert scale.code_commit() == f"{head}+dirty"
    git("checkout", "-q", "--", "bench")
    (tmp_path / "src" / "new.py").write_text("")  # an untracked module is a change too
    assert scale.code_commit() == f"{head}+dirty"
    assert scale.code_commit("HEAD") == head  # a --baseline revision: its own commit, never dirty
    monkeypatch.setattr(scale, "REPO", tmp_path / "not-a-checkout")
    assert scale.code_commit() is None


def test_the_commit_goes_beside_measured_at_and_into_both_tables(scale):
    runs = [{**_run("small", 100_836, 124.6, {"etl": 10.0}), "variant": "ml-latest-small", "commit": "4ef0465"},
            {**_run("10m", 9_954_296, 871.4, {"etl": 27.2}), "commit": "abc1234+dirty"},
            _run("25m", 24_907_263, 2500.0, {"knn": 2400.0}, rc=-15, stopped={"after_s": 2400, "in_stage": "knn"})]
    assert scale.table(runs).splitlines()[-1] == (
        "| measured at (reference workload) | 2026-12-03 19:00 UTC, 4ef0465 (0.50, 0.50 s) | "
        "2026-12-03 19:00 UTC, abc1234+dirty (0.50, 0.50 s) | 2026-12-03 19:00 UTC (0.50, 0.50 s) |")
    assert scale.summary(runs).splitlines() == [
        "| size | ratings | whole run | peak RSS | commit | measured |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        "| ml-latest-small | 100,836 | 125 s | 3.0 GiB | 4ef0465 | 2026-12-03 |",
        "| synthetic 10 M | 9,954,296 | 871 s (14.5 min) | 3.0 GiB | abc1234+dirty | 2026-12-03 |",
        "| synthetic 25 M | 24,907,263 | 2,500 s (41.7 min), stopped in knn | 3.0 GiB | - | 2026-12-03 |"]


def test_the_page_gets_its_generated_blocks_rewritten_and_nothing_else(scale, monkeypatch, tmp_path):
    runs = [_run("1m", 994_300, 140.0, {"etl": 20.0})]
    blocks = "".join(f"<!-- {name} (bench/pipeline.py) -->\nold {name}\n<!-- /{name} -->\n\nprose {name}\n"
                     for name in scale.BLOCKS)
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n" + blocks)
    text = scale.render_page(page.read_text(), runs)
    assert "old " not in text and text.startswith("# Title\n\n<!-- scale-table (bench/pipeline.py) -->\n| stage |")
    assert scale.table(runs) in text and scale.summary(runs) in text
    assert "- targets 1m: whole run 140.0 s (target 150 s: met)" in text
    assert [line for line in text.splitlines() if line.startswith("prose")] == [f"prose {n}" for n in scale.BLOCKS]
    assert scale.render_page(text, runs) == text
    with pytest.raises(ValueError, match="no <!-- scale-summary"):
        scale.render_page(text.replace("<!-- /scale-summary -->", ""), runs)
    # --render: the page's tables from the JSON, no run; a JSON other than docs/scale.json needs --page
    trial = tmp_path / "trial.json"
    trial.write_text(json.dumps({"runs": runs}))
    page.write_text("# Title\n\n" + blocks)
    monkeypatch.setattr(scale, "measure", lambda *a, **k: pytest.fail("--render measured"))
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--render", "--json", str(trial), "--page", str(page)])
    assert scale.main() == 0
    assert page.read_text() == text
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--render", "--json", str(trial)])
    with pytest.raises(SystemExit):
        scale.main()
    # a page without its blocks is refused before anything is measured
    (tmp_path / "bare.md").write_text("# Title\n")
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--sizes", "small", "--json", str(trial), "--page",
                                      str(tmp_path / "bare.md")])
    with pytest.raises(SystemExit):
        scale.main()
