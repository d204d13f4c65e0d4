"""From an experiment file to a validated `ExperimentConfig`: read the YAML, apply the
command line's `--set key.sub=value` overrides, validate the keys (`schema`), then
resolve and check every component (`validation`) before anything runs."""
from __future__ import annotations

import copy
import math
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
    with path.open("rb") as f:
        text = f.read(MAX_FILE_BYTES + 1)
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB: {kind} files hold settings, not "
                          f"data (keep data in files of their own)")
    try:
        raw = load_yaml(text, source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    refuse_nonfinite(raw, source)
    return raw


#: An experiment file holds settings, not data: a larger file is refused before it is read.
MAX_FILE_BYTES = 1 << 20
#: The values a YAML document may hold once its aliases are expanded (each `*a` counts all
#: that `&a` holds): nested aliases that would multiply a small file are refused, not built.
MAX_EXPANDED_NODES = 1_000_000


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last would win unseen)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, which keys may override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the safe loader's own error names it
                    continue
                if earlier is not key_node:
                    raise ConfigError(f"{self.source}: line {key_node.start_mark.line + 1}: key '{key}' is given "
                                      f"twice in one mapping (first on line {earlier.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def load_yaml(text: str | bytes, source: str):
    """One YAML document, loaded safely: aliases that expand past `MAX_EXPANDED_NODES` values,
    an alias inside what it names, or a key given twice in one mapping are ConfigErrors
    naming `source` (and the line)."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deep to be an experiment's settings") from None
    finally:
        loader.dispose()


def _expanded_size(root, source: str) -> int:
    """How many values the YAML node graph `root` holds with every alias expanded, counted
    without expanding it (each node once); a ConfigError past `MAX_EXPANDED_NODES`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        line = node.start_mark.line + 1
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: line {line}: an alias inside the very value it names (a value that "
                              f"holds itself); write the value out")
        open_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                raise ConfigError(f"{source}: line {line}: its aliases expand to over {MAX_EXPANDED_NODES:,} "
                                  f"values (aliases of aliases multiply); refused, write the values out")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def refuse_nonfinite(value, source: str, where: str = "", prefix: str = "") -> None:
    """A ConfigError naming the key path (`training.optimizer.lr`) of the first NaN or infinite
    number in `value`, or a string that reads as one (`1e400`), which an argument's type would
    turn into one."""
    stack = [(where, value)]
    seen: set[int] = set()
    while stack:
        path, v = stack.pop()
        if isinstance(v, (dict, list)):
            if id(v) in seen:
                continue
            seen.add(id(v))
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in reversed(list(items)))
            continue
        if isinstance(v, bool) or not isinstance(v, (float, str)):
            continue
        try:
            number = float(v)
        except (ValueError, OverflowError):
            continue
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {prefix}{path or '(value)'}: expected a finite number, got {v!r}")


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply `key.sub=value` overrides (value parsed as YAML); list items are addressed by index."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key.sub=value")
        try:
            value = load_yaml(text, f"{source}: --set {key}") if text else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: --set {key}: not valid YAML: {err}") from None
        refuse_nonfinite(value, source, key, "--set ")
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
    refuse_nonfinite(raw, source)
    raw = apply_overrides(copy.deepcopy(raw), overrides or [], source)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    cfg._source_dir = source_dir
    cfg._source_file = source_file
    validate_components(cfg, source)
    return cfg
