"""The hostile-input corpus: what a careless or hostile user can throw at ``recsys`` and the served models.

Each case runs the command line in this process (``recsys(...)``, the same ``cli.main`` the console script
calls) or, where it needs a process of its own, as a subprocess (``recsys_process(...)``), and asserts:
the documented exit code, one ``recsys: error:`` line naming the file, row, column, key or path, no Python
traceback, and, where a completed run exists, that its report, the champion aliases and the served set are
exactly as they were (``Untouched``).

Cases that need a completed run share ``real_pipeline`` (the integration runs on the real ml-latest-small):
they work on copies of its run folders, or assert that a failing command left its home unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

RECSYS = Path(sys.executable).with_name("recsys")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("recsys: error:")]

    def refused(self, code: int, *named: str) -> str:
        """Assert a clean refusal: exit ``code``, exactly one error line naming each of ``named``, no traceback.
        Returns the error line."""
        assert "Traceback" not in self.stderr, self.stderr
        assert "internal error" not in self.stderr, self.stderr
        assert self.code == code, f"exit {self.code}, expected {code}:\n{self.stderr[-3000:]}"
        assert len(self.errors) == 1, self.stderr[-3000:]
        line = self.errors[0]
        for name in named:
            assert str(name) in line, f"{name!r} not named in: {line}"
        return line

    def succeeded(self) -> None:
        assert "Traceback" not in self.stderr, self.stderr
        assert self.code == 0, f"exit {self.code}:\n{self.stderr[-3000:]}"


def recsys(*args, env: dict | None = None) -> Outcome:
    """``recsys ARGS`` in this process, with ``env`` set (a value of None removes a variable) for the call."""
    from pipeline import cli
    from pipeline.config import restored_environment

    out, err = io.StringIO(), io.StringIO()
    with restored_environment(list(env or {})):
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    return Outcome(code, out.getvalue(), err.getvalue())


def recsys_process(*args, env: dict | None = None, timeout: float = 300) -> Outcome:
    """``recsys ARGS`` as its own process (for cases that kill it, or that need a fresh interpreter)."""
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items() if v is not None}}
    for key in [k for k, v in (env or {}).items() if v is None]:
        full_env.pop(key, None)
    proc = subprocess.run([str(RECSYS), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (links resolved); {} if it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    folder = folder.resolve()
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def champion_aliases(settings) -> dict:
    """{registered model: champion version or None} for both registered models."""
    from pipeline import registry, tracking

    client = tracking.client(settings)
    return {name: registry.champion_version(client, name)
            for name in (settings.registered_model, settings.registered_ranker)}


@dataclass
class Untouched:
    """What the last good run left, taken before a hostile case and compared after it."""

    settings: object
    run_dir: Path | None = None

    def __post_init__(self):
        self.before = self._take()

    def _take(self) -> dict:
        serving = self.settings.serving_dir
        current = serving / "current"
        state = {
            "current": os.readlink(current) if current.is_symlink() else None,
            "served": tree_digest(current),
            "aliases": champion_aliases(self.settings),
        }
        if self.run_dir is not None:
            state["run"] = {path: digest for path, digest in tree_digest(self.run_dir).items()
                            if path == "report.json" or path.startswith("summaries/")}
        return state

    def check(self, *keys: str) -> None:
        """Compare what was taken before with now: every part, or only ``keys`` ("current", "served",
        "aliases", "run")."""
        after = self._take()
        for key, value in self.before.items():
            if not keys or key in keys:
                assert after[key] == value, f"{key} changed"


@pytest.fixture
def completed_run(real_pipeline, tmp_path):
    """A copy of the first real run's folder (a completed run with a report), and the home it published into,
    with ``RECSYS_HOME`` pointing there; ``untouched.check()`` compares report, aliases and served set."""
    copy = tmp_path / "run"
    shutil.copytree(real_pipeline["first_dir"], copy, symlinks=True,
                    ignore=shutil.ignore_patterns(".recsys.lock", ".locks"))
    settings = real_pipeline["settings"]
    home = str(settings.home)
    saved = os.environ.get("RECSYS_HOME")
    os.environ["RECSYS_HOME"] = home
    try:
        yield {"run_dir": copy, "settings": settings, "home": home,
               "untouched": Untouched(settings, copy)}
    finally:
        if saved is None:
            os.environ.pop("RECSYS_HOME", None)
        else:
            os.environ["RECSYS_HOME"] = saved


@pytest.fixture
def source_copy(real_movielens, tmp_path):
    """A writable copy of the real ml-latest-small, to be edited by a case."""
    dest = tmp_path / "ml-latest-small"
    shutil.copytree(real_movielens, dest)
    return dest
