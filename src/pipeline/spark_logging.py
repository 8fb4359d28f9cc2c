"""What the driver JVM prints, and where: task logs that show the pipeline's lines at their real level.

Airflow 3 logs every line a task process writes to stderr at ERROR, and the JVM that Spark starts inherits the
task's stderr: with Spark's defaults every harmless JVM warning showed as a red ERROR line in successful tasks.
Here the JVM gets a log4j2 configuration that sends WARN and below to stdout (INFO in a task log; the line
still names its level) and keeps ERROR and FATAL on stderr, and loggers known to warn about harmless things
report errors only. Two lines are printed outside log4j: the native BLAS/LAPACK probes (skipped when the
libraries are absent: the Java implementations are used either way) and the launcher's notice about the
vector module Spark 4 always adds (dropped by a filter on the JVM's stderr, which passes every other line).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

QUIET_LOGGERS = {
    "netlib": "dev.ludovic.netlib",  # "Failed to load implementation from ...JNIBLAS": the Java BLAS is used
    "window": "org.apache.spark.sql.execution.window.WindowExec",  # "No Partition Defined for Window operation"
    "hadoop_native": "org.apache.hadoop.util.NativeCodeLoader",  # "Unable to load native-hadoop library"
    "utils": "org.apache.spark.util.Utils",  # loopback host name; a port in use (the next one is tried)
    "plan_strings": "org.apache.spark.sql.catalyst.util.SparkStringUtils",  # "Truncated the string representation"
    "large_binary": "org.apache.spark.scheduler.DAGScheduler",  # "Broadcasting large task binary" (ALS)
    "task_size": "org.apache.spark.scheduler.TaskSetManager",  # "Stage N contains a task of very large size"
    "gc_metrics": "org.apache.spark.metrics.source.GarbageCollectionMetrics",
    "parquet": "org.apache.parquet",
    "jetty": "org.sparkproject.jetty",
}
PATTERN = "%d{HH:mm:ss.SSS} JVM %p %c{1}: %m%n%ex"
NATIVE_LIBS = {"blas": "libblas.so.3", "lapack": "liblapack.so.3"}  # what netlib's JNI loaders dlopen
_LAUNCH_NOISE = (b"WARNING: Using incubator modules",)


def log4j2_properties(level: str = "WARN") -> str:
    """The driver JVM's log4j2 configuration."""
    lines = ["# written by pipeline.spark_logging: WARN and below to stdout, ERROR and FATAL to stderr",
             f"rootLogger.level = {level.lower()}",
             "rootLogger.appenderRef.out.ref = out",
             "rootLogger.appenderRef.err.ref = err"]
    for name, target, below_error in (("out", "SYSTEM_OUT", True), ("err", "SYSTEM_ERR", False)):
        lines += [f"appender.{name}.type = Console",
                  f"appender.{name}.name = {name}",
                  f"appender.{name}.target = {target}",
                  f"appender.{name}.layout.type = PatternLayout",
                  f"appender.{name}.layout.pattern = {PATTERN}",
                  f"appender.{name}.filter.threshold.type = ThresholdFilter",
                  f"appender.{name}.filter.threshold.level = error",
                  f"appender.{name}.filter.threshold.onMatch = {'DENY' if below_error else 'ACCEPT'}",
                  f"appender.{name}.filter.threshold.onMismatch = {'ACCEPT' if below_error else 'DENY'}"]
    for key, logger in QUIET_LOGGERS.items():
        lines += [f"logger.{key}.name = {logger}", f"logger.{key}.level = error"]
    return "\n".join(lines) + "\n"


def log4j2_file(home: Path, level: str) -> Path:
    """The configuration, written under ``home`` (rewritten atomically only when it changed)."""
    path = Path(home) / "spark-log4j2.properties"
    text = log4j2_properties(level)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def java_options(home: Path, level: str) -> str:
    """``-D`` options for ``spark.driver.extraJavaOptions``: the log4j2 file, and no native BLAS/LAPACK probe
    where the library is missing (its JNI loader prints a dlopen failure to stderr, then Java's is used)."""
    options = [f"-Dlog4j2.configurationFile=file:{log4j2_file(home, level)}"]
    options += [f"-Ddev.ludovic.netlib.{name}.allowNative=false" for name, lib in NATIVE_LIBS.items()
                if not _loadable(lib)]
    return " ".join(options)


def _loadable(library: str) -> bool:
    """Whether ``library`` loads. It is loaded into this process to find out, with one BLAS thread: an OpenBLAS
    starts its thread pool when loaded, and this process never calls it."""
    import ctypes

    from pipeline.config import restored_environment

    with restored_environment(["OPENBLAS_NUM_THREADS"]):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        try:
            ctypes.CDLL(library)
            return True
        except OSError:
            return False


@contextlib.contextmanager
def jvm_stderr_filter():
    """While the driver JVM starts, fd 2 is a pipe: a thread drops the launcher's notice and copies every other
    line to the real stderr, for the JVM's whole life (it keeps the pipe as its stderr). This process's own
    stderr is restored as soon as the block ends."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_copy_lines, args=(read_end, real), name="jvm-stderr", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)


def _copy_lines(read_end: int, out: int) -> None:
    try:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if line.startswith(_LAUNCH_NOISE):
                    continue
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(out, view):]
                except OSError:
                    pass  # keep draining: a JVM writing into a full pipe would block
    finally:
        with contextlib.suppress(OSError):
            os.close(out)
