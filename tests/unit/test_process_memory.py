"""The stage runner's process-level memory settings: glibc's malloc arenas are capped, so that the pages the
scoring threads free do not stay resident in arenas of their own."""

import platform
import subprocess
import sys
import textwrap

import pytest

from pipeline import stages

THREADS = textwrap.dedent("""
    import ctypes, sys, threading
    import numpy as np
    from pipeline import stages
    if sys.argv[1] == "capped":
        assert stages.limit_malloc_arenas()
    barrier = threading.Barrier(8)
    def work():
        kept = [np.ones(2000) for _ in range(20)]  # 16 KB each: malloc'd from this thread's arena
        barrier.wait()  # all eight threads hold memory at once, so none can reuse another's arena
        del kept
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL("libc.so.6").malloc_stats()  # to stderr, one "Arena N:" line per arena
""")


def _arenas(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_stage_runner_caps_glibcs_malloc_arenas_for_threads():
    assert _arenas("default") >= 8  # each concurrent thread got an arena of its own
    assert _arenas("capped") <= stages.MALLOC_ARENAS
