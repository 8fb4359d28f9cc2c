import dataclasses
import json
import os

import pytest

from pipeline.config import load_settings, mask_secrets
from pipeline.errors import ConfigError
from pipeline.params import PARAMS, SECTIONS, Params, parse_cli_param, resolve_params


def test_defaults_live_under_the_project_home(tmp_path):
    s = load_settings({"RECSYS_HOME": str(tmp_path)})
    assert s.data_root == tmp_path / "data"
    assert s.cache_dir == tmp_path / "cache"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.spark_master == "local[2]"
    assert s.source == "grouplens:ml-latest-small"
    assert s.s3_bucket is None


def test_environment_overrides_file_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "recsys.toml"
    cfg.write_text('[recsys]\nspark_master = "spark://10.0.0.1:7077"\ns3_bucket = "from-file"\n')
    s = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_SETTINGS_FILE": str(cfg),
                       "RECSYS_S3_BUCKET": "from-env", "MOVIELENS_DIR": str(tmp_path / "ml")})
    assert s.spark_master == "spark://10.0.0.1:7077"
    assert s.s3_bucket == "from-env"
    assert s.source == str(tmp_path / "ml")


def test_settings_file_with_unknown_key_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('sparkmaster = "x"\n')
    with pytest.raises(ConfigError, match="unknown settings.*sparkmaster"):
        load_settings({"RECSYS_SETTINGS_FILE": str(cfg)})


def test_recsys_source_wins_over_movielens_dir(tmp_path):
    s = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_SOURCE": "s3://b/ml", "MOVIELENS_DIR": "/x"})
    assert s.source == "s3://b/ml"


def test_params_resolve_defaults_and_check_types():
    p = resolve_params({"seed": 7, "split_strategy": "temporal", "test_fraction": 0.2})
    assert p.seed == 7 and p.split_strategy == "temporal" and p.test_fraction == 0.2
    assert p.quarantine_threshold == 0.001
    with pytest.raises(ConfigError, match="seed: expected integer"):
        resolve_params({"seed": "x"})
    with pytest.raises(ConfigError, match="not one of"):
        resolve_params({"split_strategy": "chronological"})
    with pytest.raises(ConfigError, match="unknown Params"):
        resolve_params({"sead": 1})
    with pytest.raises(ConfigError, match="above the maximum"):
        resolve_params({"test_fraction": 0.7})
    with pytest.raises(ConfigError, match="at least 10 %"):
        resolve_params({"test_fraction": 0.45, "validation_fraction": 0.45})


def test_cli_param_values_are_json_with_bare_strings_allowed():
    assert parse_cli_param("seed=3") == ("seed", 3)
    assert parse_cli_param("test_fraction=0.2") == ("test_fraction", 0.2)
    assert parse_cli_param("split_strategy=temporal") == ("split_strategy", "temporal")
    assert parse_cli_param('als_ranks=[4, 8]') == ("als_ranks", [4, 8])
    with pytest.raises(ConfigError):
        parse_cli_param("seed")


def test_every_param_has_a_description_and_a_default_that_passes_its_own_check():
    for spec in PARAMS:
        assert spec.description and spec.section in SECTIONS
        spec.check(spec.default)
        json.dumps(spec.json_schema())


def test_every_numeric_param_is_bounded_on_both_sides():
    for spec in PARAMS:
        if {"integer", "number"} & {spec.type, spec.item_type}:
            assert spec.minimum is not None and spec.maximum is not None, spec.name


def test_a_param_given_twice_is_refused_not_settled_by_the_last():
    from pipeline.params import parse_cli_params

    assert parse_cli_params(["seed=1", "test_fraction=0.2"]) == {"seed": 1, "test_fraction": 0.2}
    with pytest.raises(ConfigError, match="seed is given twice"):
        parse_cli_params(["seed=1", "seed=2"])


def test_params_reach_stages_as_a_typed_frozen_object():
    p = resolve_params({"als_ranks": [4, 8]})
    assert isinstance(p, Params) and p.als_ranks == (4, 8) and p.to_dict()["als_ranks"] == [4, 8]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3
    with pytest.raises(AttributeError):
        p.als_rank  # noqa: B018 - a misspelt name fails, it does not fall back to a default
    assert [f.name for f in dataclasses.fields(Params)] == [spec.name for spec in PARAMS]
    assert resolve_params(p.to_dict()) == p


def test_the_form_defaults_submit_as_they_are():
    """Every default passes its own schema, the source included: empty means the configured default."""
    defaults = {spec.name: spec.default for spec in PARAMS}
    assert resolve_params(defaults) == Params()
    assert resolve_params({"source": ""}).source is None and resolve_params({"source": None}).source is None
    source = next(spec for spec in PARAMS if spec.name == "source")
    assert source.json_schema()["type"] == ["null", "string"] and source.default is None


@pytest.mark.parametrize("name, value, message", [
    ("quarantine_threshold", float("nan"), "finite"),
    ("validation_fraction", float("inf"), "finite"),
    ("als_reg_params", [float("nan")], "finite"),
    ("seed", 99999999999999999999999, "above the maximum"),
    ("als_ranks", [2**40], "above the maximum"),
])
def test_params_that_are_not_finite_or_too_large_for_the_engines_are_refused(name, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_params({name: value})


def test_cli_refuses_nan_and_infinity_for_numbers():
    for text in ("quarantine_threshold=NaN", "validation_fraction=Infinity", "als_reg_params=[NaN]"):
        with pytest.raises(ConfigError, match="not a valid"):
            parse_cli_param(text)


def test_secrets_in_uris_are_masked_when_settings_are_printed(tmp_path):
    s = load_settings({"RECSYS_HOME": str(tmp_path),
                       "MLFLOW_TRACKING_URI": "postgresql+psycopg2://mlflow:s3cr3t@db:5432/mlflow"})
    shown = json.dumps(s.public_dict())
    assert "s3cr3t" not in shown and "mlflow:***@db" in shown
    assert mask_secrets("https://u:p@h/x and redis://:pw@r:6379/0") == "https://u:***@h/x and redis://:***@r:6379/0"


def test_environment_reads_live_in_the_settings(tmp_path):
    s = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_SPARK_UI": "true", "RECSYS_SPARK_LOG_LEVEL": "ERROR",
                       "RECSYS_EXPECTATIONS_DIR": str(tmp_path / "suites")})
    assert s.spark_ui is True and s.spark_log_level == "ERROR" and s.suites_dir == tmp_path / "suites"
    with pytest.raises(ConfigError, match="spark_ui"):
        load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_SPARK_UI": "maybe"})


def test_configuring_mlflow_does_not_leak_its_store_into_later_settings(tmp_path, monkeypatch):
    """A long-lived worker configures MLflow for one home, then loads settings for another: the second must
    get its own default store, not the URI MLflow would have exported into the environment."""
    import mlflow

    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_settings({"RECSYS_HOME": str(tmp_path / "a")})
    tracking.configure(first)
    assert mlflow.get_tracking_uri() == first.mlflow_tracking_uri  # MLflow itself uses it
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    second = load_settings(dict(os.environ, RECSYS_HOME=str(tmp_path / "b")))
    assert second.mlflow_tracking_uri != first.mlflow_tracking_uri and "/b/" in second.mlflow_tracking_uri
    # an operator's own setting is kept as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'operator.db'}")
    tracking.configure(load_settings(dict(os.environ)))
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'operator.db'}"
