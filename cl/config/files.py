"""From an experiment file to a validated `ExperimentConfig`: read the YAML, apply the
command line's `--set key.sub=value` overrides, validate the keys (`schema`), then
resolve and check every component (`validation`) before anything runs."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import ValidationError

from cl.config.errors import ConfigError, format_validation_error
from cl.config.schema import ExperimentConfig
from cl.config.validation import validate_components


def read_yaml_mapping(path: str | Path, kind: str = "experiment") -> dict:
    """The top-level mapping of a YAML file; a missing file, bad YAML or anything but a
    mapping is a ConfigError naming the file (`kind`: what the file is, for the message)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: {kind} file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    return raw


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply `key.sub=value` overrides (value parsed as YAML); list items are addressed by index."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key.sub=value")
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
        node = _parent_of(raw, parts, key, source)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key, source)] = value
        else:
            node[last] = value
    return raw


def _parent_of(raw: dict, parts: list[str], key: str, source: str) -> dict | list:
    """The mapping or list that holds the override's last part, made on the way where missing."""
    node = raw
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            slot = _index(part, node, here, source)
        elif isinstance(node, dict):
            slot = part
            if node.get(part) is None:
                node[part] = {}
        else:
            raise ConfigError(f"{source}: --set {key}: '{here}' is not a mapping or list")
        if isinstance(node[slot], str):  # a component given by its name only: expand it
            node[slot] = {"name": node[slot]}
        node = node[slot]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:-1])}' is not a mapping or list")
    return node


def _index(part: str, node: list, where: str, source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{source}: --set {where}: expected a list index below {len(node)}")
    return int(part)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    raw = read_yaml_mapping(path)
    return experiment_from_dict(raw, overrides, str(path), source_file=path)


def experiment_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "<dict>",
                         source_dir: Path | None = None, source_file: Path | None = None) -> ExperimentConfig:
    """An experiment from its keys (what the YAML file holds), checked as a file is; plugin
    modules it names are looked up in `source_dir` (default: the folder of `source_file`, the
    file the keys came from, which MLflow's source tags name) first."""
    if source_file is not None:
        source_file = Path(source_file).resolve()
        source_dir = source_dir if source_dir is not None else source_file.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    raw = apply_overrides(copy.deepcopy(raw), overrides or [], source)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    cfg._source_dir = source_dir
    cfg._source_file = source_file
    validate_components(cfg, source)
    return cfg
