"""The process's memory between stages: glibc's malloc tuned for large numpy arrays and threads, freed heap
handed back to the OS after each stage, and what outlives the stages of a whole run frozen out of the garbage
collector. ``stages.run_stage`` calls ``tune_malloc`` before a stage and ``release_memory`` after it."""

from __future__ import annotations

import contextlib
import ctypes
import gc

MALLOC_ARENAS = 2  # glibc's default is 8 per core
MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap, and are reused there
TRIM_THRESHOLD = 1 << 30  # free heap kept until the stage ends (release_memory trims it then)


def tune_malloc() -> bool:
    """Set glibc's malloc for the stages' large numpy arrays and threads; True where applied (glibc only).

    - Arenas capped at MALLOC_ARENAS for the threads started from now on (TensorFlow's pools, the scoring
      threads, Spark's gateway). Each thread otherwise gets an arena of its own, and the pages freed in them
      stay resident; two arenas keep the threads' speed without most of that memory
      (docs/adr/0033-scoring-threads-and-malloc-arenas.md).
    - Arrays up to MMAP_THRESHOLD reused from the heap, which is trimmed only past TRIM_THRESHOLD. By default
      glibc maps each block above its threshold (128 KB, rising as blocks are freed, to at most 32 MB) on its
      own and unmaps it when freed, and hands the heap's free top back at once, so the next array of a loop
      faults in fresh zeroed pages: where page faults are costly, a numpy-heavy stage spends most of its time
      in the kernel (docs/adr/0038-large-arrays-on-the-malloc-heap.md)."""
    libc = _glibc()
    if libc is None:
        return False
    return (libc.mallopt(-8, MALLOC_ARENAS) == 1  # M_ARENA_MAX
            and libc.mallopt(-3, MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD
            and libc.mallopt(-1, TRIM_THRESHOLD) == 1)  # M_TRIM_THRESHOLD


_FREEZE_SURVIVORS = False  # set while a whole run goes on in this process (survivors_frozen)


@contextlib.contextmanager
def survivors_frozen():
    """While a whole run goes on in this process (``stages.run_pipeline``): ``release_memory`` freezes what
    outlives each stage; unfrozen when it ends."""
    global _FREEZE_SURVIVORS
    _FREEZE_SURVIVORS = True
    try:
        yield
    finally:
        _FREEZE_SURVIVORS = False
        gc.unfreeze()


def release_memory(freeze: bool | None = None) -> None:
    """Hand the memory a stage freed back to the OS. glibc keeps freed heap pages (and raises its mmap threshold
    after large frees, so later large arrays land on the heap too): without this the process's resident size
    carries every earlier stage's peak into the next one (``recsys run`` runs all stages in one process).

    ``freeze`` (default: within ``survivors_frozen``, during ``stages.run_pipeline``): what outlives a stage
    after the collection (modules, the Spark session, clients, caches) lives on through the run, so it is frozen
    out of the collector (``gc.freeze``) and the later collections, this one's and Python's own, do not walk it
    again: with TensorFlow, MLflow and Spark loaded that is hundreds of thousands of objects
    (docs/adr/0051-long-lived-heap-frozen-out-of-gc.md). Frozen objects are still freed by reference counting;
    only a cycle among them dropped later would stay, and they are unfrozen when the run ends. A process that
    runs one stage (an Airflow task) or a test suite calling stages freezes nothing."""
    gc.collect()
    if _FREEZE_SURVIVORS if freeze is None else freeze:
        gc.freeze()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """glibc, for its malloc tuning calls; None elsewhere (macOS, musl): nothing to tune."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
