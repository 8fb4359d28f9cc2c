"""The served-model contract (pipeline.serving.contract, served_ranker) on tiny models logged to a real MLflow
store: signatures, one list per row, the popularity fallback, and one-line 400s through MLflow's scoring code
(its ``invocations``, in process; tests/integration/test_serving_http.py sends the same over HTTP)."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import tracking
from pipeline.models.factor_model import FactorModel
from pipeline.models.item_item import ItemItemModel
from pipeline.serving import contract
from pipeline.serving.served_ranker import ServedRanker

MOVIES = pd.DataFrame({"movie_id": [10, 20, 30, 40, 50], "title": ["Ten", "Twenty", "Thirty", "Forty", "Fifty"],
                       "genres": [["Drama"]] * 5})
# user 1 rated 10 and 20; user 2 rated 10; user 3 rated 30, 40, 50; popularity: 10 (2), then 30, 40, 50, 20 by id
RATINGS = pd.DataFrame({"user_id": [1, 1, 2, 3, 3, 3], "movie_id": [10, 20, 10, 30, 40, 50],
                        "rating": [5.0, 3.0, 4.0, 4.0, 2.0, 5.0]})
WEIGHTS = np.array([[0, 0, 3, 2, 1], [0, 0, 0, 0, 4], [1, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 5, 0]], np.float32)


def _ease() -> ItemItemModel:
    return ItemItemModel("ease", MOVIES.movie_id.to_numpy(), WEIGHTS, meta={"input": "binary"})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The EASE ranker and a factor model logged as the pipeline logs its candidates, loaded back."""
    from pipeline.config import load_settings

    tracking.configure(load_settings({"RECSYS_HOME": str(tmp_path_factory.mktemp("served") / "home")}))
    rng = np.random.default_rng(0)
    factor = FactorModel("als", np.array([1, 2, 3]), MOVIES.movie_id.to_numpy(), rng.normal(size=(3, 2)),
                         rng.normal(size=(5, 2)), offset=3.5)
    with mlflow.start_run():
        ease = tracking.log_model(_ease(), RATINGS, MOVIES, rating=False)
        als = tracking.log_model(factor, RATINGS, MOVIES)
    assert ease["model"] is None and als["model"] and als["ranker"]
    return {"ranker": mlflow.pyfunc.load_model(ease["ranker"]), "als_ranker": mlflow.pyfunc.load_model(als["ranker"]),
            "rating": mlflow.pyfunc.load_model(als["model"]), "factor": factor}


def test_both_models_carry_their_signature_params_schema_and_input_example(served):
    ranker = served["ranker"].metadata
    assert [c.name for c in ranker.get_input_schema().inputs] == ["user_id", "history", "ratings"]
    assert not any(c.required for c in ranker.get_input_schema().inputs)
    assert [c.name for c in ranker.get_output_schema().inputs] == list(contract.RANKER_OUTPUTS)
    (k,) = ranker.get_params_schema().params
    assert (k.name, k.dtype.name, k.default) == ("k", "long", 10)
    rating = served["rating"].metadata
    assert [(c.name, c.type.name, c.required) for c in rating.get_input_schema().inputs] == [
        ("user_id", "long", True), ("movie_id", "long", True)]
    assert ranker.saved_input_example_info and rating.saved_input_example_info


def test_the_ranker_answers_one_list_per_row_with_titles_scores_and_k(served):
    ranker = served["ranker"]
    frame = pd.DataFrame({"user_id": [1, 1, 98], "history": [None, [30], [40]]})
    out = ranker.predict(frame, params={"k": 2})
    assert out.groupby("row").size().to_dict() == {0: 2, 1: 2, 2: 2}
    first = out[out.row == 0]
    # user 1's stored history {10, 20}: scores 30 -> 3, 40 -> 2, 50 -> 1 + 4; both rated movies left out
    assert first.movie_id.tolist() == [50, 30] and first.score.tolist() == [5.0, 3.0]
    assert first.title.tolist() == ["Fifty", "Thirty"] and set(first.source) == {"model"}
    second = out[out.row == 1]  # the same user with their own history this time: its own list
    assert second.movie_id.tolist()[0] == 10 and 30 not in second.movie_id.tolist()
    third = out[out.row == 2]
    assert third.user_id.tolist() == [98, 98] and third.movie_id.tolist()[0] == 20
    assert len(ranker.predict(frame.iloc[:1])) == 3  # k 10 by default: every movie user 1 has not rated


def test_an_empty_or_unknown_history_gets_the_popularity_list_as_a_new_user_does(served):
    from pipeline.models.popularity import popular_movies
    from pipeline.serving.recommend import recommend_cold_user

    ranker = served["ranker"]
    out = ranker.predict(pd.DataFrame({"user_id": [99, 98, 1], "history": [None, [999], []]}), params={"k": 3})
    cold = recommend_cold_user(popular_movies(RATINGS, MOVIES), 3, [])
    for row in (0, 2):  # an unknown user without history; a known user with an empty history
        listed = out[out.row == row]
        assert listed.movie_id.tolist() == cold.movie_id.tolist() and set(listed.source) == {"popularity"}
    unknown = out[out.row == 1]  # a history of a movie the model does not know: popularity, that movie left out
    assert set(unknown.source) == {"popularity"} and 999 not in unknown.movie_id.tolist()


def test_a_factor_model_ranker_lists_known_users_and_gives_new_ones_popularity(served):
    out = served["als_ranker"].predict(pd.DataFrame({"user_id": [3, 97], "history": [None, [10]]}),
                                       params={"k": 2})
    known = out[out.row == 0]
    expected = served["factor"].top_k([3], 2, exclude={3: {30, 40, 50}})[3]
    assert known.movie_id.tolist() == expected and set(known.source) == {"model"}
    assert set(out[out.row == 1].source) == {"popularity"}


def test_the_rating_model_predicts_one_rating_per_row(served):
    frame = pd.DataFrame({"user_id": [1, 2, 3], "movie_id": [30, 40, 10]})
    out = served["rating"].predict(frame)
    assert np.allclose(out, served["factor"].predict_all(frame.user_id, frame.movie_id))


@pytest.mark.parametrize("frame,params,message", [
    (pd.DataFrame({"user_id": [1]}), {"k": 0}, "param k must be a whole number from 1 to 100"),
    (pd.DataFrame({"user_id": [1]}), {"k": 101}, "param k must be a whole number from 1 to 100"),
    (pd.DataFrame({"history": [[10]], "ratings": [[4.0, 5.0]]}), None, "one rating per history movie"),
    (pd.DataFrame({"history": [[10]], "ratings": [[7.0]]}), None, "ratings must be numbers from 0 to 5"),
], ids=["k-0", "k-101", "ratings-length", "rating-7"])
def test_bad_ranker_input_is_refused_in_one_line(served, frame, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as info:
        served["ranker"].predict(frame, params=params)
    assert info.value.get_http_status_code() == 400 and "\n" not in info.value.message


def test_checks_of_rows_name_the_row_and_column():
    with pytest.raises(Exception, match="row 1: user_id must be a whole number >= 0, got 1.5"):
        contract.rating_rows(pd.DataFrame({"user_id": [1.0, 1.5], "movie_id": [1, 2]}))
    with pytest.raises(Exception, match="missing input column"):
        contract.rating_rows(pd.DataFrame({"user_id": [1]}))
    with pytest.raises(Exception, match="row 0: history must be a whole number >= 0, got 'x'"):
        contract.ranker_rows(pd.DataFrame({"history": [["x"]]}))
    with pytest.raises(Exception, match="row 0: needs a user_id or a history"):
        contract.ranker_rows(pd.DataFrame({"user_id": [None], "history": [None]}))
    assert contract.ranker_rows(pd.DataFrame({"user_id": [2], "history": [[1, 2]]})) == [(2, [1, 2], None)]


# --- through MLflow's scoring code ------------------------------------------------------------------------


@pytest.fixture
def scoring(served, monkeypatch):
    """MLflow's ``invocations`` hardened as ``mlflow models serve`` hardens it (restored afterwards)."""
    from mlflow.pyfunc import scoring_server
    from mlflow.utils import proto_json_utils

    for module, name in ((scoring_server, "_decode_json_input"), (scoring_server, "invocations"),
                         (proto_json_utils, "cast_df_types_according_to_schema")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(scoring_server, "_recsys_hardened", False, raising=False)
    assert contract._harden()

    def call(model: str, body) -> tuple[int, dict]:
        loaded = served[model]
        payload = body if isinstance(body, str) else json.dumps(body)
        try:
            answer = scoring_server.invocations(payload, "application/json", loaded,
                                                loaded.metadata.get_input_schema())
            return answer.status, json.loads(answer.response)
        except Exception as exc:  # what the server's handler turns into the HTTP answer
            return exc.get_http_status_code(), json.loads(exc.serialize_as_json())
    return call


@pytest.mark.parametrize("model,body,message", [
    ("rating", {"dataframe_records": [{"user_id": 1.5, "movie_id": 30}]}, "row 0: user_id must be a whole number"),
    ("rating", {"dataframe_records": [{"user_id": 1}]}, "missing inputs"),
    ("rating", {"dataframe_records": [{"user_id": 1, "movie_id": 30, "title": "x"}]}, "unknown input column(s) title"),
    ("ranker", {"dataframe_records": [{"user_id": 1, "movie_id": 30}]}, "unknown input column(s) movie_id"),
    ("ranker", {"dataframe_records": [{"user_id": 1}], "params": {"k": "five"}}, "Can not safely convert"),
    ("ranker", {"dataframe_records": [{"user_id": 1}], "params": {"k": 500}}, "param k must be a whole number"),
    ("ranker", {"dataframe_records": [{"history": [10.5]}]}, "history"),
    ("ranker", "[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
    ("ranker", {"dataframe_records": [{"user_id": 1}, {"history": [40]}]}, "row 1: user_id is missing"),
    ("rating", "not json", "the request body is not JSON in UTF-8 (JSONDecodeError"),
    ("rating", "[1, 2]", "Received a list"),
    ("rating", {"inputs": [[[[[1]]]]]}, "Must pass 2-d input"),
], ids=["float-id", "missing-column", "extra-column", "rating-input-to-ranker", "k-text", "k-500", "float-history",
        "deep-json", "user-id-gap",
        "not-json", "json-list", "nested-inputs"])
def test_bad_requests_get_a_400_with_one_line_and_no_stack_trace(scoring, model, body, message):
    status, answer = scoring(model, body)
    assert status == 400, answer
    assert message in answer["message"] and "\n" not in answer["message"], answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]


def test_the_documented_requests_get_their_answers(scoring):
    rows = [{"user_id": 1}, {"user_id": 98, "history": [40], "ratings": [4.5]}]
    status, answer = scoring("ranker", {"dataframe_records": rows, "params": {"k": 2}})
    assert status == 200, answer
    assert [(r["row"], r["rank"], r["movie_id"], r["title"]) for r in answer["predictions"]] == [
        (0, 1, 50, "Fifty"), (0, 2, 30, "Thirty"), (1, 1, 20, "Twenty"), (1, 2, 10, "Ten")]
    status, answer = scoring("rating", {"dataframe_split": {"columns": ["user_id", "movie_id"], "data": [[1, 30]]}})
    assert status == 200 and len(answer["predictions"]) == 1


def test_served_ranker_round_trips_its_files(tmp_path):
    served = ServedRanker.build(_ease(), RATINGS, MOVIES)
    loaded = ServedRanker.load(served.save(tmp_path / "ranker"))
    rows = [(1, None, None), (None, [40], [4.5])]
    pd.testing.assert_frame_equal(loaded.answer(rows, 3), served.answer(rows, 3))
