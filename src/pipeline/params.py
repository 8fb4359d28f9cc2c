"""Per-run Params: one table shared by the DAG's trigger form and ``recsys run --param``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    type: str
    description: str
    enum: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    item_type: str | None = None  # for arrays: the type of each element (bounds apply to elements)

    def json_schema(self) -> dict:
        bounds: dict[str, Any] = {}
        if self.minimum is not None:
            bounds["minimum"] = self.minimum
        if self.maximum is not None:
            bounds["maximum"] = self.maximum
        if self.type == "array":
            return {"type": "array", "minItems": 1, "items": {"type": self.item_type, **bounds}}
        schema: dict[str, Any] = {"type": self.type, **bounds}
        if self.enum:
            schema["enum"] = list(self.enum)
        return schema

    def check(self, value: Any) -> Any:
        if self.type == "array":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"Param {self.name}: expected a non-empty list, got {value!r}")
            item = ParamSpec(self.name, None, self.item_type, "", minimum=self.minimum, maximum=self.maximum)
            return [item.check(v) for v in value]
        expected = _PY_TYPES[self.type]
        if isinstance(value, bool) and self.type in ("integer", "number"):
            raise ConfigError(f"Param {self.name}: expected {self.type}, got boolean {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"Param {self.name}: expected {self.type}, got {type(value).__name__} {value!r}")
        if self.enum and value not in self.enum:
            raise ConfigError(f"Param {self.name}: {value!r} is not one of {list(self.enum)}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"Param {self.name}: {value!r} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"Param {self.name}: {value!r} is above the maximum {self.maximum}")
        return float(value) if self.type == "number" else value


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "source",
        "",
        "string",
        "Dataset source: 'grouplens:<name>' (e.g. grouplens:ml-latest-small), a local folder, or s3://bucket/prefix. "
        "Empty means the configured default (RECSYS_SOURCE / MOVIELENS_DIR).",
    ),
    ParamSpec("split_strategy", "random", "string",
              "How test/validation rows are chosen per user: 'random' (stratified by user, seeded) or "
              "'temporal' (each user's latest ratings).", enum=("random", "temporal")),
    ParamSpec("seed", 42, "integer", "Seed of the random split.", minimum=0),
    ParamSpec("validation_fraction", 0.1, "number", "Fraction of each user's ratings held out for validation.",
              minimum=0.0, maximum=0.5),
    ParamSpec("test_fraction", 0.1, "number", "Fraction of each user's ratings held out for test.",
              minimum=0.0, maximum=0.5),
    ParamSpec("quarantine_threshold", 0.001, "number",
              "Largest fraction of a table's rows that may fail row-level expectations and be quarantined "
              "before the run stops (0.001 = 0.1 %).", minimum=0.0, maximum=1.0),
    ParamSpec("olap_min_ratings", 10, "integer",
              "Minimum number of ratings for a movie to enter the popularity / mean-rating table.", minimum=1),
    ParamSpec("als_ranks", [10, 25, 50], "array", "ALS grid: numbers of latent factors (rank).",
              item_type="integer", minimum=1),
    ParamSpec("als_reg_params", [0.05, 0.1, 0.125, 0.15, 0.2], "array", "ALS grid: regularization (regParam).",
              item_type="number", minimum=0.0),
    ParamSpec("als_max_iters", [15], "array", "ALS grid: iterations (maxIter).", item_type="integer", minimum=1),
    ParamSpec("als_parallel_fits", 2, "integer",
              "How many ALS grid points Spark fits at once (overlaps driver work with executor work).",
              minimum=1, maximum=16),
    ParamSpec("autorec_enabled", True, "boolean", "Train the AutoRec autoencoder (TensorFlow)."),
    ParamSpec("autorec_hidden_units", 100, "integer", "AutoRec code size (encoding_dim): each movie's embedding length.",
              minimum=1, maximum=4096),
    ParamSpec("autorec_l2", 30.0, "number", "AutoRec L2 weight (the paper's lambda).", minimum=0.0),
    ParamSpec("autorec_dropout", 0.5, "number", "Share of observed inputs hidden from the encoder at each step.",
              minimum=0.0, maximum=0.95),
    ParamSpec("autorec_learning_rate", 0.001, "number", "Adam learning rate.", minimum=1e-6, maximum=1.0),
    ParamSpec("autorec_epochs", 100, "integer", "Most epochs; early stopping on validation RMSE usually ends sooner.",
              minimum=1),
    ParamSpec("autorec_batch_size", 512, "integer", "Movies per training batch.", minimum=1),
    ParamSpec("autorec_patience", 10, "integer", "Epochs without a better validation RMSE before stopping.",
              minimum=1),
    ParamSpec("autorec_normalization", "baseline", "string",
              "What the network models: 'baseline' (residuals of the bias baseline) or 'mean' (ratings minus the "
              "global mean).", enum=("baseline", "mean")),
    ParamSpec("promotion_margin", 0.0, "number",
              "How much lower the challenger's test RMSE must be than the champion's to be promoted "
              "(0 = strictly better).", minimum=0.0),
    ParamSpec("similar_k", 10, "integer", "How many similar movies to keep per movie.", minimum=1, maximum=100),
    ParamSpec("recommend_k", 10, "integer", "How many recommendations to serve per user.", minimum=1, maximum=100),
)

PARAMS_BY_NAME = {p.name: p for p in PARAMS}


def defaults() -> dict:
    return {p.name: p.default for p in PARAMS}


def resolve_params(overrides: dict | None = None) -> dict:
    """Defaults overlaid with ``overrides``, each checked against its spec; unknown names are an error."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(PARAMS_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown Params {unknown}; see `recsys params` for the list")
    resolved = defaults()
    for name, value in overrides.items():
        resolved[name] = PARAMS_BY_NAME[name].check(value)
    if resolved["validation_fraction"] + resolved["test_fraction"] >= 0.9:
        raise ConfigError(
            "Params validation_fraction + test_fraction must leave at least 10 % of the ratings for training"
        )
    return resolved


def parse_cli_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE in JSON; a bare word that is not JSON is taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--param takes NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name, value
