"""bench/pipeline.py's report: the README's scale table and the targets' met/missed lines, on hand-made runs (the
benchmark itself runs the whole pipeline at several sizes, far beyond a test's budget)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "bench" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
