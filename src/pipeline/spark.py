"""The one SparkSession factory: a classic (JVM) session, ``local[2]`` by default, master URL from settings."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import restored_environment
from pipeline.spark_logging import java_options, jvm_stderr_filter

JVM_MEMORY_OPTIONS = "-XX:G1PeriodicGCInterval=3000 -XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=30"
# Native BLAS (Debian's OpenBLAS, `make install` / the image) runs single-threaded inside the JVMs: Spark already
# runs a task per core, and OpenBLAS's own threads on top of them made ALS fits slower than Java's BLAS
# (docs/adr/0029-native-blas-one-thread-in-the-jvm.md).
JVM_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
_LOCK = threading.Lock()
_SESSION = None  # the session get_spark made: SparkSession.getActiveSession() is per thread (None in a new one)


def get_spark(settings, app_name: str = "movielens-recsys"):
    """Return the process's SparkSession, creating it from the settings on first use. Safe from any thread
    (``recsys run`` runs a Spark stage beside a Python one)."""
    global _SESSION
    with _LOCK:
        _SESSION = _existing() or _create(settings, app_name)
        return _SESSION


def _existing():
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if _SESSION is not None and _SESSION.sparkContext._jsc is not None:  # made by another thread, not stopped
        return _SESSION
    return None


def _create(settings, app_name: str):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON") or __import__("sys").executable)
    builder = (
        SparkSession.builder.master(settings.spark_master)
        .appName(app_name)
        .config("spark.driver.memory", settings.spark_driver_memory)
        .config("spark.sql.shuffle.partitions", str(settings.spark_shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.adaptive.enabled", "true")
        # pandas <-> Spark through Arrow (the ALS stages' training rows, every model's factors): PySpark 4's
        # default, pinned against a cluster's spark-defaults: row by row is an order of magnitude slower
        # (docs/adr/0041-arrow-pinned-for-pandas-and-spark.md)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.warehouse.dir", str(settings.home / "spark-warehouse"))
        # ALS's long lineage is serialized recursively: a bigger thread stack avoids StackOverflowError,
        # most of all on the py4j threads that run concurrent grid fits; the JVM's logging: spark_logging.
        # G1 gives its free heap back to the OS: a collection every few seconds while the JVM idles (the Python
        # stages: AutoRec, kNN, EASE, ...) and a heap kept at most 30 % free, so that the idle driver JVM shrinks
        # beside the Python stages' own peaks (docs/adr/0027-memory-handed-back-between-stages.md).
        .config("spark.executorEnv.OPENBLAS_NUM_THREADS", JVM_ENV["OPENBLAS_NUM_THREADS"])
        .config("spark.executorEnv.OMP_NUM_THREADS", JVM_ENV["OMP_NUM_THREADS"])
        .config("spark.driver.extraJavaOptions", f"-Xss32m -Dderby.system.home={settings.home / 'derby'} "
                f"{JVM_MEMORY_OPTIONS} {java_options(settings.home, settings.spark_log_level)}")
    )
    if settings.spark_master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # loopback only: a laptop or CI box needs no externally reachable driver
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        builder = builder.config("spark.ui.enabled", "true" if settings.spark_ui else "false")
    _load_thread_pools()
    # the local driver JVM inherits JVM_ENV; this process's own thread pools (loaded already) keep their threads
    with jvm_stderr_filter(), restored_environment(JVM_ENV):  # the JVM starts here (once per process)
        os.environ.update(JVM_ENV)
        spark = builder.getOrCreate()
    # lets ALS checkpoint (and cut) its lineage every checkpointInterval iterations
    spark.sparkContext.setCheckpointDir(settings.spark_checkpoint_dir or str(settings.home / "spark-checkpoints"))
    spark.sparkContext.setLogLevel(settings.spark_log_level)
    return spark


def _load_thread_pools() -> None:
    """Load, before JVM_ENV is set, the libraries of this process that size a thread pool from those variables
    when they load: numpy's and scipy's OpenBLAS (scipy: kNN, EASE, and Great Expectations imports it) and
    Arrow's CPU pool (made on first use). Had one of them loaded while the variables were set -- ``recsys run``
    starts the JVM while the validate stage imports Great Expectations (``stages.warm_up``) -- its pool would
    keep one thread for the whole run."""
    import numpy
    import pyarrow
    import scipy.linalg

    pyarrow.cpu_count()
    del numpy, scipy  # loaded is what counts


@contextmanager
def frame_from_pandas(spark, frame, folder: Path | None = None) -> Iterator:
    """``frame`` (pandas) as a Spark DataFrame, for as long as the block runs.

    With ``folder`` -- a folder Spark reads from, as the run folder is (the ETL stage writes its splits there
    with Spark) -- the rows go through a parquet file in it, removed afterwards: pyarrow writes it and Spark reads
    it in parallel, where ``spark.createDataFrame`` sends Arrow batches through the driver JVM, which turns them
    into rows (docs/adr/0050-als-training-rows-through-parquet.md). Without a folder: ``spark.createDataFrame``."""
    if folder is None:
        yield spark.createDataFrame(frame)
        return
    path = Path(folder) / f"spark-input-{uuid.uuid4().hex[:8]}.parquet"  # Spark skips names that start with . or _
    try:
        frame.to_parquet(path, index=False)
        yield spark.read.parquet(str(path))
    finally:
        path.unlink(missing_ok=True)
