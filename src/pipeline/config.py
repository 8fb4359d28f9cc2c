"""Configuration: the settings (where things live, which services), the per-run Params, and a run's context.

- **Settings**: embedded defaults that work on a laptop, overridden by a TOML file and the environment
  (precedence, lowest first: defaults < the file named by ``RECSYS_SETTINGS_FILE`` < environment variables).
  Every environment variable the pipeline reads is read here. Credentials are never settings: boto3 reads
  them from its usual chain (environment, profile, role), and the DAG can fill that chain from a connection.
- **Params**: per-run knobs (split seed, fractions, grids, thresholds). One table, the ``Params`` dataclass,
  gives the DAG's trigger form, ``recsys params`` and the typed, frozen object stage code reads
  (``ctx.params.als_ranks``): a misspelt name is an AttributeError that the tests catch, not a silent default.
- **RunContext**: settings + run id + run folder + Params, what every stage function receives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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


_URI_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def mask_secrets(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (for printing settings and logs)."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


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


# --- Params -------------------------------------------------------------------------------------------------

JAVA_INT_MAX = 2**31 - 1  # Spark's ALS rank/maxIter/blocks and most JVM-side integers are 32-bit
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
SECTIONS = ("data", "split", "ALS", "AutoRec", "ranking", "gate", "serving")


def _param(default, kind: str, section: str, description: str, *, enum: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, item: str | None = None,
           nullable: bool = False):
    """A field of ``Params``: its default plus what the form, ``recsys params`` and validation need."""
    assert section in SECTIONS, section
    spec = {"type": kind, "section": section, "description": description, "enum": enum, "minimum": minimum,
            "maximum": maximum, "item_type": item, "nullable": nullable}
    return field(default=default, metadata={"param": spec})


@dataclass(frozen=True)
class Params:
    """The per-run Params: the one table behind the trigger form, ``recsys params`` and the stages."""

    source: str | None = _param(
        None, "string", "data",
        "Dataset source: 'grouplens:<name>' (e.g. grouplens:ml-latest-small), a local folder or .zip, or "
        "s3://bucket/prefix. Empty means the configured default (RECSYS_SOURCE / MOVIELENS_DIR).", nullable=True)
    quarantine_threshold: float = _param(
        0.001, "number", "data",
        "Largest fraction of a table's rows that may fail row-level expectations and be quarantined before the "
        "run stops (0.001 = 0.1 %).", minimum=0.0, maximum=1.0)
    olap_min_ratings: int = _param(
        10, "integer", "data", "Minimum number of ratings for a movie to enter the popularity / mean-rating table.",
        minimum=1)
    split_strategy: str = _param(
        "random", "string", "split",
        "How test/validation rows are chosen per user: 'random' (stratified by user, seeded) or 'temporal' "
        "(each user's latest ratings).", enum=("random", "temporal"))
    seed: int = _param(42, "integer", "split", "Seed of the random split (and of every model).",
                       minimum=0, maximum=JAVA_INT_MAX)
    validation_fraction: float = _param(0.1, "number", "split",
                                        "Fraction of each user's ratings held out for validation.",
                                        minimum=0.0, maximum=0.5)
    test_fraction: float = _param(0.1, "number", "split", "Fraction of each user's ratings held out for test.",
                                  minimum=0.0, maximum=0.5)
    als_ranks: tuple[int, ...] = _param((10, 25, 50), "array", "ALS", "ALS grid: numbers of latent factors (rank).",
                                        item="integer", minimum=1, maximum=1000)
    als_reg_params: tuple[float, ...] = _param((0.05, 0.1, 0.125, 0.15, 0.2), "array", "ALS",
                                               "ALS grid: regularization (regParam).", item="number",
                                               minimum=0.0, maximum=1e6)
    als_max_iters: tuple[int, ...] = _param((15,), "array", "ALS", "ALS grid: iterations (maxIter).",
                                            item="integer", minimum=1, maximum=1000)
    als_parallel_fits: int = _param(
        2, "integer", "ALS", "How many ALS grid points Spark fits at once (overlaps driver work with executor "
        "work).", minimum=1, maximum=16)
    autorec_enabled: bool = _param(True, "boolean", "AutoRec", "Train the AutoRec autoencoder (TensorFlow).")
    autorec_hidden_units: int = _param(100, "integer", "AutoRec",
                                       "AutoRec code size (encoding_dim): each movie's embedding length.",
                                       minimum=1, maximum=4096)
    autorec_l2: float = _param(30.0, "number", "AutoRec", "AutoRec L2 weight (the paper's lambda).",
                               minimum=0.0, maximum=1e9)
    autorec_dropout: float = _param(0.5, "number", "AutoRec",
                                    "Share of observed inputs hidden from the encoder at each step.",
                                    minimum=0.0, maximum=0.95)
    autorec_learning_rate: float = _param(0.001, "number", "AutoRec", "Adam learning rate.",
                                          minimum=1e-6, maximum=1.0)
    autorec_epochs: int = _param(100, "integer", "AutoRec",
                                 "Most epochs; early stopping on validation RMSE usually ends sooner.",
                                 minimum=1, maximum=100_000)
    autorec_batch_size: int = _param(512, "integer", "AutoRec", "Movies per training batch.",
                                     minimum=1, maximum=1_000_000)
    autorec_patience: int = _param(10, "integer", "AutoRec",
                                   "Epochs without a better validation RMSE before stopping.",
                                   minimum=1, maximum=100_000)
    autorec_normalization: str = _param(
        "baseline", "string", "AutoRec",
        "What the network models: 'baseline' (residuals of the bias baseline) or 'mean' (ratings minus the "
        "global mean).", enum=("baseline", "mean"))
    ials_ranks: tuple[int, ...] = _param((64, 128), "array", "ranking",
                                         "Implicit-feedback ALS grid: numbers of latent factors.",
                                         item="integer", minimum=1, maximum=1000)
    ials_reg_params: tuple[float, ...] = _param((0.2, 0.5), "array", "ranking", "Implicit-feedback ALS grid: regParam.",
                                                item="number", minimum=0.0, maximum=1e6)
    ials_alphas: tuple[float, ...] = _param(
        (1.0,), "array", "ranking", "Implicit-feedback ALS grid: alpha, the confidence c = 1 + alpha * rating.",
        item="number", minimum=0.0, maximum=1e6)
    ials_max_iters: tuple[int, ...] = _param((10,), "array", "ranking", "Implicit-feedback ALS grid: iterations.",
                                             item="integer", minimum=1, maximum=1000)
    ease_lambdas: tuple[float, ...] = _param((100.0, 200.0, 400.0, 800.0), "array", "ranking",
                                             "EASE: L2 weights tried (chosen on validation NDCG@10).",
                                             item="number", minimum=0.001, maximum=1e9)
    ease_min_ratings: int = _param(3, "integer", "ranking",
                                   "EASE catalogue: movies with at least this many training ratings.",
                                   minimum=1, maximum=1_000_000)
    ease_max_items: int = _param(
        15_000, "integer", "ranking",
        "EASE is skipped (with the reason logged) when its catalogue exceeds this many movies: its items x items "
        "matrices (3 float32 copies; 2.7 GB at 15,000) must fit in memory.", minimum=1, maximum=100_000)
    cold_start_known_ratings: int = _param(
        5, "integer", "ranking",
        "Cold-start measurement: how many of a test user's first ratings the cold-start path is given.",
        minimum=1, maximum=1000)
    promotion_margin: float = _param(
        0.0, "number", "gate",
        "How much lower the challenger's test RMSE must be than the champion's to be promoted "
        "(0 = strictly better).", minimum=0.0, maximum=10.0)
    ranking_promotion_margin: float = _param(
        0.0, "number", "gate",
        "How much higher the ranking challenger's test NDCG@10 must be than the ranking champion's to be promoted "
        "(0 = strictly better).", minimum=0.0, maximum=1.0)
    similarity_source: str = _param(
        "ranking", "string", "serving",
        "Which champion's item vectors feed the similar-movie tables: 'ranking' (the ranker's item factors or "
        "EASE weight rows) or 'rating' (the rating model's embeddings); chosen by the cold-start measurement.",
        enum=("rating", "ranking"))
    similar_k: int = _param(10, "integer", "serving", "How many similar movies to keep per movie.",
                            minimum=1, maximum=100)
    recommend_k: int = _param(10, "integer", "serving", "How many recommendations to serve per user.",
                              minimum=1, maximum=100)

    def to_dict(self) -> dict:
        """JSON-able values (tuples as lists), as the trigger form and report.json show them."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> Params:
        return resolve_params({**self.to_dict(), **changes})


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ParamSpec:
    """One Param as the form and the command line describe it (derived from a ``Params`` field)."""

    name: str
    default: Any
    type: str
    section: str
    description: str
    enum: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    item_type: str | None = None  # for arrays: the type of each element (bounds apply to elements)
    nullable: bool = False

    def json_schema(self) -> dict:
        bounds: dict[str, Any] = {}
        if self.minimum is not None:
            bounds["minimum"] = self.minimum
        if self.maximum is not None:
            bounds["maximum"] = self.maximum
        if self.type == "array":
            return {"type": "array", "minItems": 1, "items": {"type": self.item_type, **bounds}}
        schema: dict[str, Any] = {"type": ["null", self.type] if self.nullable else self.type, **bounds}
        if self.enum:
            schema["enum"] = list(self.enum)
        return schema

    def check(self, value: Any) -> Any:
        """The value as the stage will use it, or a ConfigError naming the Param and what is wrong."""
        if value is None and self.nullable:
            return None
        if self.type == "array":
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"Param {self.name}: expected a non-empty list, got {value!r}")
            item = ParamSpec(self.name, None, self.item_type, self.section, "", minimum=self.minimum,
                             maximum=self.maximum)
            return tuple(item.check(v) for v in value)
        expected = _JSON_TYPES[self.type]
        if isinstance(value, bool) and self.type in ("integer", "number"):
            raise ConfigError(f"Param {self.name}: expected {self.type}, got boolean {value!r}")
        if self.type == "number" and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Param {self.name}: expected a finite number, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"Param {self.name}: expected {self.type}, got {type(value).__name__} {value!r}")
        if self.enum and value not in self.enum:
            raise ConfigError(f"Param {self.name}: {value!r} is not one of {list(self.enum)}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"Param {self.name}: {value!r} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"Param {self.name}: {value!r} is above the maximum {self.maximum}")
        return float(value) if self.type == "number" else value


PARAMS: tuple[ParamSpec, ...] = tuple(
    ParamSpec(f.name, _json_value(f.default), **{k: v for k, v in f.metadata["param"].items()})
    for f in dataclasses.fields(Params)
)
PARAMS_BY_NAME = {p.name: p for p in PARAMS}


def default_params() -> dict:
    """Every Param's default, JSON-able (what the trigger form shows)."""
    return {p.name: p.default for p in PARAMS}


def resolve_params(overrides: Mapping | Params | None = None) -> Params:
    """Defaults overlaid with ``overrides``, each checked against its spec; unknown names are an error."""
    if isinstance(overrides, Params):
        return overrides
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(PARAMS_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown Params {unknown}; see `recsys params` for the list")
    values = {p.name: PARAMS_BY_NAME[p.name].check(overrides.get(p.name, p.default)) for p in PARAMS}
    if values["source"] is not None and not values["source"].strip():
        values["source"] = None  # an empty text box on the form: the configured default
    if values["validation_fraction"] + values["test_fraction"] >= 0.9:
        raise ConfigError(
            "Params validation_fraction + test_fraction must leave at least 10 % of the ratings for training"
        )
    return Params(**values)


def parse_cli_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE in JSON; a bare word that is not JSON is taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--param takes NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip()
    try:
        # NaN / Infinity are not JSON: refuse them here rather than let Python's parser accept them
        value = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError:
        spec = PARAMS_BY_NAME.get(name)
        if spec is not None and spec.type != "string":
            raise ConfigError(f"Param {name}: {raw!r} is not a valid {spec.type} (JSON)") from None
        value = raw
    return name, value


def check_k(k, what: str = "k") -> int:
    """A positive count of results (recommendations, neighbours); ConfigError otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"{what} must be a positive number of results, got {k!r}")
    return int(k)


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
