"""Experiment files: YAML in, validated typed objects out.

Every component (dataset, scenario, model, strategy, optimizer, scheduler) is
written as `{name: ..., <its arguments>}`, or just its name. Arguments are
checked against the component's own constructor signature, so an unknown key
or a wrong type is reported with the file, the key path and what was
expected, before anything runs.
"""
from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """An experiment file that cannot be run; the message names file, key and expectation."""


class ComponentSpec(BaseModel):
    """`name` picks the component; every other key is an argument to it."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OnlineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experience_size: int = Field(ge=1, description="samples per online experience")


class StreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: ComponentSpec | None = None
    scenario: ComponentSpec = ComponentSpec(name="class_incremental")
    blurry: float = Field(0.0, ge=0.0, lt=1.0, description="share of each experience handed to the next")
    online: OnlineConfig | None = None
    seed: int | None = Field(None, description="seed of the stream (class order, permutations, blur, "
                                               "online cuts); default: the run's seed")
    first_experiences: int | None = Field(None, ge=1, description="keep only the first k experiences "
                                                                  "(tuning without the tasks to come)")
    validation: float | None = Field(None, gt=0.0, lt=1.0, description="hold this share of each experience's "
                                     "training data out and evaluate on it instead of the test sets")


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: ComponentSpec = ComponentSpec(name="sgd", lr=0.01)
    scheduler: ComponentSpec | None = None
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    scheduler_scope: Literal["run", "experience"] = Field(
        "run", description="'experience': the scheduler is rebuilt, from the LR it started with, at every "
                           "experience; an argument given as the string 'steps' gets the number of scheduler "
                           "steps that experience will take")
    eval_every: int | None = Field(None, ge=1, description="also evaluate every N iterations: the curve of "
                                   "continual evaluation (anytime accuracy, min-ACC, WC-ACC, stability gap)")
    curve_tasks: Literal["seen_and_next", "all"] = Field(
        "seen_and_next", description="what the every-N-iterations evaluation covers: the tasks seen so far and "
                                     "the next experience's, or every task")
    checkpoint_every: int | None = Field(None, ge=1, description="with --checkpoint-dir, also checkpoint every "
                                                                  "N iterations inside an experience")
    lr_log_every: int = Field(50, ge=1, description="log the LR of every parameter group every N iterations")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN or infinite training loss: 'stop' fails the run naming the experience and "
                            "iteration; 'skip' drops that step and counts it (skipped_steps)")

    @model_validator(mode="after")
    def _steps_need_experience_scope(self):
        if self.scheduler is not None and self.scheduler_scope == "run" and "steps" in self.scheduler.args.values():
            raise ValueError("a scheduler argument of 'steps' needs scheduler_scope: experience "
                             "(the run's total steps are not known before it runs)")
        return self


class SweepRange(BaseModel):
    """A continuous range a random search draws from (log-uniformly with `log: true`)."""
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"expected 0 < low < high for a log range, low < high otherwise; got {self.low}, {self.high}")
        return self


class SweepConfig(BaseModel):
    """`cl sweep`: the points to run (a grid, or random draws) and how to choose among them.
    Every trial is scored on a validation split of the training data, never on a test set."""
    model_config = ConfigDict(extra="forbid")
    method: Literal["grid", "random"] = "grid"
    samples: int | None = Field(None, ge=1, description="random search: how many points to draw")
    parameters: dict[str, list[Any] | SweepRange] = Field(description="config key -> values (or a range to draw "
                                                                      "from); 'seed' sweeps seeds")
    validation: float = Field(0.1, gt=0.0, lt=1.0, description="share of each experience's training data the "
                                                               "objective is measured on")
    protocol: Literal["whole_stream", "first_experiences"] = Field(
        "whole_stream", description="tune on the whole stream, or on its first k experiences only (no peeking "
                                    "at the tasks to come), then run the whole stream with the chosen point")
    first_experiences: int | None = Field(None, ge=1, description="k, for protocol: first_experiences")
    objective: str = Field("acc", description="the trial's metric to choose by (mean over seeds)")
    mode: Literal["max", "min"] = "max"
    final_run: bool = Field(True, description="run the chosen point on the whole stream and its test sets")
    seed: int = Field(0, description="random search's draws")

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "grid" and any(isinstance(v, SweepRange) for v in self.parameters.values()):
            raise ValueError("a grid takes lists of values; ranges are for method: random")
        if self.method == "random" and self.samples is None:
            raise ValueError("method: random needs 'samples'")
        if (self.protocol == "first_experiences") != (self.first_experiences is not None):
            raise ValueError("protocol: first_experiences goes with first_experiences: k (and only with it)")
        if any(isinstance(v, list) and not v for v in self.parameters.values()):
            raise ValueError("every swept parameter needs at least one value")
        return self


class ExperimentConfig(BaseModel):
    """A whole experiment file. Either `strategies` (one run) or `runs` (label -> strategies)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="MLflow experiment name")
    seed: int = 0
    seeds: list[int] | None = Field(None, min_length=1, description="run every run of the file once per seed "
                                                                    "(overrides 'seed'); `cl run --seeds 0,1,2`")
    device: str = "auto"
    data_dir: str | None = None
    threads: int | None = Field(None, ge=1, description="torch's CPU threads (default: the cores this "
                                                        "process may use, by affinity and cgroup quota)")
    progress: bool = Field(True, description="false: print nothing but the final result")
    stream: StreamConfig
    model: ComponentSpec
    training: TrainingConfig = TrainingConfig()
    strategies: list[ComponentSpec] | None = None
    runs: dict[str, list[ComponentSpec]] | None = None
    sweep: SweepConfig | None = Field(None, description="what `cl sweep` runs; `cl run` ignores it")
    # The experiment file's folder: plugin modules it names are looked up there first.
    _source_dir: Path | None = PrivateAttr(default=None)
    _source_file: Path | None = PrivateAttr(default=None)  # the YAML file, for MLflow's source tags

    @property
    def source_dir(self) -> Path | None:
        return self._source_dir

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    def run_seeds(self) -> list[int]:
        """The seeds every run of the file goes through: `seeds`, else just `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]

    def with_seed(self, seed: int) -> "ExperimentConfig":
        """This experiment at one seed (plugin folder and source file kept)."""
        cfg = self.model_copy(update={"seed": seed, "seeds": None})
        cfg._source_dir, cfg._source_file = self._source_dir, self._source_file
        return cfg

    @field_validator("runs", mode="before")
    @classmethod
    def _single_strategy_runs(cls, v):
        # `runs: {naive: naive}` is a run of one strategy.
        return {k: ss if isinstance(ss, list) else [ss] for k, ss in v.items()} if isinstance(v, dict) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str):
        if v != "auto" and v.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError("expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
        return v

    @model_validator(mode="after")
    def _one_of_strategies_or_runs(self):
        if (self.strategies is None) == (self.runs is None):
            raise ValueError("give exactly one of 'strategies' (one run) or 'runs' (several runs to compare)")
        if self.runs is not None and not self.runs:
            raise ValueError("'runs' is empty")
        return self

    @model_validator(mode="after")
    def _online_is_one_pass(self):
        if self.stream.online is not None and self.training.epochs != 1:
            raise ValueError("an online stream is seen once: training.epochs must be 1")
        return self

    @property
    def stream_seed(self) -> int:
        return self.seed if self.stream.seed is None else self.stream.seed

    def run_specs(self) -> dict[str, list[ComponentSpec]]:
        """Label -> strategies of every run this experiment makes."""
        if self.runs is not None:
            return dict(self.runs)
        return {"+".join(s.name for s in self.strategies) or "naive": list(self.strategies)}


# ---------------------------------------------------------------- loading
def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply `key.sub=value` overrides (value parsed as YAML); list items are addressed by index."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key.sub=value")
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
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
        last = parts[-1]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:-1])}' is not a mapping or list")
        if isinstance(node, list):
            node[_index(last, node, key, source)] = value
        else:
            node[last] = value
    return raw


def _index(part: str, node: list, where: str, source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{source}: --set {where}: expected a list index below {len(node)}")
    return int(part)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid experiment"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


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


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    raw = read_yaml_mapping(path)
    cfg = experiment_from_dict(raw, overrides, str(path), path.resolve().parent)
    cfg._source_file = path.resolve()
    return cfg


def experiment_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "<dict>",
                         source_dir: Path | None = None) -> ExperimentConfig:
    """An experiment from its keys (what the YAML file holds), checked as a file is; plugin
    modules it names are looked up in `source_dir` first."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    raw = apply_overrides(copy.deepcopy(raw), overrides or [], source)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    cfg._source_dir = source_dir
    validate_components(cfg, source)
    return cfg


# ------------------------------------------------ component argument checks
def _is_callable_hint(hint) -> bool:
    """Whether an annotation asks for a callable (`Callable`, `Callable[...]`, `X | Callable`)."""
    import collections.abc

    if hint is typing.Callable or hint is collections.abc.Callable:
        return True
    origin = typing.get_origin(hint)
    if origin is collections.abc.Callable:
        return True
    return any(_is_callable_hint(a) for a in typing.get_args(hint)) if origin is not None else False


def coerce_arguments(target: Callable, args: dict, where: str, source: str,
                     injected: set[str] = frozenset()) -> dict[str, Any]:
    """Check `args` against `target`'s signature and return them converted to the annotated
    types (YAML's `1e-3` string becomes the float an optimizer needs). Unknown names, wrong
    types and unresolvable `module:attr` values for callable arguments are ConfigErrors that
    name the file, the key and what was expected."""
    from cl.config.registry import ForbiddenComponentError, UnknownComponentError, import_path

    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(args)
    params = {n: p for n, p in sig.parameters.items()
              if n not in injected and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in args if k not in params and k != "name"]
    if unknown and not takes_any:
        expected = ", ".join(params) or "no arguments"
        raise ConfigError(f"{source}: {where}.{unknown[0]}: unknown key (expected one of: {expected})")
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    out = {k: v for k, v in args.items() if k != "name"}
    fields = {}
    for n, p in params.items():
        if n not in out:
            continue
        hint = hints.get(n, Any)
        if _is_callable_hint(hint) and isinstance(out[n], str):
            if ":" not in out[n]:
                raise ConfigError(f"{source}: {where}.{n}: expected a 'package.module:function' path, "
                                  f"got {out[n]!r}")
            # A scenario may accept functions of another library for an argument (avalanche's benchmarks).
            extra = getattr(target, "trusted_callables", {}).get(n, ())
            try:
                out[n] = import_path(out[n], f"{where}.{n}", slot="factory", extra_modules=extra)
            except (UnknownComponentError, ForbiddenComponentError) as err:
                raise ConfigError(f"{source}: {where}.{n}: {err}") from None
        default = ... if p.default is p.empty else p.default
        fields[n] = (hint, default)
    if not fields:
        return out
    model = create_model("Args", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
    try:
        checked = model.model_validate({k: out[k] for k in fields})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise ConfigError(f"{source}: {where}.{key}: {e['msg']} (got {e.get('input')!r})") from None
    out.update({k: getattr(checked, k) for k in fields})
    return out


def validate_components(cfg: ExperimentConfig, source: str) -> None:
    """Resolve every component name and check its arguments, before any data is loaded."""
    from cl.config.registry import plugins_from

    with plugins_from(cfg.source_dir):
        _validate_components(cfg, source)


def _validate_components(cfg: ExperimentConfig, source: str) -> None:
    from cl.config.registry import (DATASETS, MODELS, SCENARIOS, STRATEGIES, ForbiddenComponentError,
                             UnknownComponentError, optimizer_class, scenario_takes_data, scheduler_class)

    def resolve(registry, spec, where):
        try:
            return registry.get(spec.name)
        except (UnknownComponentError, ForbiddenComponentError) as err:
            raise ConfigError(f"{source}: {where}.name: {err}") from None

    scenario = resolve(SCENARIOS, cfg.stream.scenario, "stream.scenario")
    coerce_arguments(scenario, cfg.stream.scenario.args, "stream.scenario", source, SCENARIO_INJECTED)
    if scenario_takes_data(scenario):
        if cfg.stream.dataset is None:
            raise ConfigError(f"{source}: stream.dataset: required key is missing "
                              f"(scenario '{cfg.stream.scenario.name}' splits one dataset)")
        coerce_arguments(resolve(DATASETS, cfg.stream.dataset, "stream.dataset"), cfg.stream.dataset.args,
                         "stream.dataset", source, {"data_dir"})
    elif cfg.stream.dataset is not None:
        raise ConfigError(f"{source}: stream.dataset: scenario '{cfg.stream.scenario.name}' takes its datasets "
                          f"as its own argument; remove stream.dataset")
    from cl.config.models import lab_loads_weights

    # `weights` is a file the lab loads into the built model (cl.models.load_backbone_weights),
    # unless the model's class takes a `weights` argument itself.
    if cfg.model.name in MODELS or ":" in cfg.model.name:
        cls = resolve(MODELS, cfg.model, "model")
        lab_args = {"multihead"} | ({"weights"} if lab_loads_weights(cfg.model.name) else set())
        args = {k: v for k, v in cfg.model.args.items() if k not in lab_args}
        coerce_arguments(cls, args, "model", source, MODEL_INJECTED)
    weights = cfg.model.args.get("weights")
    if weights is not None and not isinstance(weights, str) and lab_loads_weights(cfg.model.name):
        raise ConfigError(f"{source}: model.weights: expected the path of a weights file, got {weights!r}")
    for label, specs in cfg.run_specs().items():
        for i, spec in enumerate(specs):
            where = f"runs.{label}.{i}" if cfg.runs is not None else f"strategies.{i}"
            coerce_arguments(resolve(STRATEGIES, spec, where), spec.args, where, source)
    try:
        coerce_arguments(optimizer_class(cfg.training.optimizer.name), cfg.training.optimizer.args,
                         "training.optimizer", source, {"params"})
        if cfg.training.scheduler is not None:
            # 'steps' is filled in per experience; check the rest with a stand-in number.
            args = {k: 1 if v == "steps" else v for k, v in cfg.training.scheduler.args.items()}
            coerce_arguments(scheduler_class(cfg.training.scheduler.name), args, "training.scheduler", source,
                             {"optimizer"})
    except LookupError as err:
        raise ConfigError(f"{source}: training: {err}") from None


#: Arguments the lab passes to a scenario, a model itself; a file may not set them.
SCENARIO_INJECTED = frozenset({"data", "seed", "data_dir", "load_dataset"})
MODEL_INJECTED = frozenset({"input_shape", "n_classes", "num_classes"})


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {'a.b.0.c': value} for MLflow params."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out
