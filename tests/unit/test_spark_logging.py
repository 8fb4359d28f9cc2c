"""The driver JVM's logging: Airflow logs a task's stderr at ERROR, so only the JVM's errors may go there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.spark_logging import QUIET_LOGGERS, log4j2_properties

SCRIPT = """
import os
import sys
from pyspark.sql import Window, functions as F
from pipeline.config import load_settings
from pipeline.spark import get_spark

spark = get_spark(load_settings({"RECSYS_HOME": sys.argv[1]}))
print("python: session up", file=sys.stderr, flush=True)
spark.range(50).withColumn("n", F.row_number().over(Window.orderBy("id"))).count()  # WindowExec warns
from pyspark.ml.recommendation import ALS
ratings = spark.createDataFrame([(0, 0, 4.0), (0, 1, 3.0), (1, 1, 5.0), (1, 0, 1.0)], ["u", "i", "r"])
ALS(userCol="u", itemCol="i", ratingCol="r", rank=2, maxIter=2).fit(ratings).userFactors.count()  # BLAS
print("jvm OPENBLAS_NUM_THREADS=%s" % spark._jvm.java.lang.System.getenv("OPENBLAS_NUM_THREADS"), flush=True)
print("python OPENBLAS_NUM_THREADS=%s" % os.environ.get("OPENBLAS_NUM_THREADS"), flush=True)
log = spark._jvm.org.apache.log4j.LogManager.getLogger("recsys.probe")
log.warn("probe warning")
log.error("probe error")
spark.stop()
"""


def test_properties_split_levels_between_stdout_and_stderr():
    text = log4j2_properties("WARN")
    assert "rootLogger.level = warn" in text
    assert "appender.out.target = SYSTEM_OUT" in text and "appender.err.target = SYSTEM_ERR" in text
    for logger in QUIET_LOGGERS.values():
        assert f"= {logger}\n" in text


@pytest.fixture(scope="module")
def session_run(tmp_path_factory):
    """One driver process that starts the session, fits ALS and logs through the JVM."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path_factory.mktemp("spark") / "home")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.spark
def test_task_stderr_holds_only_the_jvms_errors(session_run):
    result = session_run
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("JVM ERROR probe: probe error" in line for line in err_lines), result.stderr
    assert "JVM WARN probe: probe warning" in result.stdout  # a warning: stdout (INFO in a task log)
    assert "python: session up" in result.stderr  # the process's own stderr is back after the JVM started
    noise = [line for line in err_lines if "probe error" not in line and "python: session up" not in line]
    assert noise == [], noise  # no incubator notice, BLAS probe, WindowExec or progress lines


@pytest.mark.spark
def test_native_blas_runs_one_thread_in_the_jvm_only(session_run):
    # Spark runs a task per core; OpenBLAS threads on top of them made implicit ALS fits slower
    # (docs/adr/0029-native-blas-one-thread-in-the-jvm.md)
    assert "jvm OPENBLAS_NUM_THREADS=1" in session_run.stdout
    assert "python OPENBLAS_NUM_THREADS=None" in session_run.stdout  # the driver's own environment is restored


def test_the_native_blas_probe_starts_no_blas_threads_in_python():
    """The driver learns whether the JVM can load the system BLAS by loading it itself (``_loadable``): with
    OpenBLAS's default that started a thread pool in the Python process, which never calls it."""
    probe = ("import os; from pipeline.spark_logging import _loadable; "
             "print(_loadable('libblas.so.3'), os.environ.get('OPENBLAS_NUM_THREADS'), "
             "len(os.listdir(f'/proc/{os.getpid()}/task')))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    loaded, variable, threads = out.split()
    if loaded != "True" and not os.environ.get("CI"):
        pytest.skip("no system BLAS here (make install adds it)")
    assert (loaded, variable, threads) == ("True", "None", "1")


EARLY_START = """
import os
import sys
import threading
import time
from pipeline.config import load_settings
from pipeline.spark import get_spark

starting = threading.Thread(target=get_spark, args=(load_settings({"RECSYS_HOME": sys.argv[1]}),))
starting.start()
deadline = time.monotonic() + 120
while os.environ.get("OPENBLAS_NUM_THREADS") != "1" and starting.is_alive() and time.monotonic() < deadline:
    time.sleep(0.001)  # until the JVM's environment is set: the validate stage's imports happen in that window
window = os.environ.get("OPENBLAS_NUM_THREADS") == "1"
import pyarrow
import scipy.linalg  # noqa: F401  (Great Expectations imports it)
arrow = pyarrow.cpu_count()
starting.join()
from threadpoolctl import threadpool_info
# numpy's and scipy's own OpenBLAS (the system one is the JVM's, probed with one thread: the test above)
blas = sorted(p["num_threads"] for p in threadpool_info()
              if p["internal_api"] == "openblas" and "site-packages" in p["filepath"])
print("window", window, "arrow", arrow, "blas", *blas, flush=True)
"""


@pytest.mark.spark
def test_a_session_started_beside_the_python_stages_leaves_their_thread_pools_whole(tmp_path):
    """``recsys run`` starts the JVM on a thread while ingest and validate run (``stages.warm_up``), and the
    JVM's one-thread BLAS setting is in this process's environment meanwhile: the libraries that size a pool
    from it when they load (scipy's OpenBLAS, Arrow's CPU pool) are loaded before, or the process would keep
    one thread in each."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", EARLY_START, str(tmp_path / "home")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    cores = os.cpu_count()
    assert words[:4] == ["window", "True", "arrow", str(cores)], out.stdout
    assert words[4:] == ["blas", str(cores), str(cores)], out.stdout
