"""The least a split must hold for the models (``protocol.require_enough_data``), on hand-made splits."""

import pytest

from pipeline import storage
from pipeline.errors import DataValidationError
from pipeline.models.protocol import Split, require_enough_data
from stage_inputs import ratings_frame

# users 1 and 2 share movies 10 and 11 in training; validation and test hold one rating each
TRAIN = [(1, 10, 4.0, 1), (1, 11, 3.0, 2), (2, 10, 5.0, 3), (2, 11, 2.0, 4), (2, 12, 4.0, 5)]
VALIDATION = [(1, 12, 4.5, 6)]
TEST = [(2, 13, 4.0, 7)]


def _split(tmp_path, train=TRAIN, validation=VALIDATION, test=TEST):
    etl = tmp_path / "etl"
    storage.write_manifest(etl, "etl", {}, fractions={"validation": 0.1, "test": 0.1})
    return Split(ratings_frame(train), ratings_frame(validation), ratings_frame(test), summary={}), etl


def test_a_split_with_one_of_each_need_passes_with_its_counts(tmp_path):
    split, etl = _split(tmp_path)
    assert require_enough_data(split, etl) == {"validation": 1, "test": 1, "validation_known": 1,
                                               "validation_relevant_users": 1, "test_relevant_users": 1}


SHORT = [
    pytest.param({"validation": []}, ["0 validation ratings (at least 1", "validation_fraction=0.1",
                                      "at most 4 ratings"], id="no-validation"),
    pytest.param({"test": []}, ["0 test ratings (at least 1", "test_fraction=0.1"], id="no-test"),
    pytest.param({"validation": [(1, 99, 4.5, 6)]}, ["0 validation ratings whose user and movie are in the training "
                                                     "split (at least 1"], id="validation-movie-unseen"),
    pytest.param({"validation": [(1, 12, 3.5, 6)]}, ["0 users with a validation rating >= 4 (at least 1"],
                 id="no-relevant-validation"),
    pytest.param({"test": [(2, 13, 1.0, 7)]}, ["0 users with a test rating >= 4 (at least 1"], id="no-relevant-test"),
]


@pytest.mark.parametrize("change, named", SHORT)
def test_a_split_short_of_a_need_is_refused_naming_the_count_and_the_minimum(tmp_path, change, named):
    split, etl = _split(tmp_path, **change)
    with pytest.raises(DataValidationError) as refused:
        require_enough_data(split, etl)
    message = str(refused.value)
    assert message.startswith(f"too little data for the models in {etl}: 2 users, ")
    for name in named:
        assert name in message, message
    assert message.count("(at least 1") == 1  # an empty split's other counts are not named again
