"""One settings object: embedded defaults that work on a laptop, overridden by a TOML file and the environment.

Precedence (lowest first): defaults < the TOML file named by ``RECSYS_SETTINGS_FILE`` < environment variables.
Per-run knobs (split seed, fractions, thresholds, ...) are Params (see ``pipeline.params``), not settings.
Credentials are never settings: boto3 reads them from its usual chain (environment, profile, role), and the
DAG can fill that chain from an Airflow connection.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pipeline.errors import ConfigError

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
    mlflow_experiment: str = "movielens-recsys"
    registered_model: str = "movielens-recommender"
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "recsys"
    extra: dict = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.data_root / "runs"

    @property
    def serving_dir(self) -> Path:
        return self.data_root / "serving"

    def public_dict(self) -> dict:
        """The settings as JSON-able values (there are no secrets in settings)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


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
    "mlflow_experiment": ["RECSYS_MLFLOW_EXPERIMENT"],
    "registered_model": ["RECSYS_REGISTERED_MODEL"],
    "s3_endpoint_url": ["RECSYS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"],
    "s3_bucket": ["RECSYS_S3_BUCKET"],
    "s3_prefix": ["RECSYS_S3_PREFIX"],
}


def _from_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"settings file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path}: not valid TOML ({exc})") from exc
    data = data.get("recsys", data)
    unknown = sorted(set(data) - set(_ENV))
    if unknown:
        raise ConfigError(f"settings file {path}: unknown settings {unknown}; known: {sorted(_ENV)}")
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
        try:
            values["spark_shuffle_partitions"] = int(values["spark_shuffle_partitions"])
        except ValueError as exc:
            raise ConfigError(
                f"spark_shuffle_partitions must be an integer, got {values['spark_shuffle_partitions']!r}"
            ) from exc
    source = values.get("source")
    if source and "://" not in source and not source.startswith("grouplens:"):
        values["source"] = str(Path(source).expanduser().resolve())
    return Settings(home=home, data_root=data_root, cache_dir=cache_dir, **values)
