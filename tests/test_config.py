"""Experiment files: validation errors name the file, the key and what was expected."""

import pytest

from cl.config.errors import ConfigError
from cl.config.files import apply_overrides, load_experiment
from cl.config.params import flatten
from cl.config.schema import ExperimentConfig
from conftest import tiny_experiment, write_experiment as write


def experiment(tmp_path, **changes):
    """The file these tests validate: Split-Digits, an MLP of 32, batches of 16; then `changes`."""
    return tiny_experiment(tmp_path, **{"name": "test", "hidden": (32,), "batch_size": 16, **changes})


def error_of(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_experiment(path, overrides)
    return str(err.value)


def test_valid_file_loads(tmp_path):
    cfg = load_experiment(experiment(tmp_path))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.stream.dataset.name == "digits" and cfg.model.args == {"hidden": [32]}
    assert list(cfg.run_specs()) == ["naive"]


def test_unknown_top_level_key(tmp_path):
    path = experiment(tmp_path, epochz=3)
    msg = error_of(path)
    assert str(path) in msg and "epochz" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_expectation(tmp_path):
    msg = error_of(experiment(tmp_path, batch_size="lots"))
    assert "training.batch_size" in msg and "integer" in msg and "'lots'" in msg


def test_unknown_strategy_argument_lists_the_expected_ones(tmp_path):
    path = experiment(tmp_path, strategies=[{"name": "replay", "memory": 10}])
    msg = error_of(path)
    assert "strategies.0.memory" in msg and "memory_size" in msg


def test_strategy_argument_type_is_checked(tmp_path):
    path = experiment(tmp_path, strategies=[{"name": "replay", "policy": "fifo"}])
    msg = error_of(path)
    assert "strategies.0.policy" in msg and "reservoir" in msg


def test_unknown_component_name(tmp_path):
    msg = error_of(experiment(tmp_path, strategies=["magic"]))
    assert "unknown strategies 'magic'" in msg and "replay" in msg
    msg = error_of(experiment(tmp_path, dataset="imagenet"))
    assert "stream.dataset" in msg and "imagenet" in msg


def test_unknown_optimizer_and_its_arguments(tmp_path):
    assert "unknown optimizer 'sgdx'" in error_of(experiment(tmp_path, optimizer={"name": "sgdx", "lr": 0.05}))
    msg = error_of(experiment(tmp_path, optimizer={"name": "sgd", "lr": 0.05, "momentun": 0.9}))
    assert "training.optimizer.momentun" in msg


def test_strategies_or_runs_exactly_one(tmp_path):
    msg = error_of(experiment(tmp_path, runs={"a": ["naive"]}))
    assert "exactly one of 'strategies'" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(write(tmp_path, "name: [unclosed"))
    assert "not found" in error_of(tmp_path / "nope.yaml")


def test_overrides_reach_nested_keys_lists_and_bare_names(tmp_path):
    path = experiment(tmp_path)
    cfg = load_experiment(path, ["seed=7", "training.optimizer.lr=0.5", "model.hidden=[8, 8]",
                                 "strategies.0.name=replay", "strategies.0.memory_size=20",
                                 "stream.dataset.test_fraction=0.5"])
    assert cfg.seed == 7 and cfg.training.optimizer.args["lr"] == 0.5
    assert cfg.model.args["hidden"] == [8, 8]
    assert cfg.strategies[0].name == "replay" and cfg.strategies[0].args == {"memory_size": 20}
    assert cfg.stream.dataset.args == {"test_fraction": 0.5}


def test_bad_overrides(tmp_path):
    path = experiment(tmp_path)
    assert "expected key.sub=value" in error_of(path, ["seed"])
    assert "list index below 1" in error_of(path, ["strategies.3.name=naive"])
    assert "seed" in error_of(path, ["seed=abc"])


def test_apply_overrides_creates_missing_mappings():
    assert apply_overrides({}, ["a.b.c=1"], "x") == {"a": {"b": {"c": 1}}}


def test_flatten_for_mlflow_params():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"name": "x", "k": 2}]})
    assert flat == {"a.b": 1, "a.c": [1, 2], "d.0.name": "x", "d.0.k": 2}


def test_online_stream_must_be_one_pass(tmp_path):
    path = experiment(tmp_path, epochs=3)
    msg = error_of(path, ["stream.online.experience_size=10"])
    assert "online stream is seen once" in msg
