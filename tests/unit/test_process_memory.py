"""The stage runner's process-level memory settings: glibc's malloc arenas are capped, so that the pages the
scoring threads free do not stay resident in arenas of their own, and large arrays are reused from the heap
instead of being mapped and faulted in afresh each time."""

import platform
import subprocess
import sys
import textwrap

import pytest

from pipeline import memory

THREADS = textwrap.dedent("""
    import ctypes, sys, threading
    import numpy as np
    from pipeline import memory
    if sys.argv[1] == "capped":
        assert memory.tune_malloc()
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
    assert _arenas("capped") <= memory.MALLOC_ARENAS


LOOP = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from pipeline import memory

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        assert memory.tune_malloc()
    before = mallinfo2()
    mapped, heap = 0, 0
    for i in range(20):  # a training or scoring loop: arrays of tens of MB made and dropped
        a, b = np.ones(8_000_000 + 1000 * i), np.ones(4_000_000)
        now = mallinfo2()
        mapped += now.hblks - before.hblks  # blocks mmap'd on their own (each faulted in afresh, then unmapped)
        heap = max(heap, now.arena - before.arena)  # how far the heap grew
        del a, b
    print(mapped, heap)
""")


def _malloc(mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mapped, heap = done.stdout.split()[-2:]
    return int(mapped), int(heap)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_stage_runner_reuses_large_arrays_from_the_heap():
    """1.9 GB of 64 and 32 MB arrays. By default each 64 MB one is mmap'd on its own (above the 32 MB to which
    glibc raises its threshold as blocks are freed), faulted in and unmapped when freed; tuned, every array
    comes from the heap, which the first pair grows and the later pairs reuse. Counted with glibc's
    mallinfo2, not with page faults: how many faults a mapping costs depends on the kernel's transparent huge
    pages at that moment (docs/adr/0053-malloc-test-counts-mappings.md)."""
    default_mapped, default_heap = _malloc("default")
    tuned_mapped, tuned_heap = _malloc("tuned")
    assert default_mapped >= 20, (default_mapped, default_heap)  # one mapping per 64 MB array
    assert tuned_mapped == 0, tuned_mapped
    first_pair = (8_000_000 + 4_000_000) * 8
    assert tuned_heap < first_pair + (8 << 20), tuned_heap  # the first pair's heap reused: not 20 pairs' worth


FREEZE = textwrap.dedent("""
    import gc, weakref
    import numpy as np
    from pipeline import memory

    class Holder:
        pass

    kept = [Holder() for _ in range(1000)]  # what outlives the stage (modules, sessions)
    garbage = Holder()
    garbage.cycle, garbage.array = garbage, np.ones(1000)  # a cycle the stage dropped
    gone = weakref.ref(garbage)
    del garbage
    gc.disable()  # no automatic collection: release_memory's own must find the cycle
    memory.release_memory()  # outside run_pipeline: nothing frozen
    assert gone() is None and gc.get_freeze_count() == 0

    garbage = Holder()
    garbage.cycle = garbage
    gone = weakref.ref(garbage)
    del garbage
    memory.release_memory(freeze=True)  # what run_pipeline's stages do
    assert gone() is None, "the dropped cycle was frozen instead of collected"
    assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
    assert not any(o is kept[0] for o in gc.get_objects())  # the survivors are out of the collector's walk
""")


def test_release_memory_collects_what_a_stage_dropped_then_freezes_what_outlives_it_in_a_whole_run():
    done = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
