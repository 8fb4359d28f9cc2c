"""The per-run Params: one table, the frozen ``Params`` dataclass, behind the DAG's trigger form,
``recsys params`` and the typed object stage code reads (``ctx.params.als_ranks``).

Each field carries its section, type, bounds and description; ``PARAMS`` derives the form's and the command
line's view of them; ``resolve_params`` checks overrides (unknown names, types, bounds, NaN/Inf refused).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError

JAVA_INT_MAX = 2**31 - 1  # Spark's ALS rank/maxIter/blocks and most JVM-side integers are 32-bit
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
SECTIONS = ("data", "split", "ALS", "AutoRec", "kNN", "blend", "ranking", "gate", "serving")


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
        minimum=1, maximum=1_000_000)
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
        0, "integer", "ALS", "How many ALS grid points Spark fits at once, in both ALS grids (overlaps driver work "
        "with executor work). 0: by the data: every rank's regParam chain at once (at most 4) below 2,000,000 "
        "training rows, where a fit is mostly fixed cost; from there on 2 for the explicit grid and 1 for the "
        "implicit one, whose larger ranks keep the cores busy by themselves. (Implicit ALS on the implicit library, "
        "ials_engine, fits one point at a time on every core.)", minimum=0, maximum=16)
    als_search: str = _param(
        "halving", "string", "ALS",
        "How the ALS grids (explicit and implicit) are searched: 'halving' (successive halving over iterations: "
        "every point fitted with a fraction of its maxIter, the best 1/eta go on with eta times more, the last "
        "rung with all of them; the full grid below 100,000 training rows; implicit ALS chooses among every fit, "
        "the screen's too) or 'full' (every point fitted with all its iterations).",
        enum=("halving", "full"))
    als_halving_eta: int = _param(
        5, "integer", "ALS", "Successive halving: each rung keeps the best 1/eta of its points and gives them eta "
        "times more iterations.", minimum=2, maximum=10)
    als_line_search: bool = _param(
        True, "boolean", "ALS",
        "Line searches inside successive halving (both ALS grids): the first rung fits each rank's regParams in "
        "ascending order and stops at the first one that scores worse than the one before it (validation error is "
        "U-shaped in the regularisation); the last rung fits its finalists rank by rank, lowest first, and stops "
        "after the first rank whose best scores worse than the lower rank's. Off: every point is screened and "
        "every finalist fitted.")
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
    autorec_lr_decay: float = _param(
        1.0, "number", "AutoRec",
        "Learning-rate schedule: epoch e trains at autorec_learning_rate * autorec_lr_decay^(e-1) (1 = constant).",
        minimum=0.5, maximum=1.0)
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
    knn_enabled: bool = _param(True, "boolean", "kNN", "Train the item-neighbourhood rating model (item kNN).")
    knn_neighbours: tuple[int, ...] = _param(
        (50, 100, 200), "array", "kNN",
        "Item kNN grid: how many most similar movies each movie keeps as neighbours (K).", item="integer",
        minimum=1, maximum=2000)
    knn_shrinkages: tuple[float, ...] = _param(
        (50.0, 100.0), "array", "kNN",
        "Item kNN grid: similarity shrinkage, s * n / (n + shrinkage) for n users who rated both movies.",
        item="number", minimum=0.0, maximum=1e6)
    knn_dampings: tuple[float, ...] = _param(
        (0.25, 0.5, 1.0), "array", "kNN",
        "Item kNN grid: added to the sum of |similarities| a prediction divides by (pulls thin evidence to "
        "the baseline).", item="number", minimum=0.0, maximum=1e6)
    knn_max_user_ratings: int = _param(
        2000, "integer", "kNN",
        "The similarities are estimated from at most this many ratings of each user (a seeded sample of a "
        "heavier user's; the predictions use them all): their cost grows with each user's ratings squared. "
        "0: every rating.", minimum=0, maximum=10_000_000)
    blend_enabled: bool = _param(True, "boolean", "blend",
                                 "Blend the run's rating models (weights fitted on validation).")
    blend_support: bool = _param(
        True, "boolean", "blend",
        "Let each member's weight vary with the movie's (log) number of training ratings.")
    blend_ridges: tuple[float, ...] = _param(
        (0.0, 0.0001, 0.001, 0.01, 0.1), "array", "blend",
        "Ridge strengths tried for the blend weights (chosen by K-fold over validation).", item="number",
        minimum=0.0, maximum=1e6)
    blend_folds: int = _param(5, "integer", "blend",
                              "K of the K-fold over validation (ridge choice and out-of-fold validation RMSE).",
                              minimum=2, maximum=100)
    ials_engine: str = _param(
        "implicit", "string", "ranking",
        "Implicit-feedback ALS engine: 'implicit' (the implicit library's CPU ALS in the driver, grid ials_ranks x "
        "ials_reg_params x ials_alphas x ials_max_iters) or 'spark' (Spark ML ALS(implicitPrefs=True), for a "
        "cluster, grid ials_spark_*).", enum=("implicit", "spark"))
    ials_ranks: tuple[int, ...] = _param((128,), "array", "ranking",
                                         "Implicit-feedback ALS grid (implicit library): numbers of latent factors.",
                                         item="integer", minimum=1, maximum=1000)
    ials_reg_params: tuple[float, ...] = _param(
        (50.0, 100.0, 200.0, 400.0), "array", "ranking",
        "Implicit-feedback ALS grid (implicit library): L2 regularization, one weight for every user and movie.",
        item="number", minimum=0.0, maximum=1e6)
    ials_alphas: tuple[float, ...] = _param(
        (10.0,), "array", "ranking",
        "Implicit-feedback ALS grid (implicit library): alpha, the confidence c = 1 + alpha * rating / 5.",
        item="number", minimum=0.0, maximum=1e6)
    ials_max_iters: tuple[int, ...] = _param((10,), "array", "ranking",
                                             "Implicit-feedback ALS grid (implicit library): iterations.",
                                             item="integer", minimum=1, maximum=1000)
    ials_spark_ranks: tuple[int, ...] = _param((64, 128), "array", "ranking",
                                               "Implicit-feedback ALS grid (Spark engine): numbers of latent factors.",
                                               item="integer", minimum=1, maximum=1000)
    ials_spark_reg_params: tuple[float, ...] = _param(
        (0.2, 0.5), "array", "ranking",
        "Implicit-feedback ALS grid (Spark engine): regParam, scaled by each user's and movie's number of ratings.",
        item="number", minimum=0.0, maximum=1e6)
    ials_spark_alphas: tuple[float, ...] = _param(
        (1.0,), "array", "ranking", "Implicit-feedback ALS grid (Spark engine): alpha, the confidence c = 1 + "
        "alpha * rating.", item="number", minimum=0.0, maximum=1e6)
    ials_spark_max_iters: tuple[int, ...] = _param((10,), "array", "ranking",
                                                   "Implicit-feedback ALS grid (Spark engine): iterations.",
                                                   item="integer", minimum=1, maximum=1000)
    ease_lambdas: tuple[float, ...] = _param((100.0, 200.0, 400.0, 800.0), "array", "ranking",
                                             "EASE: L2 weights tried (chosen on validation NDCG@10).",
                                             item="number", minimum=0.001, maximum=1e9)
    ease_inputs: tuple[str, ...] = _param(
        ("binary", "rating"), "array", "ranking",
        "EASE: how a rating enters its matrix, each tried with every lambda (chosen on validation NDCG@10): "
        "'binary' (1 per rating), 'rating' (rating / 5), 'liked' (1 for ratings >= 3.5, else 0).",
        item="string", enum=("binary", "rating", "liked"))
    ease_min_ratings: int = _param(3, "integer", "ranking",
                                   "EASE catalogue: movies with at least this many training ratings.",
                                   minimum=1, maximum=1_000_000)
    ease_max_items: int = _param(
        15_000, "integer", "ranking",
        "EASE is skipped (with the reason logged) when its catalogue exceeds this many movies: its items x items "
        "matrices (3 float32 copies; 2.7 GB at 15,000) must fit in memory.", minimum=1, maximum=100_000)
    ltr_candidates: int = _param(
        100, "integer", "ranking",
        "Learning to rank: each candidate generator's (EASE, implicit ALS) top this many movies per user are the "
        "candidates it reorders.", minimum=10, maximum=1000)
    ltr_folds: int = _param(3, "integer", "ranking",
                            "Learning to rank: folds over the validation users (hyper-parameters and the out-of-fold "
                            "validation NDCG@10).", minimum=2, maximum=20)
    ltr_objectives: tuple[str, ...] = _param(
        ("rank_xendcg",), "array", "ranking",
        "Learning to rank grid: LightGBM's ranking objective, 'rank_xendcg' (XE-NDCG) or 'lambdarank' (chosen by "
        "cross-validation).",
        item="string", enum=("lambdarank", "rank_xendcg"))
    ltr_num_leaves: tuple[int, ...] = _param((3, 7), "array", "ranking",
                                             "Learning to rank grid: LightGBM leaves per tree.", item="integer",
                                             minimum=2, maximum=1024)
    ltr_learning_rates: tuple[float, ...] = _param((0.05,), "array", "ranking",
                                                   "Learning to rank grid: LightGBM learning rate.", item="number",
                                                   minimum=0.001, maximum=1.0)
    ltr_min_child_samples: int = _param(100, "integer", "ranking",
                                        "Learning to rank: LightGBM's least candidates per leaf.", minimum=1,
                                        maximum=1_000_000)
    ltr_max_rounds: int = _param(300, "integer", "ranking",
                                 "Learning to rank: most boosting rounds (the count is chosen by cross-validation).",
                                 minimum=1, maximum=10_000)
    cold_start_known_ratings: int = _param(
        5, "integer", "ranking",
        "Cold-start measurement: how many of a test user's first ratings the cold-start path is given.",
        minimum=1, maximum=1000)
    ranking_max_users: int = _param(
        10_000, "integer", "ranking",
        "Ranking measurement: at most this many users per split (validation, test) are ranked and averaged over, "
        "a seeded sample of those with a relevant held-out rating, the same for every model of the run (all of "
        "them below this; scoring 70,000 users x 10,000 movies per model and split dominates the ranking time "
        "at 10 M ratings).", minimum=100, maximum=100_000_000)
    cold_start_max_users: int = _param(
        1000, "integer", "ranking",
        "Cold-start measurement: at most this many users per split (a seeded sample of the eligible ones; the "
        "lists are built in one batch per similarity source, ~0.15 s per 1,000 users at 1 M ratings).",
        minimum=1, maximum=10_000_000)
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
            items = {"type": self.item_type, **bounds, **({"enum": list(self.enum)} if self.enum else {})}
            return {"type": "array", "minItems": 1, "items": items}
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
            item = ParamSpec(self.name, None, self.item_type, self.section, "", enum=self.enum,
                             minimum=self.minimum, maximum=self.maximum)
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


def parse_cli_params(texts: list[str]) -> dict[str, Any]:
    """Every ``--param NAME=VALUE``; a Param given twice is refused (a later value silently winning hides the
    mistake of the earlier one)."""
    params: dict[str, Any] = {}
    for text in texts:
        name, value = parse_cli_param(text)
        if name in params:
            raise ConfigError(f"Param {name} is given twice (--param {name}=...): give each Param once")
        params[name] = value
    return params


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


