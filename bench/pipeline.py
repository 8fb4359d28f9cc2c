"""The whole pipeline (``recsys run``, default Params) at several sizes: every stage's wall time and peak resident
memory of the driver (the Python process tree) and of the Spark JVM.

    .venv/bin/python bench/pipeline.py [--sizes small,1m,10m] [--data-dir /tmp/recsys-bench/data]
        [--work-dir /tmp/recsys-bench/runs] [--json docs/scale.json] [--plot JSON.png] [--page PAGE.md]
        [--param NAME=VALUE] [--timeout SECONDS] [--side-by-side] [--baseline REV [--rounds N] [--baseline-wall S]]
    .venv/bin/python bench/pipeline.py --render     # docs/benchmarks.md's tables from docs/scale.json, no run

Sizes: ``small`` is ml-latest-small ($MOVIELENS_DIR, else ../shared/data/ml-latest-small); ``1m``, ``10m`` and
``25m`` are ``recsys synth`` folders of the ml-1m-like, ml-10m and ml-25m shapes (made once in --data-dir, seed
42). Each size runs in a fresh RECSYS_HOME (an empty registry: the first run's gate). Stage times are the run's
own ``timings_s``; memory is sampled from /proc every half second over the process tree (the JVM is the ``java``
process, the driver everything else) and attributed to the stage whose start/done log lines enclose the
sample (to both where two stages run side by side: a stage's peak is then the process's while it ran). Each run
records the commit it measured (HEAD's short hash, ``+dirty`` when src/, dags/ or bench/ differ from it) beside
when it ended. Results merge into --json by size (measure sizes in separate calls), the plot is redrawn from all of
them, and the tables are printed and written into --page between their markers (``<!-- scale-table
(bench/pipeline.py) -->`` ... ``<!-- /scale-table -->``, and the same for ``scale-summary`` and
``scale-targets``): docs/benchmarks.md for the default --json, no page for another one unless named.

``--baseline REV`` measures another commit's code beside this checkout's in the same hour: this machine's speed
varies by day and by hour, so two versions are compared only when run alternately. REV's ``src/`` and
``expectations/`` are exported (``git archive``) to a temporary folder that the baseline's ``recsys run`` finds
first on ``PYTHONPATH`` (this checkout's venv: REV must run on the same pins); each size then runs ``--rounds``
times, the baseline first, and the means and their ratio are printed and kept under the size's ``baseline`` in
--json. ``--baseline-wall``: the baseline's whole-run seconds on a reference day; the ratio then gives this
checkout's estimate for that day.

A script run from bench/ has bench/ first on ``sys.path``, where this file is ``pipeline.py``: an ``import
pipeline`` there (this file's own, the other bench scripts') finds this file before the package. Imported
under that name, the module below steps aside and hands the import on to the installed ``pipeline`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

if __name__ == "pipeline":  # found by `import pipeline` from a script in bench/: load the package instead
    import importlib

    _BENCH = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _BENCH]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)  # what the pending import statement returns

REPO = Path(__file__).resolve().parents[1]
SCALE_JSON = REPO / "docs" / "scale.json"
PAGE_MD = REPO / "docs" / "benchmarks.md"
BLOCKS = ("scale-table", "scale-summary", "scale-targets")  # the page's generated blocks, between their markers
CODE_DIRS = ("src", "dags", "bench")  # a run's commit is "+dirty" when these differ from it
SIZES = {  # ratings, users, movies
    "1m": (1_000_000, 7_000, 5_000),
    "10m": (10_000_000, 70_000, 10_000),
    "25m": (25_000_000, 160_000, 60_000),
}
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_mb(pid: int) -> tuple[float, bool, float]:
    """(resident MB, is a JVM, CPU seconds used so far) of one process; (0, False, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE / 2**20
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            exe = f.read().split(b"\0")[0]
        return rss, exe.endswith(b"java"), cpu
    except (OSError, IndexError, ValueError):
        return 0.0, False, 0.0


class Sampler(threading.Thread):
    """Samples (time, driver MB, JVM MB, CPU seconds) of ``root`` and its descendants every ``period`` seconds."""

    def __init__(self, root: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.period, self.samples, self.stop = root, period, [], threading.Event()
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds last seen (kept once the process is gone)

    def run(self):
        while not self.stop.is_set():
            tree, todo, driver, jvm = _children(), [self.root], 0.0, 0.0
            while todo:
                pid = todo.pop()
                rss, is_jvm, used = _rss_mb(pid)
                jvm, driver = (jvm + rss, driver) if is_jvm else (jvm, driver + rss)
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), used)
                todo.extend(tree.get(pid, []))
            self.samples.append((time.time(), driver, jvm, sum(self.cpu.values())))
            self.stop.wait(self.period)


def _stage_spans(log_path: Path) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """({stage: (start, end)}, {stage: start}) epoch seconds from the run's 'stage X: starting' / 'done|skipped'
    log lines; a stage in the second but not the first had started and not ended."""
    spans, starts = {}, {}
    for line in log_path.read_text(errors="replace").splitlines():
        if " stage " not in line or ": " not in line:
            continue
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        text = line.split(" stage ", 1)[1]
        name, _, rest = text.partition(": ")
        if rest.startswith("starting"):
            starts[name] = stamp
        elif (rest.startswith("done") or rest.startswith("skipped")) and name in starts:
            spans[name] = (starts[name], stamp)
    return spans, starts


def source_for(size: str, data_dir: Path) -> tuple[str, dict]:
    if size == "small":
        folder = Path(os.environ.get("MOVIELENS_DIR", REPO.parent / "shared/data/ml-latest-small"))
        return str(folder), {"variant": "ml-latest-small"}
    ratings, users, movies = SIZES[size]
    folder = data_dir / f"synth-{size}"
    meta = folder / "synth.json"
    if not (meta.exists() and json.loads(meta.read_text())["users"] == users):
        from pipeline.data.synth import write_synthetic

        print(f"bench: writing {ratings:,} synthetic ratings to {folder}", file=sys.stderr)
        write_synthetic(folder, ratings, users, movies, seed=42)
    return str(folder), {"variant": f"synthetic {size}", **json.loads(meta.read_text())}


def code_commit(rev: str | None = None) -> str | None:
    """The short hash of ``rev``, or of HEAD with ``+dirty`` when src/, dags/ or bench/ have uncommitted changes
    (untracked files included): the code a run measures. None outside a git checkout."""
    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *words], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        if rev is not None:
            return git("rev-parse", "--short", f"{rev}^{{commit}}")
        dirty = git("status", "--porcelain", "--", *CODE_DIRS)
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(size: str, args, code: Path | None = None, tag: str = "") -> dict:
    """One ``recsys run`` of ``size``: this checkout's package, or the one under ``code`` (a source tree's
    ``src``, first on the run's PYTHONPATH: the ``--baseline`` commit's). ``tag`` names its work folder beside
    the size's."""
    from pipeline.stages import side_by_side_by_default

    commit = code_commit(getattr(args, "baseline", None) if code is not None else None)
    source, data = source_for(size, args.data_dir)
    root = args.work_dir / f"{size}{tag}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {**os.environ, "RECSYS_HOME": str(root / "home")}
    env.pop("RECSYS_SETTINGS_FILE", None)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [str(Path(sys.executable).with_name("recsys")), "run", "--source", source, "--work-dir", str(root / "run")]
    for p in args.param:
        cmd += ["--param", p]
    if args.side_by_side:
        cmd.append("--side-by-side")
    log_path = root / "run.log"
    print(f"bench: {size}: code at {commit or 'an unknown commit'}: {' '.join(cmd)} (log {log_path})",
          file=sys.stderr)
    started = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True,
                                start_new_session=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            out, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:  # stop the whole run (the JVM too) and keep what it measured
            os.killpg(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate()
            for _ in range(60):  # the JVM takes a moment to go; then it is killed
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            out, stopped = "", True
        else:
            stopped = False
        sampler.stop.set()
        sampler.join()
    wall = time.time() - started
    try:
        timings = json.loads(out).get("timings_s", {})
    except json.JSONDecodeError:
        timings = {}
    spans, starts = _stage_spans(log_path)
    unfinished = [name for name in starts if name not in spans] if stopped else []
    for name in unfinished:  # the stages the time limit cut short count up to the stop, marked as such
        spans[name] = (starts[name], time.time())
    samples = sampler.samples

    def peaks(lo: float, hi: float) -> dict:
        inside = [s for s in samples if lo <= s[0] <= hi] or [min(samples, key=lambda s: abs(s[0] - lo))]
        return {"driver_mb": round(max(s[1] for s in inside)), "jvm_mb": round(max(s[2] for s in inside)),
                "total_mb": round(max(s[1] + s[2] for s in inside))}

    def busy(lo: float, hi: float) -> float | None:
        """Mean cores busy over [lo, hi] (CPU seconds of the tree / wall seconds; 2.0 = both of 2 cores)."""
        inside = [s for s in samples if lo <= s[0] <= hi]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1.0:
            return None
        return round((inside[-1][3] - inside[0][3]) / (inside[-1][0] - inside[0][0]), 2)

    stages = {name: {"seconds": round(timings.get(name, hi - lo), 1), **peaks(lo, hi), "cores_busy": busy(lo, hi),
                     **({"stopped": True} if name in unfinished else {})}
              for name, (lo, hi) in spans.items()}
    report = root / "run" / "report.json"
    dataset = json.loads(report.read_text()).get("dataset", {}) if report.exists() else {}
    return {"size": size, "source": source, "ratings": dataset.get("ratings") or data.get("ratings"),
            "users": dataset.get("users") or data.get("users"), "movies": dataset.get("movies") or data.get("movies"),
            "variant": data["variant"], "params": args.param,
            "stages_at_once": 2 if args.side_by_side or side_by_side_by_default() else 1, "rc": proc.returncode,
            "wall_s": round(wall, 1),
            "stopped": {"after_s": args.timeout, "in_stage": ", ".join(unfinished)} if stopped else None,
            "peak": peaks(started, time.time()), "cores_busy": busy(started, time.time()), "stages": stages,
            "log": str(log_path),
            "measured_at": datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "cpus": os.cpu_count()}


def table(runs: list[dict]) -> str:
    names = []
    for r in runs:
        names += [n for n in r["stages"] if n not in names]
    lines = ["| stage | " + " | ".join(f"{r['size']} ({(r['ratings'] or 0) / 1e6:.2f} M)" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for n in names:
        cells = []
        for r in runs:
            s = r["stages"].get(n)
            cells.append("-" if not s else f"{s['seconds']:.1f} s / {s['total_mb'] / 1024:.1f} GiB"
                         + (" (stopped)" if s.get("stopped") else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **whole run** | " + " | ".join(
        f"**{r['wall_s']:.0f} s / {r['peak']['total_mb'] / 1024:.1f} GiB**"
        + ("" if r["rc"] == 0 else f" (stopped after {r['stopped']['after_s']:.0f} s in {r['stopped']['in_stage']})"
           if r.get("stopped") else f" (exit {r['rc']})")
        for r in runs) + " |")
    lines.append("| peak driver / JVM | " + " | ".join(
        f"{r['peak']['driver_mb'] / 1024:.1f} / {r['peak']['jvm_mb'] / 1024:.1f} GiB" for r in runs) + " |")
    lines.append("| cores busy (mean) | " + " | ".join(
        f"{r['cores_busy']:.2f} of {r['cpus']}" if r.get("cores_busy") is not None else "-" for r in runs) + " |")
    # columns may come from different days and commits (the JSON keeps the other sizes' last runs), and this
    # machine's speed varies by day: each column says when it ran, which code, and the reference workload around it
    lines.append("| measured at (reference workload) | " + " | ".join(
        _when(r) + (f" ({', '.join(f'{x:.2f}' for x in r['reference_s'])} s)" if r.get("reference_s") else "")
        for r in runs) + " |")
    return "\n".join(lines)


def _when(run: dict) -> str:
    return run.get("measured_at", "-") + (f", {run['commit']}" if run.get("commit") else "")


def _size_name(run: dict) -> str:
    if run["size"] in SIZES:
        return f"synthetic {run['size'].removesuffix('m')} M"
    return run.get("variant") or run["size"]


def _whole_run(run: dict) -> str:
    wall = f"{run['wall_s']:,.0f} s" + (f" ({run['wall_s'] / 60:.1f} min)" if run["wall_s"] >= 600 else "")
    if run.get("stopped"):
        return f"{wall}, stopped in {run['stopped']['in_stage']}"
    return wall if run["rc"] == 0 else f"{wall}, exit {run['rc']}"


def summary(runs: list[dict]) -> str:
    """The whole runs, one row per size: what the README's results copy."""
    lines = ["| size | ratings | whole run | peak RSS | commit | measured |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    lines += [f"| {_size_name(r)} | {r['ratings'] or 0:,} | {_whole_run(r)} | {r['peak']['total_mb'] / 1024:.1f} "
              f"GiB | {r.get('commit') or '-'} | {r.get('measured_at', '-')[:10]} |" for r in runs]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in runs if r["ratings"]), key=lambda r: r["ratings"])
    names = []
    for r in runs:
        names += [n for n in r["stages"] if n not in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    x = [r["ratings"] for r in runs]
    labels = [f"{r['size']}\n{r['ratings'] / 1e6:.2f} M" for r in runs]
    bottom, other = [0.0] * len(runs), [0.0] * len(runs)
    for n in names:
        heights = [r["stages"].get(n, {}).get("seconds", 0) for r in runs]
        if max(heights) < 0.02 * max(r["wall_s"] for r in runs):
            other = [o + h for o, h in zip(other, heights)]
            continue
        left.bar(labels, heights, bottom=bottom, label=n)
        bottom = [b + h for b, h in zip(bottom, heights)]
    left.bar(labels, other, bottom=bottom, label="other stages", color="lightgrey")
    left.plot(labels, [r["wall_s"] for r in runs], "k_", markersize=30, label="whole run (wall)")
    left.set(ylabel="seconds", title="Wall time by stage (stages under 2 % of the largest run: other)")
    left.legend(fontsize=7)
    for key, style in (("total_mb", "o-"), ("driver_mb", "s--"), ("jvm_mb", "^--")):
        right.plot(x, [r["peak"][key] / 1024 for r in runs], style, label=key.replace("_mb", ""))
    right.set(xscale="log", xlabel="ratings", ylabel="peak RSS (GiB)", title="Peak resident memory")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# the targets on 2 cores / 24 GiB (issue 14): whole run seconds, peak GiB, and a stage limit where one is set
TARGETS = {
    "small": {"wall_s": 300, "peak_gib": None, "stages": {}},  # "the whole DAG stays under 5 minutes"
    "1m": {"wall_s": 150, "peak_gib": 4, "stages": {}},
    "10m": {"wall_s": 900, "peak_gib": 8, "stages": {"als": 240}},
    "25m": {"wall_s": 2400, "peak_gib": 24, "stages": {}},
}


def targets(runs: list[dict]) -> str:
    """One line per size: each target, the measured figure, met or missed."""
    lines = []
    for r in runs:
        goal = TARGETS.get(r["size"])
        if not goal:
            continue
        checks = [("whole run", r["wall_s"], goal["wall_s"], "s")]
        if goal["peak_gib"]:
            checks.append(("peak RSS", r["peak"]["total_mb"] / 1024, goal["peak_gib"], "GiB"))
        checks += [(f"stage {name}", r["stages"][name]["seconds"], limit, "s")
                   for name, limit in goal["stages"].items() if name in r["stages"]]
        done = r["rc"] == 0
        lines.append(f"targets {r['size']}: " + "; ".join(
            f"{what} {value:.1f} {unit} (target {limit} {unit}: "
            f"{'met' if value <= limit and (done or what != 'whole run') else 'MISSED'})"
            for what, value, limit, unit in checks) + ("" if done else " -- the run did not finish"))
    return "\n".join(lines)


def render_page(text: str, runs: list[dict]) -> str:
    """``text`` (a Markdown page) with each generated block between its markers rewritten from ``runs``."""
    bodies = {"scale-table": table(runs), "scale-summary": summary(runs),
              "scale-targets": "\n".join(f"- {line}" for line in targets(runs).splitlines())}
    for name in BLOCKS:
        start, end = f"<!-- {name} (bench/pipeline.py) -->", f"<!-- /{name} -->"
        before, found, rest = text.partition(start)
        _, found_end, after = rest.partition(end)
        if not (found and found_end):
            raise ValueError(f"the page has no {start} ... {end} block")
        text = f"{before}{start}\n{bodies[name]}\n{end}{after}"
    return text


def export_code(rev: str, into: Path) -> Path:
    """``rev``'s ``src/`` and ``expectations/`` (the settings look for it beside ``src/``) written under ``into``;
    the path to put first on PYTHONPATH."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}^{{commit}}"],
                           capture_output=True, text=True, check=True).stdout.split()
    archive = into / "code.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", f"--output={archive}", rev,
                    *[n for n in ("src", "expectations") if n in names]], capture_output=True, text=True, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return into / "src"


def compare(size: str, rev: str, baseline: list[float], ours: list[float], reference_wall: float | None) -> dict:
    """The same-hour comparison of this checkout with ``rev`` at ``size``: the whole runs' seconds, their means,
    the ratio (ours / baseline), and with ``reference_wall`` (the baseline's seconds on a reference day) this
    checkout's estimate for that day and the size's time target against it."""
    mean_base, mean_ours = sum(baseline) / len(baseline), sum(ours) / len(ours)
    result = {"rev": rev, "baseline_wall_s": baseline, "wall_s": ours, "ratio": round(mean_ours / mean_base, 3)}
    line = (f"baseline {size}: {rev} {', '.join(f'{w:.1f}' for w in baseline)} s (mean {mean_base:.1f}), this "
            f"checkout {', '.join(f'{w:.1f}' for w in ours)} s (mean {mean_ours:.1f}): ratio {result['ratio']:.3f}")
    if reference_wall:
        result["reference_wall_s"] = reference_wall
        result["estimate_s"] = round(reference_wall * result["ratio"], 1)
        line += f"; where {rev} took {reference_wall:.1f} s, this checkout: about {result['estimate_s']:.1f} s"
        limit = TARGETS.get(size, {}).get("wall_s")
        if limit:
            line += f" (target {limit} s: {'met' if result['estimate_s'] <= limit else 'MISSED'}, an estimate)"
    result["line"] = line
    return result


def reference_seconds() -> float:
    """Seconds of a fixed single-threaded CPU workload (a Python loop, numpy sorts): the machine's speed at the
    time of the run, so that runs measured on different days can be compared (the same code ran 2.4x slower on
    one day than on another here)."""
    import numpy as np

    started = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i
    values = np.random.default_rng(0).random(2_000_000)
    for _ in range(3):
        np.sort(values)
    return round(time.perf_counter() - started, 3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="small,1m")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/recsys-bench/data"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/recsys-bench/runs"))
    parser.add_argument("--json", type=Path, default=SCALE_JSON)
    parser.add_argument("--plot", type=Path, default=None,
                        help="default: beside --json, with .png (docs/scale.png for the default --json)")
    parser.add_argument("--page", type=Path, default=None,
                        help="the Markdown page whose generated tables are rewritten (default: docs/benchmarks.md "
                             "for the default --json, none for another)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite --page's tables from --json and print them")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--side-by-side", action="store_true",
                        help="recsys run --side-by-side: a Spark stage beside a Python stage (default: recsys "
                             "run's, by the cores)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a size's run after this long; the stages it finished are kept, the one it was "
                             "in is marked")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run this commit's code, alternating with this checkout's, and print the ratio")
    parser.add_argument("--rounds", type=int, default=1, help="with --baseline: runs of each code per size")
    parser.add_argument("--baseline-wall", type=float, metavar="SECONDS",
                        help="with --baseline and one size: REV's whole run on a reference day, to scale by the ratio")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s != "small" and s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; known: small, {', '.join(SIZES)}")
    if (args.rounds != 1 or args.baseline_wall) and not args.baseline:
        parser.error("--rounds and --baseline-wall go with --baseline")
    if args.baseline_wall and len(sizes) != 1:
        parser.error("--baseline-wall is one size's figure: give one size")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    page = args.page or (PAGE_MD if args.json.resolve() == SCALE_JSON else None)  # a trial's JSON: no page
    try:  # a page without its markers is refused before an hour of measuring, not after
        if page:
            render_page(page.read_text(), [])
    except (OSError, ValueError) as exc:
        parser.error(f"--page {page}: {exc}")
    if args.render:
        if not (args.json.exists() and page):
            parser.error("--render needs an existing --json and a page (--page, for a --json other than the default)")
        return render(args.json, page)
    previous = json.loads(args.json.read_text())["runs"] if args.json.exists() else []
    runs = {r["size"]: r for r in previous}
    with tempfile.TemporaryDirectory(prefix="recsys-baseline-") as folder:
        try:
            code = export_code(args.baseline, Path(folder)) if args.baseline else None
        except (OSError, tarfile.TarError, subprocess.CalledProcessError) as exc:
            detail = (getattr(exc, "stderr", None) or "").strip() or str(exc)
            parser.error(f"--baseline {args.baseline}: cannot export its code from {REPO} ({detail})")
        comparisons = [run_size(size, args, runs, code) for size in sizes]
    ordered = sorted(runs.values(), key=lambda r: r["ratings"] or 0)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": ordered}, indent=2) + "\n")
    plot(ordered, args.plot or args.json.with_suffix(".png"))  # a trial's --json elsewhere leaves docs/ alone
    show(ordered, page)
    for comparison in filter(None, comparisons):
        print(comparison["line"])
    return max(r["rc"] for r in ordered)


def show(runs: list[dict], page: Path | None) -> None:
    """The tables of ``runs`` (smallest first) printed, and written into ``page``'s generated blocks if given."""
    if page:
        page.write_text(render_page(page.read_text(), runs))
    print(table(runs))
    print(summary(runs))
    print(targets(runs))


def render(json_path: Path, page: Path) -> int:
    """``page``'s generated tables rewritten from ``json_path``'s runs (no measurement); they are printed too."""
    print(f"bench: {page}: tables from {json_path}", file=sys.stderr)
    show(sorted(json.loads(json_path.read_text())["runs"], key=lambda r: r["ratings"] or 0), page)
    return 0


def run_size(size: str, args, runs: dict, code: Path | None) -> dict | None:
    """Measure ``size`` (``--rounds`` times, each after a run of the baseline's ``code`` when there is one);
    this checkout's last run goes into ``runs``; the comparison, if any."""
    baseline, ours = [], []
    for round_no in range(args.rounds if code else 1):
        if code:
            reference = reference_seconds()
            run = measure(size, args, code=code, tag=f"-baseline-{round_no + 1}")
            print(f"bench: {size}: {args.baseline}, round {round_no + 1}: {run['wall_s']:.1f} s "
                  f"(exit {run['rc']}; reference workload {reference:.2f} s)", file=sys.stderr)
            baseline.append(run["wall_s"])
        reference = reference_seconds()
        runs[size] = measure(size, args)
        runs[size]["reference_s"] = [reference, reference_seconds()]  # before and after the run
        ours.append(runs[size]["wall_s"])
        print(json.dumps(runs[size], indent=2))
    if not code:
        return None
    runs[size]["baseline"] = compare(size, args.baseline, baseline, ours, args.baseline_wall)
    return runs[size]["baseline"]


if __name__ == "__main__":
    sys.exit(main())
