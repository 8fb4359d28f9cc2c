"""Item-based AutoRec (I-AutoRec, Sedhain et al. 2015) in TensorFlow 2 / Keras 3, trained from sparse batches.

Each training movie is one input: its partially observed vector of user ratings x (n_users long, mostly
missing). The network encodes it to a code h = sigmoid(x W_enc + b_enc) and reconstructs the ratings as
h W_dec^T + b_dec (identity output). The loss counts observed entries only, so a weight tied to a user who
did not rate any movie of a batch gets no gradient from the reconstruction error: the encoder row of an
unobserved input multiplies a zero, and its decoder column is never gathered. Objective, as in the paper but
divided by the number of training ratings N so that a batch's mean is an unbiased estimate of it:

    J = (1/N) * sum over observed (r_ui - r^_ui)^2  +  l2 / (2N) * (||W_enc||^2 + ||W_dec||^2)

Nothing users x movies is ever materialised: a batch of movies is given as its observed entries, encoded by
gathering the users' encoder rows and summing them per movie (``unsorted_segment_sum``), and the decoder is
evaluated only at the batch's observed (movie, user) entries by gathering its user rows. Memory is the
parameters (2 x n_users x hidden_units, plus Adam's slots) plus one batch (its ratings x hidden_units), which
is what lets ml-25m (162k users x 59k movies) fit.

The training step and the encoder run compiled by XLA (``jit_compile``), which fuses the gathers, the sums
and Adam's dense update into a few passes over memory: an epoch takes about half the time of TensorFlow's
kernels one by one (docs/adr/0034-autorec-under-xla.md). The dropout masks are drawn with numpy: XLA's random
numbers cost as much as the rest of a step. XLA compiles one program per input shape, so a
batch's entries are padded (``pad_batch``) to the next size of a short geometric series (``padded_size``):
a padded entry has weight 0, value 0 and belongs to a dummy movie row, so it changes neither the loss nor any
gradient. A run compiles a handful of shapes, about half a second each.

Normalisation: the network models the residuals of the damped bias baseline (``normalization="baseline"``,
the default) rather than the ratings minus the global mean (``"mean"``). A missing input is then read as
"what the baseline predicts", and the network only has to learn the interactions. On ml-latest-small's
validation split the residual version validates best (docs/adr/0005-models-on-bias-baseline-residuals.md).

The result is a ``FactorModel``: item_factors are the codes h of the training movies (computed from their full
training vectors, no dropout; also the item embeddings for the similarity stage), user_factors the decoder's
user rows, user_bias the decoder's bias, plus the baseline (or the mean as offset). Call
``configure_threads`` before TensorFlow does any work to bound its thread pools.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.errors import ConfigError, DataValidationError
from pipeline.models.baseline import BiasBaseline, fit_best_damping
from pipeline.models.factor_model import FactorModel
from pipeline.models.metrics import RATING_MAX, RATING_MIN
from pipeline.models.ranking import concat_ranges
from pipeline.params import Params

log = logging.getLogger(__name__)

NORMALIZATIONS = ("baseline", "mean")

# The defaults are the Params' (pipeline.params.Params), chosen on ml-latest-small's validation split against
# larger codes, other L2, dropout and learning-rate schedules, mean normalisation and smaller batches
# (docs/adr/0005-models-on-bias-baseline-residuals.md, docs/adr/0020-tuning-grids-outside-the-dag.md).
_P = Params()
DEFAULTS = {
    "hidden_units": _P.autorec_hidden_units,
    "l2": _P.autorec_l2,
    "dropout": _P.autorec_dropout,
    "learning_rate": _P.autorec_learning_rate,
    "lr_decay": _P.autorec_lr_decay,
    "epochs": _P.autorec_epochs,
    "batch_size": _P.autorec_batch_size,
    "patience": _P.autorec_patience,
    "seed": _P.seed,
    "normalization": _P.autorec_normalization,
}

_EVAL_CHUNK = 65536  # (movie, user) entries scored per numpy step when computing an RMSE
PAD_FLOOR = 1024  # the smallest padded batch (entries)
PAD_GROWTH = 2 ** 0.25  # padded sizes grow by this factor: at most 19 % padding, ~4 sizes per doubling
# training entries the per-epoch training-set RMSE is computed on (all below this): a fixed sample, so the curve
# stays smooth; its standard error is ~0.2 % of the RMSE (docs/adr/0026-autorec-training-curve-on-a-sample.md).
TRAIN_RMSE_SAMPLE = 100_000


def configure_threads(intra: int = 2, inter: int = 1) -> bool:
    """Bound TensorFlow's thread pools; True if applied, False if TensorFlow was already initialised.

    Must run before TensorFlow executes anything: afterwards TF refuses the change, and this only logs it.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    except RuntimeError as exc:  # "cannot be modified after initialization"
        log.info("TensorFlow thread pools already initialised (%s); keeping them", exc)
        return False
    return True


class ItemAutoRec(keras.layers.Layer):
    """The I-AutoRec network over ``n_users`` inputs, evaluated on sparse batches of movies.

    A batch is given as its observed entries: ``rows`` (position of the movie in the batch), ``cols`` (user
    index) and ``values`` (normalised rating), plus ``n_rows`` (movie rows in the batch, a dummy row for
    padding included; a Python int, constant for XLA) and optionally ``weights`` (1 for an entry, 0 for
    padding).
    """

    def __init__(self, n_users: int, hidden_units: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_users, self.hidden_units = int(n_users), int(hidden_units)
        self.w_enc = self.add_weight(shape=(self.n_users, self.hidden_units), name="w_enc",
                                     initializer=keras.initializers.GlorotUniform(seed=seed))
        self.b_enc = self.add_weight(shape=(self.hidden_units,), name="b_enc", initializer="zeros")
        # Stored transposed (one row per user): the decoder's user rows are the FactorModel's user factors.
        self.w_dec = self.add_weight(shape=(self.n_users, self.hidden_units), name="w_dec",
                                     initializer=keras.initializers.GlorotUniform(seed=seed + 1))
        self.b_dec = self.add_weight(shape=(self.n_users,), name="b_dec", initializer="zeros")
        self.built = True

    def encode(self, rows, cols, values, n_rows):
        """Codes h (n_rows x hidden_units) of a batch of movies."""
        inputs = tf.cast(values, tf.float32)[:, None] * tf.gather(self.w_enc, cols)  # x W_enc, observed only
        return tf.sigmoid(tf.math.unsorted_segment_sum(inputs, rows, n_rows) + self.b_enc)

    def decode_at(self, codes, rows, cols):
        """Reconstruction at the given (movie row, user) entries only: h[row] . W_dec[user] + b_dec[user]."""
        user_rows = tf.gather(self.w_dec, cols)
        return tf.reduce_sum(tf.gather(codes, rows) * user_rows, axis=-1) + tf.gather(self.b_dec, cols)

    def squared_error(self, rows, cols, values, n_rows, weights=None, inputs=None):
        """Sum of squared reconstruction errors over the batch's observed entries (padding weighs 0);
        ``inputs``: what the encoder sees instead of ``values`` (the values after dropout)."""
        codes = self.encode(rows, cols, values if inputs is None else inputs, n_rows)
        error = tf.square(tf.cast(values, tf.float32) - self.decode_at(codes, rows, cols))
        return tf.reduce_sum(error if weights is None else weights * error)

    def weight_norm(self):
        """||W_enc||^2 + ||W_dec||^2 (biases are not regularised, as in the paper)."""
        return tf.reduce_sum(tf.square(self.w_enc)) + tf.reduce_sum(tf.square(self.w_dec))


@dataclass
class ItemRows:
    """Training ratings grouped by movie (CSR): movie ``i``'s entries are ``users/values[indptr[i]:indptr[i+1]]``.

    ``order`` maps CSR positions back to the input rows (entry k is input row ``order[k]``).
    """

    indptr: np.ndarray
    users: np.ndarray
    values: np.ndarray
    order: np.ndarray

    @classmethod
    def from_codes(cls, items: np.ndarray, users: np.ndarray, values: np.ndarray, n_items: int) -> ItemRows:
        order = np.lexsort((users, items))
        indptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(items, minlength=n_items), out=indptr[1:])
        return cls(indptr, users[order].astype(np.int64), values[order].astype(np.float32), order)

    def batch(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, users, values) of the movies ``items``; rows are positions in ``items``."""
        starts, ends = self.indptr[items], self.indptr[items + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
        pos = concat_ranges(starts, lengths)  # each entry's movie start plus its rank inside the movie
        return rows, self.users[pos], self.values[pos]


def padded_size(n: int) -> int:
    """The entry count a batch of ``n`` entries is padded to: the first of PAD_FLOOR * PAD_GROWTH^k (rounded
    up) that holds it, so that XLA sees a few shapes, not one per batch."""
    size = PAD_FLOOR
    while size < n:
        size = math.ceil(size * PAD_GROWTH)
    return size


def pad_batch(rows: np.ndarray, users: np.ndarray, values: np.ndarray, dummy_row: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, users, values, weights) padded to ``padded_size``: the added entries sit in row ``dummy_row``
    at user 0 with value 0 and weight 0 (the real entries weigh 1)."""
    n = len(values)
    pad = padded_size(n) - n
    weights = np.zeros(n + pad, dtype=np.float32)
    weights[:n] = 1.0
    return (np.concatenate([rows, np.full(pad, dummy_row, dtype=np.int64)]),
            np.concatenate([users, np.zeros(pad, dtype=np.int64)]),
            np.concatenate([values.astype(np.float32, copy=False), np.zeros(pad, dtype=np.float32)]), weights)


@dataclass
class AutoRecRun:
    """What ``fit_autorec`` returns: the exported model, the per-epoch history and the trained network."""

    model: FactorModel
    history: list[dict]
    network: ItemAutoRec


def _check_hyper_parameters(hidden_units, l2, dropout, learning_rate, epochs, batch_size, patience, normalization,
                            lr_decay=1.0):
    def count(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    checks = [
        ("hidden_units", hidden_units, count(hidden_units), "an integer >= 1"),
        ("l2", l2, l2 >= 0, "a number >= 0"),
        ("dropout", dropout, 0 <= dropout < 1, "a number in [0, 1)"),
        ("learning_rate", learning_rate, learning_rate > 0, "a number > 0"),
        ("lr_decay", lr_decay, 0 < lr_decay <= 1, "a number in (0, 1]"),
        ("epochs", epochs, count(epochs), "an integer >= 1"),
        ("batch_size", batch_size, count(batch_size), "an integer >= 1"),
        ("patience", patience, count(patience), "an integer >= 1"),
        ("normalization", normalization, normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"AutoRec {name} must be {expected}, got {value!r}")


def _clipped_rmse(truth, base, codes, user_rows, user_bias, offset, items, users) -> float:
    """RMSE of what FactorModel.predict returns for (items, users): same arithmetic, same clipping."""
    total = 0.0
    for start in range(0, len(items), _EVAL_CHUNK):
        sl = slice(start, start + _EVAL_CHUNK)
        it, us = items[sl], users[sl]
        dots = np.einsum("ij,ij->i", user_rows[us], codes[it]).astype(np.float64)
        pred = np.clip(offset + user_bias[us] + dots + base[sl], RATING_MIN, RATING_MAX)
        total += float(np.sum((truth[sl] - pred) ** 2))
    return float(np.sqrt(total / len(items)))


def fit_autorec(train: pd.DataFrame, validation: pd.DataFrame, *, hidden_units: int = DEFAULTS["hidden_units"],
                l2: float = DEFAULTS["l2"], dropout: float = DEFAULTS["dropout"],
                learning_rate: float = DEFAULTS["learning_rate"], epochs: int = DEFAULTS["epochs"],
                batch_size: int = DEFAULTS["batch_size"], patience: int = DEFAULTS["patience"],
                seed: int = DEFAULTS["seed"], normalization: str = DEFAULTS["normalization"],
                baseline: BiasBaseline | None = None, lr_decay: float = DEFAULTS["lr_decay"],
                on_epoch: Callable[[dict], None] | None = None) -> AutoRecRun:
    """Train I-AutoRec on ``train`` with early stopping on ``validation``; see ``train_autorec``."""
    _check_hyper_parameters(hidden_units, l2, dropout, learning_rate, epochs, batch_size, patience, normalization,
                            lr_decay)
    if len(train) == 0:
        raise DataValidationError("the training split has no rows: AutoRec needs ratings to learn from")
    user_codes, user_ids = pd.factorize(train["user_id"], sort=True)
    item_codes, movie_ids = pd.factorize(train["movie_id"], sort=True)
    n_users, n_items = len(user_ids), len(movie_ids)
    ratings = train["rating"].to_numpy(dtype=np.float64)

    # Validation rows scored during training: those whose user and movie are both in train (the others are
    # cold rows, which the evaluation gives to the bias baseline whatever the model is).
    val_users = pd.Index(user_ids).get_indexer(validation["user_id"].to_numpy())
    val_items = pd.Index(movie_ids).get_indexer(validation["movie_id"].to_numpy())
    warm = (val_users >= 0) & (val_items >= 0)
    if not warm.any():
        raise DataValidationError("no validation row has both its user and its movie in the training split: "
                                  "AutoRec has nothing to early-stop on")
    val_users, val_items = val_users[warm], val_items[warm]
    val_truth = validation["rating"].to_numpy(dtype=np.float64)[warm]

    if normalization == "baseline":
        if baseline is None:
            baseline, _ = fit_best_damping(train, validation)
        offset = 0.0
        train_base = baseline.predict(train["user_id"].to_numpy(), train["movie_id"].to_numpy())
        val_base = baseline.predict(validation["user_id"].to_numpy()[warm], validation["movie_id"].to_numpy()[warm])
    else:
        baseline = None
        offset = float(ratings.mean())
        train_base, val_base = np.zeros(len(ratings)), np.zeros(len(val_truth))
    targets = ratings - offset - train_base
    rows = ItemRows.from_codes(item_codes, user_codes, targets, n_items)

    network = ItemAutoRec(n_users, hidden_units, seed=seed)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer.build(network.trainable_variables)
    n_train = float(len(ratings))
    decay = float(l2) / (2.0 * n_train)
    entry = tf.TensorSpec([None], tf.int64)
    weight = tf.TensorSpec([None], tf.float32)
    chunk = max(batch_size, 1024)  # movies encoded at once for the codes
    # row batch_size (chunk) is the dummy row that padding entries belong to: a constant for XLA

    @tf.function(input_signature=(entry, entry, weight, weight, weight), jit_compile=True)
    def train_step(batch_rows, batch_users, batch_values, weights, inputs):
        with tf.GradientTape() as tape:
            sse = network.squared_error(batch_rows, batch_users, batch_values, batch_size + 1, weights, inputs)
            loss = sse / tf.maximum(tf.reduce_sum(weights), 1.0) + decay * network.weight_norm()
        variables = network.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function(input_signature=(entry, entry, weight), jit_compile=True)
    def encode(batch_rows, batch_users, batch_values):
        return network.encode(batch_rows, batch_users, batch_values, chunk + 1)

    def all_codes() -> np.ndarray:
        out = np.empty((n_items, hidden_units), dtype=np.float32)
        for start in range(0, n_items, chunk):
            items = np.arange(start, min(start + chunk, n_items))
            b_rows, b_users, b_values, _ = pad_batch(*rows.batch(items), dummy_row=chunk)
            out[items] = encode(b_rows, b_users, b_values).numpy()[:len(items)]
        return out

    # Training entries in CSR order, for the training-set RMSE: a fixed seeded sample of TRAIN_RMSE_SAMPLE of
    # them on large data (the curve is a label, never a decision: docs/adr/0026-autorec-training-curve-on-a-sample.md).
    train_items = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(rows.indptr))
    train_truth, train_base_sorted, train_users = ratings[rows.order], train_base[rows.order], rows.users
    if len(train_items) > TRAIN_RMSE_SAMPLE:
        keep = np.sort(np.random.default_rng(seed).choice(len(train_items), TRAIN_RMSE_SAMPLE, replace=False))
        train_items, train_truth = train_items[keep], train_truth[keep]
        train_base_sorted, train_users = train_base_sorted[keep], train_users[keep]

    def rmses() -> tuple[float, float, np.ndarray]:
        codes = all_codes()
        w_dec, b_dec = network.w_dec.numpy(), network.b_dec.numpy()
        train_rmse = _clipped_rmse(train_truth, train_base_sorted, codes, w_dec, b_dec, offset, train_items,
                                   train_users)
        val_rmse = _clipped_rmse(val_truth, val_base, codes, w_dec, b_dec, offset, val_items, val_users)
        return train_rmse, val_rmse, codes

    rng, drops = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    history, best = [], None
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if lr_decay != 1.0:  # exponential schedule: epoch e trains at learning_rate * lr_decay^(e-1)
            optimizer.learning_rate.assign(learning_rate * lr_decay ** (epoch - 1))
        perm = rng.permutation(n_items)
        for start in range(0, n_items, batch_size):
            items = np.sort(perm[start:start + batch_size])
            b_rows, b_users, b_values, weights = pad_batch(*rows.batch(items), dummy_row=batch_size)
            # dropout hides observed inputs from the encoder; the mask is drawn here, not by XLA, whose random
            # numbers cost as much as the rest of the step
            inputs = b_values
            if dropout > 0.0:
                inputs = b_values * (drops.random(len(b_values), dtype=np.float32) >= dropout) / np.float32(1 - dropout)
            train_step(b_rows, b_users, b_values, weights, inputs)
        train_rmse, val_rmse, codes = rmses()
        row = {"epoch": epoch, "train_rmse": train_rmse, "val_rmse": val_rmse}
        history.append(row)
        log.info("AutoRec epoch %d/%d: training-set RMSE %.4f, validation RMSE %.4f (%.1fs)", epoch, epochs, train_rmse,
                 val_rmse, time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(dict(row))
        if best is None or val_rmse < best["val_rmse"]:
            best = {"epoch": epoch, "val_rmse": val_rmse, "weights": [w.numpy().copy() for w in network.weights],
                    "codes": codes}
        elif epoch - best["epoch"] >= patience:
            break

    for variable, value in zip(network.weights, best["weights"]):
        variable.assign(value)
    meta = {"hidden_units": int(hidden_units), "l2": float(l2), "dropout": float(dropout),
            "learning_rate": float(learning_rate), "lr_decay": float(lr_decay), "epochs": int(epochs),
            "batch_size": int(batch_size), "patience": int(patience), "seed": int(seed), "normalization": normalization,
            "best_epoch": int(best["epoch"]), "epochs_run": len(history), "best_val_rmse": float(best["val_rmse"]),
            "train_seconds": round(time.perf_counter() - started, 3)}
    model = FactorModel(name="autorec", user_ids=np.asarray(user_ids), movie_ids=np.asarray(movie_ids),
                        user_factors=network.w_dec.numpy(), item_factors=best["codes"],
                        user_bias=network.b_dec.numpy(), offset=offset, baseline=baseline, meta=meta)
    return AutoRecRun(model, history, network)


def train_autorec(train: pd.DataFrame, validation: pd.DataFrame, *, hidden_units: int = DEFAULTS["hidden_units"],
                  l2: float = DEFAULTS["l2"], dropout: float = DEFAULTS["dropout"],
                  learning_rate: float = DEFAULTS["learning_rate"], epochs: int = DEFAULTS["epochs"],
                  batch_size: int = DEFAULTS["batch_size"], patience: int = DEFAULTS["patience"],
                  seed: int = DEFAULTS["seed"], normalization: str = DEFAULTS["normalization"],
                  baseline: BiasBaseline | None = None, lr_decay: float = DEFAULTS["lr_decay"],
                  on_epoch: Callable[[dict], None] | None = None) -> tuple[FactorModel, list[dict]]:
    """(model, history): I-AutoRec trained on ``train``, early-stopped on ``validation`` RMSE.

    Frames have columns user_id, movie_id, rating (others ignored). Each epoch appends {"epoch",
    "train_rmse" (training-set RMSE on the observed training ratings, a fixed sample of 100,000 of them on
    large data: a label, not for decisions),
    "val_rmse"} to ``history`` and passes it to ``on_epoch``. val_rmse is what ``model.predict`` would score
    (clipped to the rating scale) on the validation rows whose user and movie are both in ``train``; the
    protocol's RMSE over all rows, cold ones included, is the caller's ``rating_metrics``. Training stops
    after ``patience`` epochs without a better val_rmse, and the model holds the best epoch's weights.

    ``l2`` is the paper's lambda (objective divided by the number of training ratings), ``dropout`` the
    share of observed inputs hidden from the encoder at each step. With ``normalization="baseline"`` the
    network models residuals of ``baseline`` (fitted with ``fit_best_damping`` on train/validation if not
    given), which the returned model adds back; with ``"mean"`` the global training mean is its offset.
    Initialisation, batch order and dropout masks all derive from ``seed``, so a rerun gives the same model
    (up to the last bits of TensorFlow's multi-threaded sums). Call ``configure_threads`` first.
    """
    run = fit_autorec(train, validation, hidden_units=hidden_units, l2=l2, dropout=dropout,
                      learning_rate=learning_rate, epochs=epochs, batch_size=batch_size, patience=patience,
                      seed=seed, normalization=normalization, baseline=baseline, lr_decay=lr_decay,
                      on_epoch=on_epoch)
    return run.model, run.history


# --- the stage ----------------------------------------------------------------------------------------------


def run_autorec(ctx) -> dict:
    """Stage ``autorec``: train I-AutoRec, early-stopped on validation RMSE; per-epoch curves in MLflow."""
    import mlflow

    from pipeline.models.plots import autorec_curves
    from pipeline.models.protocol import Fitted, run_candidate

    p = ctx.params
    if not p.autorec_enabled:
        log.info("autorec: skipped (autorec_enabled is false)")
        return {}
    configure_threads()
    hyper = {name: getattr(p, f"autorec_{name}") for name in (
        "hidden_units", "l2", "dropout", "learning_rate", "lr_decay", "epochs", "batch_size", "patience",
        "normalization")}

    def fit(split, baseline, folder, run) -> Fitted:
        def on_epoch(row):  # logged as it happens: the run's curves fill in while it trains
            mlflow.log_metrics({"train_rmse": row["train_rmse"], "epoch_val_rmse": row["val_rmse"]},
                               step=int(row["epoch"]))

        model, history = train_autorec(split.train, split.validation, seed=p.seed, baseline=baseline,
                                       on_epoch=on_epoch, **hyper)
        model.fallback = baseline
        pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
        best_epoch = int(min(history, key=lambda r: r["val_rmse"])["epoch"])
        return Fitted(model, params={**hyper, "seed": p.seed},
                      metrics={"best_epoch": best_epoch, "train_seconds": model.meta["train_seconds"]},
                      artifacts=[autorec_curves(history, folder / "autorec_curves.png"), folder / "history.csv"],
                      section={"best_epoch": best_epoch, "epochs_run": len(history),
                               "train_seconds": model.meta["train_seconds"]})

    return run_candidate(ctx, "autorec", fit)
