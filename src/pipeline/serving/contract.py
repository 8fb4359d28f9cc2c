"""The served-model contract of the two registered models (docs/serving.md, ADR 0071): their MLflow signatures
(input, output and params schemas), the checks of a request's rows, and the one-line errors bad input gets.

- **rating model** (``registered_model``): rows ``user_id``, ``movie_id`` (whole numbers) -> one predicted
  rating per row (cold users and movies: the bias baseline);
- **ranker** (``registered_ranker``): rows with ``user_id`` and/or ``history`` (movie ids) and optionally
  ``ratings`` (theirs, same order) -> one top-k list per row, ``k`` a param (default 10, 1 to 100).

``mlflow models serve`` runs MLflow's scoring server, which in this MLflow version casts JSON numbers to the
schema's integer type without a check (1.5 becomes 1), answers a deeply nested body with a 500, and puts the
whole request and sometimes a stack trace into a 400's message. ``harden_scoring_server`` (called when one of
these models is loaded inside that server) makes those a 400 with a one-line message; elsewhere it does nothing.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

K_DEFAULT, K_MAX = 10, 100
RANKER_INPUTS = ("user_id", "history", "ratings")
RANKER_OUTPUTS = ("row", "user_id", "rank", "movie_id", "title", "score", "source")
RATING_INPUTS = ("user_id", "movie_id")
SOURCES = ("model", "popularity")  # where a listed movie came from: the ranker, or the cold-start fallback


def contract_error(message: str):
    """The exception bad input gets: an ``MlflowException`` with INVALID_PARAMETER_VALUE (HTTP 400) whose message
    is one line; ``reason`` keeps that line when the scoring server prefixes the message with the request."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    line = " ".join(str(message).split())
    error = MlflowException(line, error_code=INVALID_PARAMETER_VALUE)
    error.reason = line
    return error


def rating_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("long", name) for name in RATING_INPUTS]),
                          outputs=Schema([ColSpec("double", "rating")]))


def ranker_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("long", "user_id", required=False), ColSpec(Array("long"), "history", required=False),
                     ColSpec(Array("double"), "ratings", required=False)])
    outputs = Schema([ColSpec("long", "row"), ColSpec("long", "user_id", required=False), ColSpec("long", "rank"),
                      ColSpec("long", "movie_id"), ColSpec("string", "title"), ColSpec("double", "score"),
                      ColSpec("string", "source")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", "long", K_DEFAULT)]))


def ranker_example(user_id: int, new_user_id: int, history: list[int], ratings: list[float]) -> pd.DataFrame:
    """The ranker's input example: a user it holds, by id alone, and a new user with their history and ratings.
    (MLflow's integer columns hold no gaps: a request gives every row a user_id, or none.)"""
    return pd.DataFrame({"user_id": [int(user_id), int(new_user_id)], "history": [None, [int(m) for m in history]],
                         "ratings": [None, [float(r) for r in ratings]]})


# --- the checks of a request --------------------------------------------------------------------------------


def _whole(value) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def check_id(value, what: str) -> int:
    if not _whole(value) or value < 0:
        raise contract_error(f"{what} must be a whole number >= 0, got {value!r}")
    return int(value)


def check_k(params: dict | None) -> int:
    k = (params or {}).get("k", K_DEFAULT)
    if not _whole(k) or not 1 <= k <= K_MAX:
        raise contract_error(f"param k must be a whole number from 1 to {K_MAX}, got {k!r}")
    return int(k)


def _columns(frame, known: tuple[str, ...]) -> pd.DataFrame:
    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        raise contract_error(f"the input must be a table with columns {', '.join(known)}, got {type(frame).__name__}")
    refuse_unknown(frame.columns, known)
    return frame


def refuse_unknown(columns, known) -> None:
    """A 400 naming the columns of ``columns`` the model does not read."""
    unknown = [str(c) for c in columns if c not in known]
    if unknown:
        raise contract_error(f"unknown input column(s) {', '.join(unknown)}; the model reads {', '.join(known)}")


def rating_rows(frame) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, movie ids) of a rating request; every row needs both, as whole numbers."""
    frame = _columns(frame, RATING_INPUTS)
    missing = [c for c in RATING_INPUTS if c not in frame.columns]
    if missing:
        raise contract_error(f"missing input column(s) {', '.join(missing)}: each row needs user_id and movie_id")
    out = []
    for column in RATING_INPUTS:
        values = frame[column]
        if values.dtype.kind in "iu":
            if len(values) and values.min() < 0:
                row = int(np.argmax(values.to_numpy() < 0))
                raise contract_error(f"row {row}: {column} must be a whole number >= 0, got {values.iloc[row]!r}")
            out.append(values.to_numpy(np.int64))
        else:
            out.append(np.array([check_id(v, f"row {i}: {column}") for i, v in enumerate(values)], dtype=np.int64))
    return out[0], out[1]


def ranker_rows(frame) -> list[tuple[int | None, list[int] | None, list[float] | None]]:
    """(user_id or None, history or None, ratings or None) per row of a ranker request."""
    frame = _columns(frame, RANKER_INPUTS)
    if "user_id" not in frame.columns and "history" not in frame.columns:
        raise contract_error("each row needs user_id, history or both (got columns: "
                             f"{', '.join(map(str, frame.columns)) or 'none'})")
    rows = []
    for i in range(len(frame)):
        def get(column, _i=i):
            return frame[column].iloc[_i] if column in frame.columns else None

        user, history, ratings = get("user_id"), get("history"), get("ratings")
        user = None if _missing(user) else check_id(user, f"row {i}: user_id")
        if history is not None and not _missing(history):
            history = [check_id(m, f"row {i}: history") for m in _list(history, i, "history")]
        else:
            history = None
        if _missing(ratings):
            ratings = None
        else:
            ratings = [_rating(r, i) for r in _list(ratings, i, "ratings")]
            if history is None or len(ratings) != len(history):
                raise contract_error(f"row {i}: ratings must have one rating per history movie "
                                     f"({len(ratings)} ratings, {0 if history is None else len(history)} movies)")
        if user is None and history is None:
            raise contract_error(f"row {i}: needs a user_id or a history")
        rows.append((user, history, ratings))
    return rows


def _list(value, row: int, column: str) -> list:
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return list(value)
    raise contract_error(f"row {row}: {column} must be a list, got {value!r}")


def _rating(value, row: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 5.0:
        raise contract_error(f"row {row}: ratings must be numbers from 0 to 5, got {value!r}")
    return float(value)


# --- MLflow's scoring server --------------------------------------------------------------------------------


def harden_scoring_server() -> bool:
    """Inside ``mlflow models serve`` (its app module is loading the model): bad requests get a 400 with a
    one-line message. Returns whether the server was hardened (False elsewhere, and if already done)."""
    if "mlflow.pyfunc.scoring_server.app" not in sys.modules:
        return False
    return _harden()


def _harden() -> bool:
    from mlflow.pyfunc import scoring_server
    from mlflow.utils import proto_json_utils
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    if getattr(scoring_server, "_recsys_hardened", False):
        return False
    decode, cast, invocations = (scoring_server._decode_json_input, proto_json_utils.cast_df_types_according_to_schema,
                                 scoring_server.invocations)

    def decode_json_input(json_input):
        try:
            return decode(json_input)
        except MlflowInvalidInputException as exc:
            cause = exc.__cause__
            if cause is None:
                raise
            raise contract_error(f"the request body is not JSON in UTF-8 ({type(cause).__name__}: {cause})") from None
        except RecursionError:
            raise contract_error("the request body nests JSON too deeply; send the rows as dataframe_records or "
                                 "dataframe_split") from None

    def cast_types(pdf, schema):
        from mlflow.types import DataType
        from mlflow.types.schema import Array

        named = schema is not None and schema.has_input_names()
        if named:
            refuse_unknown(pdf.columns, schema.input_names())
        for spec in schema.inputs if named else ():
            if spec.type == DataType.long and spec.name in pdf.columns:
                for i, value in enumerate(pdf[spec.name]):
                    if _missing(value):  # MLflow's integer columns hold no gaps
                        raise contract_error(f"row {i}: {spec.name} is missing: give every row one, or leave the "
                                             f"column out")
                    check_id(value, f"row {i}: {spec.name}")
            elif isinstance(spec.type, Array) and spec.name in pdf.columns:
                # a row without the list: None (MLflow's optional lists), not the NaN a JSON gap becomes
                pdf[spec.name] = [None if _missing(v) else v for v in pdf[spec.name]]
                for i, value in enumerate(pdf[spec.name] if spec.type.dtype == DataType.long else ()):
                    for item in value if isinstance(value, (list, tuple)) else ():
                        check_id(item, f"row {i}: {spec.name}")
        return cast(pdf, schema)

    def one_line_invocations(data, content_type, model, input_schema):
        from mlflow.exceptions import MlflowException

        try:
            return invocations(data, content_type, model, input_schema)
        except MlflowException as exc:
            raise one_line(exc) from None

    scoring_server._decode_json_input = decode_json_input
    proto_json_utils.cast_df_types_according_to_schema = cast_types
    scoring_server.invocations = one_line_invocations
    scoring_server._recsys_hardened = True
    log.info("MLflow scoring server: bad requests answer 400 with a one-line message")
    return True


def one_line(exc):
    """``exc`` (an MlflowException) as a 400 with one line: its own reason, else the last ``Error:`` part of
    MLflow's message (which repeats the request and the schema before it); a stack trace is logged, not sent."""
    reason = getattr(exc, "reason", None)
    if reason is None:
        trace = exc.json_kwargs.get("stack_trace") if hasattr(exc, "json_kwargs") else None
        if trace:
            log.error("the model failed on a request:\n%s", trace)
        message = str(exc.message).strip()
        if "\n" in message or len(message) > 400:  # MLflow's own messages repeat the request before the reason
            message = message.rsplit("Error: ", 1)[-1]
        reason = message
        if len(reason) > 300:
            reason = reason[:300] + "..."
    error = contract_error(reason)
    error.error_code = exc.error_code if exc.get_http_status_code() < 500 else error.error_code
    return error
