"""Configuration: the settings (where things live, which services) and a run's context (the Params are in
``pipeline.params``).

- **Settings**: embedded defaults that work on a laptop, overridden by a TOML file and the environment
  (precedence, lowest first: defaults < the file named by ``RECSYS_SETTINGS_FILE`` < environment variables).
  Every environment variable the pipeline reads is read here. Credentials are never settings: boto3 reads
  them from its usual chain (environment, profile, role), and the DAG can fill that chain from a connection.
- **RunContext**: settings + run id + run folder + Params, what every stage function receives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.params import Params, resolve_params

DEFAULT_SOURCE = "grouplens:ml-latest-small"
DEFAULT_GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Settings:
    """Where things live and which services to use; the same names point the pipeline at a cluster."""

    home: Path
    data_root: Path
    cache_dir: Path
    source: str = DEFAULT_SOURCE
    grouplens_url: str = DEFAULT_GROUPLENS_URL
    spark_master: str = "local[2]"
    spark_driver_memory: str = "4g"
    spark_shuffle_partitions: int = 8
    spark_checkpoint_dir: str = ""  # empty: <home>/spark-checkpoints; on a cluster, a path every node sees
    mlflow_tracking_uri: str = ""
    mlflow_ui_url: str = ""  # where people browse MLflow (the Airflow plugin's links); empty: see plugins/
    mlflow_experiment: str = "movielens-recsys"
    registered_model: str = "movielens-recommender"
    registered_ranker: str = "movielens-ranker"
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "recsys"
    spark_ui: bool = False  # the Spark UI of a local session (port 4040); off by default on shared machines
    spark_log_level: str = "WARN"
    expectations_dir: Path | None = None  # None: the repo's expectations/, else the installed copy
    schedule: str = "weekly"  # what starts movielens_recsys: weekly, asset (the watch DAG's events) or both
    extra: dict = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.data_root / "runs"

    @property
    def serving_dir(self) -> Path:
        return self.data_root / "serving"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        """Where an embedded (SQLite) MLflow store keeps its artifacts: beside the store."""
        return self.home / "mlartifacts"

    @property
    def suites_dir(self) -> Path:
        """Where the GX expectation suites are read from."""
        if self.expectations_dir:
            return Path(self.expectations_dir)
        repo = Path(__file__).resolve().parents[2] / "expectations"
        return repo if repo.is_dir() else Path(sys.prefix) / "share" / "recsys" / "expectations"

    def public_dict(self) -> dict:
        """The settings as JSON-able values, with any password inside a URI masked."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = mask_secrets(str(value)) if isinstance(value, (Path, str)) else value
        return out


# The password runs to the last "@" before the host (a raw "@" or space inside it is common in hand-written URIs).
# A password with "/" in it is taken only without spaces (``_URI_SLASHED_PASSWORD``), so that
# "http://host:8080/path ... a@b" is left alone.
_HOST_AHEAD = r"@(?=[^\s@/]+(?:[/\s?#]|$))"
_URI_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^/\n]+)"
                           + _HOST_AHEAD)
_URI_SLASHED_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):"
                                   r"(?P<password>[^\s/@]*/[^\s]*?)" + _HOST_AHEAD)


@contextlib.contextmanager
def restored_environment(names):
    """Put the environment variables ``names`` back as they were when the block ends (set, changed or
    removed inside it)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def mask_secrets(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (for printing settings and logs)."""
    masked = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _URI_SLASHED_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", masked)


# setting name -> environment variables, first one set wins
_ENV = {
    "home": ["RECSYS_HOME"],
    "data_root": ["RECSYS_DATA_ROOT"],
    "cache_dir": ["RECSYS_CACHE_DIR"],
    "source": ["RECSYS_SOURCE", "MOVIELENS_DIR"],
    "grouplens_url": ["RECSYS_GROUPLENS_URL"],
    "spark_master": ["RECSYS_SPARK_MASTER", "SPARK_MASTER"],
    "spark_driver_memory": ["RECSYS_SPARK_DRIVER_MEMORY"],
    "spark_shuffle_partitions": ["RECSYS_SPARK_SHUFFLE_PARTITIONS"],
    "spark_checkpoint_dir": ["RECSYS_SPARK_CHECKPOINT_DIR"],
    "mlflow_tracking_uri": ["MLFLOW_TRACKING_URI"],
    "mlflow_ui_url": ["RECSYS_MLFLOW_UI_URL"],
    "mlflow_experiment": ["RECSYS_MLFLOW_EXPERIMENT"],
    "registered_model": ["RECSYS_REGISTERED_MODEL"],
    "registered_ranker": ["RECSYS_REGISTERED_RANKER"],
    "s3_endpoint_url": ["RECSYS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"],
    "s3_bucket": ["RECSYS_S3_BUCKET"],
    "s3_prefix": ["RECSYS_S3_PREFIX"],
    "spark_ui": ["RECSYS_SPARK_UI"],
    "spark_log_level": ["RECSYS_SPARK_LOG_LEVEL"],
    "expectations_dir": ["RECSYS_EXPECTATIONS_DIR"],
    "schedule": ["RECSYS_SCHEDULE"],
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_FILE_TYPES = {"spark_shuffle_partitions": int, "spark_ui": bool}  # in the TOML file; every other setting is text
_TOML_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number", list: "an array",
               dict: "a table"}
MAX_SHUFFLE_PARTITIONS = 100_000
SCHEDULES = ("weekly", "asset", "both")


def _from_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"settings file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path}: not valid TOML ({exc})") from exc
    data = data.get("recsys", data)
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path}: [recsys] must be a table of settings, got {data!r}")
    unknown = sorted(set(data) - set(_ENV))
    if unknown:
        raise ConfigError(f"settings file {path}: unknown settings {unknown}; known: {sorted(_ENV)}")
    for key, value in data.items():
        kind = _FILE_TYPES.get(key, str)
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ConfigError(f"settings file {path}: {key} = {value!r} ({_TOML_NAMES.get(type(value), 'a value')}): "
                              f"expected {_TOML_NAMES[kind]}")
    partitions = data.get("spark_shuffle_partitions", 1)
    if not 1 <= partitions <= MAX_SHUFFLE_PARTITIONS:
        raise ConfigError(f"settings file {path}: spark_shuffle_partitions = {partitions}: expected an integer from 1 "
                          f"to {MAX_SHUFFLE_PARTITIONS}")
    return data


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the optional TOML file and the environment."""
    env = os.environ if env is None else env
    values: dict = {}
    if env.get("RECSYS_SETTINGS_FILE"):
        values.update(_from_file(env["RECSYS_SETTINGS_FILE"]))
    for name, keys in _ENV.items():
        for key in keys:
            if env.get(key):
                values[name] = env[key]
                break

    home = Path(values.pop("home", Path.cwd() / "var")).expanduser().resolve()
    data_root = Path(values.pop("data_root", home / "data")).expanduser().resolve()
    cache_dir = Path(values.pop("cache_dir", home / "cache")).expanduser().resolve()
    if not values.get("mlflow_tracking_uri"):
        values["mlflow_tracking_uri"] = f"sqlite:///{home / 'mlflow.db'}"
    if "spark_shuffle_partitions" in values:
        text = str(values["spark_shuffle_partitions"]).strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_SHUFFLE_PARTITIONS:
            raise ConfigError(f"spark_shuffle_partitions must be an integer from 1 to {MAX_SHUFFLE_PARTITIONS}, got "
                              f"{values['spark_shuffle_partitions']!r}")
        values["spark_shuffle_partitions"] = int(text)
    if "spark_ui" in values and not isinstance(values["spark_ui"], bool):
        text = str(values["spark_ui"]).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"spark_ui must be true or false, got {values['spark_ui']!r}")
        values["spark_ui"] = text in _TRUE
    if values.setdefault("schedule", "weekly") not in SCHEDULES:
        raise ConfigError(f"RECSYS_SCHEDULE must be one of {', '.join(SCHEDULES)}, got {values['schedule']!r}")
    if values.get("expectations_dir"):
        values["expectations_dir"] = Path(values["expectations_dir"]).expanduser().resolve()
    source = values.get("source")
    if source and "://" not in source and not source.startswith("grouplens:"):
        values["source"] = str(Path(source).expanduser().resolve())
    return Settings(home=home, data_root=data_root, cache_dir=cache_dir, **values)


# --- a run's context ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What every stage function receives: where the run lives, its Params, and the settings."""

    settings: Settings
    run_id: str
    run_dir: Path
    params: Params = field(default_factory=Params)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage

    @property
    def source(self) -> str:
        return self.params.source or self.settings.source


def make_context(run_id: str | None = None, work_dir: Path | str | None = None, params: Mapping | Params | None = None,
                 settings: Settings | None = None) -> RunContext:
    """A run's context: the run folder is ``work_dir`` or ``<data_root>/runs/<run_id>``."""
    from pipeline import storage

    settings = settings or load_settings()
    run_id = run_id or storage.new_run_id()
    run_dir = Path(work_dir).resolve() if work_dir else settings.runs_dir / storage.safe_run_id(run_id)
    return RunContext(settings=settings, run_id=run_id, run_dir=run_dir, params=resolve_params(params))
