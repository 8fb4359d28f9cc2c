"""The stage runner's process-level memory settings: glibc's malloc arenas are capped, so that the pages the
scoring threads free do not stay resident in arenas of their own, and large arrays are reused from the heap
instead of being mapped and faulted in afresh each time."""

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
        assert stages.tune_malloc()
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


LOOP = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from pipeline import stages
    if sys.argv[1] == "tuned":
        assert stages.tune_malloc()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(20):  # a training or scoring loop: arrays of tens of MB made and dropped
        a, b = np.ones(8_000_000 + 1000 * i), np.ones(4_000_000)
        del a, b
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
""")


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_stage_runner_reuses_large_arrays_from_the_heap():
    """1.9 GB of 64 and 32 MB arrays: by default each is mapped, faulted in and unmapped (~18,000 page faults
    here, with transparent huge pages); tuned, the first pair's pages are reused (~1,000)."""
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned * 5 < default, (tuned, default)


FREEZE = textwrap.dedent("""
    import gc, weakref
    import numpy as np
    from pipeline import stages

    class Holder:
        pass

    kept = [Holder() for _ in range(1000)]  # what outlives the stage (modules, sessions)
    garbage = Holder()
    garbage.cycle, garbage.array = garbage, np.ones(1000)  # a cycle the stage dropped
    gone = weakref.ref(garbage)
    del garbage
    gc.disable()  # no automatic collection: release_memory's own must find the cycle
    stages.release_memory()  # outside run_pipeline: nothing frozen
    assert gone() is None and gc.get_freeze_count() == 0

    garbage = Holder()
    garbage.cycle = garbage
    gone = weakref.ref(garbage)
    del garbage
    stages.release_memory(freeze=True)  # what run_pipeline's stages do
    assert gone() is None, "the dropped cycle was frozen instead of collected"
    assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
    assert not any(o is kept[0] for o in gc.get_objects())  # the survivors are out of the collector's walk
""")


def test_release_memory_collects_what_a_stage_dropped_then_freezes_what_outlives_it_in_a_whole_run():
    done = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
