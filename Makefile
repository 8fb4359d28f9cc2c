# Two commands on a fresh machine: `make run` (the whole DAG on embedded defaults) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Embedded defaults: everything lives under ./var (Airflow SQLite metadata, MLflow SQLite store, data, cache).
export RECSYS_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(RECSYS_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER ?= $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__CORE__UNIT_TEST_MODE ?= False
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Sized for a small (2-core) machine: the LocalExecutor forks [core] parallelism workers when it starts (Airflow's
# default 32), so two tasks at a time; one process parses the DAG files.
export AIRFLOW__CORE__PARALLELISM ?= 2
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES ?= 1
# Where make airflow / mlflow / ui listen (127.0.0.1).
export AIRFLOW_PORT ?= 8080
export MLFLOW_PORT ?= 5000

.PHONY: help install java blas run airflow mlflow ui test test-fast lint lock clean

help:
	@echo "make run    set up, then run the whole DAG once (airflow dags test); make airflow then shows its task logs"
	@echo "make airflow   the Airflow UI on http://127.0.0.1:$(AIRFLOW_PORT) (user admin; AIRFLOW_PORT=... for another port)"
	@echo "make mlflow    the MLflow UI on the run store, http://127.0.0.1:$(MLFLOW_PORT) (MLFLOW_PORT=...)"
	@echo "make ui        both at once; Ctrl-C stops both"
	@echo "make test   set up, then run the test suite"
	@echo "make test-fast   the unit tests that need no Spark, data or servers (under 3 minutes)"
	@echo "make lint   ruff (rules in pyproject.toml)"
	@echo "make lock   re-resolve setup.cfg's ranges into constraints.txt"

java:
	@command -v java >/dev/null 2>&1 || { echo "Java 17 or 21 is required by Spark 4 and was not found: install OpenJDK 17 (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME." >&2; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then echo "Java 17 or 21 is required by Spark 4; found Java '$$v' ($$(command -v java))." >&2; exit 1; fi

# Native BLAS for Spark ML: Debian's OpenBLAS and LAPACK, which Spark's netlib loads instead of its Java BLAS.
# ALS fits at 1 M ratings: rank 50 1.5x, implicit rank 128 2.4x faster; the same models to float rounding.
# Installed with apt-get where that is possible (root on Debian/Ubuntu), else a hint; RECSYS_NATIVE_BLAS=0 skips.
BLAS_PACKAGES := libopenblas0-pthread liblapack3
blas:
	@if [ "$${RECSYS_NATIVE_BLAS:-1}" = 0 ]; then exit 0; fi; \
	if /sbin/ldconfig -p 2>/dev/null | grep -q 'libblas\.so\.3 ' && /sbin/ldconfig -p | grep -q 'liblapack\.so\.3 '; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "native BLAS for Spark ML: apt-get install $(BLAS_PACKAGES)"; \
		apt-get install -y -q --no-install-recommends $(BLAS_PACKAGES) >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $(BLAS_PACKAGES) >/dev/null 2>&1; } \
		|| echo "native BLAS not installed (apt-get failed): Spark ML uses its Java BLAS, ALS fits run slower" >&2; \
	else \
		echo "hint: install $(BLAS_PACKAGES) (Debian/Ubuntu) for native BLAS in Spark ML; ALS fits run 1.5-2.4x faster" >&2; \
	fi

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: Python 3.11 is required (set PYTHON=...)." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: java blas $(STAMP)

# scripts/: what is too long for a recipe (starting, waiting for and stopping the servers these targets need).
# make run's tasks go through the LocalExecutor, which writes the task logs the UI shows (scripts/dag_run.py).
run: install
	$(BIN)/airflow db migrate >/dev/null
	$(BIN)/python scripts/dag_run.py movielens_recsys

airflow: $(STAMP)
	@$(BIN)/python scripts/servers.py airflow

mlflow: $(STAMP)
	@$(BIN)/python scripts/servers.py mlflow

ui: $(STAMP)
	@$(BIN)/python scripts/servers.py airflow mlflow

test: install
	$(BIN)/python -m pytest

# Unit tests on tiny generated data that need no Spark session, no real dataset, no servers (under 3 minutes).
test-fast: install
	$(BIN)/python -m pytest -m "not integration and not service and not spark" tests/unit tests/plugins

lint: $(STAMP)
	$(BIN)/ruff check src dags plugins tests bench scripts

lock:
	rm -rf /tmp/recsys-lock && $(PYTHON) -m venv /tmp/recsys-lock
	/tmp/recsys-lock/bin/pip install --quiet -e '.[dev]'
	( head -2 constraints.txt; /tmp/recsys-lock/bin/pip freeze --exclude-editable ) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf var .pytest_cache
