import json
import os

import pytest

from pipeline.errors import ConfigError
from pipeline.params import PARAMS, parse_cli_param, resolve_params
from pipeline.settings import load_settings


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
    assert p["seed"] == 7 and p["split_strategy"] == "temporal" and p["test_fraction"] == 0.2
    assert p["quarantine_threshold"] == 0.001
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
        assert spec.description
        spec.check(spec.default)
        json.dumps(spec.json_schema())


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
